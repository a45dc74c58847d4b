import { describe, expect, it, vi } from 'vitest';
import { Errno, FLAG_REQ_ONE, type Extent, type ZeroSpan } from '@nbdx/server/api';
import { createMemoryPlugin } from './index.js';
import { PAGE_SIZE, SUB_SIZE, SparseArray, type SharedMemory } from './sparse.js';

const GiB = 2 ** 30;
const DIR_PAGES = 32 * 1024; // pages per directory, as in sparse.ts
const SUBS = PAGE_SIZE / SUB_SIZE;

/** A small deterministic PRNG, so a failure can be replayed. */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) % n;
  };
}

/**
 * The reference: page contents by page index, with the rules spelled out page by page. A page is
 * created by any write to it, dropped when zeroed whole or when a partial zero leaves it all zero.
 * And what the storage should hold: the sub-blocks written to, less those zeroed whole, those a
 * partial zero left all zero, and those of dropped pages.
 */
class Model {
  pages = new Map<number, Buffer>();
  held = new Set<number>();

  write(buf: Buffer, offset: number): void {
    for (let pos = offset; pos < offset + buf.length; ) {
      const index = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, offset + buf.length - pos);
      let p = this.pages.get(index);
      if (!p) this.pages.set(index, (p = Buffer.alloc(PAGE_SIZE)));
      buf.copy(p, inPage, pos - offset, pos - offset + n);
      for (let k = Math.floor(pos / SUB_SIZE); k * SUB_SIZE < pos + n; k++) this.held.add(k);
      pos += n;
    }
  }

  zero(count: number, offset: number): void {
    const end = offset + count;
    // Only pages that exist can change, so visit those rather than the (maybe huge) range.
    for (const [index, p] of [...this.pages]) {
      const s = Math.max(offset, index * PAGE_SIZE);
      const e = Math.min(end, (index + 1) * PAGE_SIZE);
      if (s >= e) continue;
      p.fill(0, s - index * PAGE_SIZE, e - index * PAGE_SIZE);
      const dropped = e - s === PAGE_SIZE || p.every((b) => b === 0);
      if (dropped) this.pages.delete(index);
      for (let k = index * SUBS; k < (index + 1) * SUBS; k++) {
        const ks = Math.max(s, k * SUB_SIZE);
        const ke = Math.min(e, (k + 1) * SUB_SIZE);
        const inPage = k * SUB_SIZE - index * PAGE_SIZE;
        if (dropped || (ks < ke && (ke - ks === SUB_SIZE || p.subarray(inPage, inPage + SUB_SIZE).every((b) => b === 0)))) {
          this.held.delete(k);
        }
      }
    }
  }

  /** Brute force: one type per page of the range, then neighbours of the same type merged. */
  extents(count: number, offset: number): Extent[] {
    const out: Extent[] = [];
    for (let pos = offset; pos < offset + count; ) {
      const index = Math.floor(pos / PAGE_SIZE);
      const to = Math.min(offset + count, (index + 1) * PAGE_SIZE);
      const p = this.pages.get(index);
      const type = !p ? 3 : p.every((b) => b === 0) ? 2 : 0;
      const last = out[out.length - 1];
      if (last && last.type === type) last.length += to - pos;
      else out.push({ offset: pos, length: to - pos, type });
      pos = to;
    }
    return out;
  }
}

/** Read as the core does: a buffer of garbage, then the reported zero spans filled with zeroes. */
function readAll(a: SparseArray, count: number, offset: number): { data: Buffer; holes: ZeroSpan[] } {
  const data = Buffer.alloc(count, 0xee);
  const holes = a.read(data, offset) ?? [];
  for (const h of holes) data.fill(0, h.start, h.start + h.length);
  return { data, holes };
}

/** Storage is what is held: SUB_SIZE per sub-block at least, and dense pages at least half full. */
function expectCost(a: SparseArray, subBlocks: number): void {
  expect(a.storedBytes).toBeGreaterThanOrEqual(subBlocks * SUB_SIZE);
  expect(a.storedBytes).toBeLessThanOrEqual(2 * subBlocks * SUB_SIZE);
}

