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
 * fuzzer). Two, not more: they count in the server's memory whoever used them last.
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
  private bigPooled = 0;
  private used = false;
  private timer: NodeJS.Timeout | null = null;

  get(size: number): Buffer {
    if (size >= MIN_POOLED) {
      this.used = true;
      const b = this.free.get(size)?.pop();
      if (b) {
        if (size >= BIG) this.bigPooled--;
        else this.pooledBytes -= size;
        return b;
      }
      return Buffer.allocUnsafeSlow(size);
    }
    return Buffer.allocUnsafe(size);
  }

  /** Hand a buffer back once nothing refers to it any more (the socket wrote it, the plugin returned). */
  put(b: Buffer): void {
    const size = b.length;
    if (size < MIN_POOLED || b.byteOffset !== 0 || b.buffer.byteLength !== size) return;
    const big = size >= BIG;
    if (big ? this.bigPooled >= MAX_BIG : this.pooledBytes + size > MAX_POOLED_BYTES) return;
    let list = this.free.get(size);
    if (!list) this.free.set(size, (list = []));
    if (list.length >= MAX_PER_SIZE) return;
    list.push(b);
    if (big) this.bigPooled++;
    else this.pooledBytes += size;
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
      this.pooledBytes = 0;
      this.bigPooled = 0;
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
