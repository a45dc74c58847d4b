import { EXTENT_HOLE, EXTENT_ZERO, Errno, NbdError, type Extent, type ZeroSpan } from '@nbdx/server/api';
import * as os from 'node:os';

/** Bytes per page: the unit of the page table, and of dense storage. */
export const PAGE_SIZE = 32 * 1024;
/** Bytes per sub-block: the unit in which writes are tracked and sparse pages are stored. */
export const SUB_SIZE = 4 * 1024;
const SUB_SHIFT = 12;
/** Sub-blocks per page, and the mask of a page whose sub-blocks all hold data. */
const SUBS = PAGE_SIZE / SUB_SIZE;
const FULL = (1 << SUBS) - 1;
/** A sparse page that comes to hold this many sub-blocks (more than half) becomes dense. */
const PROMOTE_AT = SUBS / 2 + 1;
/** A dense page left holding this many sub-blocks or fewer (less than half) by zero/trim goes back
 * to sparse. Between the two, a page stays as it is, so a write and a trim of the same sub-block,
 * again and again, do not move its page back and forth. */
const DEMOTE_AT = SUBS / 2 - 1;
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

/**
 * Where everything lives: in SharedArrayBuffers, so that every worker thread serving the disk
 * (`nbdx --workers`) sees the same one. Each thread has its own SparseArray over the same buffers;
 * a lock in the control buffer makes every call one step as far as the other threads can tell.
 *
 * - data: the chunks, in 2 MiB slabs. A slab holds either 64 chunks of PAGE_SIZE ("big", dense
 *   pages) or 512 of SUB_SIZE ("small", one per written sub-block of a sparse page). Chunk h of
 *   a kind is at byte h * its size: numbers, not a Buffer per chunk, so taking one allocates
 *   nothing.
 * - the page table: a radix tree of 64-way nodes over page numbers; a leaf holds 64 pages (2 MiB
 *   of the disk). An entry is 0 where nothing is (a whole subtree never written costs one 0), a
 *   node's number + 1 above the leaves, and in a leaf: the big chunk + 1 of a full page (all its
 *   sub-blocks hold data), or -(record + 1) for a page partly written, whose record says which
 *   sub-blocks hold data and where.
 *
 * The data buffer and the tables are growable SharedArrayBuffers: address space is reserved up
 * front and memory is committed by the system only where it is touched, so a 1 TiB disk costs
 * nothing until written, and then about what was written (see the page records below). Memory
 * trimmed is kept and reused for the next writes, as nbdkit's sparse allocator does with its
 * heap; it is not given back to the system until the server exits.
 */

/** Slabs are 2 MiB: the unit in which chunk memory is handed to one kind or the other. */
const SLAB_BYTES = 2 * 1024 * 1024;
const KINDS = [
  { perSlab: SLAB_BYTES / PAGE_SIZE, shift: 6 },
  { perSlab: SLAB_BYTES / SUB_SIZE, shift: 9 },
] as const;
const BIG = 0;
const SMALL = 1;
type Kind = typeof BIG | typeof SMALL;

/** Page table nodes: 64 entries and how many of them are not 0. */
const FAN_SHIFT = 6;
const FAN = 1 << FAN_SHIFT;
const NODE_INTS = FAN + 1;
const COUNT = FAN;
/** Page records: the mask of sub-blocks holding data, the big chunk of a dense page (-1 while
 * sparse), and the small chunk of each sub-block of a sparse page (-1 where none). */
const REC_INTS = 2 + SUBS;
const MASK = 0;
const WHOLE = 1;
const SUB0 = 2;

/** Control words (Int32 indices). */
const C_LOCK = 0;
const C_READY = 1;
const C_ROOT = 2;
const C_LEVELS = 3;
const C_NODE_TOP = 4;
const C_NODE_FREE = 5;
const C_REC_TOP = 6;
const C_REC_FREE = 7;
const C_SLABS = 8;
const C_SLAB_FREE = 9;
/** Per kind: head, tail and length of the list of slabs with room. */
const C_ROOM = 10; // + kind * 3
const C_SLABS_USED = 16; // + kind
/** Float64 indices (in the same buffer): bytes of chunks in use, pages holding data. */
const F_STORED = 16;
const F_PAGES = 17;
const CONTROL_BYTES = 256;

/** Slab table: per slab, its kind + 1 (0: free), chunks in use, chunks never handed out yet start
 * at `fresh`, head of its free chunks (chunk + 1), links in its kind's list of slabs with room. */
const S_INTS = 7;
const S_KIND = 0;
const S_USED = 1;
const S_FRESH = 2;
const S_FREE = 3;
const S_NEXT = 4;
const S_PREV = 5;
const S_LISTED = 6;
/** Per big chunk: next free chunk + 1, views out (pins), freed while pinned. */
const B_INTS = 3;
const B_NEXT = 0;
const B_PINS = 1;
const B_DEFERRED = 2;

/** Chunk data is never reserved beyond this (4 TiB): small chunk numbers stay 32-bit. */
const DATA_LIMIT = 2 ** 42;
/** Extents worked out per hold of the lock. */
const EXTENTS_BATCH = 256;

/**
 * Where a SparseArray gets its buffers, by role: a fixed buffer of `byteLength`, or with
 * `maxByteLength` a growable one. Threads sharing a disk must get the same buffer for a role (the
 * plugin passes names to the server's sharedBuffer()); the default makes private ones.
 */
export type SharedMemory = (role: string, byteLength: number, maxByteLength?: number) => SharedArrayBuffer;

const privateMemory: SharedMemory = (_role, byteLength, maxByteLength) =>
  maxByteLength === undefined ? new SharedArrayBuffer(byteLength) : new SharedArrayBuffer(byteLength, { maxByteLength });

/** Set bits of a page mask. */
function popcount(m: number): number {
  let n = 0;
  for (; m; m &= m - 1) n++;
  return n;
}