describe('SparseArray', () => {
  it('reads unwritten ranges as zero spans and written ones as data', () => {
    const a = new SparseArray(10 * PAGE_SIZE);
    a.write(Buffer.alloc(100, 7), PAGE_SIZE + 50);
    const buf = Buffer.alloc(3 * PAGE_SIZE, 0xff);
    const holes = a.read(buf, 0);
    // Only the sub-block written to holds data; the rest of its page is a hole like the pages around.
    expect(holes).toEqual([
      { start: 0, length: PAGE_SIZE },
      { start: PAGE_SIZE + SUB_SIZE, length: 2 * PAGE_SIZE - SUB_SIZE },
    ]);
    expect(buf.subarray(PAGE_SIZE, PAGE_SIZE + 50).every((b) => b === 0)).toBe(true);
    expect(buf.subarray(PAGE_SIZE + 50, PAGE_SIZE + 150).every((b) => b === 7)).toBe(true);
  });

  it('frees whole pages on zero and keeps partial ones cleared', () => {
    const a = new SparseArray(4 * PAGE_SIZE);
    a.write(Buffer.alloc(4 * PAGE_SIZE, 1), 0);
    expect(a.allocatedPages).toBe(4);
    expect(a.storedBytes).toBe(4 * PAGE_SIZE);
    a.zero(2 * PAGE_SIZE, PAGE_SIZE / 2);
    expect(a.allocatedPages).toBe(3);
    // Pages 0 and 2 keep half their sub-blocks each: still one chunk each, like page 3.
    expect(a.storedBytes).toBe(3 * PAGE_SIZE);
    // A quarter: page 2 goes back to a chunk per sub-block.
    a.zero(SUB_SIZE * 2, 2 * PAGE_SIZE + PAGE_SIZE / 2);
    expect(a.storedBytes).toBe(2 * PAGE_SIZE + 2 * SUB_SIZE);
    const b = readAll(a, 4 * PAGE_SIZE, 0).data;
    expect(b.subarray(0, PAGE_SIZE / 2).every((x) => x === 1)).toBe(true);
    expect(b.subarray(PAGE_SIZE / 2, PAGE_SIZE * 2.5 + 2 * SUB_SIZE).every((x) => x === 0)).toBe(true);
    expect(b.subarray(PAGE_SIZE * 2.5 + 2 * SUB_SIZE).every((x) => x === 1)).toBe(true);
  });

  it('reports exact extents: holes, written zeroes, data; and skips empty gigabytes quickly', () => {
    const a = new SparseArray(2 ** 40);
    a.write(Buffer.alloc(PAGE_SIZE), 5 * 2 ** 30);
    a.write(Buffer.alloc(10, 1), 5 * 2 ** 30 + PAGE_SIZE);
    const ext = [...a.extents(2 ** 40, 0)];
    const merged = ext.reduce<typeof ext>((acc, e) => {
      const last = acc[acc.length - 1];
      if (last && last.type === e.type) last.length += e.length;
      else acc.push({ ...e });
      return acc;
    }, []);
    expect(merged.slice(0, 3)).toEqual([
      { offset: 0, length: 5 * 2 ** 30, type: 3 },
      { offset: 5 * 2 ** 30, length: PAGE_SIZE, type: 2 },
      { offset: 5 * 2 ** 30 + PAGE_SIZE, length: PAGE_SIZE, type: 0 },
    ]);
    expect(ext.length).toBeLessThan(2000);
  });

  it('matches a page-by-page model under random writes and zeroes, across pages, bitmap words and directories', () => {
    const size = 4 * DIR_PAGES * PAGE_SIZE;
    // Activity is concentrated near places where the walk changes gear: the start of a directory,
    // bitmap word (32 pages) and summary (1024 pages) boundaries, and directory boundaries.
    const hot = [0, 30, 1000, DIR_PAGES - 40, DIR_PAGES + 2040, 3 * DIR_PAGES - 3, 4 * DIR_PAGES - 70].map(
      (p) => p * PAGE_SIZE,
    );
    for (const seed of [1, 2, 3]) {
      const r = rng(seed);
      const a = new SparseArray(size);
      const m = new Model();
      const somewhere = () => Math.min(size - 1, hot[r(hot.length)]! + r(70 * PAGE_SIZE));
      for (let op = 0; op < 600; op++) {
        const at = somewhere();
        const kind = r(10);
        if (kind < 5) {
          const len = Math.min(size - at, 1 + r(r(4) === 0 ? 3 * PAGE_SIZE : 5000));
          // Some writes are of zeroes: those pages must be reported ZERO, not data or hole.
          const buf = r(3) === 0 ? Buffer.alloc(len) : Buffer.alloc(len, 1 + r(255));
          a.write(buf, at);
          m.write(buf, at);
        } else {
          const len = Math.min(size - at, kind === 9 ? r(size) : 1 + r(r(2) ? PAGE_SIZE : 40 * PAGE_SIZE));
          a.zero(len, at);
          m.zero(len, at);
        }
        expect(a.allocatedPages).toBe(m.pages.size);
        expectCost(a, m.held.size);
        if (op % 3 === 0) {
          // Both ends usually among the pages in use, so ranges start and end inside them.
          const x = r(8) ? somewhere() : r(size);
          const y = r(8) ? somewhere() : r(size);
          const from = Math.min(x, y);
          const count = Math.max(1, Math.abs(x - y));
          const want = m.extents(count, from);
          expect([...a.extents(count, from)]).toEqual(want);
          // Stopping early yields the same first extents, each whole.
          const k = 1 + r(4);
          expect([...a.extents(count, from, k)]).toEqual(want.slice(0, k));
        }
      }
      expect([...a.extents(size, 0)]).toEqual(m.extents(size, 0));
      // And the bytes themselves, with holes exactly where no sub-block is held.
      for (const [index, p] of m.pages) {
        const { data, holes } = readAll(a, PAGE_SIZE, index * PAGE_SIZE);
        expect(data.equals(p)).toBe(true);
        const unheld: ZeroSpan[] = [];
        for (let k = 0; k < SUBS; k++) {
          if (m.held.has(index * SUBS + k)) continue;
          const last = unheld[unheld.length - 1];
          if (last && last.start + last.length === k * SUB_SIZE) last.length += SUB_SIZE;
          else unheld.push({ start: k * SUB_SIZE, length: SUB_SIZE });
        }
        expect(holes).toEqual(unheld);
      }
    }
  });

  it('finds allocated pages at every bitmap boundary of a directory', () => {
    const a = new SparseArray(2 * DIR_PAGES * PAGE_SIZE);
    const m = new Model();
    const at = [0, 1, 31, 32, 63, 64, 1023, 1024, 1025, 2047, 2048, 31 * 1024, DIR_PAGES - 1, DIR_PAGES];
    for (const p of at) {
      a.write(Buffer.from([9]), p * PAGE_SIZE + 7);
      m.write(Buffer.from([9]), p * PAGE_SIZE + 7);
    }
    const size = 2 * DIR_PAGES * PAGE_SIZE;
    expect([...a.extents(size, 0)]).toEqual(m.extents(size, 0));
    for (const p of at) {
      // Start just after each page, so the search begins inside or at the end of a word.
      expect([...a.extents(size - (p + 1) * PAGE_SIZE, (p + 1) * PAGE_SIZE)]).toEqual(
        m.extents(size - (p + 1) * PAGE_SIZE, (p + 1) * PAGE_SIZE),
      );
      // End inside each page, after a hole: the page must still be found.
      const from = Math.max(0, p - 1) * PAGE_SIZE + 9;
      expect([...a.extents(p * PAGE_SIZE + 3 - from, from)]).toEqual(m.extents(p * PAGE_SIZE + 3 - from, from));
    }
    // Zeroing from the middle of page 2 to the middle of the last one frees all but those two.
    a.zero(size - 3 * PAGE_SIZE, 2.5 * PAGE_SIZE);
    m.zero(size - 3 * PAGE_SIZE, 2.5 * PAGE_SIZE);
    expect(a.allocatedPages).toBe(m.pages.size);
    expect([...m.pages.keys()].sort((x, y) => x - y)).toEqual([0, 1]);
    expect([...a.extents(size, 0)]).toEqual(m.extents(size, 0));
  });

  it('zero over many directories frees exactly the pages of the range', () => {
    const dirs = 64;
    const a = new SparseArray(dirs * GiB);
    const m = new Model();
    const r = rng(7);
    for (let d = 0; d < dirs; d++) {
      // The first and last page of every directory, and a few anywhere in it.
      for (const p of [0, DIR_PAGES - 1, r(DIR_PAGES), r(DIR_PAGES), r(DIR_PAGES)]) {
        const buf = Buffer.alloc(PAGE_SIZE, 1 + r(255));
        a.write(buf, (d * DIR_PAGES + p) * PAGE_SIZE);
        m.write(buf, (d * DIR_PAGES + p) * PAGE_SIZE);
      }
    }
    const cases: [number, number][] = [
      [5 * GiB + 123, 20 * GiB], // starts and ends inside pages
      [30 * GiB, 4 * GiB], // whole directories only
      [40 * GiB - PAGE_SIZE, 2 * PAGE_SIZE], // the last page of one and first of the next
      [0, dirs * GiB], // everything
    ];
    for (const [offset, count] of cases) {
      a.zero(count, offset);
      m.zero(count, offset);
      expect(a.allocatedPages).toBe(m.pages.size);
      expect([...a.extents(dirs * GiB, 0)]).toEqual(m.extents(dirs * GiB, 0));
    }
    expect(a.allocatedPages).toBe(0);
  });

  it('extents and zero cost the allocated pages and directories of the range, not its length', () => {
    // One byte per GiB on a 1 TiB disk: every directory exists, each holding one page. Before the
    // bitmaps, extents or zero over 4 GiB took 4 * 32768 steps (one per page).
    const a = new SparseArray(2 ** 40);
    for (let d = 0; d < 1024; d++) a.write(Buffer.from([1]), d * GiB + (d % 3) * 12345 * PAGE_SIZE + 5);
    expect(a.allocatedPages).toBe(1024);

    for (const offset of [0, 100 * GiB, 200 * GiB + 7 * PAGE_SIZE + 3]) {
      const before = a.walkSteps;
      const ext = [...a.extents(4 * GiB, offset)];
      // At most three segments per directory (hole, page, hole), plus the ends.
      expect(a.walkSteps - before).toBeLessThanOrEqual(4 * 3 + 3);
      expect(ext.reduce((n, e) => n + e.length, 0)).toBe(4 * GiB);
    }
    // REQ_ONE-style queries stop at the first extent.
    let before = a.walkSteps;
    expect([...a.extents(4 * GiB, 0, 1)]).toEqual([{ offset: 0, length: PAGE_SIZE, type: 0 }]);
    expect(a.walkSteps - before).toBeLessThanOrEqual(2);

    // The whole disk: steps grow with directories (1024), not with pages (2^25).
    before = a.walkSteps;
    const all = [...a.extents(2 ** 40, 0)];
    expect(all.filter((e) => e.type === 0)).toHaveLength(1024);
    expect(a.walkSteps - before).toBeLessThanOrEqual(3 * 1024 + 3);

    // Directory 300's page (page 0) lies before the second range, 304's (page 12345) after it.
    for (const [offset, freed] of [
      [10 * GiB, 4],
      [300 * GiB + 5 * PAGE_SIZE + 1, 3],
    ] as const) {
      before = a.walkSteps;
      const pages = a.allocatedPages;
      a.zero(4 * GiB, offset);
      expect(a.walkSteps - before).toBeLessThanOrEqual(4 * 2 + 3);
      expect(pages - a.allocatedPages).toBe(freed);
    }
    before = a.walkSteps;
    a.zero(2 ** 40, 0);
    expect(a.allocatedPages).toBe(0);
    expect(a.walkSteps - before).toBeLessThanOrEqual(2 * 1024 + 2);
  });

  it('the plugin asks for one extent only when the client sent REQ_ONE', async () => {
    const plugin = createMemoryPlugin();
    plugin.config!('size', '1T');
    plugin.configComplete!();
    plugin.getReady!();
    plugin.pwrite!({}, Buffer.alloc(10, 1), 3 * GiB, 0);
    const one = [...((await plugin.extents!({}, 8 * GiB, 0, FLAG_REQ_ONE)) as Iterable<Extent>)];
    expect(one).toEqual([{ offset: 0, length: 3 * GiB, type: 3 }]);
    const all = [...((await plugin.extents!({}, 8 * GiB, 0, 0)) as Iterable<Extent>)];
    expect(all).toEqual([
      { offset: 0, length: 3 * GiB, type: 3 },
      { offset: 3 * GiB, length: PAGE_SIZE, type: 0 },
      { offset: 3 * GiB + PAGE_SIZE, length: 5 * GiB - PAGE_SIZE, type: 3 },
    ]);
  });

  it('each plugin in a process gets its own disk in shared memory, also after one that was never unloaded', async () => {
    const start = (size: string) => {
      const p = createMemoryPlugin();
      p.config!('size', size);
      p.configComplete!();
      p.getReady!();
      return p;
    };
    const read = async (p: ReturnType<typeof start>, n: number, at: number) => {
      const b = Buffer.alloc(n, 0xee);
      for (const h of (await p.pread!({}, b, at, 0)) ?? []) b.fill(0, h.start, h.start + h.length);
      return b;
    };
    const a = start('1G');
    a.pwrite!({}, Buffer.alloc(4096, 1), 0, 0);
    const b = start('1G'); // a is still up: b must not see its data
    expect((await read(b, 4096, 0)).equals(Buffer.alloc(4096))).toBe(true);
    b.pwrite!({}, Buffer.alloc(4096, 2), 0, 0);
    expect((await read(a, 4096, 0)).equals(Buffer.alloc(4096, 1))).toBe(true);
    await b.unload!();
    const c = start('1G');
    expect((await read(c, 4096, 0)).equals(Buffer.alloc(4096))).toBe(true);
    // A second copy of the module (as a program reloading it would have) counts from 0 again:
    // it must still not take a's buffers, which were never given up.
    vi.resetModules();
    const again = (await import('./index.js')).createMemoryPlugin();
    again.config!('size', '1G');
    again.configComplete!();
    again.getReady!();
    expect((await read(again as ReturnType<typeof start>, 4096, 0)).equals(Buffer.alloc(4096))).toBe(true);
    await again.unload!();
    await a.unload!();
    await c.unload!();
  });
});

