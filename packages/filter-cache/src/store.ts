import { FLAG_FUA, debug, logError, type Extent, type Next, type ReadResult } from '@nbdx/server/api';
import { BlockLocks } from './block-locks.js';
import type { TempFile } from '@nbdx/server/api';

export type CacheMode = 'writeback' | 'writethrough' | 'unsafe';

/** What the store needs from the layer below: a subset of Next, so tests can hand in their own. */
export type Below = Pick<Next, 'pread' | 'pwrite' | 'zero' | 'trim' | 'flush' | 'canFlush' | 'extents'>;

export interface StoreOptions {
  blockSize: number;
  mode: CacheMode;
  /** Most bytes the cached blocks may take (Infinity = no limit). */
  maxSize: number;
  /** Reclaim starts when this % of maxSize is used, and goes on until under lowThreshold %. */
  highThreshold: number;
  lowThreshold: number;
}

/** Counters for tests, debug output and the report. */
export interface StoreStats {
  /** pread calls sent to the layer below, and their bytes. */
  belowReads: number;
  belowReadBytes: number;
  /** Blocks served from the cache file / fetched from below. */
  hits: number;
  misses: number;
  /** Blocks dropped by reclaim, and dirty blocks written below (by flush or by reclaim). */
  reclaimed: number;
  writtenBack: number;
}

/** Largest piece of dirty data written below in one pwrite by flush. */
const WRITEBACK_RUN = 4 * 1024 * 1024;
/**
 * Largest read below for a cache request: NBD_CMD_CACHE may ask for up to 4 GiB at once, which
 * must not become one 4 GiB buffer. Bigger ranges are fetched piece by piece.
 */
const FETCH_RUN = 4 * 1024 * 1024;
/** A cache request over a huge range lets other work run every this many blocks. */
const YIELD_EVERY = 4096;

/** A pread below may answer "these parts are zeroes" instead of filling them: fill them here. */
function fillZeroSpans(buf: Uint8Array, result: ReadResult): void {
  if (result) for (const z of result) buf.fill(0, z.start, z.start + z.length);
}

/**
 * The cache of one export: which blocks of the layer below are held in the slot file, which of
 * them are dirty (written here, not yet below), and the per-block locks that keep many requests in
 * flight apart. Blocks are kept in least-recently-used order (a Map's insertion order, refreshed
 * on every use), which is the order reclaim drops them in.
 */
export class CacheStore {
  readonly bs: number;
  readonly mode: CacheMode;
  readonly locks = new BlockLocks();
  readonly stats: StoreStats = { belowReads: 0, belowReadBytes: 0, hits: 0, misses: 0, reclaimed: 0, writtenBack: 0 };
  /** Cached block → its slot in the file, least recently used first. */
  private readonly slots = new Map<number, number>();
  private readonly dirty = new Set<number>();
  private readonly free: number[] = [];
  /** Slots handed out so far: the file is never longer than this many blocks. */
  private slotsMade = 0;
  private readonly maxSlots: number;
  private readonly highSlots: number;
  private readonly lowSlots: number;

  constructor(
    readonly file: TempFile,
    /** The export's size in bytes. The last block may be short. */
    readonly size: number,
    options: StoreOptions,
    readonly name = 'cache',
  ) {
    this.bs = options.blockSize;
    this.mode = options.mode;
    if (Number.isFinite(options.maxSize)) {
      this.maxSlots = Math.max(1, Math.floor(options.maxSize / this.bs));
      this.highSlots = Math.max(1, Math.floor((this.maxSlots * options.highThreshold) / 100));
      this.lowSlots = Math.min(this.highSlots - 1, Math.floor((this.maxSlots * options.lowThreshold) / 100));
    } else {
      this.maxSlots = this.highSlots = this.lowSlots = Infinity;
    }
  }

  /** Number of cached blocks, and of dirty ones. */
  get cachedBlocks(): number {
    return this.slots.size;
  }
  get dirtyBlocks(): number {
    return this.dirty.size;
  }

  private blockLength(b: number): number {
    return Math.min(this.bs, this.size - b * this.bs);
  }

  private touch(b: number, slot: number): void {
    this.slots.delete(b);
    this.slots.set(b, slot);
  }

