/**
 * Layout 2: a writable disk stored as fixed-size objects under a prefix, with a write-back
 * buffer shared by every NBD connection of this server.
 *
 * - Object i holds bytes [i·objectSize, (i+1)·objectSize) under PREFIX + 16 hex digits of i (so
 *   key order is disk order and one LIST answers block status). Absent objects read as zeroes.
 * - Writes land in a per-object buffer and are acknowledged from there. An object that clients
 *   have written entirely is stored at once (write-behind, one PUT, nothing read); partly written
 *   objects wait for flush, FUA, a full buffer or the end of the connection, and are then merged
 *   with the stored object (read-modify-write) and stored with a conditional PUT, so that a
 *   concurrent change by another server is noticed (412) and merged again instead of lost.
 * - An object whose content becomes all zeroes is deleted instead of stored.
 * - Everything that touches one object's buffer or its stored copy runs under that object's
 *   lock, in arrival order; reads of stored data take no lock.
 */
import { Errno, NbdError, EXTENT_HOLE, EXTENT_ZERO, debug, logError, type Extent, type ZeroSpan } from '@nbdx/server/api';
import { ReadCoalescer } from './coalesce.js';
import { Ranges } from './ranges.js';
import type { GetResult, Store } from './store.js';

export interface Geometry {
  size: number;
  objectSize: number;
}

/** Conditional PUTs that keep failing mean a writer elsewhere rewrites this object nonstop. */
const MAX_MERGE_ATTEMPTS = 8;
/** DeleteObjects takes at most 1000 keys. */
const DELETE_BATCH = 1000;
const KEY_NAME = /^[0-9a-f]{16}$/;
/** Freed object buffers kept for the next writes (a sequential copy reuses them all the time). */
const SPARE_BUFFERS = 16;

export function objectName(index: number): string {
  return index.toString(16).padStart(16, '0');
}

class Entry {
  /** Written data not yet in the store (only the `covered` bytes mean anything, unless zeroBase). */
  data: Buffer | null = null;
  /** The bytes of `data` written by clients since it was allocated. */
  readonly covered = new Ranges();
  /** The store holds no such object (we deleted it): unwritten bytes are zero, data is complete. */
  zeroBase = false;
  dirty = false;
  /** A write-behind store is queued or running. */
  queued = false;
  /** Completed write-backs and deletes: a read that overlaps one must not trust its GET. */
  stores = 0;
  /** Holders and waiters of the lock; the entry leaves the map when none remain and it is clean. */
  users = 0;
  tail: Promise<void> = Promise.resolve();
  constructor(
    readonly index: number,
    readonly length: number,
  ) {}
}

export interface DiskStats {
  puts: number;
  deletes: number;
  merges: number;
  conflicts: number;
}

export class ObjectDisk {
  private readonly entries = new Map<number, Entry>();
  /** Dirty entries, least recently written first. */
  private readonly dirty = new Set<Entry>();
  /** Bytes held in object buffers. */
  private buffered = 0;
  /** Bytes of buffers already queued for write-behind. */
  private queuedBytes = 0;
  private readonly roomWaiters: (() => void)[] = [];
  private failures = 0;
  private lastFailure: Error | null = null;
  private readonly spare: Buffer[] = [];
  private readonly zeros: Buffer;
  readonly stats: DiskStats = { puts: 0, deletes: 0, merges: 0, conflicts: 0 };
  readonly reads: ReadCoalescer;

  constructor(
    private readonly store: Store,
    private readonly prefix: string,
    readonly geometry: Geometry,
    private readonly maxBuffered: number,
  ) {
    this.zeros = Buffer.alloc(geometry.objectSize);
    this.reads = new ReadCoalescer(store);
  }

  key(index: number): string {
    return this.prefix + objectName(index);
  }

  objectLength(index: number): number {
    const { size, objectSize } = this.geometry;
    return Math.min(objectSize, size - index * objectSize);
  }

  /** Call f(index, posInObject, length, posInRequest) for each object [offset, offset+count) touches. */
  private forParts(offset: number, count: number, f: (index: number, pos: number, len: number, at: number) => void): void {
    const os = this.geometry.objectSize;
    let at = 0;
    while (at < count) {
      const abs = offset + at;
      const index = Math.floor(abs / os);
      const pos = abs - index * os;
      const len = Math.min(os - pos, count - at);
      f(index, pos, len, at);
      at += len;
    }
  }

  // -------------------------------------------------------------------------------------------
  // Entries, locks and buffers

  private entry(index: number): Entry {
    let e = this.entries.get(index);
    if (!e) {
      e = new Entry(index, this.objectLength(index));
      this.entries.set(index, e);
    }
    return e;
  }