/** Bytes that name their own offset (and a round), so misplaced or stale data shows. */
function pattern(length: number, offset: number, round = 0): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = ((offset + i) * 7 + (offset + i) / 251 + round * 13) & 0xff || 1;
  return b;
}

describe('SparseArray sub-blocks', () => {
  it('writes across sub-block and page boundaries take only the sub-blocks they touch', () => {
    const a = new SparseArray(4 * PAGE_SIZE);
    // The last 3000 bytes of page 0 (part of sub-block 7), then sub-block 0 of page 1 whole and
    // part of its sub-block 1.
    const at = PAGE_SIZE - 3000;
    const data = pattern(10_000, at);
    a.write(data, at);
    expect(a.allocatedPages).toBe(2);
    expect(a.storedBytes).toBe(3 * SUB_SIZE);
    const { data: got, holes } = readAll(a, 2 * PAGE_SIZE, 0);
    const want = Buffer.alloc(2 * PAGE_SIZE);
    data.copy(want, at);
    expect(got.equals(want)).toBe(true);
    expect(holes).toEqual([
      { start: 0, length: 7 * SUB_SIZE },
      { start: PAGE_SIZE + 2 * SUB_SIZE, length: PAGE_SIZE - 2 * SUB_SIZE },
    ]);
    // Extents stay page by page, as before sub-blocks.
    expect([...a.extents(4 * PAGE_SIZE, 0)]).toEqual([
      { offset: 0, length: 2 * PAGE_SIZE, type: 0 },
      { offset: 2 * PAGE_SIZE, length: 2 * PAGE_SIZE, type: 3 },
    ]);
    // A read that starts and ends inside sub-blocks, with and without data.
    const part = readAll(a, 6000, PAGE_SIZE + SUB_SIZE + 100);
    expect(part.data.equals(want.subarray(PAGE_SIZE + SUB_SIZE + 100, PAGE_SIZE + SUB_SIZE + 6100))).toBe(true);
    expect(part.holes).toEqual([{ start: SUB_SIZE - 100, length: 6000 - (SUB_SIZE - 100) }]);
  });

  it('never lets stale bytes of a reused chunk through: the unwritten part of a sub-block reads as zero', () => {
    const a = new SparseArray(8 * PAGE_SIZE);
    // Fill chunks of both kinds with 0xff, then free them: their memory goes back to the slabs
    // as it is, and the next chunks handed out are those.
    a.write(Buffer.alloc(PAGE_SIZE, 0xff), 0);
    for (let k = 0; k < 4; k++) a.write(Buffer.alloc(SUB_SIZE, 0xff), PAGE_SIZE + 2 * k * SUB_SIZE);
    a.zero(2 * PAGE_SIZE, 0);
    expect(a.storedBytes).toBe(0);
    // A few bytes in the middle of a sub-block of a sparse page.
    a.write(Buffer.from([1, 2, 3]), 4 * PAGE_SIZE + 5000);
    // A page filled in 3000-byte pieces: it becomes dense when its last sub-block is first
    // touched, and the end of that sub-block was never written.
    for (let pos = 0; pos < 30_000; pos += 3000) a.write(pattern(3000, pos), 6 * PAGE_SIZE + pos);
    expect(a.storedBytes).toBe(SUB_SIZE + PAGE_SIZE);
    const { data } = readAll(a, 8 * PAGE_SIZE, 0);
    const want = Buffer.alloc(8 * PAGE_SIZE);
    Buffer.from([1, 2, 3]).copy(want, 4 * PAGE_SIZE + 5000);
    pattern(30_000, 0).copy(want, 6 * PAGE_SIZE);
    expect(data.equals(want)).toBe(true);
  });

  it('a page becomes one chunk when more than half written, and goes back when less than half is left', () => {
    const a = new SparseArray(2 * PAGE_SIZE);
    const order = [5, 0, 7, 2, 6, 1, 3, 4];
    for (let i = 0; i < SUBS; i++) {
      const k = order[i]!;
      a.write(pattern(SUB_SIZE, k * SUB_SIZE), k * SUB_SIZE);
      expect(a.storedBytes).toBe(i + 1 <= SUBS / 2 ? (i + 1) * SUB_SIZE : PAGE_SIZE);
    }
    const full = pattern(PAGE_SIZE, 0);
    // A full page is held as its chunk's view alone, and reads in one piece, with no holes.
    expect(a.partialPages).toBe(0);
    const buf = Buffer.alloc(PAGE_SIZE);
    expect(a.read(buf, 0)).toBeUndefined();
    expect(buf.equals(full)).toBe(true);
    // Trimming part of a sub-block keeps it (and the page dense); trimming four whole ones leaves
    // half the page: still dense.
    a.zero(100, 10);
    full.fill(0, 10, 110);
    expect(a.partialPages).toBe(0);
    a.zero(4 * SUB_SIZE, 4 * SUB_SIZE);
    expect(a.partialPages).toBe(1);
    expect(a.storedBytes).toBe(PAGE_SIZE);
    // One more, and a bit of the one before it: back to one chunk per sub-block.
    a.zero(SUB_SIZE + 1, 3 * SUB_SIZE - 1);
    full.fill(0, 3 * SUB_SIZE - 1, PAGE_SIZE);
    expect(a.storedBytes).toBe(3 * SUB_SIZE);
    const { data, holes } = readAll(a, PAGE_SIZE, 0);
    expect(data.equals(full)).toBe(true);
    expect(holes).toEqual([{ start: 3 * SUB_SIZE, length: 5 * SUB_SIZE }]);
    // A write of the whole page makes it one chunk again, without copying the old sub-blocks.
    a.write(pattern(PAGE_SIZE, 0, 1), 0);
    expect(a.storedBytes).toBe(PAGE_SIZE);
    expect(readAll(a, PAGE_SIZE, 0).data.equals(pattern(PAGE_SIZE, 0, 1))).toBe(true);
  });

  it('zero and trim of partial sub-blocks clear bytes, and drop a sub-block once it is all zero', () => {
    const a = new SparseArray(PAGE_SIZE);
    a.write(Buffer.alloc(SUB_SIZE, 0x11), SUB_SIZE);
    a.zero(100, SUB_SIZE + 10);
    expect(a.storedBytes).toBe(SUB_SIZE);
    const want = Buffer.alloc(PAGE_SIZE);
    want.fill(0x11, SUB_SIZE, 2 * SUB_SIZE).fill(0, SUB_SIZE + 10, SUB_SIZE + 110);
    expect(readAll(a, PAGE_SIZE, 0).data.equals(want)).toBe(true);
    expect([...a.extents(PAGE_SIZE, 0)]).toEqual([{ offset: 0, length: PAGE_SIZE, type: 0 }]);
    // The rest of it, in two pieces that each stop inside it: then nothing is left.
    a.zero(20, SUB_SIZE - 10);
    expect(a.storedBytes).toBe(SUB_SIZE);
    a.zero(SUB_SIZE, SUB_SIZE + 110);
    expect(a.storedBytes).toBe(0);
    expect(a.allocatedPages).toBe(0);
    expect([...a.extents(PAGE_SIZE, 0)]).toEqual([{ offset: 0, length: PAGE_SIZE, type: 3 }]);
    // Zeroing where nothing was written allocates nothing.
    a.zero(PAGE_SIZE - 20, 10);
    expect(a.allocatedPages).toBe(0);
  });

  it('extents over mixed pages: one extent per page, ZERO only where every byte reads zero', () => {
    const a = new SparseArray(7 * PAGE_SIZE);
    // Page 0: dense, data, with sub-block 2 written with zeroes.
    const p0 = pattern(PAGE_SIZE, 0);
    p0.fill(0, 2 * SUB_SIZE, 3 * SUB_SIZE);
    a.write(p0, 0);
    // Page 1: sparse, sub-block 5 data and 6 zeroes.
    a.write(pattern(SUB_SIZE, 0), PAGE_SIZE + 5 * SUB_SIZE);
    a.write(Buffer.alloc(10), PAGE_SIZE + 6 * SUB_SIZE + 100);
    // Page 2: sparse, only zeroes written: ZERO, not a hole (as when it was a zero-filled page).
    a.write(Buffer.alloc(100), 2 * PAGE_SIZE + 3 * SUB_SIZE);
    // Page 3 never written; page 4 dense, all zeroes; page 5 dense, data; page 6: one byte.
    a.write(Buffer.alloc(PAGE_SIZE), 4 * PAGE_SIZE);
    a.write(pattern(PAGE_SIZE, 1), 5 * PAGE_SIZE);
    a.write(Buffer.from([1]), 6 * PAGE_SIZE + 7 * SUB_SIZE + 5);
    const want = [
      { offset: 0, length: 2 * PAGE_SIZE, type: 0 },
      { offset: 2 * PAGE_SIZE, length: PAGE_SIZE, type: 2 },
      { offset: 3 * PAGE_SIZE, length: PAGE_SIZE, type: 3 },
      { offset: 4 * PAGE_SIZE, length: PAGE_SIZE, type: 2 },
      { offset: 5 * PAGE_SIZE, length: 2 * PAGE_SIZE, type: 0 },
    ];
    expect([...a.extents(7 * PAGE_SIZE, 0)]).toEqual(want);
    for (let k = 1; k <= want.length; k++) expect([...a.extents(7 * PAGE_SIZE, 0, k)]).toEqual(want.slice(0, k));
    // Ranges starting and ending inside pages are clipped, not rounded.
    expect([...a.extents(PAGE_SIZE, 2 * PAGE_SIZE - 7)]).toEqual([
      { offset: 2 * PAGE_SIZE - 7, length: 7, type: 0 },
      { offset: 2 * PAGE_SIZE, length: PAGE_SIZE - 7, type: 2 },
    ]);
    // Never ZERO for anything that reads non-zero: check every extent against the bytes.
    const { data } = readAll(a, 7 * PAGE_SIZE, 0);
    for (const e of want) {
      const bytes = data.subarray(e.offset, e.offset + e.length);
      expect(bytes.every((x) => x === 0)).toBe((e.type & 2) !== 0);
    }
    // Page 1 loses its data sub-block: it now reads all zero, so it goes, the zero sub-block too.
    const stored = a.storedBytes;
    a.zero(SUB_SIZE, PAGE_SIZE + 5 * SUB_SIZE);
    expect(a.storedBytes).toBe(stored - 2 * SUB_SIZE);
    expect([...a.extents(2 * PAGE_SIZE, 0)]).toEqual([
      { offset: 0, length: PAGE_SIZE, type: 0 },
      { offset: PAGE_SIZE, length: PAGE_SIZE, type: 3 },
    ]);
  });

  it('matches a flat reference buffer under many random writes, zeroes and reads', () => {
    const size = 20 * PAGE_SIZE + 3 * SUB_SIZE + 100;
    const subCount = Math.ceil(size / SUB_SIZE);
    for (const seed of [11, 12, 13, 14]) {
      const r = rng(seed);
      const a = new SparseArray(size);
      const ref = Buffer.alloc(size);
      // Which sub-blocks hold data, by the rules: written → yes; zeroed whole, or zeroed in part
      // and then all zero → no.
      const held = new Uint8Array(subCount);
      const heldCount = () => held.reduce((n, x) => n + x, 0);
      // Which pages exist: written to, and not since zeroed whole or left all zero by a zero.
      const pageCount = Math.ceil(size / PAGE_SIZE);
      const exists = new Uint8Array(pageCount);
      const pageAll0 = (i: number) => ref.subarray(i * PAGE_SIZE, Math.min(size, (i + 1) * PAGE_SIZE)).every((x) => x === 0);
      const subAll0 = (k: number) => ref.subarray(k * SUB_SIZE, Math.min(size, (k + 1) * SUB_SIZE)).every((x) => x === 0);
      // Starts and lengths aligned to nothing, to sub-blocks, or to pages.
      const place = (): [number, number] => {
        const unit = [1, 1, SUB_SIZE, PAGE_SIZE][r(4)]!;
        const at = Math.min(size - 1, r(Math.ceil(size / unit)) * unit);
        const maxLen = [200, SUB_SIZE, 3 * PAGE_SIZE, size][r(4)]!;
        const len = Math.min(size - at, unit === 1 ? 1 + r(maxLen) : unit * (1 + r(Math.ceil(maxLen / unit))));
        return [at, len];
      };
      for (let op = 0; op < 1500; op++) {
        const [at, len] = place();
        const kind = r(10);
        if (kind < 5) {
          const buf = r(4) === 0 ? Buffer.alloc(len) : pattern(len, at, op);
          // Now and then through a view, as the core does with payloads it receives in place.
          const v = r(3) === 0 ? a.view(len, at, true) : undefined;
          if (v) {
            buf.copy(v);
            a.write(v, at);
            a.releaseView(v, true);
          } else a.write(buf, at);
          buf.copy(ref, at);
          for (let k = Math.floor(at / SUB_SIZE); k * SUB_SIZE < at + len; k++) held[k] = 1;
          for (let i = Math.floor(at / PAGE_SIZE); i * PAGE_SIZE < at + len; i++) exists[i] = 1;
        } else if (kind < 8) {
          a.zero(len, at);
          ref.fill(0, at, at + len);
          for (let k = Math.floor(at / SUB_SIZE); k * SUB_SIZE < at + len; k++) {
            const whole = at <= k * SUB_SIZE && at + len >= Math.min(size, (k + 1) * SUB_SIZE);
            if (whole || subAll0(k)) held[k] = 0;
          }
          for (let i = Math.floor(at / PAGE_SIZE); i * PAGE_SIZE < at + len; i++) {
            if (!pageAll0(i)) continue;
            exists[i] = 0;
            held.fill(0, i * SUBS, (i + 1) * SUBS);
          }
        } else if (kind === 8) {
          // A reply sent from the array's memory: where it is one piece, it holds the data.
          const v = a.view(len, at, false);
          if (v) {
            expect(v.equals(ref.subarray(at, at + len))).toBe(true);
            a.releaseView(v, true);
          }
        } else {
          // Read twice with different garbage in the buffer: every byte not reported as a hole
          // must have been written by the read, and holes only where nothing is held.
          const x = Buffer.alloc(len, 0x00);
          const y = Buffer.alloc(len, 0xff);
          const hx = a.read(x, at) ?? [];
          const hy = a.read(y, at) ?? [];
          expect(hy).toEqual(hx);
          for (const h of hx) {
            x.fill(0, h.start, h.start + h.length);
            y.fill(0, h.start, h.start + h.length);
            for (let k = Math.floor((at + h.start) / SUB_SIZE); k * SUB_SIZE < at + h.start + h.length; k++) {
              expect(held[k]).toBe(0);
            }
          }
          expect(x.equals(ref.subarray(at, at + len))).toBe(true);
          expect(y.equals(x)).toBe(true);
        }
        expectCost(a, heldCount());
        if (op % 10 === 0) {
          expect(a.allocatedPages).toBe(exists.reduce((n, x) => n + x, 0));
          // Exactly the pages with every sub-block held are held as a plain view.
          let full = 0;
          for (let i = 0; (i + 1) * SUBS <= subCount; i++) {
            if (held.subarray(i * SUBS, (i + 1) * SUBS).every((x) => x === 1)) full++;
          }
          expect(a.allocatedPages - a.partialPages).toBe(full);
          const [from, count] = place();
          const ext = [...a.extents(count, from)];
          // Contiguous, covering the range, each type what the reference says.
          expect(ext[0]!.offset).toBe(from);
          expect(ext.reduce((n, e) => n + e.length, 0)).toBe(count);
          for (const e of ext) {
            for (let i = Math.floor(e.offset / PAGE_SIZE); i * PAGE_SIZE < e.offset + e.length; i++) {
              expect(e.type).toBe(!exists[i] ? 3 : pageAll0(i) ? 2 : 0);
            }
          }
        }
      }
      // The whole disk at the end.
      expect(readAll(a, size, 0).data.equals(ref)).toBe(true);
      a.zero(size, 0);
      expect(a.storedBytes).toBe(0);
      expect(a.allocatedPages).toBe(0);
    }
  });

  it('slabs emptied and released, then numbered again, keep every chunk where it belongs', () => {
    // Chunks are taken in order of writing, so writing runs of pages and zeroing runs of them
    // empties whole slabs (2 MiB: 512 sub-blocks or 64 pages): they are released and their
    // numbers given to the next slabs, while other slabs still hold data.
    const size = 2 ** 34;
    const a = new SparseArray(size);
    const m = new Model();
    const r = rng(21);
    const run = (first: number, count: number, whole: boolean, round: number) => {
      for (let index = first; index < first + count; index++) {
        const at = index * PAGE_SIZE + (whole ? 0 : r(SUBS) * SUB_SIZE + r(100));
        const buf = pattern(whole ? PAGE_SIZE : 1 + r(SUB_SIZE - 100), at, round);
        a.write(buf, at);
        m.write(buf, at);
      }
    };
    const zero = (count: number, at: number) => {
      a.zero(count, at);
      m.zero(count, at);
    };
    const check = () => {
      expect(a.allocatedPages).toBe(m.pages.size);
      expectCost(a, m.held.size);
      for (const [index, p] of m.pages) expect(readAll(a, PAGE_SIZE, index * PAGE_SIZE).data.equals(p)).toBe(true);
    };
    for (let round = 0; round < 3; round++) {
      const base = round * 100_000;
      run(base, 3000, false, round); // six slabs of sub-blocks
      run(base + 50_000, 400, true, round); // seven slabs of pages
      check();
      // The first 2000 sparse pages and the first 300 dense ones: four and four slabs emptied.
      zero(2000 * PAGE_SIZE, base * PAGE_SIZE);
      zero(300 * PAGE_SIZE, (base + 50_000) * PAGE_SIZE);
      // And some chunks here and there.
      for (let i = 0; i < 200; i++) zero(SUB_SIZE, (base + 2000 + r(1000)) * PAGE_SIZE + r(SUBS) * SUB_SIZE);
      check();
      // New chunks: from the slabs with room, then slabs with the released numbers.
      run(base + 10_000, 2500, false, round);
      run(base + 60_000, 300, true, round);
      check();
    }
    a.zero(size, 0);
    expect(a.storedBytes).toBe(0);
  });

  it('slabs emptied by trims are reused, by either kind, before the data grows', () => {
    const a = new SparseArray(GiB);
    const MiB = 2 ** 20;
    a.write(pattern(300 * MiB, 0, 9), 0);
    expect(a.slabBytes).toBe(300 * MiB);
    expect(a.dataBytes).toBe(300 * MiB);
    expect(readAll(a, 300 * MiB, 0).data.equals(pattern(300 * MiB, 0, 9))).toBe(true);
    a.zero(300 * MiB, 0);
    // One empty slab is kept for the next write; the others are free, but the data keeps its size.
    expect(a.slabBytes).toBe(2 * MiB);
    expect(a.dataBytes).toBe(300 * MiB);
    // Scattered 4 KiB writes (small chunks) take the freed slabs: nothing new is made.
    for (let i = 0; i < 1000; i++) a.write(pattern(SUB_SIZE, i * 7 * PAGE_SIZE, 10), i * 7 * PAGE_SIZE);
    a.write(pattern(4 * MiB, 500 * MiB, 11), 500 * MiB);
    expect(a.dataBytes).toBe(300 * MiB);
    for (let i = 0; i < 1000; i++) expect(readAll(a, SUB_SIZE, i * 7 * PAGE_SIZE).data.equals(pattern(SUB_SIZE, i * 7 * PAGE_SIZE, 10))).toBe(true);
    expect(readAll(a, 4 * MiB, 500 * MiB).data.equals(pattern(4 * MiB, 500 * MiB, 11))).toBe(true);
  });

  it('out of reserved memory: ENOMEM, and what was written before stays intact', () => {
    // Data capped at two slabs (4 MiB): one for pages, one for sub-blocks.
    const small: SharedMemory = (role, bytes, max) =>
      max === undefined ? new SharedArrayBuffer(bytes) : new SharedArrayBuffer(bytes, { maxByteLength: role === 'data' ? 4 * 2 ** 20 : max });
    const a = new SparseArray(GiB, small);
    const MiB = 2 ** 20;
    a.write(pattern(2 * MiB, 0, 1), 0); // the first slab, full
    a.write(pattern(100, 5 * MiB + 10, 2), 5 * MiB + 10); // a sub-block: the second slab
    let err: unknown;
    try {
      a.write(pattern(PAGE_SIZE, 10 * MiB, 3), 10 * MiB); // a page: no slab left for it
    } catch (e) {
      err = e;
    }
    expect(err).toMatchObject({ errno: Errno.ENOMEM });
    expect(String((err as Error).message)).toMatch(/memory disk: out of room for data/);
    // A sparse page whose first sub-block could not be had is not left behind either.
    for (let i = 0; i < 600; i++) {
      try {
        a.write(pattern(100, 20 * MiB + i * PAGE_SIZE, 4), 20 * MiB + i * PAGE_SIZE);
      } catch {
        break;
      }
    }
    const pages = a.allocatedPages;
    expect([...a.extents(GiB, 0)].filter((e) => e.type === 0).reduce((n, e) => n + e.length / PAGE_SIZE, 0)).toBe(pages);
    expect(readAll(a, 2 * MiB, 0).data.equals(pattern(2 * MiB, 0, 1))).toBe(true);
    expect(readAll(a, 100, 5 * MiB + 10).data.equals(pattern(100, 5 * MiB + 10, 2))).toBe(true);
    // Trimmed, the memory is there again.
    a.zero(2 * MiB, 0);
    a.write(pattern(PAGE_SIZE, 10 * MiB, 3), 10 * MiB);
    expect(readAll(a, PAGE_SIZE, 10 * MiB).data.equals(pattern(PAGE_SIZE, 10 * MiB, 3))).toBe(true);
  });

  it('a page written in order becomes dense correctly when its chunks straddle two slabs', () => {
    // 510 pages of one sub-block take the first 510 chunks of the first 2 MiB slab (512 of
    // 4 KiB); then a page written a sub-block at a time gets chunks 510 and 511 of that slab and
    // the first ones of the next: consecutive numbers, not consecutive memory.
    const a = new SparseArray(2 ** 30);
    for (let i = 0; i < 510; i++) a.write(pattern(SUB_SIZE, i * PAGE_SIZE), i * PAGE_SIZE);
    const at = 1000 * PAGE_SIZE;
    for (let k = 0; k < SUBS; k++) a.write(pattern(SUB_SIZE, at + k * SUB_SIZE), at + k * SUB_SIZE);
    expect(readAll(a, PAGE_SIZE, at).data.equals(pattern(PAGE_SIZE, at))).toBe(true);
    for (const i of [0, 1, 508, 509]) expect(readAll(a, SUB_SIZE, i * PAGE_SIZE).data.equals(pattern(SUB_SIZE, i * PAGE_SIZE))).toBe(true);
  });

  it('scattered 4 KiB writes cost 4 KiB each (the old pages cost 32 KiB)', () => {
    const a = new SparseArray(2 ** 40);
    const r = rng(5);
    const buf = pattern(SUB_SIZE, 0);
    const n = 8192;
    const pages = new Set<number>();
    while (pages.size < n) {
      const index = r(2 ** 25); // pages of a 1 TiB disk
      if (pages.has(index)) continue;
      pages.add(index);
      a.write(buf, index * PAGE_SIZE + r(SUBS) * SUB_SIZE);
    }
    expect(a.allocatedPages).toBe(n);
    expect(a.storedBytes).toBe(n * SUB_SIZE);
    // The slabs the chunks come from: the chunks and at most the slack of the slab being filled.
    // (Resident memory, arenas included, is measured in rss.test.ts.)
    expect(a.slabBytes).toBeLessThanOrEqual(n * SUB_SIZE + 2 * 2 ** 20);
    a.zero(2 ** 40, 0);
    expect(a.storedBytes).toBe(0);
  });
});

