/**
 * Giving memory back after a burst.
 *
 * Replies and buffers a burst of clients made the server hold become garbage when those clients
 * go, but V8 collects garbage only when JavaScript allocates more: a server that falls quiet
 * would keep the burst's memory for ever. So once the server-wide budget has been high and then
 * stays near zero for a few seconds, we ask V8 for one full collection (a few milliseconds on a
 * quiet heap). Node offers no API for that; the `gc` function V8 exposes to new contexts once
 * the flag is set is the one way in, and if it is not available we simply do without.
 */
import * as v8 from 'node:v8';
import * as vm from 'node:vm';

/** Quiet this long (budget near zero) before collecting. */
const QUIET_MS = 3_000;
/** Only after the budget has been at least this high since the last collection. */
const WORTH_IT = 16 * 1024 * 1024;
/** "Near zero". */
const QUIET_BYTES = 1024 * 1024;

let collect: (() => void) | null | undefined;

function collector(): (() => void) | null {
  if (collect === undefined) {
    try {
      v8.setFlagsFromString('--expose-gc');
      collect = vm.runInNewContext('gc') as () => void;
    } catch {
      collect = null;
    }
  }
  return collect;
}

export class Reclaimer {
  private peak = 0;
  private timer: NodeJS.Timeout | null = null;

  constructor(private readonly used: () => number) {}

  /** The budget went up to `n`. */
  rose(n: number): void {
    if (n > this.peak) this.peak = n;
  }

  /** The budget went down: collect later if the burst is over. */
  fell(n: number): void {
    if (this.timer || this.peak < WORTH_IT || n > QUIET_BYTES) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.used() > QUIET_BYTES) return; // busy again: the next fall tries again
      this.peak = this.used();
      collector()?.();
    }, QUIET_MS);
    this.timer.unref();
  }
}
