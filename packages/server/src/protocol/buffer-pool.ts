/**
 * Recycled buffers for READ replies and WRITE payloads. Big buffers that live for one request
 * are the main cost of a fast NBD server in a garbage-collected runtime: reusing them keeps the
 * collector out of the hot path. Buffers come from allocUnsafeSlow (each owns its memory, so it can
 * be handed back on its own) and are kept per exact size, up to a global cap.
 */
const MIN_POOLED = 1024;
const MAX_POOLED_BYTES = 128 * 1024 * 1024;
/** Enough for nbdcopy's 4 connections x 64 requests of 256 KiB; the byte cap bounds the rest. */
const MAX_PER_SIZE = 1024;

class BufferPool {
  private free = new Map<number, Buffer[]>();
  private pooledBytes = 0;

  get(size: number): Buffer {
    if (size >= MIN_POOLED) {
      const b = this.free.get(size)?.pop();
      if (b) {
        this.pooledBytes -= size;
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
    if (this.pooledBytes + size > MAX_POOLED_BYTES) return;
    let list = this.free.get(size);
    if (!list) this.free.set(size, (list = []));
    if (list.length >= MAX_PER_SIZE) return;
    list.push(b);
    this.pooledBytes += size;
  }
}

export const bufferPool = new BufferPool();
