/**
 * How much memory clients can make the server hold.
 *
 * Every connection counts the bytes it holds on a client's behalf: requests being served (a WRITE
 * payload, a READ buffer) and replies not yet taken by the socket (data, acks, errors, block
 * status, option replies). A client that sends without reading would otherwise grow the server
 * without bound. When a connection holds more than its own limit, or the server as a whole holds
 * more than the server-wide limit, the connection stops reading requests until it is back under
 * half its limit: a client that does not read its replies stops being read.
 *
 * The server-wide limit never starves anyone: a connection that holds nothing may always take
 * one more request, so a well-behaved client makes progress (one request at a time) while
 * others sit on the budget. The worst case is therefore the server-wide limit plus one request
 * per connection.
 */

import { Reclaimer } from './reclaim.js';

/** The sum over all connections of one server. */
export class ServerBudget {
  used = 0;
  private readonly reclaimer = new Reclaimer(() => this.used);
  /** Connections waiting for the server to be back under its limit. */
  private readonly waiting = new Set<() => void>();

  constructor(readonly limit: number) {}

  get over(): boolean {
    return this.used > this.limit;
  }

  /** Run `wake` once the server is back under half its limit (until cancelled). */
  wait(wake: () => void): void {
    this.waiting.add(wake);
  }

  cancel(wake: () => void): void {
    this.waiting.delete(wake);
  }

  /** Called after `used` went up. */
  grew(): void {
    this.reclaimer.rose(this.used);
  }

  /** Called after `used` went down. */
  released(): void {
    this.reclaimer.fell(this.used);
    if (this.waiting.size === 0 || this.used > this.limit / 2) return;
    const list = [...this.waiting];
    this.waiting.clear();
    for (const wake of list) wake();
  }
}

/** One connection's share. */
export class ConnectionBudget {
  held = 0;
  /** Told whenever `held` went down (the connection may read again). */
  onRelease: (() => void) | null = null;
  private closed = false;

  constructor(
    readonly server: ServerBudget,
    readonly limit: number,
  ) {}

  take(n: number): void {
    if (this.closed) return;
    this.held += n;
    this.server.used += n;
    this.server.grew();
  }

  give(n: number): void {
    if (this.closed) return;
    this.held -= n;
    this.server.used -= n;
    this.server.released();
    this.onRelease?.();
  }

  /** Stop reading requests: over our own limit, or holding something while the server is over its limit. */
  get full(): boolean {
    return this.held > this.limit || (this.held > 0 && this.server.over);
  }

  /** Read again: well under our own limit, and the server has room (or we hold nothing). */
  get roomy(): boolean {
    return this.held <= this.limit / 2 && (this.held === 0 || this.server.used <= this.server.limit / 2);
  }

  /** The connection is gone: whatever it still counted is given back at once, and later gives are ignored. */
  close(): void {
    if (this.closed) return;
    this.server.used -= this.held;
    this.held = 0;
    this.closed = true;
    this.onRelease = null;
    this.server.released();
  }
}

/** Defaults (see SECURITY.md): per connection, per server. */
export const DEFAULT_CONNECTION_MEMORY = 24 * 1024 * 1024;
export const DEFAULT_SERVER_MEMORY = 128 * 1024 * 1024;
