/**
 * The backend chain without a socket: API versions, the v1 adapter, filter pass-through and the
 * masking rule for methods newer than a filter's declared API version, thread models.
 */
import { describe, expect, it } from 'vitest';
import { EXTENT_HOLE, EXTENT_ZERO, FLAG_FUA, FLAG_MAY_TRIM, NbdError } from '../api/common.js';
import { defineFilter, definePlugin, type Filter } from '../api/define.js';
import { Backend } from './backend.js';

/** A 1 MiB v2 test plugin that records every call. */
function recordingPlugin(calls: string[]) {
  const disk = Buffer.alloc(1 << 20);
  const plugin = definePlugin({
    apiVersion: 2,
    name: 'rec',
    getSize: () => disk.length,
    pread: (_h, buf, off) => void disk.copy(buf, 0, off, off + buf.length),
    pwrite: (_h, buf, off, flags) => {
      calls.push(`pwrite ${off} ${buf.length} ${flags}`);
      disk.set(buf, off);
    },
    flush: () => void calls.push('flush'),
    trim: (_h, n, off) => void calls.push(`trim ${off} ${n}`),
    zero: (_h, n, off, flags) => {
      calls.push(`zero ${off} ${n} ${flags}`);
      disk.fill(0, off, off + n);
    },
    extents: (_h, n, off) => [{ offset: off, length: n, type: EXTENT_HOLE | EXTENT_ZERO }],
    cache: (_h, n, off) => void calls.push(`cache ${off} ${n}`),
    canFua: () => 'emulate',
    canCache: () => 'native',
  });
  return Object.assign(plugin, { disk });
}

/** A filter that moves everything up by 4096 bytes, implementing only what its version knows. */
function shiftFilter(apiVersion: 1 | 2): Filter {
  const D = 4096;
  const base = {
    name: `shift-v${apiVersion}`,
    getSize: async (next: { getSize(): Promise<number> }) => (await next.getSize()) - D,
    pread: (next: any, _h: unknown, buf: Uint8Array, off: number, flags: number) => next.pread(buf, off + D, flags),
    pwrite: (next: any, _h: unknown, buf: Uint8Array, off: number, flags: number) => next.pwrite(buf, off + D, flags),
    trim: (next: any, _h: unknown, n: number, off: number, flags: number) => next.trim(n, off + D, flags),
  };
  return apiVersion === 1 ? defineFilter({ ...base, apiVersion: 1 }) : defineFilter({ ...base, apiVersion: 2 });
}

async function open(b: Backend, readonly = false) {
  await b.load();
  return b.open(readonly, '', false);
}

