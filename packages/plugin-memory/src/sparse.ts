import { EXTENT_HOLE, EXTENT_ZERO, type Extent, type ZeroSpan } from '@nbdx/server/api';

/** Bytes per page: the unit of the directories' maps and bitmaps, and of dense storage. */
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
/** Pages per directory: whole directories that were never written are skipped in one step. */
const DIR_PAGES = 32 * 1024; // 1 GiB of address space per directory
const DIR_BYTES = PAGE_SIZE * DIR_PAGES;
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

/** Slabs are 2 MiB: the unit in which chunks are handed out and given back. */
const SLAB_BYTES = 2 * 1024 * 1024;

/**
 * Slabs are carved out of arenas, ArrayBuffers that grow from 2 MiB to ARENA_MAX as the disk
 * fills. The system backs an arena with memory only where it is touched, so an arena costs what
 * its slabs hold; but V8 starts a full garbage collection for about every 64 MiB of new
 * ArrayBuffer memory, however it is split: with a 2 MiB ArrayBuffer per slab, 1 GiB written into
 * a fresh disk cost about 25 collections and twice the user CPU time of the same copy into a
 * disk already written; with 256 MiB arenas, 5 or 6. An arena is freed once none of its slabs is
 * in use.
 */
const ARENA_MAX = 256 * 1024 * 1024;

interface Arena {
  memory: Buffer;
  /** The slab number in each slot of SLAB_BYTES, -1 where free. */
  slabOf: Int32Array;
  used: number;
}

interface Slab {
  number: number;
  free: number[];
  used: number;
  arena: Arena;
  slot: number;
}

/**
 * Hands out fixed-size chunks carved out of slabs, by number: chunk `h` is at offset(h) of
 * memory(h). Numbers rather than a Buffer view per chunk: taking a chunk allocates nothing (a view
 * costs more than the copy of a 4 KiB write, and ~100 bytes of heap while it lives), and the few
 * slab Buffers stay in cache where a view per chunk would be one more object to fetch per request.
 * A slab whose chunks are all free again is released. Chunks are never cleared: arenas come from
 * Buffer.allocUnsafeSlow, and whoever takes a chunk writes (or zero-fills) every byte of it that
 * can later be read.
 */
class ChunkAllocator {
  /** Slab memory by slab number; null once released (the number is then reused). */
  private readonly slabMemory: (Buffer | null)[] = [];
  private readonly slabs: (Slab | null)[] = [];
  private readonly arenas: Arena[] = [];
  private readonly arenaOf = new Map<ArrayBuffer, Arena>();
  private readonly spareNumbers: number[] = [];
  private readonly withRoom = new Set<Slab>();
  /** Where chunks are taken from while it has room. */
  private current: Slab | undefined;
  private readonly perSlab: number;
  private readonly shift: number;

  constructor(readonly chunk: number) {
    this.perSlab = SLAB_BYTES / chunk;
    this.shift = 31 - Math.clz32(this.perSlab);
  }

  alloc(): number {
    let slab = this.current;
    if (!slab || slab.free.length === 0) slab = this.current = this.withRoom.values().next().value ?? this.newSlab();
    const i = slab.free.pop()!;
    slab.used++;
    if (slab.free.length === 0) this.withRoom.delete(slab);
    return slab.number * this.perSlab + i;
  }

  private newSlab(): Slab {
    const n = this.perSlab;
    const number = this.spareNumbers.pop() ?? this.slabs.length;
    // The oldest arena with room first, so that newer ones empty out and go when the disk shrinks.
    let arena = this.arenas.find((a) => a.used < a.slabOf.length);
    if (!arena) arena = this.newArena();
    const slot = arena.slabOf.indexOf(-1);
    arena.slabOf[slot] = number;
    arena.used++;
    const slab: Slab = { number, free: Array.from({ length: n }, (_, i) => n - 1 - i), used: 0, arena, slot };
    this.slabs[number] = slab;
    this.slabMemory[number] = arena.memory.subarray(slot * SLAB_BYTES, (slot + 1) * SLAB_BYTES);
    this.withRoom.add(slab);
    return slab;
  }

  /** Bytes of the slabs in use (the arenas around them are backed by memory only where touched). */
  get slabBytes(): number {
    let n = 0;
    for (const a of this.arenas) n += a.used;
    return n * SLAB_BYTES;
  }

