import { EXTENT_HOLE, Errno, NbdError, type Extent, type ExtentSource } from '../api/common.js';

async function collect(source: ExtentSource): Promise<Extent[]> {
  if (Array.isArray(source)) return source;
  const out: Extent[] = [];
  if (Symbol.asyncIterator in (source as object)) {
    for await (const e of source as AsyncIterable<Extent>) out.push(e);
  } else {
    for (const e of source as Iterable<Extent>) out.push(e);
  }
  return out;
}

/**
 * Turn whatever a layer said about [offset, offset+count) into what the protocol needs: sorted,
 * clipped to the request, neighbours of the same type merged, contiguous from `offset`. Gaps are
 * HOLE (never ZERO: silence must not make a client skip data). Overlaps are a plugin bug.
 */
export async function normalizeExtents(
  source: ExtentSource,
  offset: number,
  count: number,
  reqOne: boolean,
  who: string,
): Promise<Extent[]> {
  const raw = await collect(source);
  const end = offset + count;
  const sorted: Extent[] = [];
  for (const e of raw) {
    const o = Number(e.offset);
    const l = Number(e.length);
    const t = Number(e.type ?? 0);
    if (!Number.isFinite(o) || !Number.isFinite(l) || o < 0 || l < 0 || !(t >= 0 && t <= 3)) {
      throw new NbdError(Errno.EIO, `${who}: invalid extent ${JSON.stringify(e)}`);
    }
    if (l === 0 || o + l <= offset || o >= end) continue;
    sorted.push({ offset: o, length: l, type: t });
  }
  sorted.sort((a, b) => a.offset - b.offset);

  const out: Extent[] = [];
  let pos = offset;
  const emit = (o: number, l: number, type: number): void => {
    const last = out[out.length - 1];
    if (last && last.type === type && last.offset + last.length === o) last.length += l;
    else out.push({ offset: o, length: l, type });
  };
  let prevEnd = -1;
  for (const e of sorted) {
    if (e.offset < prevEnd) {
      throw new NbdError(Errno.EIO, `${who}: extents overlap at offset ${e.offset}`);
    }
    prevEnd = e.offset + e.length;
    const s = Math.max(e.offset, offset);
    const f = Math.min(prevEnd, end);
    if (s > pos) emit(pos, s - pos, EXTENT_HOLE);
    emit(s, f - s, e.type);
    pos = f;
    if (reqOne) break;
  }
  if (pos < end && !(reqOne && out.length > 0)) emit(pos, end - pos, EXTENT_HOLE);
  return reqOne ? out.slice(0, 1) : out;
}
