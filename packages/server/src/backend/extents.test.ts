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
});