  /** Run fn with the entry's lock held; the lock is taken synchronously in call order. */
  private async locked<T>(e: Entry, fn: () => T | Promise<T>): Promise<T> {
    e.users++;
    const prev = e.tail;
    let release!: () => void;
    e.tail = new Promise<void>((r) => (release = r));
    try {
      await prev;
      return await fn();
    } finally {
      release();
      e.users--;
      if (e.users === 0 && !e.dirty && !e.data && this.entries.get(e.index) === e) this.entries.delete(e.index);
    }
  }

  private takeBuffer(length: number, zeroed: boolean): Buffer {
    const b = length === this.geometry.objectSize ? this.spare.pop() : undefined;
    this.buffered += length;
    if (b) return zeroed ? b.fill(0) : b;
    return zeroed ? Buffer.alloc(length) : Buffer.allocUnsafe(length);
  }

  private dropData(e: Entry): void {
    if (!e.data) return;
    if (e.data.length === this.geometry.objectSize && this.spare.length < SPARE_BUFFERS) this.spare.push(e.data);
    this.buffered -= e.data.length;
    e.data = null;
    e.covered.clear();
    this.wakeWriters();
  }

  private markClean(e: Entry): void {
    e.dirty = false;
    this.dirty.delete(e);
    this.dropData(e);
  }

  private wakeWriters(): void {
    for (const w of this.roomWaiters.splice(0)) w();
  }

  /**
   * Wait until a new object buffer fits in write-buffer=, pushing the least recently written
   * objects out meanwhile. If storing fails while we wait, the write fails with that error (the
   * buffer cannot drain, and acknowledging more would only pile up data we may lose).
   */
  private async room(length: number): Promise<void> {
    const failures = this.failures;
    while (this.buffered + length > this.maxBuffered && this.buffered > 0) {
      this.evict(this.maxBuffered - length);
      await new Promise<void>((r) => this.roomWaiters.push(r));
      if (this.failures !== failures) {
        throw new NbdError(Errno.EIO, `write buffer full and writing it back failed: ${this.lastFailure?.message ?? 'unknown error'}`);
      }
    }
  }

  /** Queue write-behind for the least recently written dirty objects until at most `target` bytes stay unqueued. */
  private evict(target: number): void {
    for (const e of this.dirty) {
      if (this.buffered - this.queuedBytes <= target) return;
      if (!e.queued) this.writeBehind(e);
    }
  }

  private writeBehind(e: Entry): void {
    if (e.queued) return;
    e.queued = true;
    this.queuedBytes += e.length;
    this.storeEntry(e).catch((err: Error) => {
      this.failures++;
      this.lastFailure = err;
      logError('s3', `writing back ${this.store.where(this.key(e.index))}: ${err.message}`);
      this.wakeWriters();
    });
  }

  // -------------------------------------------------------------------------------------------
  // Storing one object

  /** Store the entry's dirty data (or do nothing when it is clean), under its lock. */
  private storeEntry(e: Entry): Promise<void> {
    return this.locked(e, async () => {
      if (e.queued) {
        e.queued = false;
        this.queuedBytes -= e.length;
      }
      if (!e.dirty || !e.data) return;
      await this.persist(e, e.data);
      e.stores++;
      this.markClean(e);
    });
  }

  private isZero(data: Buffer): boolean {
    return data.equals(data.length === this.zeros.length ? this.zeros : this.zeros.subarray(0, data.length));
  }