/** Bits first..last (sub-block indices, inclusive). */
const bitsOf = (first: number, last: number): number => ((2 << last) - 1) & ~((1 << first) - 1);

/** Whether `len` bytes (PAGE_SIZE at most) of `b` from `at` are all zero (no allocation). */
const isZero = (b: Buffer, at: number, len: number): boolean => b.compare(ZERO_PAGE, 0, len, at, at + len) === 0;

/** Append a zero span to a read's list, merged with the last one when they touch. */
function addHole(holes: ZeroSpan[] | undefined, start: number, length: number): ZeroSpan[] {
  if (!holes) return [{ start, length }];
  const last = holes[holes.length - 1]!;
  if (last.start + last.length === start) last.length += length;
  else holes.push({ start, length });
  return holes;
}

/** The slot of page `index` in a node of `level` (0: leaf). Page numbers pass 2^31 on disks over
 * 64 TiB, where bit operations no longer apply. */
function slotOf(index: number, level: number): number {
  return index < 0x80000000 ? (index >>> (FAN_SHIFT * level)) & (FAN - 1) : Math.floor(index / FAN ** level) % FAN;
}

/** `sab` grown to hold at least `bytes` (twice what it was, at least, so growing is rare). */
function ensure(sab: SharedArrayBuffer, bytes: number, what: string): void {
  if (sab.byteLength >= bytes) return;
  if (bytes > sab.maxByteLength) {
    throw new NbdError(Errno.ENOMEM, `memory disk: out of room for ${what} (${sab.maxByteLength} bytes reserved)`);
  }
  sab.grow(Math.min(sab.maxByteLength, Math.max(bytes, sab.byteLength * 2, 64 * 1024)));
}

/**
 * Records of `stride` words in a growable buffer, by number: the ones given back are kept on a
 * free list through their first word, whose head (number + 1) and the count of records ever
 * made are words of the control buffer.
 */
class RecordPool {
  private readonly words: Int32Array;

  constructor(
    private readonly control: Int32Array,
    private readonly topAt: number,
    private readonly freeAt: number,
    private readonly sab: SharedArrayBuffer,
    private readonly stride: number,
    private readonly what: string,
  ) {
    this.words = new Int32Array(sab);
  }

  /** A record number; its words hold whatever they held. */
  take(): number {
    const c = this.control;
    const free = c[this.freeAt]!;
    if (free) {
      c[this.freeAt] = this.words[(free - 1) * this.stride]!;
      return free - 1;
    }
    const r = c[this.topAt]!;
    ensure(this.sab, (r + 1) * this.stride * 4, this.what);
    c[this.topAt] = r + 1;
    return r;
  }

  give(r: number): void {
    this.words[r * this.stride] = this.control[this.freeAt]!;
    this.control[this.freeAt] = r + 1;
  }
}

/**
 * A sparse byte array: storage is allocated on first write and freed again by trim/zero (for
 * reuse), so a 1 TiB disk costs nothing until written, and then about what was written.
 *
 * A sub-block holds data once any byte of it is written (the rest of it is then zero-filled); the
 * others read as zero, whatever the memory under them holds, and cost nothing in a sparse page.
 * Sparse pages keep one SUB_SIZE chunk per written sub-block, so scattered small writes cost what
 * they write. Dense pages keep one PAGE_SIZE chunk, sub-block k at k * SUB_SIZE, so big requests
 * are one copy per page. A page becomes dense once more than half of it is written (PROMOTE_AT),
 * at the latest when written whole; zero/trim turns it back to sparse when less than half of it
 * holds data (DEMOTE_AT). So a page never costs more than twice what it holds, and a page at most
 * half written costs exactly that. (Dense at once would cost 32 KiB per 4 KiB write; the data a
 * sparse page holds is copied once more when it becomes dense, which is why not earlier.)
 */
export class SparseArray {
  private readonly control: Int32Array;
  private readonly counters: Float64Array;
  private readonly data: SharedArrayBuffer;
  /** This thread's view of `data`, made again when another thread grew it. */
  private mem: Buffer;
  private readonly nodes: Int32Array;
  private readonly recs: Int32Array;
  private readonly slabs: Int32Array;
  private readonly bigMeta: Int32Array;
  private readonly smallNext: Int32Array;
  /** The chunk tables newSlab() grows with the data (the pools grow their own buffers). */
  private readonly buffers: { slabs: SharedArrayBuffer; big: SharedArrayBuffer; small: SharedArrayBuffer };
  private readonly nodePool: RecordPool;
  private readonly recPool: RecordPool;
  /** The root's level (0: the root is a leaf), and nodes on the way down, for freeing upwards. */
  private readonly levels: number;
  private readonly path: Int32Array;
  /**
   * Loop steps taken by zero() and extents() (each step is bounded: one page looked at or freed,
   * or one search of the page table for the next page holding data). Tests use it to check their
   * cost without timing; read and write never touch it. Counted by this thread only.
   */
  walkSteps = 0;

