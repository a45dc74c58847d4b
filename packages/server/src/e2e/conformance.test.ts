/**
 * The same conformance suite for a version-1 and a version-2 test plugin, a filter over memory,
 * and 64 concurrent clients each writing and verifying its own region.
 */
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '@nbdx/client';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import { describeConformance, servePlugin } from '@nbdx/testkit';
import { FLAG_MAY_TRIM } from '../api/common.js';
import { defineFilter, definePlugin } from '../api/define.js';

const SIZE = 4 << 20;

/** Version 1: pread returns bytes, zero takes a may-trim boolean, no flags anywhere. */
function v1Plugin() {
  const disk = Buffer.alloc(SIZE);
  return definePlugin({
    name: 'test-v1',
    getSize: () => disk.length,
    pread: (_h, count, offset) => disk.subarray(offset, offset + count),
    pwrite: (_h, buf, offset) => void disk.set(buf, offset),
    flush: () => {},
    trim: (_h, count, offset) => void disk.fill(0, offset, offset + count),
    zero: (_h, count, offset, mayTrim) => {
      if (typeof mayTrim !== 'boolean') throw new Error('v1 zero must get a boolean');
      disk.fill(0, offset, offset + count);
    },
  });
}

/** Version 2: pread fills the caller's buffer, flags everywhere, extents. */
function v2Plugin() {
  const disk = Buffer.alloc(SIZE);
  const written = new Uint8Array(SIZE / 4096);
  return definePlugin({
    apiVersion: 2,
    name: 'test-v2',
    getSize: () => disk.length,
    pread: (_h, buf, offset) => void disk.copy(buf, 0, offset, offset + buf.length),
    pwrite: (_h, buf, offset) => {
      disk.set(buf, offset);
      for (let b = Math.floor(offset / 4096); b * 4096 < offset + buf.length; b++) written[b] = 1;
    },
    flush: () => {},
    canFua: () => 'native',
    trim: (_h, count, offset) => void disk.fill(0, offset, offset + count),
    zero: (_h, count, offset, flags) => {
      if (typeof flags !== 'number') throw new Error('v2 zero must get flags');
      void (flags & FLAG_MAY_TRIM);
      disk.fill(0, offset, offset + count);
    },
    // Deliberately coarse and unordered: the core sorts, clips and merges.
    extents: (_h, count, offset) => {
      const out = [];
      for (let b = Math.floor(offset / 4096); b * 4096 < offset + count; b++) {
        out.push({ offset: b * 4096, length: 4096, type: written[b] ? 0 : 3 });
      }
      return out.reverse();
    },
  });
}

describeConformance('plugin API version 1', () => ({ plugin: v1Plugin() }));
describeConformance('plugin API version 2', () => ({ plugin: v2Plugin() }));
describeConformance('memory plugin', () => ({ plugin: createMemoryPlugin(), config: [['size', '8M']] }));
describeConformance('memory under a version-1 filter', () => ({
  plugin: createMemoryPlugin(),
  config: [['size', '8M']],
  filters: [defineFilter({ name: 'noop-v1', apiVersion: 1 })],
}));

describe('64 concurrent clients', () => {
  it('each writes and verifies its own region with no mismatch', async () => {
    const server = await servePlugin(createMemoryPlugin(), { config: [['size', '64M']] });
    try {
      const region = 1 << 20;
      const results = await Promise.all(
        Array.from({ length: 64 }, async (_, i) => {
          const c = await NbdClient.connect(server.uri);
          const data = randomBytes(region);
          // 16 writes in flight per client, then read back in 4 pieces
          await Promise.all(Array.from({ length: 16 }, (_, k) => c.pwrite(data.subarray(k * 65536, (k + 1) * 65536), i * region + k * 65536)));
          const back = Buffer.concat(await Promise.all([0, 1, 2, 3].map((k) => c.pread(region / 4, i * region + (k * region) / 4))));
          await c.disconnect();
          return Buffer.compare(back, data) === 0;
        }),
      );
      expect(results.filter((ok) => !ok)).toEqual([]);
    } finally {
      await server.close();
    }
  });
});

describe('reply modes', () => {
  const modes = [
    { name: 'extended headers', opts: {}, extended: true, structured: true },
    { name: 'structured replies', opts: { extendedHeaders: false }, extended: false, structured: true },
    { name: 'simple replies', opts: { structuredReplies: false }, extended: false, structured: false },
  ];
  for (const m of modes) {
    it(`${m.name}: data, holes, errors with messages, block status`, async () => {
      const server = await servePlugin(createMemoryPlugin(), { config: [['size', '1M']] });
      try {
        const c = await NbdClient.connect(server.uri, m.opts);
        expect(c.extendedHeaders).toBe(m.extended);
        expect(c.structuredReplies).toBe(m.structured);
        const data = randomBytes(8192);
        await c.pwrite(data, 65536);
        // 64K of never-written pages, then the data: a hole chunk then a data chunk
        const buf = Buffer.alloc(65536 + 8192, 0xff);
        const holes = await c.preadInto(buf, 0);
        if (m.structured) expect(holes).toEqual([{ start: 0, length: 65536 }]);
        else {
          expect(holes).toEqual([]);
          expect(buf.subarray(0, 65536).every((b) => b === 0)).toBe(true);
        }
        expect(Buffer.compare(buf.subarray(65536), data)).toBe(0);
        const bad = await c.request({ type: 0, offset: 1 << 20, length: 1 });
        expect(bad.error).toBe(22);
        if (m.structured) {
          expect(bad.message).toMatch(/beyond the end/);
          const map = (await c.blockStatus(1 << 20, 0)).get('base:allocation')!;
          expect(map.slice(0, 2)).toEqual([
            { length: 65536, flags: 3 },
            { length: 32768, flags: 0 },
          ]);
        }
        await c.disconnect();
      } finally {
        await server.close();
      }
    });
  }
});
