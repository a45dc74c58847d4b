import { afterEach, describe, expect, it } from 'vitest';
import { EXTENT_HOLE, EXTENT_ZERO, normalizeExtents, type Extent, type ReadResult } from '@nbdx/server';
import { BlockLocks } from './block-locks.js';
import { BELOW, BlockMap, DATA, ZERO, ZERO_STALE } from './block-map.js';
import { Overlay, type Below } from './overlay.js';
import { TempFile } from '@nbdx/server/api';
import { tmpdir } from 'node:os';

/** A deterministic random generator, so a failure can be replayed. */
function rng(seed: number) {
  let s = seed >>> 0 || 1;
  return (n: number) => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s % n;
  };
}

const tick = () => new Promise<void>((r) => setImmediate(r));
const GRANULE = 4096;

/**
 * The layer below for unit tests: a buffer, read-only. All-zero reads come back as a zero span
 * (buffer untouched), like a plugin reporting holes. Each call yields to the event loop first, so
 * concurrent operations interleave.
 */
function fakeBelow(base: Buffer) {
  const stats = { reads: 0, cached: [] as Array<[number, number]> };
  const below: Below = {
    async pread(buf, offset) {
      await tick();
      stats.reads++;
      const src = base.subarray(offset, offset + buf.length);
      if (src.every((x) => x === 0)) return [{ start: 0, length: buf.length }];
      buf.set(src);
      return undefined;
    },
    async extents(count, offset) {
      await tick();
      const raw: Extent[] = [];
      const first = Math.floor(offset / GRANULE) * GRANULE;
      for (let g = first; g < offset + count; g += GRANULE) {
        const zero = base.subarray(g, Math.min(g + GRANULE, base.length)).every((x) => x === 0);
        raw.push({ offset: g, length: Math.min(GRANULE, base.length - g), type: zero ? EXTENT_HOLE | EXTENT_ZERO : 0 });
      }
      return normalizeExtents(raw, offset, count, false, 'fake');
    },
    async cache(count, offset) {
      stats.cached.push([offset, count]);
    },
  };
  return { below, stats };
}

function makeBase(size: number, random: (n: number) => number): Buffer {
  const base = Buffer.alloc(size);
  // Data in some granules, holes in others.
  for (let g = 0; g < size; g += GRANULE) {
    if (random(3) === 0) continue;
    for (let i = g; i < Math.min(g + GRANULE, size); i++) base[i] = random(256);
  }
  return base;
}

const files: TempFile[] = [];
afterEach(async () => {
  await Promise.all(files.splice(0).map((f) => f.close()));
});

async function overlay(blockSize: number, syncLimit = 0): Promise<Overlay> {
  const f = await TempFile.create(tmpdir());
  f.syncLimit = syncLimit;
  files.push(f);
  return new Overlay(f, blockSize);
}

async function readAll(o: Overlay, below: Below, size: number): Promise<Buffer> {
  const buf = Buffer.alloc(size, 0xee);
  const spans = (await o.read(below, buf, 0)) as ReadResult;
  if (spans) for (const s of spans) buf.fill(0, s.start, s.start + s.length);
  return buf;
}

type Op = { kind: 'write' | 'zero' | 'trim'; offset: number; length: number; data?: Buffer };

/** Random ops in a range; within one batch they never share a byte, but often share blocks. */
function batch(random: (n: number) => number, size: number, maxLen: number): Op[] {
  const ops: Op[] = [];
  let pos = random(maxLen);
  while (pos < size) {
    const length = Math.min(size - pos, 1 + random(maxLen));
    const r = random(10);
    const kind = r < 7 ? 'write' : r < 9 ? 'zero' : 'trim';
    const op: Op = { kind, offset: pos, length };
    if (kind === 'write') op.data = Buffer.from(Array.from({ length }, () => random(256)));
    ops.push(op);
    pos += length + random(maxLen);
  }
  return ops;
}