  /**
   * `share` gives the buffers: the first SparseArray over them sets them up, later ones (other
   * threads) find them ready and only attach.
   */
  constructor(
    readonly size: number,
    share: SharedMemory = privateMemory,
  ) {
    const control = share('control', CONTROL_BYTES);
    this.control = new Int32Array(control);
    this.counters = new Float64Array(control);
    const pages = Math.ceil(size / PAGE_SIZE);
    let levels = 0;
    while (FAN ** (levels + 1) < pages) levels++;
    this.levels = levels;
    this.path = new Int32Array(levels + 1);

    const attach = Atomics.load(this.control, C_READY) === 1;
    this.data = attach ? share('data', 0, 1) : reserveData(share, size);
    const cap = this.data.maxByteLength;
    const slabs = cap / SLAB_BYTES;
    const b = {
      slabs: share('slabs', 0, slabs * S_INTS * 4),
      big: share('big chunks', 0, slabs * KINDS[BIG].perSlab * B_INTS * 4),
      small: share('small chunks', 0, slabs * KINDS[SMALL].perSlab * 4),
      // At most a page per sub-block of data, and a leaf and its way up per page.
      recs: share('page records', 0, Math.min(2 ** 36, (cap / SUB_SIZE) * REC_INTS * 4)),
      nodes: share('page table', 0, Math.min(2 ** 36, (cap / SUB_SIZE) * NODE_INTS * 4)),
    };
    this.buffers = { slabs: b.slabs, big: b.big, small: b.small };
    // Length-tracking views: they follow every grow(), in whichever thread it happened.
    this.slabs = new Int32Array(b.slabs);
    this.bigMeta = new Int32Array(b.big);
    this.smallNext = new Int32Array(b.small);
    this.recs = new Int32Array(b.recs);
    this.nodes = new Int32Array(b.nodes);
    this.mem = Buffer.from(this.data);
    this.nodePool = new RecordPool(this.control, C_NODE_TOP, C_NODE_FREE, b.nodes, NODE_INTS, 'the page table');
    this.recPool = new RecordPool(this.control, C_REC_TOP, C_REC_FREE, b.recs, REC_INTS, 'page records');
    if (!attach) {
      this.control[C_LEVELS] = levels;
      this.control[C_ROOT] = this.newNode();
      Atomics.store(this.control, C_READY, 1);
    } else if (this.control[C_LEVELS] !== levels) {
      throw new NbdError(Errno.EINVAL, 'memory disk: the shared page table was made for another size');
    }
  }

  // -------------------------------------------------------------------------------------------
  // The lock: one holder at a time across threads. Calls are short (no I/O, copies of one
  // request at most), so a waiter spins a little before it sleeps.

  private lock(): void {
    const c = this.control;
    if (Atomics.compareExchange(c, C_LOCK, 0, 1) === 0) return;
    for (let spin = 0; spin < 100; spin++) if (Atomics.load(c, C_LOCK) === 0 && Atomics.compareExchange(c, C_LOCK, 0, 1) === 0) return;
    // 2: held, and someone may be asleep on it.
    while (Atomics.exchange(c, C_LOCK, 2) !== 0) Atomics.wait(c, C_LOCK, 2);
  }

  private unlock(): void {
    if (Atomics.exchange(this.control, C_LOCK, 0) === 2) Atomics.notify(this.control, C_LOCK, 1);
  }

  /** This thread's data view covers every slab made (another thread may have grown the data):
   * called as each call starts, and by newSlab() when this thread grows it.
   * Compared with the count of slabs, a word of shared memory: the byteLength of a growable
   * buffer is a call into V8's runtime (1 % of the server's CPU in a bulk copy, by perf). */
  private fit(): void {
    if (this.mem.length < this.control[C_SLABS]! * SLAB_BYTES) this.mem = Buffer.from(this.data);
  }

  // -------------------------------------------------------------------------------------------
  // Counters

  /** Pages holding at least one sub-block. */
  get allocatedPages(): number {
    return this.counters[F_PAGES]!;
  }

  /** Bytes of chunks in use: PAGE_SIZE per dense page, SUB_SIZE per sub-block of a sparse one. */
  get storedBytes(): number {
    return this.counters[F_STORED]!;
  }

  private stored(delta: number): void {
    this.counters[F_STORED]! += delta;
  }

  private pagesDelta(delta: number): void {
    this.counters[F_PAGES]! += delta;
  }

  /** Bytes of the slabs in use: what the storage costs, slack included. */
  get slabBytes(): number {
    return (this.control[C_SLABS_USED + BIG]! + this.control[C_SLABS_USED + SMALL]!) * SLAB_BYTES;
  }

  /** Bytes of chunk memory made so far (the high-water mark of slabs: trimmed slabs are reused). */
  get dataBytes(): number {
    return this.control[C_SLABS]! * SLAB_BYTES;
  }

  /** Pages held as a record, that is partly written: for tests, O(pages). */
  get partialPages(): number {
    this.lock();
    try {
      let n = 0;
      for (let i = this.nextPage(0, Infinity); i >= 0; i = this.nextPage(i + 1, Infinity)) if (this.entry(i) < 0) n++;
      return n;
    } finally {
      this.unlock();
    }
  }

  // -------------------------------------------------------------------------------------------
  // Record pools (page table nodes, page records)

  /** An empty page table node. */
  private newNode(): number {
    const r = this.nodePool.take();
    this.nodes.fill(0, r * NODE_INTS, (r + 1) * NODE_INTS);
    return r;
  }

  private freeNode(r: number): void {
    this.nodePool.give(r);
  }

  /** A page record: no sub-block holds data, no chunk. */
  private newRec(): number {
    const r = this.recPool.take();
    const at = r * REC_INTS;
    this.recs[at + MASK] = 0;
    this.recs.fill(-1, at + WHOLE, at + REC_INTS);
    return r;
  }

  private freeRec(r: number): void {
    this.recPool.give(r);
  }

  // -------------------------------------------------------------------------------------------
  // Chunks

  /** A slab for `kind`: a free one, or a new one at the end of the data. */
  private newSlab(kind: Kind): number {
    const c = this.control;
    let s = c[C_SLAB_FREE]!;
    if (s) c[C_SLAB_FREE] = this.slabs[--s * S_INTS + S_NEXT]!;
    else {
      s = c[C_SLABS]!;
      ensure(this.data, (s + 1) * SLAB_BYTES, 'data');
      ensure(this.buffers.slabs, (s + 1) * S_INTS * 4, 'the slab table');
      ensure(this.buffers.big, (s + 1) * KINDS[BIG].perSlab * B_INTS * 4, 'chunk links');
      ensure(this.buffers.small, (s + 1) * KINDS[SMALL].perSlab * 4, 'chunk links');
      c[C_SLABS] = s + 1;
      this.fit();
    }
    const at = s * S_INTS;
    this.slabs.fill(0, at, at + S_INTS);
    this.slabs[at + S_KIND] = kind + 1;
    if (kind === BIG) this.bigMeta.fill(0, s * KINDS[BIG].perSlab * B_INTS, (s + 1) * KINDS[BIG].perSlab * B_INTS);
    c[C_SLABS_USED + kind]!++;
    this.listRoom(kind, s, true);
    return s;
  }

