/**
 * Thread models enforced across connections, and contexts a filter opens outside any connection.
 */
import { describe, expect, it } from 'vitest';
import { NbdClient } from '@nbdx/client';
import { servePlugin } from '@nbdx/testkit';
import type { ThreadModel } from '../api/common.js';
import { defineFilter, definePlugin } from '../api/define.js';
import type { Next } from '../api/filter/next.js';

/** A plugin whose reads take a while and that records the most calls it saw at once. */
function overlapPlugin(model: ThreadModel) {
  const stats = { now: 0, max: 0, opens: 0, closes: 0 };
  const plugin = definePlugin({
    apiVersion: 2,
    name: 'overlap',
    threadModel: model,
    open: () => ({ id: ++stats.opens }),
    close: () => void stats.closes++,
    getSize: () => 1 << 20,
    pread: async (_h, buf) => {
      stats.now++;
      stats.max = Math.max(stats.max, stats.now);
      await new Promise((r) => setTimeout(r, 5));
      buf.fill(1);
      stats.now--;
    },
  });
  return { plugin, stats };
}

async function hammer(uri: string, clients: number, perClient: number): Promise<void> {
  await Promise.all(
    Array.from({ length: clients }, async () => {
      const c = await NbdClient.connect(uri);
      await Promise.all(Array.from({ length: perClient }, (_, i) => c.pread(512, i * 512)));
      await c.disconnect();
    }),
  );
}

/** A filter that opens one context below at start-up and serves every connection from it. */
function oneContextFilter() {
  let shared: (Next & { close(): Promise<void> }) | null = null;
  return defineFilter({
    apiVersion: 2,
    name: 'one-context',
    afterStart: async (below) => {
      shared = await below.openContext({ readonly: false });
    },
    open: (next) => next.use(shared!),
    unload: async () => shared?.close(),
  });
}

describe('thread models', () => {
  it('parallel: requests overlap, within and across connections', async () => {
    const { plugin, stats } = overlapPlugin('parallel');
    const s = await servePlugin(plugin);
    await hammer(s.uri, 2, 8);
    await s.close();
    expect(stats.max).toBeGreaterThan(1);
  });

  it('serialize_requests: one at a time per connection, but connections overlap', async () => {
    const { plugin, stats } = overlapPlugin('serialize_requests');
    const s = await servePlugin(plugin);
    await hammer(s.uri, 1, 8);
    expect(stats.max).toBe(1);
    await hammer(s.uri, 4, 8);
    expect(stats.max).toBeGreaterThan(1);
    await s.close();
  });

  it('serialize_all_requests: one at a time in the whole server', async () => {
    const { plugin, stats } = overlapPlugin('serialize_all_requests');
    const s = await servePlugin(plugin);
    await hammer(s.uri, 4, 8);
    await s.close();
    expect(stats.max).toBe(1);
  });

  it('a serialize_requests plugin behind a context shared by all connections is serialised across them', async () => {
    const { plugin, stats } = overlapPlugin('serialize_requests');
    const s = await servePlugin(plugin, { filters: [oneContextFilter()] });
    await hammer(s.uri, 4, 8);
    await s.close();
    expect(stats.max).toBe(1);
  });
});

describe('contexts opened outside connections', () => {
  it('ten clients, one plugin open; closed once at shutdown', async () => {
    const { plugin, stats } = overlapPlugin('parallel');
    const s = await servePlugin(plugin, { filters: [oneContextFilter()] });
    expect(stats.opens).toBe(1);
    await hammer(s.uri, 10, 2);
    expect(stats.opens).toBe(1);
    expect(stats.closes).toBe(0);
    await s.close();
    expect(stats.closes).toBe(1);
  });

  it('without the filter, one open and close per connection', async () => {
    const { plugin, stats } = overlapPlugin('parallel');
    const s = await servePlugin(plugin);
    await hammer(s.uri, 10, 2);
    await s.close();
    expect(stats.opens).toBe(10);
    expect(stats.closes).toBe(10);
  });
});
