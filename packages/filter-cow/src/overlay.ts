import {
  EXTENT_HOLE,
  EXTENT_ZERO,
  FLAG_REQ_ONE,
  type Extent,
  type Next,
  type ReadResult,
  type ZeroSpan,
} from '@nbdx/server/api';
import { BlockLocks } from './block-locks.js';
import { BELOW, BELOW_STALE, BlockMap, DATA, ZERO, ZERO_STALE, type BlockState } from './block-map.js';
import type { TempFile } from '@nbdx/server/api';

type State = BlockState;

/** What the overlay needs from the layer below (the connection's read-only context). */
export type Below = Pick<Next, 'pread' | 'extents' | 'cache'>;

/** The largest piece of a block handled in one buffer. */
const CHUNK = 1 << 20;
/** Zeroes to write from; never written into. */
const ZEROES = Buffer.alloc(CHUNK);
/** Buffers kept for reuse by read-modify-write. */
const POOL_MAX = 8;

/** zero/trim of whole blocks: no I/O, just the map. */
const ZERO_TABLE: State[] = [ZERO, ZERO_STALE, ZERO, ZERO_STALE, ZERO_STALE];
/** After a failed change: no block may still claim a clean (hole) file range. */
const TAINT_TABLE: State[] = [BELOW_STALE, DATA, ZERO_STALE, ZERO_STALE, BELOW_STALE];

const isBelow = (s: State) => s === BELOW || s === BELOW_STALE;
const isZero = (s: State) => s === ZERO || s === ZERO_STALE;
/** States whose block must be rebuilt in full before part of it becomes data. */
const needsRebuild = (s: State) => s === BELOW || s === BELOW_STALE || s === ZERO_STALE;

/** Whether the zero spans returned by a read cover all `length` bytes. */
function spansCover(spans: readonly ZeroSpan[], length: number): boolean {
  if (spans.length === 1) return spans[0]!.start <= 0 && spans[0]!.start + spans[0]!.length >= length;
  const sorted = [...spans].sort((a, b) => a.start - b.start);
  let pos = 0;
  for (const s of sorted) {
    if (s.start > pos) return false;
    pos = Math.max(pos, s.start + s.length);
  }
  return pos >= length;
}

function isAllZero(buf: Uint8Array, from: number, to: number): boolean {
  for (let i = from; i < to; i++) if (buf[i] !== 0) return false;
  return true;
}

function fillSpans(buf: Uint8Array, spans: ReadResult): void {
  if (spans) for (const s of spans) buf.fill(0, Math.max(0, s.start), Math.min(buf.length, s.start + s.length));
}

/**
 * The copy-on-write overlay of one export: a block map in memory and a sparse temporary file
 * holding the blocks that were written. Shared by every connection to that export.
 *
 * Reads take no lock: a block's state only becomes DATA after its bytes are in the file, so a
 * read racing a write sees the old or the new contents, never a half-built block (only bytes of
 * the write itself may be torn, as on any disk). Everything that changes the overlay locks the
 * blocks it touches, which makes read-modify-write of partial blocks safe between writers.
 */
export class Overlay {
  readonly map = new BlockMap();
  private readonly locks = new BlockLocks();
  private readonly pool: Buffer[] = [];

  constructor(
    readonly file: TempFile,
    readonly blockSize: number,
  ) {}

  private state(block: number): State {
    return this.map.get(block);
  }

  private take(): Buffer {
    return this.pool.pop() ?? Buffer.allocUnsafe(CHUNK);
  }

  private give(buf: Buffer): void {
    if (this.pool.length < POOL_MAX) this.pool.push(buf);
  }

  private lastBlock(offset: number, count: number): number {
    return Math.floor((offset + count - 1) / this.blockSize);
  }

  /** Whether any block in the byte range is still read from below. */
  hasBelow(offset: number, count: number): boolean {
    const first = Math.floor(offset / this.blockSize);
    const limit = this.lastBlock(offset, count) + 1;
    return this.map.has(first, limit, BELOW) || this.map.has(first, limit, BELOW_STALE);
  }

  // ---- reads ---------------------------------------------------------------------------------

