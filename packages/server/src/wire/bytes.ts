/** Big-endian helpers for 64-bit fields carried as JS numbers (exact below 2^53). */

const TWO_32 = 4294967296;

/** Read a u64 as a number. Values at or above 2^53 come back as numbers >= 2^53 (not exact),
 * which every bounds check then rejects. */
export function readU64(buf: Uint8Array, at: number): number {
  const view = buf as Buffer;
  return view.readUInt32BE(at) * TWO_32 + view.readUInt32BE(at + 4);
}

export function writeU64(buf: Uint8Array, value: number, at: number): void {
  const view = buf as Buffer;
  const hi = Math.floor(value / TWO_32);
  view.writeUInt32BE(hi >>> 0, at);
  view.writeUInt32BE(value - hi * TWO_32, at + 4);
}

/**
 * A queue of received chunks from which whole messages are taken. Taking bytes that lie in one
 * chunk returns a view without copying; only messages split across chunks are copied.
 */
const EMPTY = Buffer.alloc(0);

export class ChunkQueue {
  private chunks: Buffer[] = [];
  private head = 0; // offset into chunks[0]
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** Take exactly n bytes (caller checks `length >= n`). */
  take(n: number): Buffer {
    if (n === 0) return EMPTY;
    const first = this.chunks[0]!;
    const left = first.length - this.head;
    if (n <= left) {
      const out = first.subarray(this.head, this.head + n);
      this.head += n;
      if (this.head === first.length) {
        this.chunks.shift();
        this.head = 0;
      }
      this.length -= n;
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    this.copyInto(out, 0, n);
    return out;
  }

  /** Copy n bytes into dst at dstOffset, consuming them. */
  copyInto(dst: Uint8Array, dstOffset: number, n: number): void {
    let done = 0;
    while (done < n) {
      const c = this.chunks[0]!;
      const avail = c.length - this.head;
      const m = Math.min(avail, n - done);
      c.copy(dst, dstOffset + done, this.head, this.head + m);
      done += m;
      this.head += m;
      if (this.head === c.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
    this.length -= n;
  }

  /** Discard n bytes (caller checks `length >= n`). */
  skip(n: number): void {
    this.length -= n;
    while (n > 0) {
      const c = this.chunks[0]!;
      const avail = c.length - this.head;
      if (n < avail) {
        this.head += n;
        return;
      }
      n -= avail;
      this.chunks.shift();
      this.head = 0;
    }
  }

  /** Read a u32 at `at` bytes from the front without consuming. */
  peekU32(at = 0): number {
    const first = this.chunks[0]!;
    if (this.head + at + 4 <= first.length) return first.readUInt32BE(this.head + at);
    const tmp = Buffer.allocUnsafe(at + 4);
    let got = 0;
    for (let i = 0, h = this.head; got < at + 4; i++, h = 0) {
      const c = this.chunks[i]!;
      const m = Math.min(c.length - h, at + 4 - got);
      c.copy(tmp, got, h, h + m);
      got += m;
    }
    return tmp.readUInt32BE(at);
  }

  /** Everything left, consumed (used when a socket changes hands, e.g. STARTTLS). */
  drain(): Buffer {
    return this.length === 0 ? Buffer.alloc(0) : this.take(this.length);
  }
}