  private async persist(e: Entry, data: Buffer): Promise<void> {
    const key = this.key(e.index);
    if (e.covered.covers(e.length)) {
      // Every byte was written: no need to look at the stored object, and no update to lose:
      // the whole object is overwritten, which is what a write covering it means.
      if (this.isZero(data)) {
        await this.store.delete(key);
        this.stats.deletes++;
        e.zeroBase = true;
      } else {
        await this.store.put(key, data);
        this.stats.puts++;
        e.zeroBase = false;
      }
      return;
    }
    // Read-modify-write: fill the unwritten parts from the stored object, then PUT only if the
    // stored object is still the one we read (If-Match its ETag, or If-None-Match: * when there
    // was none). A 412 means another server changed it in between: read and merge again.
    // After our own delete (zeroBase) the object is assumed absent, and the gaps are already
    // zero: the first attempt reads nothing, and its If-None-Match: * checks the assumption.
    let assumeAbsent = e.zeroBase;
    if (!assumeAbsent) this.stats.merges++;
    for (let attempt = 1; ; attempt++) {
      let got: GetResult | null = null;
      if (!assumeAbsent) {
        got = await this.store.get(key, 0, e.length, (chunk, pos) => {
          e.covered.forEachGap(pos, pos + chunk.length, (s, t) => data.set(chunk.subarray(s - pos, t - pos), s));
        });
        // absent, or shorter than an object: the rest reads as zeroes
        e.covered.forEachGap(got?.bytes ?? 0, e.length, (s, t) => data.fill(0, s, t));
      }
      if (this.isZero(data)) {
        if (assumeAbsent) {
          // Nothing to store if the object is still absent; if not, our zeroes must reach it.
          assumeAbsent = false;
          this.stats.merges++;
          continue;
        }
        // Not conditional (radosgw has no conditional DELETE): see the README's consistency notes.
        if (got) await this.store.delete(key);
        this.stats.deletes++;
        e.zeroBase = true;
        return;
      }
      const condition = got === null ? { ifNoneMatch: '*' as const } : got.etag ? { ifMatch: got.etag } : undefined;
      const stored = await this.store.put(key, data, condition);
      if (stored !== false) {
        this.stats.puts++;
        e.zeroBase = false;
        return;
      }
      this.stats.conflicts++;
      if (assumeAbsent) {
        assumeAbsent = false;
        this.stats.merges++;
      }
      debug('s3', `${this.store.where(key)} changed while being merged (attempt ${attempt}): merging again`);
      if (attempt >= MAX_MERGE_ATTEMPTS) {
        throw new NbdError(Errno.EIO, `${this.store.where(key)}: changed by another writer during each of ${attempt} merges`);
      }
    }
  }

  // -------------------------------------------------------------------------------------------
  // NBD operations

  async read(buf: Uint8Array, offset: number): Promise<ZeroSpan[] | undefined> {
    const holes: ZeroSpan[] = [];
    const stored: Promise<void>[] = [];
    this.forParts(offset, buf.length, (index, pos, len, at) => {
      const e = this.entries.get(index);
      if (e?.data && (e.zeroBase || e.covered.contains(pos, pos + len))) {
        buf.set(e.data.subarray(pos, pos + len), at);
        return;
      }
      stored.push(this.readStored(index, pos, buf.subarray(at, at + len), at, holes, e));
    });
    await Promise.all(stored);
    return holes.length ? holes : undefined;
  }

  /**
   * Read from the store, then lay over it whatever is buffered (possibly written meanwhile).
   * `seen` is the object's entry when the read began: if it was written back while our GET was
   * on its way, the GET may predate that write-back, whose buffer (with writes acknowledged
   * before this read) is gone now; a second GET, sent after the write-back, cannot miss it.
   */
  private async readStored(index: number, pos: number, target: Uint8Array, at: number, holes: ZeroSpan[], seen?: Entry): Promise<void> {
    const stores = seen?.stores;
    let got = await this.reads.read(this.key(index), pos, target);
    if (seen && seen.stores !== stores) got = await this.reads.read(this.key(index), pos, target);
    const e = this.entries.get(index);
    const bytes = got?.bytes ?? 0;
    if (!e?.data) {
      if (got === null) holes.push({ start: at, length: target.length });
      else if (bytes < target.length) target.fill(0, bytes);
      return;
    }
    if (bytes < target.length) target.fill(0, bytes);
    if (e.zeroBase) target.set(e.data.subarray(pos, pos + target.length));
    else e.covered.forEachIn(pos, pos + target.length, (s, t) => target.set(e.data!.subarray(s, t), s - pos));
  }

  async write(buf: Uint8Array, offset: number, fua: boolean): Promise<void> {
    const parts: Promise<Entry>[] = [];
    this.forParts(offset, buf.length, (index, pos, len, at) => parts.push(this.writePart(index, pos, buf.subarray(at, at + len))));
    const entries = await Promise.all(parts);
    if (fua) await this.storeAll(entries);
  }

  private async writePart(index: number, pos: number, src: Uint8Array): Promise<Entry> {
    if (!this.entries.get(index)?.data) await this.room(this.objectLength(index));
    const e = this.entry(index);
    await this.locked(e, () => {
      if (!e.data) {
        e.data = this.takeBuffer(e.length, e.zeroBase);
        e.covered.clear();
      }
      // The caller's buffer is the core's and is reused once we return: copy now.
      e.data.set(src, pos);
      e.covered.add(pos, pos + src.length);
      e.dirty = true;
      this.dirty.delete(e);
      this.dirty.add(e);
      if (e.covered.covers(e.length)) this.writeBehind(e);
      // Past half the buffer, start writing back the oldest objects before writers must wait.
      else if (this.buffered - this.queuedBytes > this.maxBuffered / 2) this.evict(this.maxBuffered / 2);
    });
    return e;
  }