  private piece(below: Below, state: State, buf: Uint8Array, offset: number): Promise<ReadResult> | ReadResult {
    if (state === DATA) return this.file.read(buf, offset);
    if (isZero(state)) return [{ start: 0, length: buf.length }];
    return below.pread(buf, offset);
  }

  read(below: Below, buf: Uint8Array, offset: number): Promise<ReadResult> | ReadResult {
    const len = buf.length;
    if (len === 0) return undefined;
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const limit = this.lastBlock(offset, len) + 1;
    // The usual case: the whole request is in one state. Hand the caller's buffer on as it is.
    if (this.map.runEnd(first, limit) === limit) return this.piece(below, this.state(first), buf, offset);
    return this.readRuns(below, buf, offset, first, limit);
  }

  private async readRuns(below: Below, buf: Uint8Array, offset: number, first: number, limit: number): Promise<ReadResult> {
    const bs = this.blockSize;
    const end = offset + buf.length;
    const spans: ZeroSpan[] = [];
    const work: Promise<void>[] = [];
    for (let b = first; b < limit; ) {
      const e = this.map.runEnd(b, limit);
      const state = this.state(b);
      const s = Math.max(offset, b * bs);
      const f = Math.min(end, e * bs);
      const rel = s - offset;
      if (isZero(state)) {
        spans.push({ start: rel, length: f - s });
      } else {
        const r = this.piece(below, state, buf.subarray(rel, f - offset), s);
        work.push(
          Promise.resolve(r).then((holes) => {
            if (holes) for (const h of holes) spans.push({ start: h.start + rel, length: h.length });
          }),
        );
      }
      b = e;
    }
    await Promise.all(work);
    return spans.length > 0 ? spans : undefined;
  }

  // ---- writes --------------------------------------------------------------------------------

  /** Run `fn` holding the blocks of a byte range; on failure no block keeps a "clean" claim. */
  private async locked(offset: number, count: number, fn: () => Promise<void>): Promise<void> {
    const first = Math.floor(offset / this.blockSize);
    const last = this.lastBlock(offset, count);
    const wait = this.locks.lock(first, last);
    if (wait) await wait;
    try {
      await fn();
    } catch (err) {
      this.map.map(first, last + 1, TAINT_TABLE);
      throw err;
    } finally {
      this.locks.unlock(first, last);
    }
  }

  /** Write `buf` at `offset`. `size` is the export size (the last block may be partial). */
  write(below: Below, size: number, buf: Uint8Array, offset: number): Promise<void> {
    if (buf.length === 0) return Promise.resolve();
    return this.locked(offset, buf.length, async () => {
      const bs = this.blockSize;
      const end = offset + buf.length;
      const first = Math.floor(offset / bs);
      const last = this.lastBlock(offset, buf.length);
      // Bytes [lo, hi) go straight from the caller's buffer to the file: whole blocks, and parts
      // of blocks whose other bytes are already right in the file (DATA, or a clean zero hole).
      let lo = offset;
      let hi = end;
      const headStart = first * bs;
      const headState = this.state(first);
      if (needsRebuild(headState) && (offset > headStart || end < Math.min(headStart + bs, size))) {
        const stop = Math.min(end, headStart + bs);
        await this.rebuild(below, size, first, headState, offset, stop - offset, buf.subarray(0, stop - offset));
        lo = stop;
      }
      if (last > first && lo < hi) {
        const tailStart = last * bs;
        const tailState = this.state(last);
        if (needsRebuild(tailState) && end < Math.min(tailStart + bs, size)) {
          await this.rebuild(below, size, last, tailState, tailStart, end - tailStart, buf.subarray(tailStart - offset));
          hi = tailStart;
        }
      }
      if (lo < hi) {
        const pending = this.file.write(lo === offset && hi === end ? buf : buf.subarray(lo - offset, hi - offset), lo);
        if (pending) await pending;
      }
      this.map.fill(first, last + 1, DATA);
    });
  }