  /** Put slab `s` in its kind's list of slabs with room: at the front (where chunks are taken
   * from, so a new slab fills up first) or at the back. */
  private listRoom(kind: Kind, s: number, front: boolean): void {
    const c = this.control;
    const S = this.slabs;
    const at = s * S_INTS;
    const head = C_ROOM + kind * 3;
    S[at + S_LISTED] = 1;
    if (c[head] === 0) {
      S[at + S_NEXT] = S[at + S_PREV] = 0;
      c[head] = c[head + 1] = s + 1;
    } else if (front) {
      S[at + S_PREV] = 0;
      S[at + S_NEXT] = c[head]!;
      S[(c[head]! - 1) * S_INTS + S_PREV] = s + 1;
      c[head] = s + 1;
    } else {
      S[at + S_NEXT] = 0;
      S[at + S_PREV] = c[head + 1]!;
      S[(c[head + 1]! - 1) * S_INTS + S_NEXT] = s + 1;
      c[head + 1] = s + 1;
    }
    c[head + 2]!++;
  }

  private unlistRoom(kind: Kind, s: number): void {
    const c = this.control;
    const S = this.slabs;
    const at = s * S_INTS;
    const head = C_ROOM + kind * 3;
    const next = S[at + S_NEXT]!;
    const prev = S[at + S_PREV]!;
    if (prev) S[(prev - 1) * S_INTS + S_NEXT] = next;
    else c[head] = next;
    if (next) S[(next - 1) * S_INTS + S_PREV] = prev;
    else c[head + 1] = prev;
    S[at + S_LISTED] = 0;
    c[head + 2]!--;
  }

  /** A chunk of `kind`: from the first slab with room, chunks never used in ascending order first. */
  private alloc(kind: Kind): number {
    const k = KINDS[kind];
    const head = this.control[C_ROOM + kind * 3]!;
    const s = head ? head - 1 : this.newSlab(kind);
    const at = s * S_INTS;
    const S = this.slabs;
    let h: number;
    const free = S[at + S_FREE]!;
    if (free) {
      h = free - 1;
      S[at + S_FREE] = kind === BIG ? this.bigMeta[h * B_INTS + B_NEXT]! : this.smallNext[h]!;
    } else h = s * k.perSlab + S[at + S_FRESH]!++;
    S[at + S_USED]!++;
    if (S[at + S_FREE] === 0 && S[at + S_FRESH] === k.perSlab) this.unlistRoom(kind, s);
    return h;
  }

  /** Chunk `h` of `kind` is free again; a slab left empty is free for either kind (one empty slab
   * per kind is kept, so that alternating writes and trims do not churn). */
  private release(kind: Kind, h: number): void {
    const s = h >>> KINDS[kind].shift;
    const at = s * S_INTS;
    const S = this.slabs;
    if (kind === BIG) this.bigMeta[h * B_INTS + B_NEXT] = S[at + S_FREE]!;
    else this.smallNext[h] = S[at + S_FREE]!;
    S[at + S_FREE] = h + 1;
    S[at + S_USED]!--;
    if (!S[at + S_LISTED]) this.listRoom(kind, s, false);
    if (S[at + S_USED] === 0 && this.control[C_ROOM + kind * 3 + 2]! > 1) {
      this.unlistRoom(kind, s);
      S[at + S_KIND] = 0;
      S[at + S_NEXT] = this.control[C_SLAB_FREE]!;
      this.control[C_SLAB_FREE] = s + 1;
      this.control[C_SLABS_USED + kind]!--;
    }
  }

  /** Give a big chunk back, or, while a view of it is out, once that comes back. */
  private releaseBig(h: number): void {
    if (this.bigMeta[h * B_INTS + B_PINS]! > 0) this.bigMeta[h * B_INTS + B_DEFERRED] = 1;
    else this.release(BIG, h);
  }

  /**
   * `n` big chunks next to each other (h, h+1, ...), or -1 when the chunks that would come next
   * are not (then nothing is taken). A slab's chunks come out in ascending order until trims
   * scatter them, and new slabs follow the last one in memory, so runs for sequential writes into
   * empty space are the rule.
   */
  private allocRun(n: number): number {
    const taken: number[] = [];
    for (let k = 0; k < n; k++) taken.push(this.alloc(BIG));
    // Freed in ascending order (a trim), they come back out descending: any order will do.
    taken.sort((x, y) => x - y);
    if (taken[n - 1]! - taken[0]! === n - 1) return taken[0]!;
    for (let j = n - 1; j >= 0; j--) this.release(BIG, taken[j]!);
    return -1;
  }

  // -------------------------------------------------------------------------------------------
  // The page table

  /** The entry of page `index` (0 when nothing is there). */
  private entry(index: number): number {
    let node = this.control[C_ROOT]!;
    for (let level = this.levels; level > 0; level--) {
      const e = this.nodes[node * NODE_INTS + slotOf(index, level)]!;
      if (e === 0) return 0;
      node = e - 1;
    }
    return this.nodes[node * NODE_INTS + slotOf(index, 0)]!;
  }

  /** Where page `index`'s entry is (an index into `nodes`), nodes made on the way as needed. */
  private place(index: number): number {
    let node = this.control[C_ROOT]!;
    for (let level = this.levels; level > 0; level--) {
      const at = node * NODE_INTS + slotOf(index, level);
      let e = this.nodes[at]!;
      if (e === 0) {
        e = this.newNode() + 1;
        this.nodes[at] = e;
        this.nodes[node * NODE_INTS + COUNT]!++;
      }
      node = e - 1;
    }
    return node * NODE_INTS + slotOf(index, 0);
  }