  /** Bytes of the arenas: address space, backed by memory only where slabs were touched. */
  get arenaBytes(): number {
    let n = 0;
    for (const a of this.arenas) n += a.memory.length;
    return n;
  }

  /** Twice the size of the last one (2 MiB for the first), up to ARENA_MAX. */
  private newArena(): Arena {
    const last = this.arenas[this.arenas.length - 1];
    const bytes = last ? Math.min(ARENA_MAX, last.memory.length * 2) : SLAB_BYTES;
    const arena: Arena = { memory: Buffer.allocUnsafeSlow(bytes), slabOf: new Int32Array(bytes / SLAB_BYTES).fill(-1), used: 0 };
    this.arenas.push(arena);
    this.arenaOf.set(arena.memory.buffer as ArrayBuffer, arena);
    return arena;
  }

  release(h: number): void {
    const slab = this.slabs[h >>> this.shift]!;
    slab.free.push(h & (this.perSlab - 1));
    slab.used--;
    this.withRoom.add(slab);
    // Give memory back once a slab is empty, keeping one spare so alternating write/trim doesn't churn.
    if (slab.used === 0 && this.withRoom.size > 1) {
      this.withRoom.delete(slab);
      const arena = slab.arena;
      arena.slabOf[slab.slot] = -1;
      if (--arena.used === 0) {
        this.arenas.splice(this.arenas.indexOf(arena), 1);
        this.arenaOf.delete(arena.memory.buffer as ArrayBuffer);
      }
      this.slabs[slab.number] = null;
      this.slabMemory[slab.number] = null;
      this.spareNumbers.push(slab.number);
      if (this.current === slab) this.current = undefined;
    }
  }

  /** The slab memory holding chunk `h`. */
  memory(h: number): Buffer {
    return this.slabMemory[h >>> this.shift]!;
  }

  /** Where chunk `h` starts in memory(h). */
  offset(h: number): number {
    return (h & (this.perSlab - 1)) * this.chunk;
  }

  /** A view of chunk `h` alone. */
  view(h: number): Buffer {
    const m = this.memory(h);
    return Buffer.from(m.buffer, m.byteOffset + this.offset(h), this.chunk);
  }

  /** The number of the chunk holding byte 0 of `v` (a view() of a chunk, for one), if `v` is a
   * view of a slab in use, else -1. */
  chunkAt(v: Uint8Array): number {
    const arena = this.arenaOf.get(v.buffer as ArrayBuffer);
    if (arena === undefined) return -1;
    const at = v.byteOffset - arena.memory.byteOffset;
    const slab = arena.slabOf[Math.floor(at / SLAB_BYTES)]!;
    return slab < 0 ? -1 : slab * this.perSlab + Math.floor((at % SLAB_BYTES) / this.chunk);
  }

  /** Whether chunks h .. h+n-1 are all in h's slab (so they are neighbours in memory). */
  inOneSlab(h: number, n: number): boolean {
    return (h & (this.perSlab - 1)) + n <= this.perSlab;
  }

  /**
   * `n` chunks next to each other in one slab (h, h+1, ...), or -1 when the chunks that would come
   * next are not (then nothing is taken). A slab's free chunks come out in ascending order until
   * trims scatter them, so runs for sequential writes into empty space are the rule.
   */
  allocRun(n: number): number {
    if (n > this.perSlab) return -1;
    const taken: number[] = [];
    for (let k = 0; k < n; k++) taken.push(this.alloc());
    // Freed in ascending order (a trim), they come back out descending: any order will do. Not
    // across slabs: consecutive numbers there are not neighbours in memory.
    taken.sort((x, y) => x - y);
    if (taken[n - 1]! - taken[0]! === n - 1 && this.inOneSlab(taken[0]!, n)) return taken[0]!;
    for (let j = n - 1; j >= 0; j--) this.release(taken[j]!);
    return -1;
  }
}