  /**
   * Write the whole of `block` to the file: its old contents (from below, or zeroes) with
   * [pos, pos+count) replaced by `data` (or by zeroes when `data` is null). The caller holds the
   * block's lock and marks it DATA afterwards.
   */
  private async rebuild(
    below: Below,
    size: number,
    block: number,
    state: State,
    pos: number,
    count: number,
    data: Uint8Array | null,
  ): Promise<void> {
    const start = block * this.blockSize;
    const end = Math.min(start + this.blockSize, size);
    const patchEnd = pos + count;
    // A clean block's file range is a hole: zeroes need not be written there.
    const clean = state === BELOW;
    const tmp = this.take();
    try {
      for (let w = start; w < end; w += CHUNK) {
        const wEnd = Math.min(w + CHUNK, end);
        if (w >= pos && wEnd <= patchEnd) {
          if (data) await this.file.write(data.subarray(w - pos, wEnd - pos), w);
          else if (!clean) await this.file.write(ZEROES.subarray(0, wEnd - w), w);
          continue;
        }
        const win = tmp.subarray(0, wEnd - w);
        let zero = true;
        if (state === ZERO_STALE) {
          win.fill(0);
        } else {
          const holes = await below.pread(win, w);
          if (!holes || holes.length === 0) zero = false;
          else {
            zero = spansCover(holes, win.length);
            fillSpans(win, holes);
          }
        }
        const ps = Math.max(pos, w);
        const pe = Math.min(patchEnd, wEnd);
        if (ps < pe) {
          if (data) {
            win.set(data.subarray(ps - pos, pe - pos), ps - w);
            zero = false;
          } else {
            win.fill(0, ps - w, pe - w);
          }
        }
        if (zero && clean) continue;
        await this.file.write(win, w);
      }
    } finally {
      this.give(tmp);
    }
  }

  /** Write zeroes to the file (for blocks already in it). */
  private async writeZeroes(pos: number, count: number): Promise<void> {
    for (let done = 0; done < count; ) {
      const n = Math.min(CHUNK, count - done);
      await this.file.write(ZEROES.subarray(0, n), pos + done);
      done += n;
    }
  }

  /** Zero (or trim: the same here) a byte range. Whole blocks only change the map. */
  zero(below: Below, size: number, count: number, offset: number): Promise<void> {
    if (count === 0) return Promise.resolve();
    return this.locked(offset, count, async () => {
      const bs = this.blockSize;
      const end = offset + count;
      const first = Math.floor(offset / bs);
      const last = this.lastBlock(offset, count);
      let from = first;
      let to = last + 1;
      const headStart = first * bs;
      if (offset > headStart || end < Math.min(headStart + bs, size)) {
        await this.zeroPart(below, size, first, offset, Math.min(end, headStart + bs) - offset);
        from = first + 1;
      }
      if (last >= from) {
        const tailStart = last * bs;
        if (end < Math.min(tailStart + bs, size)) {
          await this.zeroPart(below, size, last, tailStart, end - tailStart);
          to = last;
        }
      }
      if (from < to) this.map.map(from, to, ZERO_TABLE);
    });
  }

  private async zeroPart(below: Below, size: number, block: number, pos: number, count: number): Promise<void> {
    const state = this.state(block);
    if (isZero(state)) return;
    if (state === DATA) return this.writeZeroes(pos, count);
    await this.rebuild(below, size, block, state, pos, count, null);
    this.map.fill(block, block + 1, DATA);
  }

  // ---- copy-on-read, cache, extents ----------------------------------------------------------

  /** Copy the blocks of a range that are still below into the overlay (cow-on-read/cache). */
  async copyUp(below: Below, size: number, offset: number, count: number): Promise<void> {
    if (count === 0 || !this.hasBelow(offset, count)) return;
    const first = Math.floor(offset / this.blockSize);
    const limit = this.lastBlock(offset, count) + 1;
    await this.locked(offset, count, async () => {
      // Re-read the states under the lock: a writer may have been first.
      for (let b = first; b < limit; ) {
        const e = this.map.runEnd(b, limit);
        const state = this.state(b);
        if (isBelow(state)) await this.copyBlocks(below, size, b, e, state);
        b = e;
      }
    });
  }