  private drop(b: number): void {
    const slot = this.slots.get(b);
    if (slot === undefined) return;
    this.slots.delete(b);
    this.dirty.delete(b);
    this.free.push(slot);
  }

  /** A free slot, reclaiming old blocks when the cache is at its limit; -1 when none can be had. */
  private alloc(below: Below): number | Promise<number> {
    if (this.free.length > 0) return this.free.pop()!;
    if (this.slots.size < this.highSlots && this.slotsMade < this.maxSlots) return this.slotsMade++;
    return this.reclaim(below).then(() => {
      if (this.free.length > 0) return this.free.pop()!;
      if (this.slotsMade < this.maxSlots) return this.slotsMade++;
      return -1;
    });
  }

  /**
   * Bring the cache down to the low threshold: clean blocks first (free to drop), then dirty ones,
   * written below first. Runs while the caller holds its own blocks, so it only tries locks and
   * skips busy blocks, which can never deadlock.
   */
  private async reclaim(below: Below): Promise<void> {
    let excess = this.slots.size - this.lowSlots;
    for (const [b, slot] of this.slots) {
      if (excess <= 0) break;
      if (this.dirty.has(b) || this.locks.isHeld(b)) continue;
      this.slots.delete(b);
      this.free.push(slot);
      this.stats.reclaimed++;
      excess--;
    }
    if (excess <= 0) return;
    const victims: number[] = [];
    for (const b of this.slots.keys()) {
      if (victims.length >= excess) break;
      if (this.dirty.has(b) && !this.locks.isHeld(b)) victims.push(b);
    }
    for (const b of victims) {
      if (!this.locks.tryLock(b)) continue;
      try {
        const slot = this.slots.get(b);
        if (slot === undefined) continue;
        if (this.dirty.has(b)) {
          const data = Buffer.allocUnsafe(this.blockLength(b));
          await this.file.read(data, slot * this.bs);
          await below.pwrite(data, b * this.bs, 0);
          this.stats.writtenBack++;
        }
        this.drop(b);
        this.stats.reclaimed++;
      } catch (err) {
        // The block stays cached and dirty; the next flush tries again and reports the error.
        debug(this.name, `reclaim: writing block ${b} below failed: ${(err as Error).message}`);
      } finally {
        this.locks.unlock(b, b);
      }
    }
  }

  private async readBelow(below: Below, buf: Uint8Array, offset: number): Promise<void> {
    this.stats.belowReads++;
    this.stats.belowReadBytes += buf.length;
    fillZeroSpans(buf, await below.pread(buf, offset, 0));
  }

  /**
   * Fetch blocks [b, e] (none of them cached, all locked by the caller) from below in one read,
   * store as many as there is room for, and copy the part of [dstOffset, dstOffset + dst.length)
   * they cover into `dst`.
   */
  private async fetch(below: Below, b: number, e: number, dst?: Uint8Array, dstOffset = 0): Promise<void> {
    const start = b * this.bs;
    const end = Math.min((e + 1) * this.bs, this.size);
    const data = Buffer.allocUnsafe(end - start);
    await this.readBelow(below, data, start);
    this.stats.misses += e - b + 1;
    for (let k = b; k <= e; k++) {
      const slot = await this.alloc(below);
      if (slot < 0) break; // full of busy blocks: serve this data without keeping it
      const at = (k - b) * this.bs;
      await this.file.write(data.subarray(at, at + this.blockLength(k)), slot * this.bs);
      this.slots.set(k, slot);
    }
    if (dst) {
      const from = Math.max(start, dstOffset);
      const to = Math.min(end, dstOffset + dst.length);
      if (to > from) dst.set(data.subarray(from - start, to - start), from - dstOffset);
    }
  }

  private async locked<T>(first: number, last: number, fn: () => Promise<T>): Promise<T> {
    const wait = this.locks.lock(first, last);
    if (wait) await wait;
    try {
      return await fn();
    } finally {
      this.locks.unlock(first, last);
    }
  }

  private range(count: number, offset: number): [number, number] {
    return [Math.floor(offset / this.bs), Math.floor((offset + count - 1) / this.bs)];
  }

