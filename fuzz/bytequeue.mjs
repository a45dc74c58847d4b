/**
 * A FIFO of received chunks from which whole messages are taken: the oracle frames both
 * directions with it. Taking bytes that lie in one chunk returns a view, without a copy.
 */
export class ByteQueue {
  constructor() {
    this.chunks = [];
    this.head = 0;
    this.length = 0;
  }
  push(b) {
    if (b.length) {
      this.chunks.push(b);
      this.length += b.length;
    }
  }
  /** The first n bytes, contiguous, without consuming them. */
  peek(n) {
    const first = this.chunks[0];
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = Buffer.allocUnsafe(n);
    let got = 0;
    for (let i = 0, h = this.head; got < n; i++, h = 0) {
      const c = this.chunks[i];
      const m = Math.min(c.length - h, n - got);
      c.copy(out, got, h, h + m);
      got += m;
    }
    return out;
  }
  take(n) {
    const out = n === 0 ? Buffer.alloc(0) : this.peek(n);
    this.skip(n);
    return out;
  }
  skip(n) {
    this.length -= n;
    while (n > 0) {
      const c = this.chunks[0];
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
}
