/**
 * A conformance suite plugin and filter authors call from their own vitest files:
 *
 *   import { describeConformance } from '@nbdx/testkit';
 *   describeConformance('my plugin', () => ({ plugin: createMyPlugin(), config: [['size', '1M']] }));
 *
 * It serves the plugin in-process and checks, through @nbdx/client: reads, writes, zero (plain,
 * NO_HOLE, FAST_ZERO), trim, flush, FUA, cache, extents, bounds and flag checks, many requests in
 * flight, and read-only mode. Checks for capabilities the export does not advertise are skipped.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Filter, Plugin } from '@nbdx/server/api';
import { NBD, NbdRequestError, type NbdClient } from '@nbdx/client';
import { servePlugin, type TestServer } from './serve.js';

export interface ConformanceSubject {
  plugin: Plugin;
  filters?: readonly Filter[];
  config?: Array<[string, string]> | Record<string, string>;
}

export interface ConformanceOptions {
  /** Expect a writable export (default true). */
  writable?: boolean;
  /** Also run the read-only checks with a second server (default true). */
  readonlyChecks?: boolean;
}

const EINVAL = 22;
const ENOSPC = 28;
const EPERM = 1;
const ENOTSUP = 95;

async function errnoOf(p: Promise<unknown>): Promise<number> {
  try {
    await p;
  } catch (err) {
    if (err instanceof NbdRequestError) return err.errno;
    throw err;
  }
  return 0;
}

