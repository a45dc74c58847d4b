import { EXTENT_HOLE, Errno, NbdError, type Extent, type ExtentSource } from '../api/common.js';

/**
 * Most extents one answer carries. A client asking about a huge, fragmented range gets the first
 * part and asks again for the rest (the spec lets a reply cover less than the request), so no
 * request makes the server build, hold or send an unbounded list. 64 Ki descriptors are 512 KiB
 * (1 MiB with extended headers) on the wire, well under the spec's 2^20 per chunk.
 */
export const MAX_EXTENTS = 64 * 1024;

/**
 * Turn whatever a layer said about [offset, offset+count) into what the protocol needs: sorted,
 * clipped to the request, neighbours of the same type merged, contiguous from `offset`. Gaps are
 * HOLE (never ZERO: silence must not make a client skip data). Overlaps are a plugin bug.
 *
 * At most `max` extents come back; the answer then stops where the last one ends. A layer that
 * yields its extents in order (a generator, as the memory plugin's) is not even asked for more
 * than that: reading stops once the list is full, so its work is bounded too.
 */
export async function normalizeExtents(
  source: ExtentSource,
  offset: number,
  count: number,
  reqOne: boolean,
  who: string,
  max = MAX_EXTENTS,
): Promise<Extent[]> {
  const limit = reqOne ? 1 : max;
  const end = offset + count;
  const raw: Extent[] = [];
  // While extents arrive in order, those merged so far are final; count them to stop early.
  let inOrder = true;
  let lastEnd = -Infinity;
  let lastType = -1;
  let runs = 0;
  // Arrays may come in any order and cost nothing more to read whole; iterables are read lazily
  // and, as the API asks, in order.
  const lazy = !Array.isArray(source);
  const take = (e: Extent): boolean => {
    const o = Number(e.offset);
    const l = Number(e.length);
    const t = Number(e.type ?? 0);
    if (!Number.isFinite(o) || !Number.isFinite(l) || o < 0 || l < 0 || !(t >= 0 && t <= 3)) {
      throw new NbdError(Errno.EIO, `${who}: invalid extent ${JSON.stringify(e)}`);
    }
    if (l === 0 || o + l <= offset || o >= end) return true;
    raw.push({ offset: o, length: l, type: t });
    // REQ_ONE: the layer was told only the first extent matters, so what follows it may be
    // imprecise (the file plugin ends with the rest of the range as data): never merge it in.
    if (!lazy) return true;
    if (reqOne && inOrder) return false;
    if (!inOrder) return true;
    if (o < lastEnd) {
      inOrder = false;
      return true;
    }
    // A gap becomes a HOLE run of its own; a type change starts a new run.
    if (o > Math.max(lastEnd, offset)) {
      if (lastType !== EXTENT_HOLE) runs++;
      lastType = EXTENT_HOLE;
    }
    if (t !== lastType) {
      runs++;
      lastType = t;
    }
    lastEnd = o + l;
    // One run more than we keep: the last kept one is complete.
    return runs <= limit;
  };
  if (Array.isArray(source)) {
    for (const e of source) if (!take(e)) break;
  } else if (Symbol.asyncIterator in (source as object)) {
    for await (const e of source as AsyncIterable<Extent>) if (!take(e)) break;
  } else {
    for (const e of source as Iterable<Extent>) if (!take(e)) break;
  }
  if (!lazy || !inOrder) raw.sort((a, b) => a.offset - b.offset);

  const out: Extent[] = [];
  let pos = offset;
  const emit = (o: number, l: number, type: number): void => {
    const last = out[out.length - 1];
    if (last && last.type === type && last.offset + last.length === o) last.length += l;
    else out.push({ offset: o, length: l, type });
  };
  let prevEnd = -1;
  for (const e of raw) {
    if (e.offset < prevEnd) {
      throw new NbdError(Errno.EIO, `${who}: extents overlap at offset ${e.offset}`);
    }
    prevEnd = e.offset + e.length;
    const s = Math.max(e.offset, offset);
    const f = Math.min(prevEnd, end);
    if (s > pos) emit(pos, s - pos, EXTENT_HOLE);
    emit(s, f - s, e.type);
    pos = f;
    if (reqOne || out.length > limit) break;
  }
  // Full: the answer ends with the last extent kept (the client asks again for the rest).
  if (out.length > limit) return out.slice(0, limit);
  if (pos < end && !(reqOne && out.length > 0)) emit(pos, end - pos, EXTENT_HOLE);
  return out.slice(0, limit);
}