  /** Set page `index`'s entry, which was 0, to `v` (not 0). */
  private addPage(index: number, v: number): void {
    const at = this.place(index);
    this.nodes[at] = v;
    this.nodes[at - (at % NODE_INTS) + COUNT]!++;
    this.pagesDelta(1);
  }

  /** Replace page `index`'s entry (not 0) with `v` (not 0). */
  private setPage(index: number, v: number): void {
    this.nodes[this.place(index)] = v;
  }

  /** Page `index`'s entry becomes 0; nodes left empty go (the root stays). */
  private removePage(index: number): void {
    const path = this.path;
    let node = this.control[C_ROOT]!;
    for (let level = this.levels; level > 0; level--) {
      path[level] = node;
      node = this.nodes[node * NODE_INTS + slotOf(index, level)]! - 1;
    }
    this.nodes[node * NODE_INTS + slotOf(index, 0)] = 0;
    this.pagesDelta(-1);
    for (let level = 0; level < this.levels; level++) {
      if (--this.nodes[node * NODE_INTS + COUNT]! > 0) return;
      this.freeNode(node);
      node = path[level + 1]!;
      this.nodes[node * NODE_INTS + slotOf(index, level + 1)] = 0;
    }
    this.nodes[node * NODE_INTS + COUNT]!--;
  }

  /** The lowest page in [from, to) holding data, or -1: subtrees with nothing are skipped whole,
   * so the cost is the depth of the table times the entries looked at on the way. */
  private nextPage(from: number, to: number): number {
    return from < to ? this.search(this.control[C_ROOT]!, this.levels, 0, from, to) : -1;
  }

  private search(node: number, level: number, base: number, from: number, to: number): number {
    const span = FAN ** level;
    const first = from > base ? Math.floor((from - base) / span) : 0;
    const at = node * NODE_INTS;
    for (let s = first; s < FAN; s++) {
      const start = base + s * span;
      if (start >= to) return -1;
      const e = this.nodes[at + s]!;
      if (e === 0) continue;
      if (level === 0) return start;
      const found = this.search(e - 1, level - 1, start, from, to);
      if (found >= 0) return found;
    }
    return -1;
  }

  // -------------------------------------------------------------------------------------------
  // Views

  /**
   * The `count` bytes at `offset` as one piece of this array's memory, for a READ reply sent from
   * it or a WRITE payload received into it; undefined when they are not one piece. That is when
   * every page of the range is full (one big chunk) and the chunks are consecutive (neighbours
   * in memory), or, for `write`, when the range covers pages never written, whole, and a run of
   * consecutive chunks is free for them (they are taken now, and hold data from now on). Bulk
   * copies are the first kind or the second; scattered small writes are neither and are copied.
   * Every view must be given back with releaseView(); until then its chunks are not reused, even
   * if trimmed.
   */
  view(count: number, offset: number, write: boolean): Buffer | undefined {
    if (count <= 0) return undefined;
    const first = Math.floor(offset / PAGE_SIZE);
    const last = Math.floor((offset + count - 1) / PAGE_SIZE);
    const n = last - first + 1;
    this.lock();
    try {
      const start = this.entry(first);
      let h: number;
      if (start === 0) {
        if (!write || offset !== first * PAGE_SIZE || (offset + count) % PAGE_SIZE !== 0) return undefined;
        for (let i = first + 1; i <= last; i++) if (this.entry(i) !== 0) return undefined;
        h = this.allocRun(n);
        if (h < 0) return undefined;
        for (let k = 0; k < n; k++) this.addPage(first + k, h + k + 1);
        this.stored(n * PAGE_SIZE);
      } else {
        if (start < 0) return undefined;
        h = start - 1;
        if (!this.consecutive(first, h, n)) return undefined;
      }
      for (let k = 0; k < n; k++) this.bigMeta[(h + k) * B_INTS + B_PINS]!++;
      return Buffer.from(this.data, h * PAGE_SIZE + (offset - first * PAGE_SIZE), count);
    } finally {
      this.unlock();
    }
  }

  /** Whether pages first .. first+n-1 are full and held by chunks h .. h+n-1 (neighbours in memory). */
  private consecutive(first: number, h: number, n: number): boolean {
    for (let k = 1; k < n; k++) if (this.entry(first + k) !== h + k + 1) return false;
    return true;
  }

  /**
   * A view from view() is no longer used. `completed` false: a WRITE payload stopped part way
   * (the client went away), so the view holds a part of it over whatever the chunks held before
   * (possibly bytes of other offsets, for pages taken for it): it becomes zero, which is one of
   * the things an unfinished write may leave behind.
   */
  releaseView(view: Uint8Array, completed: boolean): void {
    if (view.buffer !== this.data) return;
    this.lock();
    try {
      if (!completed) view.fill(0);
      const h = Math.floor(view.byteOffset / PAGE_SIZE);
      const n = Math.ceil(((view.byteOffset % PAGE_SIZE) + view.byteLength) / PAGE_SIZE);
      for (let k = h; k < h + n; k++) {
        const at = k * B_INTS;
        if (--this.bigMeta[at + B_PINS]! === 0 && this.bigMeta[at + B_DEFERRED]) {
          this.bigMeta[at + B_DEFERRED] = 0;
          this.release(BIG, k);
        }
      }
    } finally {
      this.unlock();
    }
  }

  /** Whether `buf` is the view() for `offset` (a payload the core received into place), with
   * every page it covers still held where it was when the view was made. */
  private isOwnView(buf: Uint8Array, offset: number): boolean {
    if (buf.buffer !== this.data) return false;
    const first = Math.floor(offset / PAGE_SIZE);
    const e = this.entry(first);
    if (e <= 0 || buf.byteOffset !== (e - 1) * PAGE_SIZE + (offset - first * PAGE_SIZE)) return false;
    const n = Math.floor((offset + buf.byteLength - 1) / PAGE_SIZE) - first + 1;
    return this.consecutive(first, e - 1, n);
  }

