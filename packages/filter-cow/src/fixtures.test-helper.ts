/**
 * Test plugins for the cow filter (not built). They can only read: a write reaching them would be
 * a bug in the filter, and the core refuses writes to them anyway.
 */
import * as fs from 'node:fs';
import { EXTENT_HOLE, EXTENT_ZERO, definePlugin, type Extent } from '@nbdx/server/api';

export interface ReadStats {
  opens: Array<{ readonly: boolean; exportName: string }>;
  reads: number;
  bytesRead: number;
  cached: Array<[number, number]>;
}

const newStats = (): ReadStats => ({ opens: [], reads: 0, bytesRead: 0, cached: [] });

/** A real file, opened read-only with fs; pread only (a stand-in for @nbdx/plugin-file). */
export function createReadOnlyFilePlugin(file: string) {
  const stats = newStats();
  const plugin = definePlugin<{ fd: number }>({
    apiVersion: 2,
    name: 'rofile',
    open(readonly, exportName) {
      stats.opens.push({ readonly, exportName });
      return { fd: fs.openSync(file, 'r') };
    },
    close: (h) => fs.closeSync(h.fd),
    getSize: (h) => fs.fstatSync(h.fd).size,
    pread: (h, buf, offset) =>
      new Promise<void>((resolve, reject) => {
        stats.reads++;
        stats.bytesRead += buf.length;
        const step = (done: number) =>
          fs.read(h.fd, buf, done, buf.length - done, offset + done, (err, n) => {
            if (err) return reject(err);
            if (n === 0) return reject(new Error(`short read at ${offset + done}`));
            if (done + n < buf.length) step(done + n);
            else resolve();
          });
        step(0);
      }),
  });
  return { plugin, stats };
}

/**
 * A read-only disk with a fixed allocation layout: data extents hold a pattern, hole extents
 * (HOLE|ZERO) read as zeroes and are reported as zero spans. It can cache (recorded).
 */
export function createLayoutPlugin(size: number, layout: readonly Extent[]) {
  const stats = newStats();
  const bytes = Buffer.alloc(size);
  for (const e of layout) {
    if (e.type & EXTENT_ZERO) continue;
    for (let i = e.offset; i < e.offset + e.length; i++) bytes[i] = ((i >> 9) * 31 + i) & 255 || 1;
  }
  const plugin = definePlugin({
    apiVersion: 2,
    name: 'layout',
    open(readonly, exportName) {
      stats.opens.push({ readonly, exportName });
      return {};
    },
    getSize: () => size,
    canExtents: () => true,
    canCache: () => 'native',
    pread(_h, buf, offset) {
      stats.reads++;
      stats.bytesRead += buf.length;
      buf.set(bytes.subarray(offset, offset + buf.length));
      const holes = [];
      for (const e of layout) {
        if (!(e.type & EXTENT_ZERO)) continue;
        const s = Math.max(e.offset, offset);
        const f = Math.min(e.offset + e.length, offset + buf.length);
        if (s < f) holes.push({ start: s - offset, length: f - s });
      }
      return holes;
    },
    extents: () => layout,
    cache(_h, count, offset) {
      stats.cached.push([offset, count]);
    },
  });
  return { plugin, stats, bytes };
}

export const HOLE_ZERO = EXTENT_HOLE | EXTENT_ZERO;