/**
 * One page: which of its sub-blocks hold data, and where. A sub-block holds data once any byte of
 * it is written (the rest of it is then zero-filled); the others read as zero, whatever the memory
 * under them holds, and cost nothing in a sparse page.
 *
 * Sparse (`subs`): one SUB_SIZE chunk per written sub-block, so scattered small writes cost what
 * they write. Dense (`whole`): one PAGE_SIZE chunk, sub-block k at k * SUB_SIZE, so big requests
 * are one copy per page. A page becomes dense once more than half of it is written (PROMOTE_AT),
 * at the latest when written whole; zero/trim turns it back to sparse when less than half of it
 * holds data (DEMOTE_AT). So at least half the sub-blocks of a dense page hold data: a page never
 * costs more than twice what it holds, and a page at most half written costs exactly that.
 *
 * Why not dense at once, or only when full: dense at once is the zero-filled page this replaced
 * (a 4 KiB write costing 32 KiB); and the data a sparse page holds is copied once more when it
 * becomes dense, through memory touched twice. Filling an empty GiB with random 4 KiB writes took
 * about 60 % more CPU in this class than zero-filled pages did when pages waited to be full, 40 to
 * 50 % at more than half; sequential 4 KiB writes into empty space about 20 % and 15 %
 * (bench/ops.mjs). Reads, overwrites and whole-page writes cost what they did.
 */
class Page {
  /** Bit k: sub-block k holds data. Never 0 for a page in a directory (such a page is freed), and
   * never FULL either: see Entry. */
  mask = 0;
  /** Dense: the number of the page's PAGE_SIZE chunk (-1 when sparse), and a view of that chunk,
   * which is what the directory holds instead of the Page once the page is full. */
  whole = -1;
  view: Buffer | null = null;
  /** Sparse: the chunk number of each sub-block, -1 where none. */
  subs: number[] | null = null;
}

/**
 * What a directory holds for a page: a full page (all its sub-blocks hold data, so it is dense) is
 * just the view of its chunk, as every page was before sub-blocks; any other page is a Page. So the
 * pages of data written in big pieces cost one object each, and reads and writes of them go
 * straight to the view; a page is a Page only while it is partly written.
 */
type Entry = Buffer | Page;

/** A sparse page's chunk numbers before any is taken: SUBS of them, a literal so it is one small
 * array of integers. */
const NO_SUBS = (): number[] => [-1, -1, -1, -1, -1, -1, -1, -1];

/** Bits first..last (sub-block indices, inclusive). */
const bitsOf = (first: number, last: number): number => ((2 << last) - 1) & ~((1 << first) - 1);

/** Set bits of a page mask. */
function popcount(m: number): number {
  let n = 0;
  for (; m; m &= m - 1) n++;
  return n;
}

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

/** Words of a directory's page bitmap (one bit per page), then words of its summary (one bit per
 * bitmap word that is not zero). */
const MAP_WORDS = DIR_PAGES / 32;
const SUMMARY_WORDS = MAP_WORDS / 32;

/** Index of the lowest set bit of a non-zero 32-bit word. */
const lowestBit = (w: number): number => 31 - Math.clz32(w & -w);

/**
 * One directory: its pages by index, plus a two-level bitmap of which indices are allocated. The
 * map answers reads and writes in O(1); the bitmap lets trim and extents go from one allocated
 * page to the next in order (an empty summary word skips 1024 pages at once) instead of probing
 * every page of the range. It costs about 4 KiB per directory and two word updates per page
 * allocated or freed, never anything per read or write of a page that exists.
 */
class Directory {
  readonly pages = new Map<number, Entry>();
  private readonly bits = new Uint32Array(MAP_WORDS + SUMMARY_WORDS);

  add(i: number, p: Entry): void {
    this.pages.set(i, p);
    const w = i >>> 5;
    this.bits[w] |= 1 << (i & 31);
    this.bits[MAP_WORDS + (w >>> 5)] |= 1 << (w & 31);
  }

  remove(i: number): void {
    this.pages.delete(i);
    const w = i >>> 5;
    if ((this.bits[w] &= ~(1 << (i & 31))) === 0) this.bits[MAP_WORDS + (w >>> 5)] &= ~(1 << (w & 31));
  }

  /** The lowest allocated page index in [from, to), or -1. At most SUMMARY_WORDS + 2 words read. */
  next(from: number, to: number): number {
    if (from >= to) return -1;
    let w = from >>> 5;
    let word = this.bits[w]! & (-1 << (from & 31));
    if (word === 0) {
      // The rest of this word is empty: find the next non-empty word through the summary.
      w++;
      if (w >= MAP_WORDS) return -1;
      let s = w >>> 5;
      let sum = this.bits[MAP_WORDS + s]! & (-1 << (w & 31));
      while (sum === 0) {
        if (++s === SUMMARY_WORDS) return -1;
        sum = this.bits[MAP_WORDS + s]!;
      }
      w = (s << 5) + lowestBit(sum);
      word = this.bits[w]!;
    }
    const i = (w << 5) + lowestBit(word);
    return i < to ? i : -1;
  }
}

