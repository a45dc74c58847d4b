/**
 * Next.reopen: a filter replaces the connection's context below it by a fresh one (what the
 * retry filter is built on).
 */
import { describe, expect, it } from 'vitest';
import { Errno, NbdError } from '../api/common.js';
import { defineFilter, definePlugin } from '../api/define.js';
import type { Next } from '../api/filter/next.js';
import { Backend } from './backend.js';

/** A plugin whose handles are numbered, so a test can see which one served a request. */
function numberedPlugin(opts: { sizes?: number[] } = {}) {
  const log: string[] = [];
  let opened = 0;
  const plugin = definePlugin({
    apiVersion: 2,
    name: 'numbered',
    open: (readonly) => {
      opened += 1;
      log.push(`open ${opened}${readonly ? ' ro' : ''}`);
      return { n: opened };
    },
    close: (h: { n: number }) => void log.push(`close ${h.n}`),
    getSize: (h: { n: number }) => opts.sizes?.[h.n - 1] ?? 4096,
    pread: (h: { n: number }, buf) => void buf.fill(h.n),
    pwrite: () => {},
  });
  return { plugin, log };
}

/** A filter that exposes the `next` it was last given, and reopens on request. */
function reopeningFilter() {
  const seen: { next?: Next } = {};
  const filter = defineFilter({
    apiVersion: 2,
    name: 'reopener',
    pread: (next, _h, buf, offset, flags) => {
      seen.next = next;
      return next.pread(buf, offset, flags);
    },
  });
  return { filter, seen };
}

async function openChain(plugin: ReturnType<typeof numberedPlugin>['plugin'], filter: ReturnType<typeof reopeningFilter>['filter'], readonly = false) {
  const b = new Backend(plugin, [filter]);
  await b.load();
  return b.open(readonly, '', false);
}

describe('Next.reopen', () => {
  it('opens a fresh context below, closes the old one, and later calls get the new one', async () => {
    const { plugin, log } = numberedPlugin();
    const { filter, seen } = reopeningFilter();
    const ctx = await openChain(plugin, filter);
    const buf = Buffer.alloc(4);
    await ctx.pread(buf, 0);
    expect(buf[0]).toBe(1);
    const old = seen.next!;
    const fresh = await old.reopen!();
    expect(fresh).not.toBe(old);
    expect(log).toEqual(['open 1', 'open 2', 'close 1']);
    await ctx.pread(buf, 0);
    expect(buf[0]).toBe(2);
    expect(seen.next).toBe(fresh);
    await ctx.close();
    expect(log).toEqual(['open 1', 'open 2', 'close 1', 'close 2']);
  });

  it('shares one reopen between concurrent callers, and a replaced context answers with its successor', async () => {
    const { plugin, log } = numberedPlugin();
    const { filter, seen } = reopeningFilter();
    const ctx = await openChain(plugin, filter);
    await ctx.pread(Buffer.alloc(1), 0);
    const old = seen.next!;
    const [a, b] = await Promise.all([old.reopen!(), old.reopen!()]);
    expect(a).toBe(b);
    expect(await old.reopen!()).toBe(a);
    expect(log.filter((l) => l.startsWith('open'))).toEqual(['open 1', 'open 2']);
    await ctx.close();
  });

  it('reopens read-only when asked: writes then fail with EPERM', async () => {
    const { plugin, log } = numberedPlugin();
    const { filter, seen } = reopeningFilter();
    const ctx = await openChain(plugin, filter);
    await ctx.pread(Buffer.alloc(1), 0);
    await ctx.pwrite(Buffer.alloc(1), 0);
    const fresh = await seen.next!.reopen!({ readonly: true });
    expect(log).toContain('open 2 ro');
    await expect(fresh.pwrite(Buffer.alloc(1), 0)).rejects.toMatchObject({ errno: Errno.EPERM });
    await ctx.close();
  });

  it('refuses a context whose size changed, keeping the old one', async () => {
    const { plugin, log } = numberedPlugin({ sizes: [4096, 8192] });
    const { filter, seen } = reopeningFilter();
    const ctx = await openChain(plugin, filter);
    await ctx.pread(Buffer.alloc(1), 0);
    const old = seen.next!;
    await expect(old.reopen!()).rejects.toThrow(/size changed from 4096 to 8192/);
    expect(log).toEqual(['open 1', 'open 2', 'close 2']);
    const buf = Buffer.alloc(1);
    await ctx.pread(buf, 0);
    expect(buf[0]).toBe(1);
    await ctx.close();
    expect(log).toEqual(['open 1', 'open 2', 'close 2', 'close 1']);
  });

  it('keeps the old context when the fresh open fails, and can try again', async () => {
    const { plugin, log } = numberedPlugin();
    let failOpen = true;
    const flaky = definePlugin({
      ...plugin,
      open: (readonly: boolean, name: string, tls: boolean) => {
        if (log.length > 0 && failOpen) {
          failOpen = false;
          throw new NbdError(Errno.EIO, 'backend still down');
        }
        return plugin.open!(readonly, name, tls);
      },
    });
    const { filter, seen } = reopeningFilter();
    const ctx = await openChain(flaky, filter);
    await ctx.pread(Buffer.alloc(1), 0);
    await expect(seen.next!.reopen!()).rejects.toThrow(/backend still down/);
    const fresh = await seen.next!.reopen!();
    expect(log).toEqual(['open 1', 'open 2', 'close 1']);
    const buf = Buffer.alloc(1);
    await fresh.pread(buf, 0);
    expect(buf[0]).toBe(2);
    await ctx.close();
  });

  it('refuses to reopen contexts the filter opened itself', async () => {
    const { plugin } = numberedPlugin();
    const b = new Backend(plugin, [
      defineFilter({
        apiVersion: 2,
        name: 'owner',
        async open(next) {
          next.use(await next.openContext());
          return {};
        },
        pread: async (next) => {
          await next.reopen!();
        },
      }),
    ]);
    await b.load();
    const ctx = await b.open(false, '', false);
    await expect(ctx.pread(Buffer.alloc(1), 0)).rejects.toMatchObject({ errno: Errno.ENOTSUP });
    await ctx.close();
  });
});