/** The block-level allocation model: 'below' | 'data' | 'zero' per block. */
function applyToModel(states: string[], op: Op, bs: number, size: number): void {
  const first = Math.floor(op.offset / bs);
  const last = Math.floor((op.offset + op.length - 1) / bs);
  for (let b = first; b <= last; b++) {
    const whole = op.offset <= b * bs && op.offset + op.length >= Math.min((b + 1) * bs, size);
    if (op.kind === 'write') states[b] = 'data';
    else if (whole) states[b] = 'zero';
    else if (states[b] === 'below') states[b] = 'data';
  }
}

async function expectedExtents(states: string[], below: Below, bs: number, size: number): Promise<Extent[]> {
  const raw: Extent[] = [];
  for (let b = 0; b * bs < size; b++) {
    const o = b * bs;
    const l = Math.min(bs, size - o);
    if (states[b] === 'data') raw.push({ offset: o, length: l, type: 0 });
    else if (states[b] === 'zero') raw.push({ offset: o, length: l, type: EXTENT_HOLE | EXTENT_ZERO });
    else raw.push(...(await below.extents(l, o)));
  }
  return normalizeExtents(raw, 0, size, false, 'model');
}

describe('Overlay against a model', () => {
  // syncLimit: file I/O done synchronously up to this size (cow-io): none, some, all.
  const cases = [
    { bs: 4096, size: 256 * 1024 + 1234, maxLen: 9000, seed: 1, sync: 0 },
    { bs: 4096, size: 256 * 1024 + 1234, maxLen: 9000, seed: 11, sync: Infinity },
    { bs: 65536, size: 1024 * 1024 + 5, maxLen: 150_000, seed: 2, sync: 65536 },
    { bs: 65536, size: 1024 * 1024 + 5, maxLen: 150_000, seed: 12, sync: 0 },
    // Blocks bigger than the 1 MiB working buffer: read-modify-write goes in pieces.
    { bs: 2 * 1024 * 1024, size: 5 * 1024 * 1024 + 777, maxLen: 1_500_000, seed: 3, sync: 65536 },
  ];
  for (const { bs, size, maxLen, seed, sync } of cases) {
    it(`block size ${bs}, sync I/O up to ${sync}: concurrent unaligned writes, zeroes, trims; reads and extents match`, async () => {
      const random = rng(seed);
      const base = makeBase(size, random);
      const original = Buffer.from(base);
      const { below } = fakeBelow(base);
      const o = await overlay(bs, sync);
      const model = Buffer.from(base);
      const states: string[] = Array.from({ length: Math.ceil(size / bs) }, () => 'below');
      for (let round = 0; round < 6; round++) {
        const ops = batch(random, size, maxLen);
        await Promise.all(
          ops.map((op) =>
            op.kind === 'write' ? o.write(below, size, op.data!, op.offset) : o.zero(below, size, op.length, op.offset),
          ),
        );
        for (const op of ops) {
          if (op.data) op.data.copy(model, op.offset);
          else model.fill(0, op.offset, op.offset + op.length);
          applyToModel(states, op, bs, size);
        }
        expect(Buffer.compare(await readAll(o, below, size), model)).toBe(0);
        // Unaligned reads, too.
        for (let i = 0; i < 20; i++) {
          const off = random(size);
          const len = 1 + random(Math.min(size - off, 3 * bs));
          const buf = Buffer.alloc(len, 0xee);
          const spans = await o.read(below, buf, off);
          if (spans) for (const s of spans) buf.fill(0, s.start, s.start + s.length);
          expect(Buffer.compare(buf, model.subarray(off, off + len))).toBe(0);
        }
        expect(await normalizeExtents(await o.extents(below, size, 0, false), 0, size, false, 'cow')).toEqual(
          await expectedExtents(states, below, bs, size),
        );
      }
      expect(Buffer.compare(base, original)).toBe(0);
    });
  }

  it('whole-block zero and trim touch no file and no layer below', async () => {
    const size = 1 << 20;
    const { below, stats } = fakeBelow(makeBase(size, rng(5)));
    const o = await overlay(65536);
    await o.zero(below, size, 4 * 65536, 65536);
    expect(stats.reads).toBe(0);
    expect(await o.file.allocatedBytes()).toBe(0);
    expect(o.map.get(0)).toBe(BELOW);
    expect(o.map.get(1)).toBe(ZERO);
    expect(o.map.get(4)).toBe(ZERO);
    expect(o.map.get(5)).toBe(BELOW);
    await o.write(below, size, Buffer.alloc(65536, 1), 65536);
    await o.zero(below, size, 65536, 65536);
    expect(o.map.get(1)).toBe(ZERO_STALE);
    // A partial write into a stale block must not bring the old bytes back.
    await o.write(below, size, Buffer.from([9]), 65536 + 100);
    const buf = Buffer.alloc(65536);
    await o.read(below, buf, 65536);
    expect(buf[100]).toBe(9);
    expect(buf.filter((x) => x !== 0)).toHaveLength(1);
  });

  it('a partial write into a clean zero block writes only its bytes', async () => {
    const size = 1 << 20;
    const { below, stats } = fakeBelow(makeBase(size, rng(6)));
    const o = await overlay(65536);
    await o.zero(below, size, 65536, 0);
    await o.write(below, size, Buffer.from('hello'), 10);
    expect(stats.reads).toBe(0);
    expect(o.map.get(0)).toBe(DATA);
    const buf = Buffer.alloc(20, 0xee);
    await o.read(below, buf, 0);
    expect(buf.toString('latin1')).toBe('\0'.repeat(10) + 'hello' + '\0'.repeat(5));
  });

  it('copyUp copies blocks still below, marks all-zero ones as zero, and is skipped when done', async () => {
    const size = 8 * 65536;
    const base = Buffer.alloc(size);
    base.fill(7, 65536, 2 * 65536); // block 1 has data, the rest is zero
    const { below, stats } = fakeBelow(base);
    const o = await overlay(65536);
    await o.copyUp(below, size, 0, size);
    expect(o.map.get(0)).toBe(ZERO);
    expect(o.map.get(1)).toBe(DATA);
    const reads = stats.reads;
    await o.copyUp(below, size, 0, size);
    expect(stats.reads).toBe(reads);
    expect(o.hasBelow(0, size)).toBe(false);
    expect((await readAll(o, below, size)).equals(base)).toBe(true);
  });

  it('cacheBelow passes on only the ranges still below', async () => {
    const size = 4 * 65536;
    const { below, stats } = fakeBelow(Buffer.alloc(size, 1));
    const o = await overlay(65536);
    await o.write(below, size, Buffer.alloc(65536, 2), 65536);
    await o.cacheBelow(below, 100, size - 200);
    expect(stats.cached).toEqual([
      [100, 65536 - 100],
      [2 * 65536, 2 * 65536 - 100],
    ]);
  });

  it('extents ask below once per stretch, even when the layer below answers for less each time', async () => {
    const size = 64 * GRANULE;
    const base = Buffer.alloc(size);
    for (let g = 0; g < 64; g += 2) base.fill(1, g * GRANULE, (g + 1) * GRANULE); // data, hole, data, …
    const { below } = fakeBelow(base);
    let calls = 0;
    const stingy: Below = {
      ...below,
      async extents(count, offset, flags) {
        calls++;
        return (await below.extents(count, offset, flags)).slice(0, 3);
      },
    };
    const o = await overlay(GRANULE);
    await o.write(below, size, Buffer.alloc(10, 5), 10 * GRANULE + 7); // block 10 was a data block
    await o.zero(below, size, GRANULE, 21 * GRANULE); // block 21 was a hole
    const got = await normalizeExtents(await o.extents(stingy, size, 0, false), 0, size, false, 'cow');
    const want: Extent[] = [];
    for (let g = 0; g < 64; g++) want.push({ offset: g * GRANULE, length: GRANULE, type: g % 2 === 0 ? 0 : 3 });
    expect(got).toEqual(await normalizeExtents(want, 0, size, false, 'model'));
    expect(calls).toBeLessThanOrEqual(Math.ceil(64 / 3) + 3);
    // REQ_ONE on a stretch still below: one extent, from the layer below.
    expect(await o.extents(stingy, size - GRANULE, GRANULE, true)).toEqual([{ offset: GRANULE, length: GRANULE, type: 3 }]);
  });

  it('REQ_ONE extents describe only the first run', async () => {
    const size = 4 * 65536;
    const { below } = fakeBelow(Buffer.alloc(size, 1));
    const o = await overlay(65536);
    await o.zero(below, size, 65536, 0);
    expect(await o.extents(below, size, 0, true)).toEqual([{ offset: 0, length: 65536, type: 3 }]);
  });

  it('a failed write leaves no block claiming a clean file range', async () => {
    const size = 4 * 65536;
    const { below } = fakeBelow(Buffer.alloc(size, 1));
    const f = await TempFile.create(tmpdir());
    const o = new Overlay(f, 65536);
    await o.zero(below, size, 65536, 65536);
    await f.close(); // every later write to the file fails (EBADF)
    await expect(o.write(below, size, Buffer.alloc(10), 65536 + 5)).rejects.toThrow();
    expect(o.map.get(1)).toBe(ZERO_STALE);
    await expect(o.write(below, size, Buffer.alloc(10), 5)).rejects.toThrow();
    expect(o.map.get(0)).toBe(4); // BELOW_STALE: still read from below
  });
});