describe('SparseArray views (replies sent from its memory, payloads received into it)', () => {
  const RUN = 8 * PAGE_SIZE;

  it('full pages in consecutive chunks are one view, at any offset and length inside them', () => {
    const a = new SparseArray(GiB);
    const data = pattern(RUN, 0, 1);
    a.write(data, 4 * RUN);
    for (const [at, len] of [[0, RUN], [100, 100_000], [PAGE_SIZE - 1, 2], [RUN - 1, 1]] as const) {
      const v = a.view(len, 4 * RUN + at, false)!;
      expect(v.equals(data.subarray(at, at + len))).toBe(true);
      a.releaseView(v, true);
    }
    // Not one piece: a page never written, a page written in part, the edge of the run.
    expect(a.view(RUN, 5 * RUN - PAGE_SIZE, false)).toBeUndefined();
    a.write(Buffer.alloc(100, 7), 6 * RUN);
    expect(a.view(100, 6 * RUN, false)).toBeUndefined();
    expect(a.view(RUN, 0, false)).toBeUndefined();
  });

  it('a payload view over pages never written takes them whole; other shapes are copied', () => {
    const a = new SparseArray(GiB);
    const v = a.view(RUN, RUN, true)!;
    expect(v.length).toBe(RUN);
    expect(a.allocatedPages).toBe(8);
    expect(a.storedBytes).toBe(RUN);
    const data = pattern(RUN, RUN, 2);
    data.copy(v);
    a.write(v, RUN); // the core hands the view back as the payload: nothing to copy
    a.releaseView(v, true);
    expect(readAll(a, RUN, RUN).data.equals(data)).toBe(true);
    expect([...a.extents(3 * RUN, 0)].map((e) => e.type)).toEqual([3, 0, 3]);
    // Overwriting what it now holds: the same memory.
    const again = a.view(RUN, RUN, true)!;
    expect(again.buffer).toBe(v.buffer);
    expect(again.byteOffset).toBe(v.byteOffset);
    a.releaseView(again, true);
    // Pages not covered whole, or part written and part not: no view.
    expect(a.view(RUN - 1, 3 * RUN, true)).toBeUndefined();
    expect(a.view(RUN, 3 * RUN + 1, true)).toBeUndefined();
    expect(a.view(2 * RUN, 0, true)).toBeUndefined();
    expect(a.allocatedPages).toBe(8);
  });

  it('a run of chunks for a payload never spans two slabs', () => {
    const a = new SparseArray(GiB);
    // 60 pages fill most of the first slab (64 chunks of 32 KiB): a run of 8 would cross into the next.
    a.write(pattern(60 * PAGE_SIZE, 0, 7), 0);
    const data = pattern(RUN, 64 * PAGE_SIZE, 8);
    for (let i = 0; i < 4; i++) {
      const at = 64 * PAGE_SIZE + i * RUN;
      const v = a.view(RUN, at, true);
      if (v) {
        data.copy(v);
        a.write(v, at);
        a.releaseView(v, true);
      } else a.write(data, at);
      expect(readAll(a, RUN, at).data.equals(data)).toBe(true);
    }
    a.zero(GiB, 0);
    expect(a.storedBytes).toBe(0);
  });

  it('chunks freed while a reply is sent from them are not reused until it is given back', () => {
    const a = new SparseArray(GiB);
    const old = pattern(RUN, 0, 3);
    a.write(old, 0);
    const reply = a.view(RUN, 0, false)!;
    a.zero(RUN, 0); // a trim while the reply waits for the socket
    expect(a.storedBytes).toBe(0);
    expect(a.allocatedPages).toBe(0);
    // New data elsewhere must not land in the chunks the reply is sent from.
    for (let i = 1; i <= 64; i++) a.write(pattern(RUN, i * RUN, 4), i * RUN);
    expect(reply.equals(old)).toBe(true);
    a.releaseView(reply, true);
    // Given back, they are used again once the slab being filled is full.
    let reused = false;
    for (let i = 0; i < 200 && !reused; i++) {
      const at = 100 * RUN + i * PAGE_SIZE;
      a.write(pattern(PAGE_SIZE, at, 5), at);
      const v = a.view(PAGE_SIZE, at, false)!;
      reused = v.buffer === reply.buffer && v.byteOffset >= reply.byteOffset && v.byteOffset < reply.byteOffset + RUN;
      a.releaseView(v, true);
    }
    expect(reused).toBe(true);
  });

  it('a payload that stopped part way leaves zeroes, not what the chunks held before', () => {
    const a = new SparseArray(GiB);
    a.write(pattern(RUN, 0, 6), 0);
    a.zero(RUN, 0); // the chunks go back to the allocator holding that pattern
    const v = a.view(RUN, 2 * RUN, true)!;
    v.fill(9, 0, 1000); // the first bytes of the payload arrived, then the client went away
    a.releaseView(v, false);
    const back = readAll(a, RUN, 2 * RUN);
    expect(back.data.equals(Buffer.alloc(RUN))).toBe(true);
    expect([...a.extents(RUN, 2 * RUN)]).toEqual([{ offset: 2 * RUN, length: RUN, type: 2 }]);
  });
});