  // -------------------------------------------------------------------------------------------
  // Reads and writes

  /** Fill `buf`; parts that hold no data are reported as zero spans instead of being written. */
  read(buf: Uint8Array, offset: number): ZeroSpan[] | undefined {
    let holes: ZeroSpan[] | undefined;
    this.lock();
    try {
      this.fit();
      let done = 0;
      while (done < buf.length) {
        const pos = offset + done;
        const index = Math.floor(pos / PAGE_SIZE);
        const inPage = pos - index * PAGE_SIZE;
        const n = Math.min(PAGE_SIZE - inPage, buf.length - done);
        const e = this.entry(index);
        if (e === 0) holes = addHole(holes, done, n);
        else if (e < 0) holes = this.readPart(-e - 1, buf, done, inPage, n, holes);
        else {
          const at = (e - 1) * PAGE_SIZE + inPage;
          this.mem.copy(buf, done, at, at + n);
        }
        done += n;
      }
    } finally {
      this.unlock();
    }
    return holes;
  }

  /** Read `n` bytes of page record `r`, from `inPage`, into `buf` at `at`. */
  private readPart(r: number, buf: Uint8Array, at: number, inPage: number, n: number, holes: ZeroSpan[] | undefined) {
    const R = this.recs;
    const rec = r * REC_INTS;
    const mask = R[rec + MASK]!;
    const whole = R[rec + WHOLE]!;
    const end = inPage + n;
    for (let k = inPage >>> SUB_SHIFT; k << SUB_SHIFT < end; k++) {
      const s = Math.max(inPage, k << SUB_SHIFT);
      const e = Math.min(end, (k + 1) << SUB_SHIFT);
      const to = at + s - inPage;
      if (!(mask & (1 << k))) holes = addHole(holes, to, e - s);
      else {
        const from = whole >= 0 ? whole * PAGE_SIZE : R[rec + SUB0 + k]! * SUB_SIZE - (k << SUB_SHIFT);
        this.mem.copy(buf, to, from + s, from + e);
      }
    }
    return holes;
  }

  write(buf: Uint8Array, offset: number): void {
    this.lock();
    try {
      this.fit();
      // The core received the payload straight into place (view()): nothing to copy.
      if (this.isOwnView(buf, offset)) return;
      let done = 0;
      while (done < buf.length) {
        const pos = offset + done;
        const index = Math.floor(pos / PAGE_SIZE);
        const inPage = pos - index * PAGE_SIZE;
        const n = Math.min(PAGE_SIZE - inPage, buf.length - done);
        const e = this.entry(index);
        if (e > 0) {
          // A full page: just the copy.
          this.mem.set(buf.subarray(done, done + n), (e - 1) * PAGE_SIZE + inPage);
        } else if (e === 0 && n === PAGE_SIZE) {
          // A new page written whole.
          const h = this.alloc(BIG);
          this.mem.set(buf.subarray(done, done + n), h * PAGE_SIZE);
          this.addPage(index, h + 1);
          this.stored(PAGE_SIZE);
        } else {
          this.writePart(index, e, buf, done, inPage, n);
        }
        done += n;
      }
    } finally {
      this.unlock();
    }
  }

  /** Write `n` bytes from `src` at `from` into page `index` (entry `e`: nothing, or a record). */
  private writePart(index: number, e: number, src: Uint8Array, from: number, inPage: number, n: number): void {
    let r: number;
    if (e === 0) {
      r = this.newRec();
      this.addPage(index, -(r + 1));
    } else r = -e - 1;
    const rec = r * REC_INTS;
    const R = this.recs;
    const first = inPage >>> SUB_SHIFT;
    const last = (inPage + n - 1) >>> SUB_SHIFT;
    try {
      if (R[rec + WHOLE]! < 0 && popcount(R[rec + MASK]! | bitsOf(first, last)) >= PROMOTE_AT) this.makeDense(rec, n === PAGE_SIZE);
      if (R[rec + WHOLE]! >= 0) this.writeDense(rec, src, from, inPage, n, first, last);
      else this.writeSparse(rec, src, from, inPage, n, first, last);
    } catch (err) {
      // Out of memory for its first chunk: a page holding nothing does not stay in the table.
      if (R[rec + MASK] === 0) {
        this.removePage(index);
        this.freeRec(r);
      }
      throw err;
    }
    if (R[rec + MASK] === FULL) {
      this.setPage(index, R[rec + WHOLE]! + 1);
      this.freeRec(r);
    }
  }

  /** Copy into a dense page; the parts of newly written sub-blocks outside the write become zero. */
  private writeDense(rec: number, src: Uint8Array, from: number, inPage: number, n: number, first: number, last: number) {
    const R = this.recs;
    const mem = this.mem;
    const at = R[rec + WHOLE]! * PAGE_SIZE;
    const mask = R[rec + MASK]!;
    const end = inPage + n;
    if (inPage & (SUB_SIZE - 1) && !(mask & (1 << first))) mem.fill(0, at + (first << SUB_SHIFT), at + inPage);
    if (end & (SUB_SIZE - 1) && !(mask & (1 << last))) mem.fill(0, at + end, at + ((last + 1) << SUB_SHIFT));
    mem.set(src.subarray(from, from + n), at + inPage);
    R[rec + MASK] = mask | bitsOf(first, last);
  }