/**
 * A sparse byte array: storage is allocated on first write and freed again by trim/zero, so a
 * 1 TiB disk costs nothing until written, and then about what was written (see Page). Two levels
 * (directory → page) keep extent queries over huge unwritten ranges cheap, and each directory's
 * bitmap keeps extents and zero proportional to the pages actually allocated in the range, never
 * to its length.
 */
export class SparseArray {
  private dirs = new Map<number, Directory>();
  private big = new ChunkAllocator(PAGE_SIZE);
  private small = new ChunkAllocator(SUB_SIZE);
  /** Pages holding at least one sub-block. */
  allocatedPages = 0;
  /** Bytes of chunks in use: PAGE_SIZE per dense page, SUB_SIZE per sub-block of a sparse one. */
  storedBytes = 0;
  /**
   * Loop steps taken by zero() and extents() (each step is O(1): at most one page looked at or
   * freed, or one bounded bitmap search). Tests use it to check their cost without timing; read
   * and write never touch it.
   */
  walkSteps = 0;
  /**
   * Views handed out (view()) and not yet given back (release()), per PAGE_SIZE chunk: a chunk
   * freed while pinned (a trim during a READ reply sent from it) is only put back for reuse once
   * its last view is released, so a reply never carries bytes written later at other offsets.
   */
  private pins = new Int32Array(256);
  private readonly pinnedFreed = new Set<number>();

  constructor(readonly size: number) {}

  /**
   * The `count` bytes at `offset` as one piece of this array's memory, for a READ reply sent from
   * it or a WRITE payload received into it; undefined when they are not one piece. That is when
   * every page of the range is full (held as one chunk) and the chunks are consecutive in one
   * slab, or, for `write`, when the range covers pages never written, whole, and a run of
   * consecutive chunks is free for them (they are taken now, and hold data from now on). Bulk
   * copies are the first kind or the second; scattered small writes are neither and are copied.
   * Every view must be given back with release().
   */
  view(count: number, offset: number, write: boolean): Buffer | undefined {
    if (count <= 0) return undefined;
    const first = Math.floor(offset / PAGE_SIZE);
    const last = Math.floor((offset + count - 1) / PAGE_SIZE);
    const n = last - first + 1;
    const start = this.page(first);
    let h: number;
    if (start === undefined) {
      if (!write || offset !== first * PAGE_SIZE || (offset + count) % PAGE_SIZE !== 0) return undefined;
      for (let i = first + 1; i <= last; i++) if (this.page(i) !== undefined) return undefined;
      h = this.big.allocRun(n);
      if (h < 0) return undefined;
      for (let k = first; k <= last; k++) this.addFullPage(this.directory(Math.floor(k / DIR_PAGES)), k % DIR_PAGES, this.big.view(h + k - first));
    } else {
      if (start instanceof Page) return undefined;
      h = this.big.chunkAt(start);
      // Neighbouring slabs of an arena are neighbours in memory too, but pins count chunks of one slab.
      if (!this.big.inOneSlab(h, n)) return undefined;
      for (let k = 1; k < n; k++) {
        const e = this.page(first + k);
        if (e === undefined || e instanceof Page || e.buffer !== start.buffer || e.byteOffset !== start.byteOffset + k * PAGE_SIZE) {
          return undefined;
        }
      }
    }
    if (h + n > this.pins.length) {
      const grown = new Int32Array(Math.max(h + n, this.pins.length * 2));
      grown.set(this.pins);
      this.pins = grown;
    }
    for (let k = 0; k < n; k++) this.pins[h + k]!++;
    const mem = this.big.memory(h);
    return Buffer.from(mem.buffer, mem.byteOffset + this.big.offset(h) + (offset - first * PAGE_SIZE), count);
  }

  /**
   * A view from view() is no longer used. `completed` false: a WRITE payload stopped part way
   * (the client went away), so the view holds a part of it over whatever the chunks held before
   * (possibly bytes of other offsets, for pages taken for it): it becomes zero, which is one of
   * the things an unfinished write may leave behind.
   */
  release(view: Uint8Array, completed: boolean): void {
    const h = this.big.chunkAt(view);
    if (h < 0) return;
    if (!completed) view.fill(0);
    const within = view.byteOffset % PAGE_SIZE;
    const n = Math.ceil((within + view.byteLength) / PAGE_SIZE);
    for (let k = 0; k < n; k++) {
      if (--this.pins[h + k]! === 0 && this.pinnedFreed.delete(h + k)) this.big.release(h + k);
    }
  }

