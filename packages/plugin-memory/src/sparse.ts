import { EXTENT_HOLE, EXTENT_ZERO, type Extent, type ZeroSpan } from '@nbdx/server/api';

/** Bytes per page: the unit of allocation. */
export const PAGE_SIZE = 32 * 1024;
/** Pages per directory: whole directories that were never written are skipped in one step. */
const DIR_PAGES = 32 * 1024; // 1 GiB of address space per directory
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

/**
 * A sparse byte array: pages are allocated on first write and freed again by trim/zero, so a
 * 1 TiB disk costs nothing until written. Two levels (directory → page) keep extent queries over
 * huge unwritten ranges cheap.
 */
export class SparseArray {
  private dirs = new Map<number, Map<number, Buffer>>();
  private pages = new PageAllocator();
  allocatedPages = 0;

  constructor(readonly size: number) {}

  private page(index: number): Buffer | undefined {
    return this.dirs.get(Math.floor(index / DIR_PAGES))?.get(index % DIR_PAGES);
  }

  /** `whole`: the caller is about to overwrite the whole page, so a new page need not be zeroed. */
  private pageForWrite(index: number, whole: boolean): Buffer {
    const d = Math.floor(index / DIR_PAGES);
    let dir = this.dirs.get(d);
    if (!dir) this.dirs.set(d, (dir = new Map()));
    let p = dir.get(index % DIR_PAGES);
    if (!p) {
      p = this.pages.alloc(!whole);
      dir.set(index % DIR_PAGES, p);
      this.allocatedPages++;
    }
    return p;
  }

  private freePage(index: number): void {
    const d = Math.floor(index / DIR_PAGES);
    const dir = this.dirs.get(d);
    const p = dir?.get(index % DIR_PAGES);
    if (p) {
      dir!.delete(index % DIR_PAGES);
      this.pages.release(p);
      this.allocatedPages--;
      if (dir!.size === 0) this.dirs.delete(d);
    }
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

  /** Zero a range: whole pages are freed, partial pages cleared. */
  zero(count: number, offset: number): void {
    let done = 0;
    while (done < count) {
      const pos = offset + done;
      const index = Math.floor(pos / PAGE_SIZE);
      const inPage = pos - index * PAGE_SIZE;
      const n = Math.min(PAGE_SIZE - inPage, count - done);
      if (n === PAGE_SIZE) this.freePage(index);
      else {
        const p = this.page(index);
        if (p) {
          p.fill(0, inPage, inPage + n);
          if (p.equals(ZERO_PAGE)) this.freePage(index);
        }
      }
      done += n;
      // Skip directories that hold nothing.
      const nextPos = offset + done;
      const d = Math.floor(nextPos / (PAGE_SIZE * DIR_PAGES));
      if (done < count && nextPos % (PAGE_SIZE * DIR_PAGES) === 0 && !this.dirs.has(d)) {
        done = Math.min(count, (d + 1) * PAGE_SIZE * DIR_PAGES - offset);
      }
    }
  }

  /** Extents: never written = HOLE|ZERO, written pages of zeroes = ZERO, the rest data. */
  *extents(count: number, offset: number): Generator<Extent> {
    const end = offset + count;
    const dirBytes = PAGE_SIZE * DIR_PAGES;
    // Runs of the same type are merged here, so a mostly empty directory costs one extent.
    let run: Extent | null = null;
    const out: Extent[] = [];
    const add = (o: number, l: number, type: number) => {
      if (run && run.type === type) run.length += l;
      else {
        if (run) out.push(run);
        run = { offset: o, length: l, type };
      }
    };
    let pos = offset;
    while (pos < end) {
      const d = Math.floor(pos / dirBytes);
      if (!this.dirs.has(d)) {
        const to = Math.min(end, (d + 1) * dirBytes);
        add(pos, to - pos, EXTENT_HOLE | EXTENT_ZERO);
        pos = to;
      } else {
        const index = Math.floor(pos / PAGE_SIZE);
        const to = Math.min(end, (index + 1) * PAGE_SIZE);
        const p = this.page(index);
        add(pos, to - pos, !p ? EXTENT_HOLE | EXTENT_ZERO : p.equals(ZERO_PAGE) ? EXTENT_ZERO : 0);
        pos = to;
      }
      if (out.length) yield* out.splice(0);
    }
    if (run) yield run;
  }
}
