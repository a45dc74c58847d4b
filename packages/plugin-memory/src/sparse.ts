import { EXTENT_HOLE, EXTENT_ZERO, type Extent, type ZeroSpan } from '@nbdx/server/api';

/** Bytes per page: the unit of allocation. */
export const PAGE_SIZE = 32 * 1024;
/** Pages per directory: whole directories that were never written are skipped in one step. */
const DIR_PAGES = 32 * 1024; // 1 GiB of address space per directory
const DIR_BYTES = PAGE_SIZE * DIR_PAGES;
const ZERO_PAGE = Buffer.alloc(PAGE_SIZE);

/** Pages per slab: pages are carved out of 2 MiB slabs, so the garbage collector tracks one
 * ArrayBuffer per 64 pages instead of one per page (many live ArrayBuffers make every GC slower). */
const SLAB_PAGES = 64;

interface Slab {
  memory: ArrayBuffer;
  free: number[];
  used: number;
}

/** Hands out page-sized views of slabs; a slab whose pages are all free again is released. */
class PageAllocator {
  private slabs = new Map<ArrayBuffer, Slab>();
  private withRoom = new Set<Slab>();

  alloc(zeroed: boolean): Buffer {
    let slab: Slab | undefined = this.withRoom.values().next().value;
    if (!slab) {
      const memory = Buffer.allocUnsafeSlow(SLAB_PAGES * PAGE_SIZE).buffer as ArrayBuffer;
      slab = { memory, free: Array.from({ length: SLAB_PAGES }, (_, i) => SLAB_PAGES - 1 - i), used: 0 };
      this.slabs.set(memory, slab);
      this.withRoom.add(slab);
    }
    const i = slab.free.pop()!;
    slab.used++;
    if (slab.free.length === 0) this.withRoom.delete(slab);
    const page = Buffer.from(slab.memory, i * PAGE_SIZE, PAGE_SIZE);
    if (zeroed) page.fill(0);
    return page;
  }

  release(page: Buffer): void {
    const slab = this.slabs.get(page.buffer as ArrayBuffer)!;
    slab.free.push(page.byteOffset / PAGE_SIZE);
    slab.used--;
    this.withRoom.add(slab);
    // Give memory back once a slab is empty, keeping one spare so alternating write/trim doesn't churn.
    if (slab.used === 0 && this.withRoom.size > 1) {
      this.withRoom.delete(slab);
      this.slabs.delete(slab.memory);
    }
  }
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
  readonly pages = new Map<number, Buffer>();
  private readonly bits = new Uint32Array(MAP_WORDS + SUMMARY_WORDS);

  add(i: number, p: Buffer): void {
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
 * A sparse byte array: pages are allocated on first write and freed again by trim/zero, so a
 * 1 TiB disk costs nothing until written. Two levels (directory → page) keep extent queries over
 * huge unwritten ranges cheap, and each directory's bitmap keeps extents and zero proportional to
 * the pages actually allocated in the range, never to its length.
 */
export class SparseArray {
  private dirs = new Map<number, Directory>();
  private pages = new PageAllocator();
  allocatedPages = 0;
  /**
   * Loop steps taken by zero() and extents() (each step is O(1): at most one page looked at or
   * freed, or one bounded bitmap search). Tests use it to check their cost without timing; read
   * and write never touch it.
   */
  walkSteps = 0;

  constructor(readonly size: number) {}

  private page(index: number): Buffer | undefined {
    return this.dirs.get(Math.floor(index / DIR_PAGES))?.pages.get(index % DIR_PAGES);
  }

  /** `whole`: the caller is about to overwrite the whole page, so a new page need not be zeroed. */
  private pageForWrite(index: number, whole: boolean): Buffer {
    const d = Math.floor(index / DIR_PAGES);
    let dir = this.dirs.get(d);
    if (!dir) this.dirs.set(d, (dir = new Directory()));
    let p = dir.pages.get(index % DIR_PAGES);
    if (!p) {
      p = this.pages.alloc(!whole);
      dir.add(index % DIR_PAGES, p);
      this.allocatedPages++;
    }
    return p;
  }

  /** Free page `i` of directory `d` (which holds it); an emptied directory goes too. */
  private freePage(d: number, dir: Directory, i: number, p: Buffer): void {
    dir.remove(i);
    this.pages.release(p);
    this.allocatedPages--;
    if (dir.pages.size === 0) this.dirs.delete(d);
  }

  /** Fill `buf`; unallocated parts are reported as zero spans instead of being written. */
  read(buf: Uint8Array, offset: number): ZeroSpan[] | undefined {
    let holes: ZeroSpan[] | undefined;
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, buf.length - done);
      const p = this.page(index);
      if (p) {
        p.copy(buf, done, inPage, inPage + n);
      } else {
        const last = holes?.[holes.length - 1];
        if (last && last.start + last.length === done) last.length += n;
        else (holes ??= []).push({ start: done, length: n });
      }
      done += n;
    }
    return holes;
  }

  write(buf: Uint8Array, offset: number): void {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, buf.length - done);
      this.pageForWrite(index, n === PAGE_SIZE).set(buf.subarray(done, done + n), inPage);
      done += n;
    }
  }

  /** Zero a range: whole pages are freed, partial pages cleared (and freed if now all zero). */
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

  /** Clear `n` bytes of page `index` from `inPage`; a page left all zero is freed. */
  private clearPart(index: number, inPage: number, n: number): void {
    this.walkSteps++;
    const d = Math.floor(index / DIR_PAGES);
    const dir = this.dirs.get(d);
    const i = index % DIR_PAGES;
    const p = dir?.pages.get(i);
    if (!p) return;
    p.fill(0, inPage, inPage + n);
    if (p.equals(ZERO_PAGE)) this.freePage(d, dir!, i, p);
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
        for (const p of dir.pages.values()) this.pages.release(p);
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

  /**
   * Extents: never written = HOLE|ZERO, written pages of zeroes = ZERO, the rest data. Runs of the
   * same type are merged. With `maxExtents`, stops once that many are out: the last one is whole
   * (it ends where the type changes), but together they may cover less than the range.
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
      this.walkSteps++;
      // One segment per step: an absent directory, an allocated page, or the hole up to the next
      // allocated page of the directory; so the steps are O(directories + allocated pages).
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
          type = p.equals(ZERO_PAGE) ? EXTENT_ZERO : 0;
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