  /** Give a PAGE_SIZE chunk back for reuse, or, while a view of it is out, once that comes back. */
  private releaseBig(h: number): void {
    if (h < this.pins.length && this.pins[h]! > 0) this.pinnedFreed.add(h);
    else this.big.release(h);
  }

  /** Directory `d`, made if it does not exist yet. */
  private directory(d: number): Directory {
    let dir = this.dirs.get(d);
    if (!dir) this.dirs.set(d, (dir = new Directory()));
    return dir;
  }

  /** Page `i` of `dir`, never written, is now `v`: a full page's chunk. */
  private addFullPage(dir: Directory, i: number, v: Buffer): void {
    dir.add(i, v);
    this.allocatedPages++;
    this.storedBytes += PAGE_SIZE;
  }

  /** Whether `buf` is the view() for `offset` (a payload the core received into place). */
  private isOwnView(buf: Uint8Array, offset: number): boolean {
    const e = this.page(Math.floor(offset / PAGE_SIZE));
    return e !== undefined && !(e instanceof Page) && buf.buffer === e.buffer && buf.byteOffset === e.byteOffset + (offset % PAGE_SIZE);
  }

  /** Bytes of the slabs the chunks are taken from: what the storage costs, slack included. */
  get slabBytes(): number {
    return this.big.slabBytes + this.small.slabBytes;
  }

  /** Bytes of the arenas the slabs are carved from (address space; see ARENA_MAX). */
  get arenaBytes(): number {
    return this.big.arenaBytes + this.small.arenaBytes;
  }

  /** Pages held as a Page, that is partly written (the others are full, held as a view): for tests,
   * O(pages). */
  get partialPages(): number {
    let n = 0;
    for (const dir of this.dirs.values()) for (const e of dir.pages.values()) if (e instanceof Page) n++;
    return n;
  }

  private page(index: number): Entry | undefined {
    return this.dirs.get(Math.floor(index / DIR_PAGES))?.pages.get(index % DIR_PAGES);
  }

  /** Free page `i` of directory `d` (which holds it); an emptied directory goes too. */
  private freePage(d: number, dir: Directory, i: number, p: Entry): void {
    dir.remove(i);
    this.releaseStorage(p);
    this.allocatedPages--;
    if (dir.pages.size === 0) this.dirs.delete(d);
  }

  private releaseStorage(p: Entry): void {
    if (!(p instanceof Page)) {
      this.releaseBig(this.big.chunkAt(p));
      this.storedBytes -= PAGE_SIZE;
    } else if (p.whole >= 0) {
      this.releaseBig(p.whole);
      this.storedBytes -= PAGE_SIZE;
      p.whole = -1;
      p.view = null;
    } else if (p.subs) {
      for (const c of p.subs) {
        if (c < 0) continue;
        this.small.release(c);
        this.storedBytes -= SUB_SIZE;
      }
      p.subs = null;
    }
    if (p instanceof Page) p.mask = 0;
  }