  /** Copy into a sparse page, one chunk per sub-block, taking (and zero-filling) chunks as needed. */
  private writeSparse(rec: number, src: Uint8Array, from: number, inPage: number, n: number, first: number, last: number) {
    const R = this.recs;
    const end = inPage + n;
    for (let k = first; k <= last; k++) {
      const base = k << SUB_SHIFT;
      const s = Math.max(inPage, base) - base;
      const e = Math.min(end, base + SUB_SIZE) - base;
      let c = R[rec + SUB0 + k]!;
      const fresh = c < 0;
      if (fresh) {
        R[rec + SUB0 + k] = c = this.alloc(SMALL);
        this.stored(SUB_SIZE);
      }
      const mem = this.mem;
      const at = c * SUB_SIZE;
      if (fresh && s > 0) mem.fill(0, at, at + s);
      if (fresh && e < SUB_SIZE) mem.fill(0, at + e, at + SUB_SIZE);
      mem.set(src.subarray(from + base + s - inPage, from + base + e - inPage), at + s);
      R[rec + MASK]! |= 1 << k;
    }
  }

  /** Sparse → dense: one PAGE_SIZE chunk, with the sub-blocks held so far copied in (unless the
   * caller is about to overwrite the whole page). */
  private makeDense(rec: number, overwritten: boolean): void {
    const R = this.recs;
    const chunk = this.alloc(BIG);
    const mem = this.mem;
    const at = chunk * PAGE_SIZE;
    if (!overwritten) {
      // Sub-blocks in consecutive chunks (as a page written in order gets them) are copied in
      // one piece: chunk numbers are addresses, so consecutive ones are neighbours in memory.
      for (let k = 0; k < SUBS; ) {
        const c = R[rec + SUB0 + k]!;
        if (c < 0) {
          k++;
          continue;
        }
        let n = 1;
        while (k + n < SUBS && R[rec + SUB0 + k + n] === c + n) n++;
        mem.copy(mem, at + (k << SUB_SHIFT), c * SUB_SIZE, (c + n) * SUB_SIZE);
        k += n;
      }
    }
    // Released last first, so that the next chunks taken come out in ascending order.
    for (let k = SUBS - 1; k >= 0; k--) {
      const c = R[rec + SUB0 + k]!;
      if (c < 0) continue;
      this.release(SMALL, c);
      this.stored(-SUB_SIZE);
      R[rec + SUB0 + k] = -1;
    }
    R[rec + WHOLE] = chunk;
    this.stored(PAGE_SIZE);
  }

  /** Dense → sparse: the sub-blocks that hold data move to chunks of their own. */
  private makeSparse(rec: number): void {
    const R = this.recs;
    const whole = R[rec + WHOLE]!;
    const mask = R[rec + MASK]!;
    for (let k = 0; k < SUBS; k++) {
      if (!(mask & (1 << k))) continue;
      const c = (R[rec + SUB0 + k] = this.alloc(SMALL));
      this.mem.copy(this.mem, c * SUB_SIZE, whole * PAGE_SIZE + (k << SUB_SHIFT), whole * PAGE_SIZE + ((k + 1) << SUB_SHIFT));
      this.stored(SUB_SIZE);
    }
    this.releaseBig(whole);
    this.stored(-PAGE_SIZE);
    R[rec + WHOLE] = -1;
  }

  // -------------------------------------------------------------------------------------------
  // Zero and trim

  /** Zero a range: whole pages are freed; in a page the range covers in part, sub-blocks covered
   * whole are freed, partly covered ones cleared (and freed if now all zero), and the page goes if
   * it now reads all zero. */
  zero(count: number, offset: number): void {
    this.lock();
    try {
      this.fit();
      const end = offset + count;
      let pos = offset;
      if (pos < end && pos % PAGE_SIZE !== 0) {
        const index = Math.floor(pos / PAGE_SIZE);
        const inPage = pos - index * PAGE_SIZE;
        const n = Math.min(PAGE_SIZE - inPage, end - pos);
        this.clearPart(index, inPage, n);
        pos += n;
      }
      const wholeEnd = end - (end % PAGE_SIZE);
      if (pos < wholeEnd) {
        this.freePages(pos / PAGE_SIZE, wholeEnd / PAGE_SIZE);
        pos = wholeEnd;
      }
      if (pos < end) this.clearPart(pos / PAGE_SIZE, 0, end - pos);
    } finally {
      this.unlock();
    }
  }

  /** Free the pages holding data among [first, end): the page table is searched from one to the
   * next, so an empty terabyte costs a few steps, not one per page. */
  private freePages(first: number, end: number): void {
    this.walkSteps++;
    for (let i = this.nextPage(first, end); i >= 0; i = this.nextPage(i + 1, end)) {
      this.walkSteps++;
      this.freePage(i, this.entry(i));
    }
  }

  /** Free page `index` (entry `e`, not 0) and its storage. */
  private freePage(index: number, e: number): void {
    this.removePage(index);
    if (e > 0) {
      this.releaseBig(e - 1);
      this.stored(-PAGE_SIZE);
      return;
    }
    const r = -e - 1;
    const rec = r * REC_INTS;
    const R = this.recs;
    if (R[rec + WHOLE]! >= 0) {
      this.releaseBig(R[rec + WHOLE]!);
      this.stored(-PAGE_SIZE);
    } else {
      for (let k = 0; k < SUBS; k++) {
        const c = R[rec + SUB0 + k]!;
        if (c < 0) continue;
        this.release(SMALL, c);
        this.stored(-SUB_SIZE);
      }
    }
    this.freeRec(r);
  }

