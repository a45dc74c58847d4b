/**
 * Adaptive polling of an idle connection, after QEMU's AioContext polling (poll-max-ns).
 *
 * A client doing one request at a time sends the next one a few tens of microseconds after our
 * reply. If the event loop goes to sleep meanwhile, that request has to wake it up, and on a
 * virtual machine a sleep and a wake-up cost about as much as serving the request. So after
 * answering everything, a connection may keep reading for a short while without sleeping.
 *
 * The window adapts to the client: it is learnt from how long the loop actually slept before
 * the next request came (up to `maxNs`), halved whenever a poll finds nothing, and zero for
 * clients that pause much longer than `maxNs`, which therefore cost nothing. Each poll runs from
 * setImmediate, so timers and other connections get their turn between two polls, and waits at
 * most one window.
 */

/** What a poll read did: bytes handled, nothing there yet, or stop (closed, error, not possible). */
export const POLL_EMPTY = 0;
export const POLL_STOP = -1;

/** Windows shorter than this are not worth starting. */
const MIN_WINDOW_NS = 4_000;

export class Poller {
  private windowNs = 0;
  private idleSince = 0;
  private scheduled = false;
  private polling = false;
  /** idle() came while a poll was handing data on: poll again afterwards. */
  private idleAgain = false;

  constructor(
    private readonly maxNs: number,
    /**
     * Read whatever has arrived, without waiting, and hand it on: bytes handled, POLL_EMPTY when
     * nothing has, POLL_STOP when the connection must not be read now (ended, paused).
     */
    private readonly readNow: () => number,
  ) {}

  /** How long the next poll may last, in ns (0: the connection sleeps at once). */
  get window(): number {
    return this.windowNs;
  }

  /** Data came the ordinary way, through the event loop. */
  woke(): void {
    if (this.polling || this.idleSince === 0) return;
    const slept = now() - this.idleSince;
    this.idleSince = 0;
    // The sleep includes waking up, which is what polling saves (often half of it or more): a
    // client back within twice the limit is worth polling for, as long as it took, up to the
    // limit. A slower one would only make us burn time.
    this.windowNs = slept <= 2 * this.maxNs ? Math.min(this.maxNs, Math.max(MIN_WINDOW_NS, slept)) : 0;
  }

  /**
   * The connection has answered everything it was asked: maybe poll before sleeping. `poll`
   * false: the client does not look like one waiting for each answer (it sent several requests
   * at once, or a request took several reads), so just note the time.
   */
  idle(poll = true): void {
    if (this.polling) {
      this.idleAgain = poll;
      return;
    }
    this.idleSince = now();
    if (poll && this.windowNs >= MIN_WINDOW_NS && !this.scheduled) {
      this.scheduled = true;
      setImmediate(this.poll);
    }
  }

  private readonly poll = (): void => {
    this.scheduled = false;
    if (this.idleSince === 0) return;
    const deadline = this.idleSince + this.windowNs;
    this.polling = true;
    this.idleAgain = false;
    let result = POLL_EMPTY;
    try {
      do result = this.readNow();
      while (result === POLL_EMPTY && now() < deadline);
    } finally {
      this.polling = false;
    }
    if (result > 0) {
      // Handled as if the loop had delivered it. If that answered everything, poll on; if a
      // request is still being served, its completion calls idle().
      this.idleSince = 0;
      if (this.idleAgain) this.idle();
      return;
    }
    if (result === POLL_STOP) return;
    this.windowNs /= 2;
    if (this.windowNs < MIN_WINDOW_NS) this.windowNs = 0;
  };
}

function now(): number {
  return performance.now() * 1e6;
}
