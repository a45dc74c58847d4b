/**
 * Sharing the one event loop between connections.
 *
 * Requests that finish without I/O (a memory plugin's block status or trim) run as promise
 * continuations, and all of those run before the event loop looks at any socket again: a few
 * clients pipelining hundreds of them would keep every other client waiting. So costly requests
 * check how long the loop has been busy in this turn and, past a few milliseconds, wait for the
 * next turn, letting other connections' reads and replies through first.
 */
import { performance } from 'node:perf_hooks';

/** Work one turn may do before costly requests wait for the next one. */
const BUSY_MS = 4;

let turnStart = -1;

/** A promise to await before a costly request when the loop has been busy long enough; else undefined. */
export function yieldIfBusy(): Promise<void> | undefined {
  const now = performance.now();
  if (turnStart < 0) {
    turnStart = now;
    // Cleared at the end of this turn (check phase), before any continuation queued below.
    setImmediate(() => (turnStart = -1));
    return undefined;
  }
  if (now - turnStart < BUSY_MS) return undefined;
  return new Promise((resolve) => setImmediate(resolve));
}
