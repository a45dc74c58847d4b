import type { Duplex } from 'node:stream';
import type { ConnectionBudget } from './memory-budget.js';

/**
 * Collects reply buffers and hands them to the socket in batches: everything that completes in
 * one turn of the event loop goes out in one corked write (one writev system call). While the
 * parser holds the writer (it is handling the bytes of one read), replies wait for its release and
 * go out then, without waiting for the turn to end: requests a synchronous plugin served are
 * answered straight from the read callback.
 *
 * Every byte pushed counts against the connection's memory budget until the socket has taken
 * it (the write callback of the batch's last buffer: writes complete in order).
 *
 * Small replies (acks, errors, chunk headers) are written in place into an arena, one after the
 * other, and go to the socket as one view per run: a reply costs its bytes and no object of its
 * own, so a client that never reads cannot make a few budgeted bytes cost much more in objects.
 */
const ARENA_SIZE = 64 * 1024;

export class ReplyWriter {
  private pending: Uint8Array[] = [];
  private pendingBytes = 0;
  /** Called once the batch they came with has been written (or dropped): buffers to recycle. */
  private pendingDone: Array<() => void> = [];
  private scheduled = false;
  private holds = 0;
  private closed = false;
  /** Bytes pushed and not yet taken by the socket (queued here or in the socket's buffer). */
  backlog = 0;
  private idleWaiters: Array<() => void> = [];
  private settledWaiters: Array<() => void> = [];
  /**
   * Told once when a write fails (the socket is gone). Failed writes complete at once, so without
   * this a connection would go on serving queued requests into a dead socket, each failure
   * freeing budget for the next, without ever giving the event loop a turn to report the close.
   */
  onBroken: (() => void) | null = null;
  /** Where small replies are written (see reserve()); bytes from runStart to used are not yet queued. */
  arena = Buffer.allocUnsafeSlow(ARENA_SIZE);
  private used = 0;
  private runStart = 0;

  constructor(
    private stream: Duplex,
    private readonly budget: ConnectionBudget,
  ) {}

  setStream(stream: Duplex): void {
    this.stream = stream;
  }

  /**
   * Room for a small reply of `n` bytes: returns the offset in `arena` (read `arena` after this
   * call: it may be a new one) where the caller writes it.
   */
  reserve(n: number): number {
    if (this.used + n > this.arena.length) {
      this.endRun();
      this.arena = Buffer.allocUnsafeSlow(Math.max(ARENA_SIZE, n));
      this.used = this.runStart = 0;
    }
    const at = this.used;
    this.used += n;
    if (this.closed) return at;
    this.queued(n);
    return at;
  }

  /** Queue the small replies written since the last run as one view (before anything else). */
  private endRun(): void {
    if (this.used === this.runStart) return;
    this.pending.push(this.arena.subarray(this.runStart, this.used));
    this.runStart = this.used;
  }

  push(...buffers: Uint8Array[]): void {
    if (this.closed) return;
    this.endRun();
    let bytes = 0;
    for (const b of buffers) {
      this.pending.push(b);
      bytes += b.byteLength;
    }
    this.queued(bytes);
  }

  /** Queue one buffer and call `done` when the socket no longer needs it (to recycle it). */
  pushThen(buffer: Uint8Array, done: () => void): void {
    if (this.closed) return done();
    this.endRun();
    this.pending.push(buffer);
    this.pendingDone.push(done);
    this.queued(buffer.byteLength);
  }

  /** Replies count against the budget from the moment they are queued. */
  private queued(bytes: number): void {
    this.pendingBytes += bytes;
    this.backlog += bytes;
    this.budget.take(bytes);
    this.schedule();
  }

  /**
   * Call `done` once everything queued so far has been sent (or dropped). `holds` bytes (memory
   * the queued replies keep alive beyond their own length) count against the budget until then.
   */
  whenWritten(done: () => void, holds = 0): void {
    if (this.closed) return done();
    if (holds > 0) {
      this.budget.take(holds);
      this.pendingDone.push(() => {
        this.budget.give(holds);
        done();
      });
    } else this.pendingDone.push(done);
    this.schedule();
  }

  /** Keep replies back until release(); holds nest. */
  hold(): void {
    this.holds++;
  }

  release(): void {
    if (--this.holds === 0 && this.pendingBytes > 0) this.flush();
  }

  private schedule(): void {
    if (!this.scheduled && this.holds === 0) {
      this.scheduled = true;
      setImmediate(this.flush);
    }
  }

  /** Write now, without waiting for the batch (used during the handshake). */
  writeNow(buf: Uint8Array): void {
    this.push(buf);
    this.flush();
  }

  readonly flush = (): void => {
    this.scheduled = false;
    if (this.holds > 0) return; // release() writes them
    if (!this.closed) this.endRun();
    const list = this.pending;
    if (this.closed || (list.length === 0 && this.pendingDone.length === 0)) {
      this.notifyIdle();
      return;
    }
    // Only callbacks: they wait for what the socket still has (an empty write completes after it).
    if (list.length === 0) list.push(Buffer.alloc(0));
    const done = this.pendingDone;
    const bytes = this.pendingBytes;
    this.pending = [];
    this.pendingDone = [];
    this.pendingBytes = 0;
    const s = this.stream;
    const last = list.length - 1;
    if (last > 0) s.cork();
    for (let i = 0; i < last; i++) s.write(list[i]);
    s.write(list[last], (err) => {
      if (err) this.broken();
      this.written(bytes, done);
    });
    if (last > 0) s.uncork();
    this.notifyIdle();
  };

  private broken(): void {
    const f = this.onBroken;
    this.onBroken = null;
    f?.();
  }

  private written(bytes: number, done: Array<() => void>): void {
    this.backlog -= bytes;
    for (const cb of done) cb();
    this.budget.give(bytes);
    if (this.backlog === 0 && this.settledWaiters.length) {
      const w = this.settledWaiters;
      this.settledWaiters = [];
      for (const f of w) f();
    }
  }

  private notifyIdle(): void {
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const f of w) f();
  }

  /** Resolves once everything pushed so far has been handed to the socket. */
  drained(): Promise<void> {
    if (this.pendingBytes === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Resolves once the socket has taken everything pushed so far (a client that reads). */
  async settled(): Promise<void> {
    await this.drained();
    if (this.backlog === 0 || this.closed) return;
    return new Promise((resolve) => this.settledWaiters.push(resolve));
  }

  close(): void {
    this.closed = true;
    this.runStart = this.used;
    const done = this.pendingDone;
    this.pending = [];
    this.pendingDone = [];
    this.backlog -= this.pendingBytes;
    this.budget.give(this.pendingBytes);
    this.pendingBytes = 0;
    // Nothing will be written: whoever waits to reuse a buffer may do so now.
    for (const cb of done) cb();
    this.notifyIdle();
    const w = this.settledWaiters;
    this.settledWaiters = [];
    for (const f of w) f();
  }
}