  /**
   * Serve a read: cached blocks from the file, the rest from below (kept when `keep`).
   *
   * The blocks nobody else holds are taken at once and served at once; the busy ones (being
   * fetched by a prefetch, most often) are waited for beside that, run by run. A read that
   * overlaps a prefetch in flight thus waits only for the prefetch, while reading its other blocks
   * below at the same time: one round trip, not two in a row. This cannot deadlock: the part
   * taken at once never waits for a lock while holding one, it only does I/O and lets go.
   */
  async read(below: Below, buf: Uint8Array, offset: number, keep: boolean): Promise<void> {
    if (buf.length === 0) return;
    const [first, last] = this.range(buf.length, offset);
    // The lists are only made once a block turns out busy: an uncontended read allocates nothing.
    let busy: number[] | undefined;
    let free: number[] | undefined;
    for (let b = first; b <= last; b++) {
      if (this.locks.tryLock(b)) {
        free?.push(b);
      } else {
        if (!busy) {
          busy = [];
          free = [];
          for (let k = first; k < b; k++) free.push(k);
        }
        busy.push(b);
      }
    }
    if (!busy) {
      try {
        return await this.serveRun(below, first, last, buf, offset, keep);
      } finally {
        this.locks.unlock(first, last);
      }
    }
    const work: Promise<void>[] = [];
    if (free && free.length > 0) {
      work.push(
        this.forRuns(free, async (b, e) => {
          try {
            await this.serveRun(below, b, e, buf, offset, keep);
          } finally {
            this.locks.unlock(b, e);
          }
        }),
      );
    }
    work.push(this.forRuns(busy, (b, e) => this.locked(b, e, () => this.serveRun(below, b, e, buf, offset, keep))));
    // Both parts write into buf: neither may still be running when the reply goes out.
    const results = await Promise.allSettled(work);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /** Call fn for each run of consecutive block numbers in the sorted list, one after another. */
  private async forRuns(blocks: number[], fn: (b: number, e: number) => Promise<void>): Promise<void> {
    for (let i = 0; i < blocks.length; ) {
      let j = i;
      while (j + 1 < blocks.length && blocks[j + 1] === blocks[j]! + 1) j++;
      await fn(blocks[i]!, blocks[j]!);
      i = j + 1;
    }
  }

  /** Serve the part of a read that falls in blocks [first, last] (held by the caller). */
  private async serveRun(below: Below, first: number, last: number, buf: Uint8Array, offset: number, keep: boolean): Promise<void> {
    const end = offset + buf.length;
    for (let b = first; b <= last; ) {
      const slot = this.slots.get(b);
      const bStart = b * this.bs;
      if (slot !== undefined) {
        const from = Math.max(offset, bStart);
        const to = Math.min(end, bStart + this.bs);
        await this.file.read(buf.subarray(from - offset, to - offset), slot * this.bs + (from - bStart));
        this.touch(b, slot);
        this.stats.hits++;
        b++;
        continue;
      }
      let e = b;
      while (e < last && !this.slots.has(e + 1)) e++;
      if (keep) {
        await this.fetch(below, b, e, buf, offset);
      } else {
        const from = Math.max(offset, bStart);
        const to = Math.min(end, (e + 1) * this.bs);
        await this.readBelow(below, buf.subarray(from - offset, to - offset), from);
      }
      b = e + 1;
    }
  }

  /**
   * NBD_CMD_CACHE: bring the range into the cache (what readahead asks for). Advisory, so blocks
   * another request holds are skipped rather than waited for: a client read of them is under
   * way, and a prefetch must never queue behind (or in front of) the client's own requests.
   */
  async prefetch(below: Below, count: number, offset: number): Promise<void> {
    if (count === 0) return;
    const [first, last] = this.range(count, offset);
    const maxRun = Math.max(1, Math.floor(FETCH_RUN / this.bs));
    for (let b = first, seen = 0; b <= last; ) {
      if (++seen % YIELD_EVERY === 0) await new Promise<void>((resolve) => setImmediate(resolve));
      const slot = this.slots.get(b);
      if (slot !== undefined) {
        this.touch(b, slot);
        b++;
        continue;
      }
      // The longest run (up to FETCH_RUN) of blocks from b on that are neither cached nor held,
      // taken now.
      let e = b - 1;
      while (e < last && e + 1 - b < maxRun && !this.slots.has(e + 1) && this.locks.tryLock(e + 1)) e++;
      if (e < b) {
        b++;
        continue;
      }
      try {
        // Checked and taken in one synchronous step: they are still misses when fetch starts.
        await this.fetch(below, b, e);
      } finally {
        this.locks.unlock(b, e);
      }
      b = e + 1;
    }
  }

  /**
   * A write. writeback and unsafe keep it in the cache as dirty blocks (a partial block not yet
   * cached is read from below first); writethrough, and FUA in writeback, send it below at once
   * and keep the cache's copy up to date.
   */
  write(below: Below, buf: Uint8Array, offset: number, flags: number): Promise<void> {
    if (buf.length === 0) return Promise.resolve();
    const [first, last] = this.range(buf.length, offset);
    const through = this.mode === 'writethrough' || (this.mode === 'writeback' && (flags & FLAG_FUA) !== 0);
    return this.locked(first, last, async () => {
      if (through) await below.pwrite(buf, offset, flags);
      const end = offset + buf.length;
      for (let b = first; b <= last; b++) {
        const bStart = b * this.bs;
        const from = Math.max(offset, bStart);
        const to = Math.min(end, bStart + this.bs);
        const part = buf.subarray(from - offset, to - offset);
        const whole = from === bStart && to === bStart + this.blockLength(b);
        let slot = this.slots.get(b);
        if (slot === undefined) {
          if (through && !whole) continue; // below has it; nothing cached to keep up to date
          if (!whole) {
            await this.fetch(below, b, b);
            slot = this.slots.get(b);
          } else {
            const s = await this.alloc(below);
            if (s >= 0) slot = s;
          }
          if (slot === undefined) {
            // No room in the cache (every block busy): this part goes straight below.
            if (!through) await below.pwrite(part, from, 0);
            continue;
          }
        }
        await this.file.write(part, slot * this.bs + (from - bStart));
        this.touch(b, slot);
        if (!through) this.dirty.add(b);
      }
    });
  }

  /** Cached blocks in [first, last], ascending, looked up the cheaper way round. */
  private cachedIn(first: number, last: number): number[] {
    const out: number[] = [];
    if (this.slots.size < last - first + 1) {
      for (const b of this.slots.keys()) if (b >= first && b <= last) out.push(b);
      return out.sort((a, b) => a - b);
    }
    for (let b = first; b <= last; b++) if (this.slots.has(b)) out.push(b);
    return out;
  }

  /**
   * Zero and trim go below at once in every mode, then the cache is made to agree: blocks wholly
   * inside the range are dropped (dirty or not: below now holds their new contents), and cached
   * blocks partly inside get zeroes written over that part (zero only: trimmed bytes may read as
   * anything, so keeping the old ones is allowed). If below fails, the cache is left as it was.
   *
   * Only the cached blocks of the range are locked (held across the call below, so reclaim
   * cannot write their older data below after it): a trim of a whole 1 TiB disk must not take
   * sixteen million locks. Uncached blocks need none; a write racing with the zero may land
   * before or after it, as NBD allows for requests in flight together.
   */
  async zeroOrTrim(below: Below, count: number, offset: number, flags: number, isZero: boolean): Promise<void> {
    if (count === 0) return isZero ? below.zero(0, offset, flags) : below.trim(0, offset, flags);
    const [first, last] = this.range(count, offset);
    const held: Array<[number, number]> = [];
    try {
      await this.forRuns(this.cachedIn(first, last), async (b, e) => {
        const wait = this.locks.lock(b, e);
        held.push([b, e]);
        if (wait) await wait;
      });
      if (isZero) await below.zero(count, offset, flags);
      else await below.trim(count, offset, flags);
      const end = offset + count;
      for (const [rb, re] of held) {
        for (let b = rb; b <= re; b++) {
          const slot = this.slots.get(b);
          if (slot === undefined) continue;
          const bStart = b * this.bs;
          const from = Math.max(offset, bStart);
          const to = Math.min(end, bStart + this.bs);
          if (from === bStart && to === bStart + this.blockLength(b)) {
            this.drop(b);
          } else if (isZero) {
            await this.file.write(Buffer.alloc(to - from), slot * this.bs + (from - bStart));
          }
        }
      }
    } finally {
      for (const [b, e] of held) this.locks.unlock(b, e);
    }
  }

  /**
   * Write every dirty block below, in runs of neighbouring blocks. Each run is locked while it is
   * written, so requests to other blocks go on meanwhile.
   */
  async writeBack(below: Below): Promise<void> {
    if (this.dirty.size === 0) return;
    const blocks = [...this.dirty].sort((a, b) => a - b);
    const maxRun = Math.max(1, Math.floor(WRITEBACK_RUN / this.bs));
    for (let i = 0; i < blocks.length; ) {
      let j = i;
      while (j + 1 < blocks.length && blocks[j + 1] === blocks[j]! + 1 && j + 1 - i < maxRun) j++;
      const first = blocks[i]!;
      const last = blocks[j]!;
      await this.locked(first, last, async () => {
        // Written again by parts: blocks may have been dropped or written back meanwhile.
        for (let b = first; b <= last; ) {
          if (!this.dirty.has(b)) {
            b++;
            continue;
          }
          let e = b;
          while (e < last && this.dirty.has(e + 1)) e++;
          const start = b * this.bs;
          const data = Buffer.allocUnsafe(Math.min((e + 1) * this.bs, this.size) - start);
          for (let k = b; k <= e; k++) {
            const at = (k - b) * this.bs;
            await this.file.read(data.subarray(at, at + this.blockLength(k)), this.slots.get(k)! * this.bs);
          }
          await below.pwrite(data, start, 0);
          for (let k = b; k <= e; k++) this.dirty.delete(k);
          this.stats.writtenBack += e - b + 1;
          b = e + 1;
        }
      });
      i = j + 1;
    }
  }

  /** flush: write back (writeback), then flush below; unsafe ignores it. */
  async flush(below: Below, flags: number): Promise<void> {
    if (this.mode === 'unsafe') return;
    if (this.mode === 'writeback') await this.writeBack(below);
    if (await below.canFlush()) await below.flush(flags);
  }

  /**
   * Extents: what below says, except that dirty blocks (data that is only here so far) are data
   * whatever below says about those bytes.
   */
  async extents(below: Below, count: number, offset: number, flags: number): Promise<Extent[]> {
    const list = await below.extents(count, offset, flags);
    if (this.dirty.size === 0 || list.length === 0) return list;
    const covered = list[list.length - 1]!.offset + list[list.length - 1]!.length;
    const [first, last] = this.range(covered - offset, offset);
    let dirty: number[];
    if (this.dirty.size < last - first + 1) {
      dirty = [...this.dirty].filter((b) => b >= first && b <= last).sort((a, b) => a - b);
    } else {
      dirty = [];
      for (let b = first; b <= last; b++) if (this.dirty.has(b)) dirty.push(b);
    }
    if (dirty.length === 0) return list;
    // Merge neighbouring dirty blocks into spans, clipped to what below answered for.
    const spans: Array<[number, number]> = [];
    for (const b of dirty) {
      const s = Math.max(offset, b * this.bs);
      const e = Math.min(covered, (b + 1) * this.bs);
      const prev = spans[spans.length - 1];
      if (prev && prev[1] === s) prev[1] = e;
      else spans.push([s, e]);
    }
    const out: Extent[] = [];
    let si = 0;
    for (const ext of list) {
      let at = ext.offset;
      const end = ext.offset + ext.length;
      while (at < end) {
        while (si < spans.length && spans[si]![1] <= at) si++;
        const span = spans[si];
        if (!span || span[0] >= end) {
          out.push({ offset: at, length: end - at, type: ext.type });
          break;
        }
        if (span[0] > at) {
          out.push({ offset: at, length: span[0] - at, type: ext.type });
          at = span[0];
        }
        const stop = Math.min(end, span[1]);
        out.push({ offset: at, length: stop - at, type: 0 });
        at = stop;
      }
    }
    return out;
  }

  /** Close the file (the caller writes back first where the mode asks for it). */
  async close(): Promise<void> {
    try {
      await this.file.close();
    } catch (err) {
      logError(this.name, `closing the cache file: ${(err as Error).message}`);
    }
  }
}