describe('backend chain', () => {
  it('refuses a plugin asking for API version 3, naming the supported versions', () => {
    const p = { name: 'future', apiVersion: 3, getSize: () => 0, pread: () => {} } as never;
    expect(() => new Backend(p)).toThrow(/plugin 'future' asks for plugin API version 3, but this nbdx supports versions 1 and 2/);
  });

  it('refuses a filter asking for an unknown filter API version', () => {
    const plugin = recordingPlugin([]);
    expect(() => new Backend(plugin, [{ name: 'f', apiVersion: 9 } as never])).toThrow(/filter API version 9/);
  });

  it('adapts v1 plugins: pread returns bytes, zero gets may-trim, FUA is emulated by flush', async () => {
    const calls: string[] = [];
    const disk = Buffer.alloc(65536, 7);
    const v1 = definePlugin({
      name: 'old',
      getSize: () => disk.length,
      pread: (_h, count, off) => disk.subarray(off, off + count),
      pwrite: (_h, buf, off) => void disk.set(buf, off),
      flush: () => void calls.push('flush'),
      zero: (_h, count, off, mayTrim) => {
        calls.push(`zero ${off} ${count} ${mayTrim}`);
        disk.fill(0, off, off + count);
      },
      canFua: () => 'native', // a v1 plugin cannot do FUA itself: the core must emulate it
    });
    const ctx = await open(new Backend(v1));
    const buf = Buffer.alloc(16);
    await ctx.pread(buf, 0);
    expect(buf.every((b) => b === 7)).toBe(true);
    expect(await ctx.canFua()).toBe('emulate');
    expect(await ctx.canFastZero()).toBe(false);
    await ctx.pwrite(Buffer.alloc(8, 1), 0, FLAG_FUA);
    await ctx.zero(100, 0, FLAG_MAY_TRIM);
    expect(calls).toEqual(['flush', 'zero 0 100 true']);
  });

  it('emulates zero with writes in bounded chunks at the right offsets', async () => {
    const calls: string[] = [];
    const disk = Buffer.alloc(3 << 20, 9);
    const p = definePlugin({
      apiVersion: 2,
      name: 'nozero',
      getSize: () => disk.length,
      pread: (_h, b, o) => void disk.copy(b, 0, o, o + b.length),
      pwrite: (_h, b, o) => {
        calls.push(`pwrite ${o} ${b.length}`);
        disk.set(b, o);
      },
    });
    const ctx = await open(new Backend(p));
    await ctx.zero((2 << 20) + 10, 5, 0);
    expect(calls).toEqual([`pwrite 5 ${1 << 20}`, `pwrite ${(1 << 20) + 5} ${1 << 20}`, `pwrite ${(2 << 20) + 5} 10`]);
    expect(disk.subarray(5, (2 << 20) + 15).every((b) => b === 0)).toBe(true);
    expect(disk[4]).toBe(9);
    expect(disk[(2 << 20) + 15]).toBe(9);
  });

  it('falls back to writes when a plugin says zero is not supported, but not for fast zero', async () => {
    const disk = Buffer.alloc(8192, 1);
    const p = definePlugin({
      apiVersion: 2,
      name: 'picky',
      getSize: () => disk.length,
      pread: (_h, b, o) => void disk.copy(b, 0, o, o + b.length),
      pwrite: (_h, b, o) => void disk.set(b, o),
      zero: () => {
        throw new NbdError(95, 'cannot zero here');
      },
      canFastZero: () => true,
    });
    const ctx = await open(new Backend(p));
    await ctx.zero(4096, 0, 0);
    expect(disk.subarray(0, 4096).every((b) => b === 0)).toBe(true);
    await expect(ctx.zero(4096, 4096, 8 /* FAST_ZERO */)).rejects.toMatchObject({ errno: 95 });
    expect(disk[4096]).toBe(1);
  });

  it('passes through a v2 filter what it does not implement, shifted where it does', async () => {
    const calls: string[] = [];
    const plugin = recordingPlugin(calls);
    const ctx = await open(new Backend(plugin, [shiftFilter(2)]));
    expect(ctx.size).toBe((1 << 20) - 4096);
    await ctx.pwrite(Buffer.alloc(10, 5), 0);
    await ctx.flush(); // not implemented by the filter: passes through
    await ctx.zero(100, 0, 0); // v2 filter without zero: passes through, unshifted (the filter's own choice)
    expect(calls).toEqual(['pwrite 4096 10 0', 'flush', 'zero 0 100 0']);
    expect(await ctx.canExtents()).toBe(true);
  });

  it('never passes methods newer than a v1 filter through it: zero is emulated via its pwrite, extents masked', async () => {
    const calls: string[] = [];
    const plugin = recordingPlugin(calls);
    const ctx = await open(new Backend(plugin, [shiftFilter(1)]));
    plugin.disk.fill(3);
    await ctx.zero(100, 0, FLAG_MAY_TRIM);
    // zeroed through the filter's pwrite, so at the shifted offset; the plugin's zero never ran
    expect(calls).toEqual(['pwrite 4096 100 0']);
    expect(plugin.disk.subarray(4096, 4196).every((b) => b === 0)).toBe(true);
    expect(plugin.disk[0]).toBe(3);
    expect(await ctx.canExtents()).toBe(false);
    expect(await ctx.extents(1000, 0)).toEqual([{ offset: 0, length: 1000, type: 0 }]);
    // cache is read through the filter instead of passed on unshifted
    expect(await ctx.canCache()).toBe('emulate');
    await ctx.cache(4096, 0);
    expect(calls.some((c) => c.startsWith('cache'))).toBe(false);
  });

  it('routes config through the filters to the plugin and runs lifecycle bottom-up', async () => {
    const seen: string[] = [];
    const plugin = definePlugin({
      apiVersion: 2,
      name: 'p',
      load: () => void seen.push('load p'),
      config: (k, v) => void seen.push(`p ${k}=${v}`),
      getSize: () => 0,
      pread: () => {},
    });
    const f = defineFilter({
      apiVersion: 2,
      name: 'f',
      load: () => void seen.push('load f'),
      config: async (next, k, v) => (k === 'mine' ? void seen.push(`f ${k}=${v}`) : next(k, v)),
    });
    const b = new Backend(plugin, [f]);
    await b.load();
    await b.config('mine', '1');
    await b.config('other', '2');
    expect(seen).toEqual(['load p', 'load f', 'f mine=1', 'p other=2']);
  });

  it('picks the strictest thread model of plugin and filters', () => {
    const plugin = recordingPlugin([]);
    const f = defineFilter({ apiVersion: 2, name: 'slow', threadModel: 'serialize_requests' });
    expect(new Backend(plugin).threadModel()).toBe('parallel');
    expect(new Backend(plugin, [f]).threadModel()).toBe('serialize_requests');
  });

  it('refuses writes on a read-only context and checks bounds for filters too', async () => {
    const ctx = await open(new Backend(recordingPlugin([])), true);
    await expect(ctx.pwrite(Buffer.alloc(1), 0)).rejects.toMatchObject({ errno: 1 });
    await expect(ctx.pread(Buffer.alloc(2), (1 << 20) - 1)).rejects.toMatchObject({ errno: 22 });
  });
});
