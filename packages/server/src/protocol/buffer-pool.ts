/**
 * Recycled buffers for READ replies and WRITE payloads. Big buffers that live for one request
 * are the main cost of a fast NBD server in a garbage-collected runtime: reusing them keeps the
 * collector out of the hot path. Buffers come from allocUnsafeSlow (each owns its memory, so it can
 * be handed back on its own) and are kept per exact size, up to a global cap.
 *
 * A pool that nobody has used for a while is emptied: after a burst of clients the server goes
 * back to what it needs when idle instead of keeping the burst's buffers for ever.
 */
const MIN_POOLED = 1024;
const MAX_POOLED_BYTES = 32 * 1024 * 1024;
/**
 * Buffers this big or bigger are kept two at most, outside the byte cap: the largest READ (32 MiB
 * of data plus the reply header) would never fit it otherwise, every such READ would be a fresh
 * buffer, and a client sending them made the garbage outrun the collector (GiBs, found by the
 * fuzzer). Two, not more: they count in the server's memory whoever used them last. They are not
 * kept per exact size (big requests of varying lengths would then always miss): a request gets
 * the smallest pooled one that is big enough, as a view of its first bytes, and the pool keeps
 * the biggest buffers it is given back.
 */
const BIG = 4 * 1024 * 1024;
const MAX_BIG = 2;
/** Enough for nbdcopy's 4 connections x 64 requests of 256 KiB; the byte cap bounds the rest. */
const MAX_PER_SIZE = 1024;
/** Unused this long, the pool lets its buffers go. */
const IDLE_MS = 1_000;

class BufferPool {
  private free = new Map<number, Buffer[]>();
  private pooledBytes = 0;
  /** Big buffers, whole (see BIG); `bigMade` marks the memory the pool allocated for them. */
  private big: Buffer[] = [];
  private readonly bigMade = new WeakSet<ArrayBufferLike>();
  private used = false;
  private timer: NodeJS.Timeout | null = null;

  get(size: number): Buffer {
    if (size >= BIG) return this.getBig(size);
    if (size >= MIN_POOLED) {
      this.used = true;
      const b = this.free.get(size)?.pop();
      if (b) {
        this.pooledBytes -= size;
        return b;
      }
      return Buffer.allocUnsafeSlow(size);
    }
    return Buffer.allocUnsafe(size);
  }

  private getBig(size: number): Buffer {
    this.used = true;
    let best = -1;
    for (let i = 0; i < this.big.length; i++) {
      const len = this.big[i]!.length;
      if (len >= size && (best < 0 || len < this.big[best]!.length)) best = i;
    }
    if (best < 0) {
      const b = Buffer.allocUnsafeSlow(size);
      this.bigMade.add(b.buffer);
      return b;
    }
    const b = this.big.splice(best, 1)[0]!;
    return b.length === size ? b : b.subarray(0, size);
  }

  private putBig(b: Buffer): void {
    const whole = b.length === b.buffer.byteLength ? b : Buffer.from(b.buffer, 0, b.buffer.byteLength);
    if (this.big.length < MAX_BIG) this.big.push(whole);
    else {
      // Full: keep the bigger one (it serves every size the smaller one does).
      let smallest = 0;
      for (let i = 1; i < this.big.length; i++) if (this.big[i]!.length < this.big[smallest]!.length) smallest = i;
      if (this.big[smallest]!.length >= whole.length) return;
      this.big[smallest] = whole;
    }
    this.watch();
  }

  /** Hand a buffer back once nothing refers to it any more (the socket wrote it, the plugin returned). */
  put(b: Buffer): void {
    if (b.byteOffset !== 0) return;
    if (this.bigMade.has(b.buffer)) return this.putBig(b);
    const size = b.length;
    if (size < MIN_POOLED || b.buffer.byteLength !== size || size >= BIG) return;
    if (this.pooledBytes + size > MAX_POOLED_BYTES) return;
    let list = this.free.get(size);
    if (!list) this.free.set(size, (list = []));
    if (list.length >= MAX_PER_SIZE) return;
    list.push(b);
    this.pooledBytes += size;
    this.watch();
  }

  /** While buffers are pooled, check now and then whether anyone still uses them. */
  private watch(): void {
    if (this.timer) return;
    this.timer = setInterval(() => {
      if (this.used) {
        this.used = false;
        return;
      }
      this.free.clear();
      this.big = [];
      this.pooledBytes = 0;
      clearInterval(this.timer!);
      this.timer = null;
    }, IDLE_MS);
    this.timer.unref();
  }

  get bytes(): number {
    return this.pooledBytes;
  }
}

export const bufferPool = new BufferPool();
