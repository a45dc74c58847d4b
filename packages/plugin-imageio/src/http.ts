import { Errno, NbdError, debug, logError } from '@nbdx/server/api';
import { isConnectionLost, transportError } from './errors.js';
import { NOT_ANSWERED, WireConnection, type Endpoint, type RequestSpec, type Response } from './wire.js';

export type { Endpoint, RequestSpec, Response } from './wire.js';

/**
 * One HTTP connection (one socket, one request at a time), so this module knows which socket
 * each request used: imageio keeps one backend handle per connection and flushes per
 * connection, hence `dirty`.
 */
export class Connection {
  private readonly wire: WireConnection;
  /** Written (PUT or zero) since this connection's last successful flush. */
  dirty = false;

  constructor(
    readonly index: number,
    endpoint: Endpoint,
    timeoutMs: number,
  ) {
    // Only the server closes idle connections: closing one ourselves would drop the server's
    // backend handle (and with it what a per-connection flush would have covered).
    this.wire = new WireConnection(endpoint, timeoutMs);
  }

  /**
   * Send one request. If the connection was lost before any answer came (typically an idle
   * keep-alive socket the server closed just as we reused it), send it once more on a fresh
   * socket: every imageio request (GET, PUT of a range, PATCH zero/flush) is idempotent.
   */
  async request(spec: RequestSpec, what: string): Promise<Response> {
    try {
      return await this.wire.request(spec);
    } catch (err) {
      const first = (err as { [NOT_ANSWERED]?: boolean })[NOT_ANSWERED];
      if (!first || !isConnectionLost(err)) throw this.failed(what, err);
      debug('imageio', `${what}: connection ${this.index} lost before an answer (${(err as Error).message}); retrying once`);
    }
    try {
      return await this.wire.request(spec);
    } catch (err) {
      throw this.failed(what, err);
    }
  }

  private failed(what: string, err: unknown): NbdError {
    const e = transportError(what, err);
    logError('imageio', e.message);
    return e;
  }

  close(): Promise<void> {
    this.wire.close();
    return Promise.resolve();
  }

  destroy(): Promise<void> {
    this.wire.destroy();
    return Promise.resolve();
  }
}

interface Waiter {
  all: boolean;
  resolve: (conns: Connection[]) => void;
  reject: (err: Error) => void;
}

/**
 * A small fair pool over N single-socket Connections, shared by every NBD connection. A request
 * borrows one connection; a flush borrows all of them (so in-flight writes finish first) and
 * sends a flush on each one that wrote since its last flush.
 */
export class ConnectionPool {
  readonly connections: Connection[];
  private free: Connection[];
  private waiters: Waiter[] = [];
  private closed = false;

  constructor(size: number, endpoint: Endpoint, timeoutMs: number) {
    this.connections = Array.from({ length: size }, (_, i) => new Connection(i, endpoint, timeoutMs));
    this.free = [...this.connections];
  }

  get size(): number {
    return this.connections.length;
  }

  private acquire(all: boolean): Promise<Connection[]> {
    if (this.closed) return Promise.reject(new NbdError(Errno.ESHUTDOWN, 'imageio: the connection pool is closed'));
    return new Promise((resolve, reject) => {
      this.waiters.push({ all, resolve, reject });
      this.dispatch();
    });
  }

  /** Hand out connections in FIFO order; a waiter for all of them blocks those behind it. */
  private dispatch(): void {
    while (this.waiters.length > 0) {
      const w = this.waiters[0]!;
      if (w.all) {
        if (this.free.length !== this.connections.length) return;
        this.waiters.shift();
        this.free = [];
        w.resolve([...this.connections]);
      } else {
        if (this.free.length === 0) return;
        this.waiters.shift();
        // Lowest index first, so the same few sockets stay warm under light load.
        this.free.sort((a, b) => a.index - b.index);
        w.resolve([this.free.shift()!]);
      }
    }
  }

  private release(conns: Connection[]): void {
    this.free.push(...conns);
    this.dispatch();
  }

  async use<T>(fn: (c: Connection) => Promise<T>): Promise<T> {
    const [c] = await this.acquire(false);
    try {
      return await fn(c!);
    } finally {
      this.release([c!]);
    }
  }

  async useAll<T>(fn: (cs: Connection[]) => Promise<T>): Promise<T> {
    const cs = await this.acquire(true);
    try {
      return await fn(cs);
    } finally {
      this.release(cs);
    }
  }

  /** Let in-flight requests finish, then close every socket. */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      await this.useAll(async () => {});
    } catch {
      // already closing
    }
    this.closed = true;
    for (const w of this.waiters.splice(0)) w.reject(new NbdError(Errno.ESHUTDOWN, 'imageio: the connection pool is closed'));
    await Promise.all(this.connections.map((c) => c.close()));
  }
}
