/**
 * readView / writeView (PluginV2): READ replies sent straight from the plugin's memory and WRITE
 * payloads received into it, in every reply mode (simple, structured, extended), through our
 * client and real ones; with a filter above, or a view the plugin declines, the ordinary path.
 */
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { needTools, nbdshOk, servePlugin } from '@nbdx/testkit';
import { defineFilter, definePlugin } from '../api/define.js';

const SIZE = 4 << 20;

/** A flat RAM disk offering views, counting how each request was served. */
function viewPlugin(offerViews = true) {
  const disk = Buffer.alloc(SIZE);
  const calls = { pread: 0, readView: 0, writeView: 0, pwriteCopied: 0, pwriteInPlace: 0 };
  const plugin = definePlugin({
    apiVersion: 2,
    name: 'views',
    open: () => ({}),
    getSize: () => SIZE,
    canWrite: () => true,
    pread: (_h, buf, offset) => {
      calls.pread++;
      disk.copy(buf, 0, offset, offset + buf.length);
    },
    pwrite: (_h, buf, offset) => {
      if (buf.buffer === disk.buffer && buf.byteOffset === disk.byteOffset + offset) calls.pwriteInPlace++;
      else {
        calls.pwriteCopied++;
        disk.set(buf, offset);
      }
    },
    readView: (_h, count, offset) => {
      calls.readView++;
      return offerViews ? disk.subarray(offset, offset + count) : undefined;
    },
    writeView: (_h, count, offset) => {
      calls.writeView++;
      return offerViews ? disk.subarray(offset, offset + count) : undefined;
    },
  });
  return { plugin, disk, calls };
}

describe('plugin memory views (readView / writeView)', () => {
  for (const mode of ['simple', 'structured', 'extended'] as const) {
    it(`${mode} replies: data round-trips, nothing copied by the plugin`, async () => {
      const { plugin, disk, calls } = viewPlugin();
      const srv = await servePlugin(plugin);
      try {
        const c = await srv.connect({ structuredReplies: mode !== 'simple', extendedHeaders: mode === 'extended' });
        const data = randomBytes(300_000); // several socket reads: direct reads land in place too
        await c.pwrite(data, 12345);
        const small = randomBytes(100); // arrives with its header: copied once from the queue
        await c.pwrite(small, 1 << 20);
        expect(disk.subarray(12345, 12345 + data.length).equals(data)).toBe(true);
        expect(disk.subarray(1 << 20, (1 << 20) + 100).equals(small)).toBe(true);
        expect(Buffer.from(await c.pread(data.length, 12345)).equals(data)).toBe(true);
        expect(Buffer.from(await c.pread(100, 1 << 20)).equals(small)).toBe(true);
        expect(calls).toMatchObject({ pread: 0, pwriteCopied: 0, pwriteInPlace: 2 });
        await c.disconnect();
      } finally {
        await srv.close();
      }
    });
  }

  it('bad requests never reach the views; the connection goes on', async () => {
    const { plugin, calls } = viewPlugin();
    const srv = await servePlugin(plugin);
    try {
      const c = await srv.connect();
      await expect(c.pwrite(Buffer.alloc(4096), SIZE - 100)).rejects.toThrow();
      await expect(c.pread(4096, SIZE - 100)).rejects.toThrow();
      expect(calls.writeView + calls.readView).toBe(0);
      expect((await c.pread(10, 0)).length).toBe(10);
      await c.disconnect();
    } finally {
      await srv.close();
    }
  });

  it('declined views and filters above take the ordinary path', async () => {
    const declined = viewPlugin(false);
    const passthrough = defineFilter({ apiVersion: 2, name: 'pass' });
    for (const [subject, filters] of [
      [declined, []],
      [viewPlugin(), [passthrough]],
    ] as const) {
      const srv = await servePlugin(subject.plugin, { filters });
      try {
        const c = await srv.connect();
        const data = randomBytes(70_000);
        await c.pwrite(data, 4096);
        expect(Buffer.from(await c.pread(data.length, 4096)).equals(data)).toBe(true);
        expect(subject.calls.pread).toBe(1);
        expect(subject.calls.pwriteCopied).toBe(1);
        await c.disconnect();
      } finally {
        await srv.close();
      }
    }
  });

  it.skipIf(!needTools('nbdsh'))('a real client (libnbd) reads and writes through views', async () => {
    const { plugin, calls } = viewPlugin();
    const srv = await servePlugin(plugin);
    try {
      const out = await nbdshOk(
        srv.uri,
        `
import os
d = os.urandom(1 << 20)
h.pwrite(d, 65536)
assert h.pread(1 << 20, 65536) == d
print("ok")
`,
      );
      expect(out.trim()).toBe('ok');
      expect(calls.pread).toBe(0);
      expect(calls.pwriteCopied).toBe(0);
    } finally {
      await srv.close();
    }
  });
});