export function describeConformance(
  name: string,
  make: () => ConformanceSubject | Promise<ConformanceSubject>,
  options: ConformanceOptions = {},
): void {
  const writable = options.writable ?? true;

  // Checks that need a writable export are only registered for one (nothing shows as skipped).
  const itWritable = (title: string, fn: () => Promise<void>) => {
    if (writable) it(title, fn);
  };

  describe(`conformance: ${name}`, () => {
    let server: TestServer;
    let c: NbdClient;
    let raw: NbdClient;
    let size: number;
    beforeAll(async () => {
      const s = await make();
      server = await servePlugin(s.plugin, { filters: s.filters, config: s.config });
      c = await server.connect();
      raw = await server.connect({ strict: false });
      size = c.size;
    });
    afterAll(async () => server?.close());

    it('has a size and reads at both ends', async () => {
      expect(size).toBeGreaterThan(0);
      expect((await c.pread(Math.min(512, size), 0)).length).toBe(Math.min(512, size));
      const n = Math.min(512, size);
      expect((await c.pread(n, size - n)).length).toBe(n);
    });

    it('refuses reads beyond the end and zero-length requests with EINVAL', async () => {
      expect((await raw.request({ type: NBD.CMD_READ, offset: size - 1, length: 2 })).error).toBe(EINVAL);
      expect((await raw.request({ type: NBD.CMD_READ, offset: size, length: 1 })).error).toBe(EINVAL);
      expect((await raw.request({ type: NBD.CMD_READ, offset: 0, length: 0 })).error).toBe(EINVAL);
      expect((await raw.request({ type: NBD.CMD_READ, offset: 0, length: 1, flags: 0x40 })).error).toBe(EINVAL);
    });

    it(`is ${writable ? 'writable' : 'read-only'} as expected`, () => {
      expect(c.readOnly).toBe(!writable);
    });

    itWritable('reads back what was written, at the start, the middle and the end', async () => {
      for (const off of [0, Math.floor(size / 2 / 512) * 512, size - 4096]) {
        if (off < 0) continue;
        const data = randomBytes(Math.min(4096, size - off));
        await c.pwrite(data, off);
        expect(Buffer.compare(await c.pread(data.length, off), data)).toBe(0);
      }
    });

    itWritable('refuses writes and zeroes beyond the end with ENOSPC', async () => {
      const res = await raw.request({ type: NBD.CMD_WRITE, offset: size - 1, length: 2, payload: Buffer.alloc(2) });
      expect(res.error).toBe(ENOSPC);
      if (c.canZero) {
        expect((await raw.request({ type: NBD.CMD_WRITE_ZEROES, offset: size - 1, length: 2 })).error).toBe(ENOSPC);
      }
    });

    itWritable('keeps many requests in flight without mixing them up', async () => {
      const n = 32;
      const chunk = Math.max(512, Math.min(65536, Math.floor(size / n / 512) * 512));
      const blocks = Array.from({ length: Math.min(n, Math.floor(size / chunk)) }, () => randomBytes(chunk));
      await Promise.all(blocks.map((b, i) => c.pwrite(b, i * chunk)));
      const back = await Promise.all(blocks.map((_, i) => c.pread(chunk, i * chunk)));
      back.forEach((b, i) => expect(Buffer.compare(b, blocks[i]!)).toBe(0));
    });

    itWritable('zeroes with and without NO_HOLE, and fast zero as advertised', async () => {
      if (!c.canZero) return;
      const len = Math.min(65536, size);
      for (const flags of [0, NBD.CMD_FLAG_NO_HOLE]) {
        await c.pwrite(Buffer.alloc(len, 0xaa), 0);
        await c.zero(len, 0, flags);
        expect((await c.pread(len, 0)).every((b) => b === 0)).toBe(true);
      }
      if (c.canFastZero) {
        await c.pwrite(Buffer.alloc(len, 0xbb), 0);
        const e = await errnoOf(c.zero(len, 0, NBD.CMD_FLAG_FAST_ZERO));
        expect([0, ENOTSUP]).toContain(e);
        const after = await c.pread(len, 0);
        // Either it was zeroed, or (ENOTSUP) it was left alone.
        expect(after.every((b) => b === (e === 0 ? 0 : 0xbb))).toBe(true);
      } else {
        expect((await raw.request({ type: NBD.CMD_WRITE_ZEROES, offset: 0, length: 512, flags: NBD.CMD_FLAG_FAST_ZERO })).error).toBe(EINVAL);
      }
    });

    itWritable('trims, flushes, writes with FUA and caches when advertised', async () => {
      if (c.canTrim) await c.trim(Math.min(65536, size), 0);
      if (c.canFlush) await c.flush();
      else expect((await raw.request({ type: NBD.CMD_FLUSH })).error).toBe(EINVAL);
      if (c.canFua) {
        const d = randomBytes(512);
        await c.pwrite(d, 0, NBD.CMD_FLAG_FUA);
        expect(Buffer.compare(await c.pread(512, 0), d)).toBe(0);
      }
      if (c.canCache) await c.cache(Math.min(65536, size), 0);
    });

    it('describes extents that start at the offset, make progress, and never call data zero', async () => {
      if (!c.metaContexts.has('base:allocation')) return;
      const len = Math.min(1 << 20, size);
      const map = (await c.blockStatus(len, 0)).get('base:allocation')!;
      expect(map.length).toBeGreaterThan(0);
      let pos = 0;
      for (const e of map) {
        expect(e.length).toBeGreaterThan(0);
        expect(e.flags & ~3).toBe(0);
        if (e.flags & 2 && pos < len) {
          const n = Math.min(e.length, len - pos, 1 << 20);
          expect((await c.pread(n, pos)).every((b) => b === 0)).toBe(true);
        }
        pos += e.length;
      }
      const one = (await c.blockStatus(len, 0, NBD.CMD_FLAG_REQ_ONE)).get('base:allocation')!;
      expect(one.length).toBe(1);
      expect(one[0]!.length).toBeLessThanOrEqual(len);
      expect((await raw.request({ type: NBD.CMD_BLOCK_STATUS, offset: size, length: 1 })).error).toBe(EINVAL);
    });

    if (!writable) {
      it('refuses writes, trims and zeroes on the read-only export with EPERM', async () => {
        expect((await raw.request({ type: NBD.CMD_WRITE, offset: 0, length: 1, payload: Buffer.alloc(1) })).error).toBe(EPERM);
        expect((await raw.request({ type: NBD.CMD_TRIM, offset: 0, length: 1 })).error).toBe(EPERM);
        expect((await raw.request({ type: NBD.CMD_WRITE_ZEROES, offset: 0, length: 1 })).error).toBe(EPERM);
      });
    }

    if (writable && (options.readonlyChecks ?? true)) describe('read-only', () => {
      let ro: TestServer;
      let r: NbdClient;
      beforeAll(async () => {
        const s = await make();
        ro = await servePlugin(s.plugin, { filters: s.filters, config: s.config, readonly: true });
        r = await ro.connect({ strict: false });
      });
      afterAll(async () => ro?.close());

      it('refuses writes, trims and zeroes with EPERM', async () => {
        expect(r.readOnly).toBe(true);
        expect((await r.request({ type: NBD.CMD_WRITE, offset: 0, length: 1, payload: Buffer.alloc(1) })).error).toBe(EPERM);
        expect((await r.request({ type: NBD.CMD_TRIM, offset: 0, length: 1 })).error).toBe(EPERM);
        expect((await r.request({ type: NBD.CMD_WRITE_ZEROES, offset: 0, length: 1 })).error).toBe(EPERM);
        expect((await r.pread(1, 0)).length).toBe(1);
      });
    });
  });
}
