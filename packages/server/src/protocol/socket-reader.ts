import type { Duplex } from 'node:stream';
import { ChunkQueue } from '../wire/bytes.js';
import { enableDirectReads, type DirectReads } from './direct-reads.js';
import { POLL_STOP } from './poller.js';

/** Why reading is paused (several may hold at once; reading resumes when none does). */
export const PAUSE_QUEUE = 1; // the handshake has not taken what is queued yet
export const PAUSE_BUDGET = 2; // the connection holds too much (memory-budget.ts)
export const PAUSE_TURN = 4; // the connection used its turn of the event loop (transmission.ts)

/**
 * Bytes queued during the handshake beyond which the socket is not read until the handshake
 * takes some (options are at most maxOptionLength long; this leaves room for one and its header).
 */
const HANDSHAKE_QUEUE = 128 * 1024;

/**
 * Buffers what a socket sends. The handshake reads with `await read(n)`; the transmission phase
 * switches to `onData`, a synchronous callback run whenever bytes arrive, and parses whole
 * requests straight out of the queue.
 *
 * Nothing a client sends is buffered without bound: during the handshake the socket is paused
 * while the queue is full, in transmission the parser empties the queue on every read and the
 * connection pauses reading while it holds too much, and once a connection ends, input is
 * dropped and the socket is no longer read at all.
 */
export class SocketReader {
  readonly queue = new ChunkQueue();
  private want = 0;
  private waiter: { resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private ended: Error | null = null;
  /** The connection failed or closed (not just EOF): onEnd(true) was or is to be told. */
  private hardEnded = false;
  /** Set once the connection is ending: nothing more is read or kept. */
  private discarding = false;
  private pauses = 0;
  onData: (() => void) | null = null;
  /** `hard`: the connection is gone (error, close); otherwise the client sent EOF and may still read replies. */
  onEnd: ((hard: boolean) => void) | null = null;
  /** Told by fail(): whoever waits on something other than read() (the TLS handshake). */
  onFail: ((err: Error) => void) | null = null;
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
  private readonly endListener = () => this.end(new Error('connection closed by the client'), false);
  private readonly closeListener = () => this.end(new Error('connection closed'), true);
  private readonly errorListener = (err: Error) => this.end(err, true);

  constructor(public stream: Duplex) {
    this.attach(stream);
  }

  private attach(stream: Duplex): void {
    this.stream = stream;
    stream.on('data', this.dataListener);
    stream.on('end', this.endListener);
    stream.on('close', this.closeListener);
    stream.on('error', this.errorListener);
  }

  /** Stop reading from the current stream (STARTTLS hands it to a TLS socket). */
  detach(): void {
    const s = this.stream;
    s.off('data', this.dataListener);
    s.off('end', this.endListener);
    s.off('close', this.closeListener);
    s.off('error', this.errorListener);
  }

  /** Bytes received and not yet taken, here or in the stream's own buffer. */
  get unread(): number {
    return this.queue.length + (this.stream.readableLength ?? 0);
  }

  /** Stop reading for `reason` (a PAUSE_* bit) until resume(reason). */
  pause(reason: number): void {
    if (this.pauses === 0) this.stream.pause();
    this.pauses |= reason;
  }

  resume(reason: number): void {
    if (!(this.pauses & reason)) return;
    this.pauses &= ~reason;
    if (this.pauses === 0 && !this.discarding) this.stream.resume();
  }

  /**
   * The connection is ending: stop reading for good and forget what was queued. A client that
   * keeps sending fills its socket buffer and then gets a reset when the socket closes.
   */
  discardInput(): void {
    if (this.discarding) return;
    this.discarding = true;
    this.onData = null;
    this.directTarget = null;
    this.stream.pause();
    this.queue.skip(this.queue.length);
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
    // Found by the fuzzer: bytes the stream read before the switch and still holds (it was
    // paused during the handshake) must come before anything read directly, or a client that
    // sent far ahead gets its requests reordered. Take them now, in order.
    if ((this.stream.readableLength ?? 0) > 0 && !this.discarding) {
      this.stream.off('data', this.dataListener);
      for (let chunk = this.stream.read() as Buffer | null; chunk !== null; chunk = this.stream.read() as Buffer | null) {
        this.queue.push(chunk);
      }
      this.stream.on('data', this.dataListener);
    }
    this.direct = enableDirectReads(this.stream, {
      onRead: (nread, buf) => {
        this.reads++;
        if (this.polled) this.polledReads++;
        else this.onWake?.();
        if (this.discarding) return false;
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
    if (this.discarding) return;
    this.queue.push(chunk);
    if (this.waiter && this.queue.length >= this.want) {
      const w = this.waiter;
      this.waiter = null;
      w.resolve(this.queue.take(this.want));
    } else if (this.onData) {
      this.onData();
    } else if (this.queue.length >= Math.max(HANDSHAKE_QUEUE, this.want)) {
      // The handshake is busy (a slow open, a reply the client does not read): wait for it.
      this.pause(PAUSE_QUEUE);
    }
  }

  private end(err: Error, hard: boolean): void {
    if (this.ended) {
      // EOF first, then the socket closed or failed: the connection is gone after all.
      if (hard && !this.hardEnded) {
        this.hardEnded = true;
        this.onEnd?.(true);
      }
      return;
    }
    this.ended = err;
    this.hardEnded = hard;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(err);
    }
    this.onEnd?.(hard);
  }


  /**
   * End the connection from our side (timeout, shutdown): whoever waits for bytes gets `err`, and
   * nothing more is read. The socket stays open, so the caller can still close it properly (a TLS
   * close_notify, the last replies).
   */
  fail(err: Error): void {
    this.discardInput();
    const f = this.onFail;
    this.onFail = null;
    f?.(err);
    if (this.ended) return;
    this.ended = err;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = null;
      w.reject(err);
    }
  }

  get isEnded(): boolean {
    return this.ended !== null;
  }

  read(n: number): Promise<Buffer> {
    if (this.queue.length >= n) {
      const b = this.queue.take(n);
      if (this.queue.length < HANDSHAKE_QUEUE) this.resume(PAUSE_QUEUE);
      return Promise.resolve(b);
    }
    this.resume(PAUSE_QUEUE);
    if (this.ended) return Promise.reject(this.ended);
    this.want = n;
    return new Promise((resolve, reject) => (this.waiter = { resolve, reject }));
  }
}