  private async copyBlocks(below: Below, size: number, from: number, to: number, state: State): Promise<void> {
    const bs = this.blockSize;
    // Small blocks are copied many to a buffer; big ones a buffer at a time.
    const group = bs >= CHUNK ? 1 : CHUNK / bs;
    const clean = state === BELOW;
    const tmp = this.take();
    try {
      for (let k = from; k < to; k += group) {
        const kEnd = Math.min(k + group, to);
        const start = k * bs;
        const end = Math.min(kEnd * bs, size);
        let allZero = true;
        for (let w = start; w < end; w += CHUNK) {
          const win = tmp.subarray(0, Math.min(CHUNK, end - w));
          const holes = await below.pread(win, w);
          if (holes && holes.length > 0 && spansCover(holes, win.length)) {
            // Nothing but zeroes: a clean file range already reads so.
            if (!clean) await this.file.write(ZEROES.subarray(0, win.length), w);
            continue;
          }
          fillSpans(win, holes);
          allZero = false;
          await this.file.write(win, w);
        }
        // States change only once the bytes are in the file (reads take no lock).
        if (allZero || group === 1) {
          this.map.fill(k, kEnd, allZero ? ZERO : DATA);
        } else {
          const win = tmp.subarray(0, end - start);
          for (let b = k; b < kEnd; b++) {
            const bo = (b - k) * bs;
            this.map.fill(b, b + 1, isAllZero(win, bo, Math.min(bo + bs, win.length)) ? ZERO : DATA);
          }
        }
      }
    } finally {
      this.give(tmp);
    }
  }

  /** Pass a cache request on for the parts still below (the rest is in the overlay already). */
  async cacheBelow(below: Below, offset: number, count: number): Promise<void> {
    if (count === 0) return;
    const bs = this.blockSize;
    const end = offset + count;
    const limit = this.lastBlock(offset, count) + 1;
    for (let b = Math.floor(offset / bs); b < limit; ) {
      const e = this.map.runEnd(b, limit);
      if (isBelow(this.state(b))) {
        const s = Math.max(offset, b * bs);
        await below.cache(Math.min(end, e * bs) - s, s);
      }
      b = e;
    }
  }

  /**
   * Allocation status: written blocks are data, zeroed/trimmed ones holes that read as zero, and
   * the rest is whatever the layer below says (asked once for the rest of the range, not per run).
   */
  async extents(below: Below, count: number, offset: number, reqOne: boolean): Promise<Extent[]> {
    const out: Extent[] = [];
    if (count === 0) return out;
    const bs = this.blockSize;
    const end = offset + count;
    const limit = this.lastBlock(offset, count) + 1;
    let fetched: Extent[] = [];
    let fi = 0;
    const fromBelow = async (from: number, to: number): Promise<void> => {
      for (let p = from; p < to; ) {
        while (fi < fetched.length && fetched[fi]!.offset + fetched[fi]!.length <= p) fi++;
        if (fi >= fetched.length || fetched[fi]!.offset > p) {
          fetched = await below.extents(end - p, p, reqOne ? FLAG_REQ_ONE : 0);
          fi = 0;
          const next = fetched.length > 0 ? fetched[0]!.offset : to;
          if (next > p) {
            // The layer below said nothing about [p, next): data, never a claim of zeroes.
            const stop = Math.min(next, to);
            out.push({ offset: p, length: stop - p, type: 0 });
            p = stop;
            if (reqOne) return;
          }
          continue;
        }
        const e = fetched[fi]!;
        const stop = Math.min(e.offset + e.length, to);
        out.push({ offset: p, length: stop - p, type: e.type });
        p = stop;
        if (reqOne) return;
      }
    };
    for (let pos = offset; pos < end; ) {
      const b = Math.floor(pos / bs);
      const state = this.state(b);
      const stop = Math.min(end, this.map.runEnd(b, limit) * bs);
      if (state === DATA) out.push({ offset: pos, length: stop - pos, type: 0 });
      else if (isZero(state)) out.push({ offset: pos, length: stop - pos, type: EXTENT_HOLE | EXTENT_ZERO });
      else await fromBelow(pos, stop);
      if (reqOne) break;
      pos = stop;
    }
    return out;
  }

  close(): Promise<void> {
    return this.file.close();
  }
}
