/**
 * The byte ranges of one object that clients have written since it was last stored, kept sorted
 * and merged. A write-back buffer needs them to know whether an object can be stored as it is
 * (every byte written) or must first be merged with what the store holds.
 *
 * Writes into one object are few and mostly adjacent, so a flat sorted array of [start, end)
 * pairs stays tiny; merging on insert keeps every lookup a short scan.
 */
export class Ranges {
  /** start0, end0, start1, end1, …: sorted, non-overlapping, non-adjacent. */
  private r: number[] = [];

  get isEmpty(): boolean {
    return this.r.length === 0;
  }

  clear(): void {
    this.r.length = 0;
  }

  /** Mark [start, end) written. */
  add(start: number, end: number): void {
    if (end <= start) return;
    const r = this.r;
    // first pair whose end reaches start (touching pairs merge too)
    let i = 0;
    while (i < r.length && r[i + 1]! < start) i += 2;
    let j = i;
    let s = start;
    let e = end;
    while (j < r.length && r[j]! <= end) {
      s = Math.min(s, r[j]!);
      e = Math.max(e, r[j + 1]!);
      j += 2;
    }
    r.splice(i, j - i, s, e);
  }

  /** Is every byte of [start, end) written? */
  contains(start: number, end: number): boolean {
    const r = this.r;
    for (let i = 0; i < r.length; i += 2) {
      if (r[i]! <= start && end <= r[i + 1]!) return true;
      if (r[i]! > start) return false;
    }
    return false;
  }

  /** Is every byte of [0, length) written? */
  covers(length: number): boolean {
    return this.r.length === 2 && this.r[0] === 0 && this.r[1]! >= length;
  }

  /** Call f for each written part of [start, end), in order. */
  forEachIn(start: number, end: number, f: (s: number, e: number) => void): void {
    const r = this.r;
    for (let i = 0; i < r.length; i += 2) {
      const s = Math.max(start, r[i]!);
      const e = Math.min(end, r[i + 1]!);
      if (s < e) f(s, e);
    }
  }

  /** Call f for each unwritten part of [start, end), in order. */
  forEachGap(start: number, end: number, f: (s: number, e: number) => void): void {
    let pos = start;
    const r = this.r;
    for (let i = 0; i < r.length && pos < end; i += 2) {
      if (r[i + 1]! <= pos) continue;
      if (r[i]! > pos) f(pos, Math.min(r[i]!, end));
      pos = Math.max(pos, r[i + 1]!);
    }
    if (pos < end) f(pos, end);
  }

  /** For tests and debug output. */
  toArray(): [number, number][] {
    const out: [number, number][] = [];
    for (let i = 0; i < this.r.length; i += 2) out.push([this.r[i]!, this.r[i + 1]!]);
    return out;
  }
}
