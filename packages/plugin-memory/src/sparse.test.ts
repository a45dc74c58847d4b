import { describe, expect, it } from 'vitest';
import { PAGE_SIZE, SparseArray } from './sparse.js';

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
});
