import type { Duplex } from 'node:stream';

/**
 * Collects reply buffers and hands them to the socket in batches: everything that completes in
 * one turn of the event loop goes out in one corked write (one writev system call). While the
 * parser holds the writer (it is handling the bytes of one read), replies wait for its release and
 * go out then, without waiting for the turn to end: requests a synchronous plugin served are
 * answered straight from the read callback.
 */
export class ReplyWriter {
  private pending: Uint8Array[] = [];
  /** Called once the buffer at the same index in `pending` has been written (or dropped). */
  private pendingDone: Array<(() => void) | undefined> = [];
  private scheduled = false;
  private holds = 0;
  private closed = false;
  private idleWaiters: Array<() => void> = [];

  constructor(private stream: Duplex) {}

  setStream(stream: Duplex): void {
    this.stream = stream;
  }

  push(...buffers: Uint8Array[]): void {
    if (this.closed) return;
    for (const b of buffers) {
      this.pending.push(b);
      this.pendingDone.push(undefined);
    }
    this.schedule();
  }

  /** Queue one buffer and call `done` when the socket no longer needs it (to recycle it). */
  pushThen(buffer: Uint8Array, done: () => void): void {
    if (this.closed) return done();
    this.pending.push(buffer);
    this.pendingDone.push(done);
    this.schedule();
  }

  /** Keep replies back until release(); holds nest. */
  hold(): void {
    this.holds++;
  }

  release(): void {
    if (--this.holds === 0 && this.pending.length > 0) this.flush();
  }

  private schedule(): void {
    if (!this.scheduled && this.holds === 0) {
      this.scheduled = true;
      setImmediate(this.flush);
    }
  }

  /** Write now, without waiting for the batch (used during the handshake). */
  writeNow(buf: Uint8Array): void {
    this.flush();
    if (!this.closed) this.stream.write(buf);
  }

  readonly flush = (): void => {
    this.scheduled = false;
    if (this.holds > 0) return; // release() writes them
    const list = this.pending;
    if (list.length === 0 || this.closed) {
      this.notifyIdle();
      return;
    }
    const done = this.pendingDone;
    this.pending = [];
    this.pendingDone = [];
    const s = this.stream;
    if (list.length > 1) s.cork();
    for (let i = 0; i < list.length; i++) {
      const cb = done[i];
      if (cb) s.write(list[i], () => cb());
      else s.write(list[i]);
    }
    if (list.length > 1) s.uncork();
    this.notifyIdle();
  };

  private notifyIdle(): void {
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const f of w) f();
  }

  /** Resolves once everything pushed so far has been handed to the socket. */
  drained(): Promise<void> {
    if (this.pending.length === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  close(): void {
    this.closed = true;
    const done = this.pendingDone;
    this.pending = [];
    this.pendingDone = [];
    // Nothing will be written: whoever waits to reuse a buffer may do so now.
    for (const cb of done) cb?.();
    this.notifyIdle();
  }
}
