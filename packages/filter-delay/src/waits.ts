/**
 * Timers that end early. One `Waits` per connection: every pending delay is a timer plus a cancel
 * function in a set, and one listener on the connection's abort signal cancels them all, so
 * nothing busy-waits and a vanished client or a shutting-down server never waits for a timer.
 */
import { Errno, NbdError } from '@nbdx/server/api';

function shutdownError(reason: unknown): NbdError {
  if (reason instanceof NbdError && reason.errno === Errno.ESHUTDOWN) {
    return new NbdError(Errno.ESHUTDOWN, `delay cut short: ${reason.message}`);
  }
  const text = reason instanceof Error ? reason.message : reason === undefined ? 'aborted' : String(reason);
  return new NbdError(Errno.ESHUTDOWN, `delay cut short: ${text}`);
}

export class Waits {
  private readonly pending = new Set<(err: NbdError) => void>();
  private listening = false;
  private cancelled: NbdError | null = null;

  constructor(private readonly signal?: AbortSignal) {}

  /** Pending delays (for tests and debugging). */
  get size(): number {
    return this.pending.size;
  }

  /** Resolve after `ms`, or reject with NbdError(ESHUTDOWN) as soon as the wait is cancelled. */
  sleep(ms: number): Promise<void> {
    const signal = this.signal;
    if (this.cancelled) return Promise.reject(this.cancelled);
    if (signal) {
      if (signal.aborted) return Promise.reject(shutdownError(signal.reason));
      if (!this.listening) {
        this.listening = true;
        signal.addEventListener('abort', () => this.cancelAll(signal.reason), { once: true });
      }
    }
    return new Promise<void>((resolve, reject) => {
      const cancel = (err: NbdError) => {
        clearTimeout(timer);
        this.pending.delete(cancel);
        reject(err);
      };
      const timer = setTimeout(() => {
        this.pending.delete(cancel);
        resolve();
      }, ms);
      this.pending.add(cancel);
    });
  }

  /** End every pending wait now (each fails with ESHUTDOWN), and every later one at once. */
  cancelAll(reason: unknown = 'the connection closed'): void {
    const err = shutdownError(reason);
    this.cancelled ??= err;
    for (const cancel of [...this.pending]) cancel(err);
  }
}
