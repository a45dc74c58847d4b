import type { Duplex } from 'node:stream';
import { ChunkQueue } from '../wire/bytes.js';
import { enableDirectReads, type DirectReads } from './direct-reads.js';
import { POLL_STOP } from './poller.js';

/**
 * Buffers what a socket sends. The handshake reads with `await read(n)`; the transmission phase
 * switches to `onData`, a synchronous callback run whenever bytes arrive, and parses whole
 * requests straight out of the queue.
 */
export class SocketReader {
  readonly queue = new ChunkQueue();
  private want = 0;
  private waiter: { resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private ended: Error | null = null;
  onData: (() => void) | null = null;
  onEnd: (() => void) | null = null;
  /** With direct reads on: the next read lands here (a WRITE payload's missing part). */
  directTarget: Uint8Array | null = null;
  /** Set by the parser after a big WRITE: the next read stages only a little (direct-reads.ts). */
  expectBigPayload = false;
  /** True while the queue holds bytes of a reused buffer: take() views must not be kept. */
  volatile = false;
  /** Told how many bytes a read put into `directTarget` (which is cleared first). */
  onDirect: ((n: number) => void) | null = null;
  /** Told when the event loop delivered bytes (not readNow): the connection was asleep. */
  onWake: (() => void) | null = null;
  private direct: DirectReads | null = null;
  private polled = false;
  /** Reads so far, and how many of them readNow() made (for the debug line at the end). */
  reads = 0;
  polledReads = 0;
  private readonly dataListener = (chunk: Buffer) => this.push(chunk);
  private readonly endListener = () => this.end(new Error('connection closed by the client'));
  private readonly errorListener = (err: Error) => this.end(err);

  constructor(public stream: Duplex) {
    this.attach(stream);
  }

  private attach(stream: Duplex): void {
    this.stream = stream;
    stream.on('data', this.dataListener);
    stream.on('end', this.endListener);
    stream.on('close', this.endListener);
    stream.on('error', this.errorListener);
  }

  /** Stop reading from the current stream (STARTTLS hands it to a TLS socket). */
  detach(): void {
    const s = this.stream;
    s.off('data', this.dataListener);
    s.off('end', this.endListener);
    s.off('close', this.endListener);
    s.off('error', this.errorListener);
  }

  /** Start reading from a new stream (the TLS socket that wraps the old one). */
  reattach(stream: Duplex): void {
    this.attach(stream);
  }

  /**
   * Read into buffers we choose from now on (see direct-reads.ts). Bytes that land in the
   * staging buffer are copied out, since it is reused; bytes read into `directTarget` are
   * handed to `onDirect` without any copy.
   */
  useDirectReads(): boolean {
    this.direct = enableDirectReads(this.stream, {
      onRead: (nread, buf) => {
        this.reads++;
        if (this.polled) this.polledReads++;
        else this.onWake?.();
        const target = this.directTarget;
        if (target !== null && buf === target) {
          this.directTarget = null;
          this.onDirect!(nread);
        } else {
          // Parse straight out of the staging buffer; only what the parser leaves behind is
          // copied, since the staging buffer is reused by the next read.
          this.volatile = true;
          this.queue.push(buf.subarray(0, nread));
          this.onData?.();
          if (this.queue.length > 0) this.queue.push(Buffer.from(this.queue.drain()));
          this.volatile = false;
        }
        return true;
      },
      nextBuffer: () => this.directTarget,
      small: () => this.expectBigPayload,
    });
    return this.direct !== null;
  }

  /** Read what has arrived, without waiting (see DirectReads.readNow); only with direct reads. */
  readNow(): number {
    if (!this.direct || this.ended) return POLL_STOP;
    this.polled = true;
    try {
      return this.direct.readNow();
    } finally {
      this.polled = false;
    }
  }

  private push(chunk: Buffer): void {
    this.queue.push(chunk);
    if (this.waiter && this.queue.length >= this.want) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve(this.queue.take(this.want));
    } else if (this.onData) {
      this.onData();
    }
  }

  private end(err: Error): void {
    if (this.ended) return;
    this.ended = err;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(err);
    }
    this.onEnd?.();
  }

  get isEnded(): boolean {
    return this.ended !== null;
  }

  read(n: number): Promise<Buffer> {
    if (this.queue.length >= n) return Promise.resolve(this.queue.take(n));
    if (this.ended) return Promise.reject(this.ended);
    this.want = n;
    return new Promise((resolve, reject) => (this.waiter = { resolve, reject }));
  }
}
