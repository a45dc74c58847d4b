/**
 * What a memory disk costs, measured on the real command: `nbdx -f -U SOCKET memory 1T`, 256 MiB
 * written as scattered pieces of 4 KiB, 64 KiB or 1 MiB, the server's RSS (VmRSS) before and
 * after, and a sample read back. The CLI loads the plugin's dist: build it first.
 *
 * Figures from before sub-blocks (32 KiB pages zero-filled when first touched), on the same
 * machine with the same offsets (packages/plugin-memory/bench/rss.mjs):
 *   4 KiB pieces, 4 KiB-aligned:  +2074 MiB
 *   64 KiB pieces, 64 KiB-aligned: +270 MiB;  4 KiB-aligned (most straddle three pages): +383 MiB
 *   1 MiB pieces, 1 MiB-aligned:   +265 MiB
 * and with sub-blocks: +292, +270, +281 and +265 MiB.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { NbdClient } from '@nbdx/client';
import { needNbdx, startCli, tmpDir } from '@nbdx/testkit';

const MiB = 1024 * 1024;
const DATA = 256 * MiB;
const DISK = 2 ** 40;
const have = needNbdx();
const dir = tmpDir();
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function vmRss(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m![1]) * 1024;
}

/** xorshift32, so every run writes at the same offsets. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

/** `count` distinct offsets, multiples of `align`, no two pieces within a piece of each other. */
function scattered(piece: number, align: number, count: number): number[] {
  const r = rng(1);
  const slots = Math.floor((DISK - piece) / align) + 1;
  const taken = new Set<number>();
  const out: number[] = [];
  while (out.length < count) {
    const off = (((r() & 0x1fffff) * 2 ** 32 + r()) % slots) * align;
    const key = Math.floor(off / piece);
    if (taken.has(key) || taken.has(key - 1) || taken.has(key + 1)) continue;
    taken.add(key);
    out.push(off);
  }
  return out;
}

/** A piece's contents: random bytes, with its own offset stamped at the start of every 4 KiB. */
const NOISE = Buffer.alloc(2 * MiB);
{
  const r = rng(99);
  for (let i = 0; i < NOISE.length; i += 4) NOISE.writeUInt32LE(r(), i);
}
function contents(buf: Buffer, off: number): Buffer {
  const from = ((off / 4096) % 256) * 4096;
  NOISE.copy(buf, 0, from, from + buf.length);
  for (let i = 0; i < buf.length; i += 4096) buf.writeDoubleLE(off + i, i);
  return buf;
}

const cases = [
  { piece: 4096, align: 4096, limit: 600 * MiB },
  { piece: 64 * 1024, align: 64 * 1024, limit: 290 * MiB }, // 270 MiB before
  { piece: 64 * 1024, align: 4096, limit: 383 * MiB }, // 383 MiB before
  { piece: MiB, align: MiB, limit: 285 * MiB }, // 265 MiB before
];

describe.skipIf(!have)('memory 1T: RSS of 256 MiB of scattered writes', () => {
  for (const { piece, align, limit } of cases) {
    const name = `${piece / 1024} KiB pieces at multiples of ${align / 1024} KiB`;
    it(`${name}: RSS grows by at most ${limit / MiB} MiB, and the data reads back`, async () => {
      const srv = await startCli(['-U', path.join(dir, `${piece}-${align}.sock`), 'memory', '1T']);
      try {
        const pid = srv.child.pid!;
        const c = await NbdClient.connect(srv.uri);
        // A connection that has served something: the baseline includes its buffers.
        await c.pwrite(Buffer.alloc(4096, 1), 0);
        await c.pread(4096, 0);
        await new Promise((r) => setTimeout(r, 200));
        const before = vmRss(pid);

        const offsets = scattered(piece, align, DATA / piece);
        let next = 0;
        await Promise.all(
          Array.from({ length: 64 }, async () => {
            const buf = Buffer.alloc(piece);
            while (next < offsets.length) {
              const off = offsets[next++]!;
              await c.pwrite(contents(buf, off), off);
            }
          }),
        );
        await new Promise((r) => setTimeout(r, 300));
        const grew = vmRss(pid) - before;
        console.log(`memory 1T, ${name}: RSS +${(grew / MiB).toFixed(1)} MiB for ${DATA / MiB} MiB written`);

        // 512 pieces back, and the 4 KiB before each: zeroes (no piece starts in the slot before a
        // piece's, and the first 4 KiB of the disk hold the warm-up write).
        const want = Buffer.alloc(piece);
        const step = Math.max(1, Math.floor(offsets.length / 512));
        for (let i = 0; i < offsets.length; i += step) {
          const off = offsets[i]!;
          expect((await c.pread(piece, off)).equals(contents(want, off))).toBe(true);
          if (align === piece && off >= 8192) expect((await c.pread(4096, off - 4096)).every((b) => b === 0)).toBe(true);
        }
        await c.disconnect();
        expect(grew).toBeLessThanOrEqual(limit);
      } finally {
        await srv.stop();
      }
    }, 30_000);
  }
});