  /** Fill `buf`; parts that hold no data are reported as zero spans instead of being written. */
  read(buf: Uint8Array, offset: number): ZeroSpan[] | undefined {
    let holes: ZeroSpan[] | undefined;
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, buf.length - done);
      const p = this.page(index);
      if (p === undefined) holes = addHole(holes, done, n);
      else if (p instanceof Page) holes = this.readPart(p, buf, done, inPage, n, holes);
      else p.copy(buf, done, inPage, inPage + n);
      done += n;
    }
    return holes;
  }

  /** Read `n` bytes of a page that is not full, from `inPage`, into `buf` at `at`. */
  private readPart(p: Page, buf: Uint8Array, at: number, inPage: number, n: number, holes: ZeroSpan[] | undefined) {
    const end = inPage + n;
    for (let k = inPage >>> SUB_SHIFT; k << SUB_SHIFT < end; k++) {
      const s = Math.max(inPage, k << SUB_SHIFT);
      const e = Math.min(end, (k + 1) << SUB_SHIFT);
      const to = at + s - inPage;
      if (!(p.mask & (1 << k))) holes = addHole(holes, to, e - s);
      else if (p.whole >= 0) {
        const from = this.big.offset(p.whole);
        this.big.memory(p.whole).copy(buf, to, from + s, from + e);
      } else {
        const c = p.subs![k]!;
        const from = this.small.offset(c) - (k << SUB_SHIFT);
        this.small.memory(c).copy(buf, to, from + s, from + e);
      }
    }
    return holes;
  }

  write(buf: Uint8Array, offset: number): void {
    // The core received the payload straight into place (view()): nothing to copy.
    if (this.isOwnView(buf, offset)) return;
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, buf.length - done);
      const d = Math.floor(index / DIR_PAGES);
      const i = index % DIR_PAGES;
      const dir = this.directory(d);
      const e = dir.pages.get(i);
      if (e !== undefined && !(e instanceof Page)) {
        // A full page: just the copy.
        e.set(buf.subarray(done, done + n), inPage);
      } else if (e === undefined && n === PAGE_SIZE) {
        // A new page written whole.
        const v = this.big.view(this.big.alloc());
        v.set(buf.subarray(done, done + n));
        this.addFullPage(dir, i, v);
      } else {
        let p = e;
        if (p === undefined) {
          dir.add(i, (p = new Page()));
          this.allocatedPages++;
        }
        const first = inPage >>> SUB_SHIFT;
        const last = (inPage + n - 1) >>> SUB_SHIFT;
        if (p.whole < 0 && popcount(p.mask | bitsOf(first, last)) >= PROMOTE_AT) this.makeDense(p, n === PAGE_SIZE);
        if (p.whole >= 0) this.writeDense(p, buf, done, inPage, n, first, last);
        else this.writeSparse(p, buf, done, inPage, n, first, last);
        if (p.mask === FULL) dir.pages.set(i, p.view!);
      }
      done += n;
    }
  }

  /** Copy into a dense page; the parts of newly written sub-blocks outside the write become zero. */
  private writeDense(p: Page, src: Uint8Array, from: number, inPage: number, n: number, first: number, last: number) {
    const mem = this.big.memory(p.whole);
    const at = this.big.offset(p.whole);
    const end = inPage + n;
    if (inPage & (SUB_SIZE - 1) && !(p.mask & (1 << first))) mem.fill(0, at + (first << SUB_SHIFT), at + inPage);
    if (end & (SUB_SIZE - 1) && !(p.mask & (1 << last))) mem.fill(0, at + end, at + ((last + 1) << SUB_SHIFT));
    mem.set(src.subarray(from, from + n), at + inPage);
    p.mask |= bitsOf(first, last);
  }

  /** Copy into a sparse page, one chunk per sub-block, taking (and zero-filling) chunks as needed. */
  private writeSparse(p: Page, src: Uint8Array, from: number, inPage: number, n: number, first: number, last: number) {
    const subs = (p.subs ??= NO_SUBS());
    const end = inPage + n;
    for (let k = first; k <= last; k++) {
      const base = k << SUB_SHIFT;
      const s = Math.max(inPage, base) - base;
      const e = Math.min(end, base + SUB_SIZE) - base;
      let c = subs[k]!;
      const fresh = c < 0;
      if (fresh) {
        subs[k] = c = this.small.alloc();
        this.storedBytes += SUB_SIZE;
      }
      const mem = this.small.memory(c);
      const at = this.small.offset(c);
      if (fresh && s > 0) mem.fill(0, at, at + s);
      if (fresh && e < SUB_SIZE) mem.fill(0, at + e, at + SUB_SIZE);
      mem.set(src.subarray(from + base + s - inPage, from + base + e - inPage), at + s);
    }
    p.mask |= bitsOf(first, last);
  }

  /** Sparse → dense: one PAGE_SIZE chunk, with the sub-blocks held so far copied in (unless the
   * caller is about to overwrite the whole page). */
  private makeDense(p: Page, overwritten: boolean): void {
    const chunk = this.big.alloc();
    const mem = this.big.memory(chunk);
    const at = this.big.offset(chunk);
    const subs = p.subs;
    if (subs) {
      if (!overwritten) {
        // Sub-blocks in consecutive chunks of one slab (as a page written in order gets them)
        // are copied in one piece.
        for (let k = 0; k < SUBS; ) {
          const c = subs[k]!;
          if (c < 0) {
            k++;
            continue;
          }
          const from = this.small.offset(c);
          let n = 1;
          while (k + n < SUBS && subs[k + n] === c + n && this.small.offset(c + n) === from + n * SUB_SIZE) n++;
          this.small.memory(c).copy(mem, at + (k << SUB_SHIFT), from, from + n * SUB_SIZE);
          k += n;
        }
      }
      // Released last first, so that the next chunks taken come out in ascending order.
      for (let k = SUBS - 1; k >= 0; k--) {
        const c = subs[k]!;
        if (c < 0) continue;
        this.small.release(c);
        this.storedBytes -= SUB_SIZE;
      }
      p.subs = null;
    }
    p.whole = chunk;
    p.view = this.big.view(chunk);
    this.storedBytes += PAGE_SIZE;
  }


  /** Dense → sparse: the sub-blocks that hold data move to chunks of their own. */
  private makeSparse(p: Page): void {
    const mem = this.big.memory(p.whole);
    const at = this.big.offset(p.whole);
    const subs = NO_SUBS();
    for (let k = 0; k < SUBS; k++) {
      if (!(p.mask & (1 << k))) continue;
      const c = (subs[k] = this.small.alloc());
      mem.copy(this.small.memory(c), this.small.offset(c), at + (k << SUB_SHIFT), at + ((k + 1) << SUB_SHIFT));
      this.storedBytes += SUB_SIZE;
    }
    this.releaseBig(p.whole);
    this.storedBytes -= PAGE_SIZE;
    p.whole = -1;
    p.view = null;
    p.subs = subs;
  }

  /** Zero a range: whole pages are freed; in a page the range covers in part, sub-blocks covered
   * whole are freed, partly covered ones cleared (and freed if now all zero), and the page goes if
   * it now reads all zero. */
  zero(count: number, offset: number): void {
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
  }

  /** Clear `n` bytes of page `index` from `inPage`: sub-blocks covered whole are dropped, partly
   * covered ones cleared (and dropped if now all zero); a page left reading all zero is freed. */
  private clearPart(index: number, inPage: number, n: number): void {
    this.walkSteps++;
    const d = Math.floor(index / DIR_PAGES);
    const dir = this.dirs.get(d);
    const i = index % DIR_PAGES;
    const e = dir?.pages.get(i);
    if (e === undefined) return;
    let p: Page;
    if (e instanceof Page) p = e;
    else {
      // A full page: a Page while it is cleared (and again just its view if it is still full).
      p = new Page();
      p.mask = FULL;
      p.whole = this.big.chunkAt(e);
      p.view = e;
      dir!.pages.set(i, p);
    }
    const end = inPage + n;
    for (let k = inPage >>> SUB_SHIFT; k << SUB_SHIFT < end; k++) {
      const bit = 1 << k;
      if (!(p.mask & bit)) continue;
      const base = k << SUB_SHIFT;
      const s = Math.max(inPage, base) - base;
      const e = Math.min(end, base + SUB_SIZE) - base;
      if (s > 0 || e < SUB_SIZE) {
        const dense = p.whole >= 0;
        const c = dense ? this.big.memory(p.whole) : this.small.memory(p.subs![k]!);
        const at = dense ? this.big.offset(p.whole) + base : this.small.offset(p.subs![k]!);
        c.fill(0, at + s, at + e);
        if (!isZero(c, at, SUB_SIZE)) continue;
      }
      p.mask &= ~bit;
      if (p.subs) {
        this.small.release(p.subs[k]!);
        this.storedBytes -= SUB_SIZE;
        p.subs[k] = -1;
      }
    }
    // As before sub-blocks, a page that now reads all zero goes (even if some of its sub-blocks
    // were written with zeroes), so extents are what they were: see extents().
    if (this.pageType(p) === EXTENT_ZERO) this.freePage(d, dir!, i, p);
    else if (p.mask === FULL) dir!.pages.set(i, p.view!);
    else if (p.whole >= 0 && popcount(p.mask) <= DEMOTE_AT) this.makeSparse(p);
  }

  /** Free the allocated pages among [first, end): each existing directory is visited once and only
   * its allocated pages in the range are touched, so an empty terabyte costs one lookup per GiB. */
  private freePages(first: number, end: number): void {
    const lastDir = Math.floor((end - 1) / DIR_PAGES);
    for (let d = Math.floor(first / DIR_PAGES); d <= lastDir; d++) {
      this.walkSteps++;
      const dir = this.dirs.get(d);
      if (!dir) continue;
      const from = Math.max(first - d * DIR_PAGES, 0);
      const to = Math.min(end - d * DIR_PAGES, DIR_PAGES);
      if (from === 0 && to === DIR_PAGES) {
        // The whole directory goes: no need to search its bitmap.
        this.walkSteps += dir.pages.size;
        for (const p of dir.pages.values()) this.releaseStorage(p);
        this.allocatedPages -= dir.pages.size;
        this.dirs.delete(d);
        continue;
      }
      // Freeing may delete the directory with its last page; `next` then finds nothing more.
      for (let i = dir.next(from, to); i >= 0; i = dir.next(i + 1, to)) {
        this.walkSteps++;
        this.freePage(d, dir, i, dir.pages.get(i)!);
      }
    }
  }

  /** Extent type of a page in a directory: ZERO if every sub-block it holds is all zero (the others
   * read as zero anyway), else data. O(1): at most one page's bytes compared with zeroes. */
  private pageType(p: Entry): number {
    if (!(p instanceof Page)) return p.equals(ZERO_PAGE) ? EXTENT_ZERO : 0;
    if (p.mask === FULL) return p.view!.equals(ZERO_PAGE) ? EXTENT_ZERO : 0;
    for (let m = p.mask; m; m &= m - 1) {
      const k = lowestBit(m);
      const zero =
        p.whole >= 0
          ? isZero(this.big.memory(p.whole), this.big.offset(p.whole) + (k << SUB_SHIFT), SUB_SIZE)
          : isZero(this.small.memory(p.subs![k]!), this.small.offset(p.subs![k]!), SUB_SIZE);
      if (!zero) return 0;
    }
    return EXTENT_ZERO;
  }

  /**
   * Extents, page by page: never written (or trimmed) = HOLE|ZERO, pages reading all zero = ZERO,
   * the rest data. Runs of the same type are merged. With `maxExtents`, stops once that many are
   * out: the last one is whole (it ends where the type changes), but together they may cover less
   * than the range.
   *
   * A page with some sub-blocks written is one extent, as it was when pages were the unit of
   * storage (and as nbdkit's memory plugin reports): the unwritten sub-blocks read as zero, so
   * ZERO and data stay true for the whole page, and the answers are the same as before, extent for
   * extent. Reads still answer unwritten sub-blocks as holes.
   */
  *extents(count: number, offset: number, maxExtents = Infinity): Generator<Extent> {
    const end = offset + count;
    let left = Math.max(1, maxExtents);
    // The run being built: yielded only when a segment of another type follows it (or at the end).
    let runOffset = offset;
    let runLength = 0;
    let runType = 0;
    let pos = offset;
    while (pos < end) {
      // One segment per step: an absent directory, an allocated page, or the hole up to the next
      // allocated page of the directory; so the steps are O(directories + allocated pages).
      this.walkSteps++;
      const d = Math.floor(pos / DIR_BYTES);
      const dir = this.dirs.get(d);
      let to: number;
      let type = EXTENT_HOLE | EXTENT_ZERO;
      if (!dir) {
        to = Math.min(end, (d + 1) * DIR_BYTES);
      } else {
        const index = Math.floor(pos / PAGE_SIZE);
        const i = index - d * DIR_PAGES;
        const p = dir.pages.get(i);
        if (p) {
          to = Math.min(end, (index + 1) * PAGE_SIZE);
          type = this.pageType(p);
        } else {
          // Search no further than the page holding the end of the range.
          const limit = Math.min(DIR_PAGES, Math.ceil(end / PAGE_SIZE) - d * DIR_PAGES);
          const next = dir.next(i + 1, limit);
          to = Math.min(end, next < 0 ? (d + 1) * DIR_BYTES : (d * DIR_PAGES + next) * PAGE_SIZE);
        }
      }
      if (runLength > 0 && type === runType) runLength += to - pos;
      else {
        if (runLength > 0) {
          yield { offset: runOffset, length: runLength, type: runType };
          if (--left === 0) return;
        }
        runOffset = pos;
        runLength = to - pos;
        runType = type;
      }
      pos = to;
    }
    if (runLength > 0) yield { offset: runOffset, length: runLength, type: runType };
  }
}
