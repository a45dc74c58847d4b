import { describe, expect, it } from 'vitest';
import { EXTENT_HOLE as H, EXTENT_ZERO as Z } from '../api/common.js';
import { normalizeExtents } from './extents.js';

const norm = (src: Parameters<typeof normalizeExtents>[0], offset: number, count: number, reqOne = false) =>
  normalizeExtents(src, offset, count, reqOne, 'test');

describe('normalizeExtents', () => {
  it('sorts, clips to the request and merges neighbours of the same type', async () => {
    const out = await norm(
      [
        { offset: 300, length: 100, type: 0 },
        { offset: 0, length: 100, type: H | Z },
        { offset: 100, length: 200, type: H | Z },
        { offset: 400, length: 1000, type: Z },
      ],
      50,
      500,
    );
    expect(out).toEqual([
      { offset: 50, length: 250, type: H | Z },
      { offset: 300, length: 100, type: 0 },
      { offset: 400, length: 150, type: Z },
    ]);
  });

  it('reports uncovered parts as HOLE, never ZERO', async () => {
    const out = await norm([{ offset: 100, length: 100, type: Z }], 0, 300);
    expect(out).toEqual([
      { offset: 0, length: 100, type: H },
      { offset: 100, length: 100, type: Z },
      { offset: 200, length: 100, type: H },
    ]);
    expect(await norm([], 0, 10)).toEqual([{ offset: 0, length: 10, type: H }]);
  });

  it('rejects overlapping extents as a plugin error', async () => {
    await expect(norm([{ offset: 0, length: 100, type: 0 }, { offset: 50, length: 100, type: 0 }], 0, 200)).rejects.toThrow(/overlap/);
  });

  it('honours REQ_ONE with exactly one extent inside the request', async () => {
    const out = await norm([{ offset: 0, length: 1000, type: Z }, { offset: 1000, length: 10, type: 0 }], 10, 500, true);
    expect(out).toEqual([{ offset: 10, length: 500, type: Z }]);
  });

  it('accepts generators and async generators', async () => {
    function* gen() {
      yield { offset: 0, length: 5, type: 0 };
      yield { offset: 5, length: 5, type: 0 };
    }
    async function* agen() {
      yield { offset: 0, length: 10, type: H | Z };
    }
    expect(await norm(gen(), 0, 10)).toEqual([{ offset: 0, length: 10, type: 0 }]);
    expect(await norm(agen(), 0, 10)).toEqual([{ offset: 0, length: 10, type: H | Z }]);
  });

  it('rejects nonsense', async () => {
    await expect(norm([{ offset: -1, length: 5, type: 0 }], 0, 10)).rejects.toThrow(/invalid extent/);
    await expect(norm([{ offset: 0, length: 5, type: 9 }], 0, 10)).rejects.toThrow(/invalid extent/);
  });

  it('stops at the limit, ending the answer with the last extent kept', async () => {
    const alternating = (n: number) => Array.from({ length: n }, (_, i) => ({ offset: i * 10, length: 10, type: i % 2 ? H : 0 }));
    const out = await normalizeExtents(alternating(100), 0, 1000, false, 'test', 5);
    expect(out).toHaveLength(5);
    expect(out[4]).toEqual({ offset: 40, length: 10, type: 0 });
    // The same from an unsorted array: sorted first, then cut.
    const shuffled = await normalizeExtents(alternating(100).reverse(), 0, 1000, false, 'test', 5);
    expect(shuffled).toEqual(out);
  });

  it('reads an in-order generator only as far as the limit needs', async () => {
    let yielded = 0;
    function* many() {
      for (let i = 0; i < 1_000_000; i++) {
        yielded++;
        yield { offset: i * 10, length: 10, type: i % 2 ? H : 0 };
      }
    }
    const out = await normalizeExtents(many(), 0, 10_000_000, false, 'test', 100);
    expect(out).toHaveLength(100);
    expect(out[99]!.offset + out[99]!.length).toBe(1000);
    expect(yielded).toBe(101);
  });

  it('merges same-type neighbours before counting against the limit', async () => {
    const same = Array.from({ length: 50 }, (_, i) => ({ offset: i * 10, length: 10, type: 0 }));
    const out = await normalizeExtents([...same, { offset: 500, length: 10, type: H }], 0, 600, false, 'test', 2);
    expect(out).toEqual([
      { offset: 0, length: 500, type: 0 },
      { offset: 500, length: 100, type: H },
    ]);
  });
});