  /**
   * Trim and write zeroes: objects inside the range are deleted (in batches, before replying);
   * the parts of objects at its edges are written with zeroes like any write, so the object is
   * stored merged, or deleted if nothing but zeroes is left.
   */
  async zero(count: number, offset: number, fua: boolean): Promise<void> {
    const whole: number[] = [];
    const edges: Promise<Entry>[] = [];
    this.forParts(offset, count, (index, pos, len) => {
      if (pos === 0 && len === this.objectLength(index)) whole.push(index);
      else edges.push(this.writePart(index, pos, this.zeros.subarray(0, len)));
    });
    const results = await Promise.allSettled([
      (async () => {
        for (let i = 0; i < whole.length; i += DELETE_BATCH) await this.deleteObjects(whole.slice(i, i + DELETE_BATCH));
      })(),
      ...edges,
    ]);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    if (fua) await this.storeAll(results.slice(1).map((r) => (r as PromiseFulfilledResult<Entry>).value));
  }

  /** Delete whole objects with every one's lock held, so no write-back of older data can follow. */
  private async deleteObjects(indices: number[]): Promise<void> {
    let locked = 0;
    let startDelete!: () => void;
    const allLocked = new Promise<void>((r) => (startDelete = r));
    let deleted: Promise<void> = Promise.resolve();
    // Locks are queued synchronously here, so two batches can never wait for each other in a cycle.
    const holds = indices.map((index) => {
      const e = this.entry(index);
      return this.locked(e, async () => {
        // the trim overwrites every byte: buffered data for this object is obsolete
        this.markClean(e);
        if (++locked === indices.length) {
          deleted = this.store.deleteMany(indices.map((i) => this.key(i)));
          startDelete();
        }
        await allLocked;
        await deleted;
        e.stores++;
        e.zeroBase = true;
      });
    });
    const results = await Promise.allSettled(holds);
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    this.stats.deletes += indices.length;
  }

  private async storeAll(entries: Iterable<Entry>): Promise<void> {
    const results = await Promise.allSettled([...new Set(entries)].map((e) => this.storeEntry(e)));
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
  }

  /** Every write acknowledged before this call is in the store when it returns. */
  flush(): Promise<void> {
    // Entries being written back are still dirty, so storeEntry() waits for them (and retries
    // them if they failed).
    return this.storeAll([...this.dirty]);
  }

  get dirtyBytes(): number {
    let n = 0;
    for (const e of this.dirty) n += e.length;
    return n;
  }

  /**
   * Block status: objects in the store (one LIST, a page per 1000 objects) or in the buffer are
   * data; the others are holes that read as zeroes. Yields in ascending order, lazily, so a
   * REQ_ONE query or a huge range costs only what the answer needs.
   */
  async *extents(count: number, offset: number): AsyncGenerator<Extent> {
    const os = this.geometry.objectSize;
    const first = Math.floor(offset / os);
    const last = Math.floor((offset + count - 1) / os);
    const buffered = [...this.entries.values()]
      .filter((e) => e.data && e.index >= first && e.index <= last)
      .map((e) => e.index)
      .sort((a, b) => a - b);
    const stored = this.storedIndices(first, last);
    const span = (from: number, to: number, type: number): Extent => {
      const start = from * os;
      return { offset: start, length: Math.min(to * os, this.geometry.size) - start, type };
    };
    try {
      let next = await stored.next();
      let b = 0;
      let pos = first; // first object not yet reported
      let runStart = -1; // start of the current run of present objects
      for (;;) {
        const s = next.done ? Infinity : next.value;
        const d = b < buffered.length ? buffered[b]! : Infinity;
        const index = Math.min(s, d);
        if (index === Infinity) break;
        if (index === s) next = await stored.next();
        if (index === d) b++;
        if (index < pos) continue;
        if (index > pos) {
          if (runStart >= 0) yield span(runStart, pos, 0);
          runStart = -1;
          yield span(pos, index, EXTENT_HOLE | EXTENT_ZERO);
        }
        if (runStart < 0) runStart = index;
        pos = index + 1;
      }
      if (runStart >= 0) yield span(runStart, pos, 0);
      if (pos <= last) yield span(pos, last + 1, EXTENT_HOLE | EXTENT_ZERO);
    } finally {
      await stored.return(undefined);
    }
  }

  /** Indices of the objects in the store from first to last, ascending. */
  private async *storedIndices(first: number, last: number): AsyncGenerator<number> {
    const startAfter = first > 0 ? this.key(first - 1) : undefined;
    for await (const key of this.store.list(this.prefix, startAfter)) {
      const name = key.slice(this.prefix.length);
      if (!KEY_NAME.test(name)) continue;
      const index = parseInt(name, 16);
      if (index < first) continue;
      if (index > last) return;
      yield index;
    }
  }
}
