import { describe, expect, it } from 'vitest';
import { FLAG_REQ_ONE, type Extent } from '@nbdx/server/api';
import { createMemoryPlugin } from './index.js';
import { PAGE_SIZE, SparseArray } from './sparse.js';

const GiB = 2 ** 30;
const DIR_PAGES = 32 * 1024; // pages per directory, as in sparse.ts

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
 */
class Model {
  pages = new Map<number, Buffer>();

  write(buf: Buffer, offset: number): void {
    for (let pos = offset; pos < offset + buf.length; ) {
      const index = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, offset + buf.length - pos);
      let p = this.pages.get(index);
      if (!p) this.pages.set(index, (p = Buffer.alloc(PAGE_SIZE)));
      buf.copy(p, inPage, pos - offset, pos - offset + n);
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
      if (e - s === PAGE_SIZE || p.every((b) => b === 0)) this.pages.delete(index);
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

describe('SparseArray', () => {
  it('reads unwritten ranges as zero spans and written ones as data', () => {
    const a = new SparseArray(10 * PAGE_SIZE);
    a.write(Buffer.alloc(100, 7), PAGE_SIZE + 50);
    const buf = Buffer.alloc(3 * PAGE_SIZE, 0xff);
    const holes = a.read(buf, 0);
    expect(holes).toEqual([
      { start: 0, length: PAGE_SIZE },
      { start: 2 * PAGE_SIZE, length: PAGE_SIZE },
    ]);
    expect(buf.subarray(PAGE_SIZE, PAGE_SIZE + 50).every((b) => b === 0)).toBe(true);
    expect(buf.subarray(PAGE_SIZE + 50, PAGE_SIZE + 150).every((b) => b === 7)).toBe(true);
  });

  it('frees whole pages on zero and keeps partial ones cleared', () => {
    const a = new SparseArray(4 * PAGE_SIZE);
    a.write(Buffer.alloc(4 * PAGE_SIZE, 1), 0);
    expect(a.allocatedPages).toBe(4);
    a.zero(2 * PAGE_SIZE, PAGE_SIZE / 2);
    expect(a.allocatedPages).toBe(3);
    const b = Buffer.alloc(4 * PAGE_SIZE);
    a.read(b, 0);
    expect(b.subarray(0, PAGE_SIZE / 2).every((x) => x === 1)).toBe(true);
    expect(b.subarray(PAGE_SIZE / 2, PAGE_SIZE * 2.5).every((x) => x === 0)).toBe(true);
    expect(b.subarray(PAGE_SIZE * 2.5).every((x) => x === 1)).toBe(true);
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
      // And the bytes themselves.
      for (const [index, p] of m.pages) {
        const buf = Buffer.alloc(PAGE_SIZE, 0xee);
        expect(a.read(buf, index * PAGE_SIZE)).toBeUndefined();
        expect(buf.equals(p)).toBe(true);
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
});
