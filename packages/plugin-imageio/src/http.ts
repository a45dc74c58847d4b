import type { IncomingHttpHeaders } from 'node:http';
import { Client, type Dispatcher } from 'undici';
import { Errno, NbdError, debug, logError } from '@nbdx/server/api';
import { isConnectionLost, transportError } from './errors.js';

/** Where the HTTP connections go: the URL's host (TCP, maybe TLS) or a Unix socket. */
export interface Endpoint {
  /** `https://host:port` or `http://host:port` (for a Unix socket, `http://localhost`). */
  origin: string;
  /** A filesystem Unix socket, or an abstract one ("\0name": undici's net.connect reaches it on Node 22+). */
  socketPath?: string;
  /** PEM text of the CA to trust instead of the system's. */
  ca?: string;
  insecure?: boolean;
}

export interface RequestSpec {
  method: 'GET' | 'PUT' | 'PATCH' | 'OPTIONS';
  path: string;
  headers?: Record<string, string>;
  body?: Uint8Array | string;
  /**
   * Read a successful body straight into this buffer: used when the status is `intoStatus`; the
   * body must then be exactly `into.length` bytes long.
   */
  into?: Uint8Array;
  intoStatus?: number;
  /** Keep at most this many bytes of other bodies (error messages, JSON). */
  maxBody?: number;
}

export interface Response {
  status: number;
  statusText: string;
  headers: IncomingHttpHeaders;
  /** The collected body (empty when it was read into `into`). */
  body: Buffer;
}

const NOT_ANSWERED = Symbol('not answered');

class TimeoutError extends Error {
  readonly code = 'ETIMEDOUT';
}

/**
 * One HTTP connection: an undici Client with a single socket and no pipelining, so this module
 * knows which socket each request used. imageio keeps one backend handle per connection and
 * flushes per connection, hence `dirty`.
 */
export class Connection {
  readonly client: Client;
  /** Written (PUT or zero) since this connection's last successful flush. */
  dirty = false;

  constructor(
    readonly index: number,
    endpoint: Endpoint,
    private readonly timeoutMs: number,
  ) {
    const connect: Record<string, unknown> = { timeout: timeoutMs };
    if (endpoint.socketPath) connect.socketPath = endpoint.socketPath;
    if (endpoint.ca !== undefined) connect.ca = endpoint.ca;
    if (endpoint.insecure) connect.rejectUnauthorized = false;
    this.client = new Client(endpoint.origin, {
      pipelining: 1,
      // Only the server closes idle connections: closing one ourselves would drop the server's
      // backend handle (and with it what a per-connection flush would have covered).
      keepAliveTimeout: 3600_000,
      keepAliveMaxTimeout: 3600_000,
      headersTimeout: timeoutMs,
      bodyTimeout: timeoutMs,
      connect,
    });
  }

  /**
   * Send one request. If the connection was lost before any answer came (typically an idle
   * keep-alive socket the server closed just as we reused it), send it once more on a fresh
   * socket: every imageio request (GET, PUT of a range, PATCH zero/flush) is idempotent.
   */
  async request(spec: RequestSpec, what: string): Promise<Response> {
    try {
      return await this.once(spec);
    } catch (err) {
      const first = (err as { [NOT_ANSWERED]?: boolean })[NOT_ANSWERED];
      if (!first || !isConnectionLost(err)) throw this.failed(what, err);
      debug('imageio', `${what}: connection ${this.index} lost before an answer (${(err as Error).message}); retrying once`);
    }
    try {
      return await this.once(spec);
    } catch (err) {
      throw this.failed(what, err);
    }
  }

  private failed(what: string, err: unknown): NbdError {
    const e = transportError(what, err);
    logError('imageio', e.message);
    return e;
  }

  private once(spec: RequestSpec): Promise<Response> {
    return new Promise<Response>((resolve, reject) => {
      let controller: Dispatcher.DispatchController | null = null;
      let status = 0;
      let statusText = '';
      let headers: IncomingHttpHeaders = {};
      let answered = false;
      let settled = false;
      const chunks: Buffer[] = [];
      let kept = 0;
      let filled = 0;
      const maxBody = spec.maxBody ?? 64 * 1024;
      let intoActive = false;

      const fail = (err: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (!answered) (err as { [NOT_ANSWERED]?: boolean })[NOT_ANSWERED] = true;
        reject(err);
      };
      // A deadline for the whole request (connect, send, wait, receive): never a hang.
      const timer = setTimeout(() => {
        const err = new TimeoutError(`no complete answer from the imageio server within ${this.timeoutMs / 1000} s`);
        if (controller && !controller.aborted) controller.abort(err);
        else fail(err);
      }, this.timeoutMs);

      const handler: Dispatcher.DispatchHandler = {
        onRequestStart(c) {
          controller = c;
          if (settled) c.abort(new TimeoutError('request timed out'));
        },
        onResponseStart(c, code, h, text) {
          if (code < 200) return; // 100 Continue and friends
          answered = true;
          status = code;
          statusText = text ?? '';
          headers = h;
          if (spec.into && code === (spec.intoStatus ?? 200)) {
            const len = Number(h['content-length']);
            if (h['content-length'] === undefined || len !== spec.into.length) {
              c.abort(
                new NbdError(
                  Errno.EIO,
                  `expected ${spec.into.length} bytes, the server announced ${h['content-length'] ?? 'no content-length'}`,
                ),
              );
              return;
            }
            intoActive = true;
          }
        },
        onResponseData(c, chunk) {
          if (intoActive) {
            const into = spec.into!;
            if (filled + chunk.length > into.length) {
              c.abort(new NbdError(Errno.EIO, `the server sent more than the ${into.length} bytes asked for`));
              return;
            }
            into.set(chunk, filled);
            filled += chunk.length;
          } else if (kept < maxBody) {
            const part = chunk.length > maxBody - kept ? chunk.subarray(0, maxBody - kept) : chunk;
            chunks.push(Buffer.from(part));
            kept += part.length;
          }
        },
        onResponseEnd() {
          if (settled) return;
          if (intoActive && filled !== spec.into!.length) {
            fail(new NbdError(Errno.EIO, `short read: got ${filled} of ${spec.into!.length} bytes`));
            return;
          }
          settled = true;
          clearTimeout(timer);
          resolve({ status, statusText, headers, body: Buffer.concat(chunks) });
        },
        onResponseError(_c, err) {
          fail(err);
        },
      };

      const headersOut: Record<string, string> = { ...spec.headers };
      let body: Uint8Array | string | undefined = spec.body;
      if (body !== undefined) {
        // Always an explicit Content-Length: imageio does not understand chunked bodies.
        const length = typeof body === 'string' ? Buffer.byteLength(body) : body.length;
        headersOut['content-length'] = String(length);
        if (length === 0) body = undefined;
      }
      try {
        this.client.dispatch(
          { method: spec.method, path: spec.path, headers: headersOut, body: body ?? null, idempotent: false },
          handler,
        );
      } catch (err) {
        fail(err as Error);
      }
    });
  }

  close(): Promise<void> {
    return this.client.close().catch(() => this.client.destroy().catch(() => {}));
  }

  destroy(): Promise<void> {
    return this.client.destroy().catch(() => {});
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