describe('BlockMap', () => {
  it('runs, fills and maps across pages, and costs nothing until written', () => {
    const m = new BlockMap();
    const far = 2 ** 40; // a block number of a huge export
    expect(m.get(far)).toBe(BELOW);
    expect(m.runEnd(0, far)).toBe(far);
    expect(m.memoryBytes).toBe(0);
    m.fill(70_000, 140_000, DATA);
    expect(m.runEnd(0, 200_000)).toBe(70_000);
    expect(m.runEnd(70_000, 200_000)).toBe(140_000);
    expect(m.runEnd(140_000, 200_000)).toBe(200_000);
    m.map(100_000, 150_000, [ZERO, ZERO_STALE, ZERO, ZERO_STALE, ZERO_STALE]);
    expect(m.get(99_999)).toBe(DATA);
    expect(m.get(100_000)).toBe(ZERO_STALE);
    expect(m.get(145_000)).toBe(ZERO);
    expect(m.has(0, 200_000, ZERO)).toBe(true);
    expect(m.has(0, 70_000, DATA)).toBe(false);
    m.fill(far, far + 2, DATA);
    expect(m.get(far + 1)).toBe(DATA);
    expect(m.memoryBytes).toBe(3 * 65536);
  });
});

describe('BlockLocks', () => {
  it('uncontended locks are synchronous; overlapping ranges wait in order; disjoint ones do not', async () => {
    const l = new BlockLocks();
    expect(l.lock(0, 3)).toBeUndefined();
    const order: string[] = [];
    const a = l.lock(3, 5)!;
    expect(a).toBeInstanceOf(Promise);
    expect(l.lock(6, 7)).toBeUndefined();
    const b = l.lock(2, 2)!;
    void a.then(() => order.push('a'));
    void b.then(() => order.push('b'));
    await tick();
    expect(order).toEqual([]);
    l.unlock(0, 3);
    await tick();
    expect(order.sort()).toEqual(['a', 'b']);
    l.unlock(3, 5);
    l.unlock(2, 2);
    l.unlock(6, 7);
    expect(l.size).toBe(0);
  });
});