  /** Clear `n` bytes of page `index` from `inPage`: sub-blocks covered whole are dropped, partly
   * covered ones cleared (and dropped if now all zero); a page left reading all zero is freed. */
  private clearPart(index: number, inPage: number, n: number): void {
    this.walkSteps++;
    const e = this.entry(index);
    if (e === 0) return;
    let r: number;
    if (e < 0) r = -e - 1;
    else {
      // A full page: a record while it is cleared (and again just its chunk if it is still full).
      r = this.newRec();
      this.recs[r * REC_INTS + MASK] = FULL;
      this.recs[r * REC_INTS + WHOLE] = e - 1;
      this.setPage(index, -(r + 1));
    }
    const R = this.recs;
    const rec = r * REC_INTS;
    const mem = this.mem;
    const end = inPage + n;
    for (let k = inPage >>> SUB_SHIFT; k << SUB_SHIFT < end; k++) {
      const bit = 1 << k;
      if (!(R[rec + MASK]! & bit)) continue;
      const base = k << SUB_SHIFT;
      const s = Math.max(inPage, base) - base;
      const e = Math.min(end, base + SUB_SIZE) - base;
      if (s > 0 || e < SUB_SIZE) {
        const at = R[rec + WHOLE]! >= 0 ? R[rec + WHOLE]! * PAGE_SIZE + base : R[rec + SUB0 + k]! * SUB_SIZE;
        mem.fill(0, at + s, at + e);
        if (!isZero(mem, at, SUB_SIZE)) continue;
      }
      R[rec + MASK]! &= ~bit;
      if (R[rec + WHOLE]! < 0) {
        this.release(SMALL, R[rec + SUB0 + k]!);
        this.stored(-SUB_SIZE);
        R[rec + SUB0 + k] = -1;
      }
    }
    // A page that now reads all zero goes (even if some of its sub-blocks were written with
    // zeroes), so extents are what they were before sub-blocks: see extents().
    if (this.pageType(-(r + 1)) === EXTENT_ZERO) this.freePage(index, -(r + 1));
    else if (R[rec + MASK] === FULL) {
      this.setPage(index, R[rec + WHOLE]! + 1);
      this.freeRec(r);
    } else if (R[rec + WHOLE]! >= 0 && popcount(R[rec + MASK]!) <= DEMOTE_AT) this.makeSparse(rec);
  }

  /** Extent type of a page holding data (entry `e`): ZERO if every sub-block it holds is all zero
   * (the others read as zero anyway), else data. At most one page's bytes compared with zeroes. */
  private pageType(e: number): number {
    if (e > 0) return isZero(this.mem, (e - 1) * PAGE_SIZE, PAGE_SIZE) ? EXTENT_ZERO : 0;
    const rec = (-e - 1) * REC_INTS;
    const R = this.recs;
    const whole = R[rec + WHOLE]!;
    for (let m = R[rec + MASK]!; m; m &= m - 1) {
      const k = 31 - Math.clz32(m & -m);
      const at = whole >= 0 ? whole * PAGE_SIZE + (k << SUB_SHIFT) : R[rec + SUB0 + k]! * SUB_SIZE;
      if (!isZero(this.mem, at, SUB_SIZE)) return 0;
    }
    return EXTENT_ZERO;
  }

  // -------------------------------------------------------------------------------------------
  // Extents

  /**
   * Extents, page by page: never written (or trimmed) = HOLE|ZERO, pages reading all zero = ZERO,
   * the rest data. Runs of the same type are merged. With `maxExtents`, stops once that many are
   * out: the last one is whole (it ends where the type changes), but together they may cover less
   * than the range.
   *
   * A page with some sub-blocks written is one extent (as nbdkit's memory plugin reports): the
   * unwritten sub-blocks read as zero, so ZERO and data stay true for the whole page. Reads still
   * answer unwritten sub-blocks as holes.
   *
   * The lock is held for a batch of segments at a time, never while the caller holds a yielded
   * extent, so other threads go on between batches.
   */
  *extents(count: number, offset: number, maxExtents = Infinity): Generator<Extent> {
    const end = offset + count;
    let left = Math.max(1, maxExtents);
    // The run being built: yielded only when a segment of another type follows it (or at the end).
    let runOffset = offset;
    let runLength = 0;
    let runType = 0;
    let pos = offset;
    const done: Extent[] = [];
    while (pos < end) {
      done.length = 0;
      this.lock();
      try {
        this.fit();
        // One segment per step: a page holding data, or the hole up to the next one. A batch
        // stops early once it has finished as many extents as are still wanted.
        for (let k = 0; k < EXTENTS_BATCH && pos < end && done.length < left; k++) {
          this.walkSteps++;
          const index = Math.floor(pos / PAGE_SIZE);
          const e = this.entry(index);
          let to: number;
          let type = EXTENT_HOLE | EXTENT_ZERO;
          if (e !== 0) {
            to = Math.min(end, (index + 1) * PAGE_SIZE);
            type = this.pageType(e);
          } else {
            const next = this.nextPage(index + 1, Math.ceil(end / PAGE_SIZE));
            to = next < 0 ? end : Math.min(end, next * PAGE_SIZE);
          }
          if (runLength > 0 && type === runType) runLength += to - pos;
          else {
            if (runLength > 0) done.push({ offset: runOffset, length: runLength, type: runType });
            runOffset = pos;
            runLength = to - pos;
            runType = type;
          }
          pos = to;
        }
      } finally {
        this.unlock();
      }
      for (const extent of done) {
        yield extent;
        if (--left === 0) return;
      }
    }
    if (runLength > 0) yield { offset: runOffset, length: runLength, type: runType };
  }
}

/**
 * The data buffer of a new disk: address space only, so be generous. A page costs at most twice
 * what it holds, but slabs left with a few chunks in use by trims cost their whole 2 MiB, so
 * eight times the disk's size (at least 1 GiB), no more than twice the machine's memory (what
 * could ever be resident, with swap) and DATA_LIMIT; less if the system will not reserve it.
 */
function reserveData(share: SharedMemory, size: number): SharedArrayBuffer {
  const round = (n: number) => Math.ceil(n / SLAB_BYTES) * SLAB_BYTES;
  let want = round(Math.min(DATA_LIMIT, Math.max(8 * size, 2 ** 30), Math.max(2 * os.totalmem(), 2 ** 30)));
  for (;;) {
    try {
      return share('data', 0, want);
    } catch (err) {
      if (want <= 64 * 2 ** 20) throw err;
      want = round(want / 2);
    }
  }
}
