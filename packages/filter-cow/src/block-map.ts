/**
 * The overlay's block map: one byte per block, saying where the block's contents live.
 * Kept in pages allocated on first use, so a huge export costs nothing until it is written.
 */

/** Not in the overlay: read from the layer below. */
export const BELOW = 0;
/** In the overlay file. */
export const DATA = 1;
/** Reads as zeroes; its part of the overlay file was never written (a hole). */
export const ZERO = 2;
/** Reads as zeroes; its part of the overlay file still holds older bytes. */
export const ZERO_STALE = 3;
/**
 * Read from below, but the overlay file holds leftovers of a failed write in this block: unlike
 * BELOW, its file range is not known to read as zeroes. Only ever set after an error.
 */
export const BELOW_STALE = 4;

export type BlockState = typeof BELOW | typeof DATA | typeof ZERO | typeof ZERO_STALE | typeof BELOW_STALE;

const PAGE = 1 << 16;

export class BlockMap {
  private readonly pages = new Map<number, Uint8Array>();
  private lastIndex = -1;
  private lastPage: Uint8Array | undefined;

  private page(index: number): Uint8Array | undefined {
    if (index === this.lastIndex) return this.lastPage;
    const p = this.pages.get(index);
    this.lastIndex = index;
    this.lastPage = p;
    return p;
  }

  private pageForWrite(index: number): Uint8Array {
    let p = this.page(index);
    if (!p) {
      p = new Uint8Array(PAGE);
      this.pages.set(index, p);
      this.lastIndex = index;
      this.lastPage = p;
    }
    return p;
  }

  get(block: number): BlockState {
    const index = Math.floor(block / PAGE);
    const p = this.page(index);
    return p ? (p[block - index * PAGE] as BlockState) : BELOW;
  }

  /**
   * The first block at or after `block` (and before `limit`) whose state differs from `block`'s;
   * `limit` when the state runs to it.
   */
  runEnd(block: number, limit: number): number {
    const state = this.get(block);
    let b = block;
    while (b < limit) {
      const index = Math.floor(b / PAGE);
      const base = index * PAGE;
      const stop = Math.min(base + PAGE, limit);
      const p = this.page(index);
      if (!p) {
        if (state !== BELOW) return b;
        b = stop;
        continue;
      }
      let i = b - base;
      const end = stop - base;
      while (i < end && p[i] === state) i++;
      if (i < end) return base + i;
      b = stop;
    }
    return limit;
  }

  /** Set blocks [from, to) to `state`. */
  fill(from: number, to: number, state: BlockState): void {
    for (let b = from; b < to; ) {
      const index = Math.floor(b / PAGE);
      const base = index * PAGE;
      const stop = Math.min(base + PAGE, to);
      if (state === BELOW && !this.page(index)) {
        b = stop;
        continue;
      }
      this.pageForWrite(index).fill(state, b - base, stop - base);
      b = stop;
    }
  }

  /** Replace each block's state in [from, to) by `table[state]`. */
  map(from: number, to: number, table: readonly BlockState[]): void {
    for (let b = from; b < to; ) {
      const index = Math.floor(b / PAGE);
      const base = index * PAGE;
      const stop = Math.min(base + PAGE, to);
      let p = this.page(index);
      if (!p) {
        if (table[BELOW] === BELOW) {
          b = stop;
          continue;
        }
        p = this.pageForWrite(index);
      }
      for (let i = b - base; i < stop - base; i++) p[i] = table[p[i]!]!;
      b = stop;
    }
  }

  /** Whether any block in [from, to) has this state. */
  has(from: number, to: number, state: BlockState): boolean {
    for (let b = from; b < to; ) {
      const end = this.runEnd(b, to);
      if (this.get(b) === state) return true;
      b = end;
    }
    return false;
  }

  /** Bytes of memory the map holds (for tests and debug output). */
  get memoryBytes(): number {
    return this.pages.size * PAGE;
  }
}
