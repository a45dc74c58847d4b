import type { IncomingHttpHeaders } from 'node:http';
import { createSecureContext } from 'node:tls';
import { Agent, type Dispatcher } from 'undici';
import { Errno, NbdError, debug } from '@nbdx/server/api';
import { isConnectionLost, statusError, transportError } from './errors.js';

const NAME = 'http';
/** Redirects followed at start-up before giving up (curl's default is 50; a loop shows long before). */
const MAX_REDIRECTS = 10;
/** Bytes of an error body kept for the message. */
const MAX_ERROR_BODY = 1024;

export interface RemoteOptions {
  /** PEM CA certificates to trust instead of the system's. */
  ca?: string[];
  sslverify: boolean;
  socketPath?: string;
  /** Inactivity limit for connecting, waiting for headers and between body chunks; 0 = none. */
  timeoutMs: number;
  connections: number;
  /** Sent with every request: flat [name, value, name, value, …]. */
  headers: string[];
  followLocation: boolean;
}

export interface ProbeResult {
  size: number | null;
  /** The URL after redirects: every read goes there. */
  url: URL;
  /** How the size was learnt, for the debug log. */
  how: string;
}

interface Answer {
  status: number;
  statusText: string;
  headers: IncomingHttpHeaders;
  body: Buffer;
}

const NOT_ANSWERED = Symbol('not answered');

function header(h: IncomingHttpHeaders, name: string): string | undefined {
  const v = h[name];
  return Array.isArray(v) ? v[0] : v;
}

/** `bytes FIRST-LAST/SIZE` (or `bytes STAR/SIZE` on a 416): the numbers; SIZE null when it is a star. */
export function parseContentRange(value: string | undefined): { first: number; last: number; size: number | null } | { first: null; last: null; size: number | null } | null {
  if (!value) return null;
  const m = /^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*\/\s*(\d+|\*)\s*$/i.exec(value);
  if (!m) return null;
  const size = m[3] === '*' ? null : Number(m[3]);
  if (size !== null && !Number.isSafeInteger(size)) return null;
  if (m[1] === undefined) return { first: null, last: null, size };
  const first = Number(m[1]);
  const last = Number(m[2]);
  if (!Number.isSafeInteger(first) || !Number.isSafeInteger(last) || last < first) return null;
  return { first, last, size };
}

/**
 * The HTTP side: one undici Agent (a keep-alive pool of `connections` sockets per origin, shared
 * by every NBD connection), the start-up probes, and ranged GETs whose bodies are written straight
 * into the caller's buffer.
 */
export class Remote {
  readonly agent: Agent;
  /** Where reads go, fixed by probe(). */
  private origin = '';
  private path = '';

  constructor(private readonly opts: RemoteOptions) {
    const connect: Record<string, unknown> = {};
    if (opts.timeoutMs > 0) connect.timeout = opts.timeoutMs;
    if (opts.socketPath) connect.socketPath = opts.socketPath;
    // One TLS context for every connection: given `ca` alone, Node would parse the PEM bundle
    // again for each new socket.
    if (opts.ca) connect.secureContext = createSecureContext({ ca: opts.ca });
    if (!opts.sslverify) connect.rejectUnauthorized = false;
    this.agent = new Agent({
      connections: opts.connections,
      // One request at a time per socket: a slow range must not hold up the ones queued behind it.
      pipelining: 1,
      headersTimeout: opts.timeoutMs,
      bodyTimeout: opts.timeoutMs,
      connect,
    });
  }

  /** Send a request and collect a small body (probes and error messages). */
  private send(method: 'GET' | 'HEAD', url: URL, extra: string[], what: string): Promise<Answer> {
    return new Promise<Answer>((resolve, reject) => {
      let status = 0;
      let statusText = '';
      let headers: IncomingHttpHeaders = {};
      const chunks: Buffer[] = [];
      let kept = 0;
      let settled = false;
      const handler: Dispatcher.DispatchHandler = {
        // Its presence marks this as a new-style (undici 7) handler.
        onRequestStart() {},
        onResponseStart(c, code, h, text) {
          if (code < 200) return;
          status = code;
          statusText = text ?? '';
          headers = h;
          // A server ignoring Range would send the whole resource: stop at the headers.
          if (method === 'GET' && code === 200) {
            settled = true;
            resolve({ status, statusText, headers, body: Buffer.alloc(0) });
            c.abort(new Error('body not wanted'));
          }
        },
        onResponseData(_c, chunk) {
          if (kept < MAX_ERROR_BODY) {
            const part = chunk.subarray(0, MAX_ERROR_BODY - kept);
            chunks.push(Buffer.from(part));
            kept += part.length;
          }
        },
        onResponseEnd() {
          if (settled) return;
          settled = true;
          resolve({ status, statusText, headers, body: Buffer.concat(chunks) });
        },
        onResponseError(_c, err) {
          if (settled) return;
          settled = true;
          reject(transportError(what, err));
        },
      };
      try {
        this.agent.dispatch(
          { origin: url.origin, path: url.pathname + url.search, method, headers: [...this.opts.headers, ...extra] },
          handler,
        );
      } catch (err) {
        reject(transportError(what, err));
      }
    });
  }

  /** Follow redirects (when allowed) from `url`; returns the final answer and URL. */
  private async follow(method: 'GET' | 'HEAD', start: URL, extra: string[], what: string): Promise<{ r: Answer; url: URL }> {
    let url = start;
    for (let hops = 0; ; hops++) {
      const r = await this.send(method, url, extra, `${what} ${url.href}`);
      const location = header(r.headers, 'location');
      if (!this.opts.followLocation || ![301, 302, 303, 307, 308].includes(r.status) || !location) return { r, url };
      if (hops >= MAX_REDIRECTS) throw new NbdError(Errno.EIO, `${what} ${start.href}: more than ${MAX_REDIRECTS} redirects`);
      const next = new URL(location, url);
      if (next.protocol !== 'https:' && next.protocol !== 'http:') {
        throw new NbdError(Errno.EIO, `${what} ${url.href}: redirected to '${next.protocol}', which is not http(s)`);
      }
      debug(NAME, `${url.href} redirects (${r.status}) to ${next.href}`);
      url = next;
    }
  }

  /**
   * Learn the size and check that the server honours byte ranges: HEAD first (the size from
   * Content-Length; Accept-Ranges: bytes is the promise of ranges), and when HEAD is refused, says
   * nothing of ranges or gives no length, a one-byte ranged GET (the size from Content-Range).
   */
  async probe(start: URL, knownSize: number | null): Promise<ProbeResult> {
    let url = start;
    if (knownSize === null) {
      const head = await this.follow('HEAD', start, [], 'HEAD');
      url = head.url;
      const { r } = head;
      const length = header(r.headers, 'content-length');
      const ranges = header(r.headers, 'accept-ranges');
      if (r.status === 404 || r.status === 410) throw statusError('open', `HEAD ${url.href}`, r.status, r.statusText, r.body);
      if (r.status >= 200 && r.status < 300 && length !== undefined && /^\d+$/.test(length) && ranges?.toLowerCase() === 'bytes') {
        const size = Number(length);
        if (Number.isSafeInteger(size)) {
          this.useUrl(url);
          return { size, url, how: 'HEAD (Content-Length, Accept-Ranges: bytes)' };
        }
      }
      debug(
        NAME,
        r.status >= 200 && r.status < 300
          ? `HEAD ${url.href}: ${length === undefined ? 'no Content-Length' : `Content-Length ${length}`}, Accept-Ranges ${ranges ?? 'absent'}: asking with a ranged GET`
          : `HEAD ${url.href} refused (${r.status}): asking with a ranged GET`,
      );
    }
    const got = await this.follow('GET', url, ['range', 'bytes=0-0'], 'GET (range 0-0)');
    url = got.url;
    const { r } = got;
    const what = `GET ${url.href} (range 0-0)`;
    if (r.status === 200) {
      throw new NbdError(
        Errno.EIO,
        `${what}: the server ignores Range requests (it answered 200 with the whole resource instead of 206 Partial Content); nbdx http needs a server that serves byte ranges`,
      );
    }
    if (r.status !== 206 && r.status !== 416) throw statusError('open', what, r.status, r.statusText, r.body);
    const cr = parseContentRange(header(r.headers, 'content-range'));
    if (r.status === 416) {
      // bytes */0: an empty resource has no byte 0.
      if (cr && cr.first === null && cr.size === 0) {
        this.useUrl(url);
        return { size: knownSize ?? 0, url, how: 'ranged GET (416, empty resource)' };
      }
      throw statusError('open', what, r.status, r.statusText, r.body);
    }
    if (!cr || cr.first !== 0) {
      throw new NbdError(Errno.EIO, `${what}: the 206 answer has no usable Content-Range (${header(r.headers, 'content-range') ?? 'none'})`);
    }
    this.useUrl(url);
    if (knownSize !== null) return { size: knownSize, url, how: 'size=' };
    if (cr.size === null) {
      throw new NbdError(Errno.EIO, `${what}: the server does not tell the size of the resource (Content-Range ends in /*): give size=SIZE`);
    }
    return { size: cr.size, url, how: 'ranged GET (Content-Range)' };
  }

  private useUrl(url: URL): void {
    this.origin = url.origin;
    this.path = url.pathname + url.search;
  }

  /**
   * Read `buf.length` bytes at `offset` with one ranged GET, the body written straight into `buf`.
   * A request that fails before any answer on a reused keep-alive socket (the server closed it
   * just then) is sent once more, as browsers and curl do for idempotent requests.
   */
  async read(buf: Uint8Array, offset: number): Promise<void> {
    try {
      return await this.readOnce(buf, offset);
    } catch (err) {
      if (!(err as { [NOT_ANSWERED]?: boolean })[NOT_ANSWERED] || !isConnectionLost((err as Error).cause)) throw err;
      debug(NAME, `${(err as Error).message}: sending it again`);
    }
    return this.readOnce(buf, offset);
  }

  private readOnce(buf: Uint8Array, offset: number): Promise<void> {
    const last = offset + buf.length - 1;
    const what = `read ${buf.length} bytes at ${offset}`;
    return new Promise<void>((resolve, reject) => {
      let filled = 0;
      let ok = false;
      let answered = false;
      let settled = false;
      let status = 0;
      let statusText = '';
      const errorBody: Buffer[] = [];
      let kept = 0;
      const fail = (err: NbdError): void => {
        if (settled) return;
        settled = true;
        if (!answered) (err as { [NOT_ANSWERED]?: boolean })[NOT_ANSWERED] = true;
        reject(err);
      };
      const handler: Dispatcher.DispatchHandler = {
        // Its presence marks this as a new-style (undici 7) handler.
        onRequestStart() {},
        onResponseStart(c, code, h, text) {
          if (code < 200) return;
          answered = true;
          status = code;
          statusText = text ?? '';
          if (code === 206) {
            const cr = parseContentRange(header(h, 'content-range'));
            const encoding = header(h, 'content-encoding');
            const length = header(h, 'content-length');
            let bad: string | null = null;
            if (!cr || cr.first !== offset || cr.last !== last) bad = `the server sent the range ${header(h, 'content-range') ?? '(none)'} instead of bytes ${offset}-${last}`;
            else if (encoding && encoding.toLowerCase() !== 'identity') bad = `the server sent the range with Content-Encoding ${encoding}`;
            else if (length !== undefined && Number(length) !== buf.length) bad = `the server announced ${length} bytes instead of ${buf.length}`;
            if (bad) {
              fail(new NbdError(Errno.EIO, `${what}: ${bad}`));
              c.abort(new Error(bad));
              return;
            }
            ok = true;
          } else if (code === 200) {
            // Never read a whole disk image to answer one request.
            const msg = `${what}: the server ignored the Range header (200 with the whole resource instead of 206)`;
            fail(new NbdError(Errno.EIO, msg));
            c.abort(new Error(msg));
          }
        },
        onResponseData(c, chunk) {
          if (ok) {
            if (filled + chunk.length > buf.length) {
              const msg = `${what}: the server sent more than the ${buf.length} bytes asked for`;
              fail(new NbdError(Errno.EIO, msg));
              c.abort(new Error(msg));
              return;
            }
            buf.set(chunk, filled);
            filled += chunk.length;
          } else if (kept < MAX_ERROR_BODY) {
            const part = chunk.subarray(0, MAX_ERROR_BODY - kept);
            errorBody.push(Buffer.from(part));
            kept += part.length;
          }
        },
        onResponseEnd() {
          if (settled) return;
          if (!ok) return fail(statusError('read', what, status, statusText, Buffer.concat(errorBody)));
          if (filled !== buf.length) return fail(new NbdError(Errno.EIO, `${what}: short answer, ${filled} of ${buf.length} bytes`));
          settled = true;
          resolve();
        },
        onResponseError(_c, err) {
          if (settled) return;
          const e = transportError(ok ? `${what} (connection lost after ${filled} bytes)` : what, err);
          fail(e);
        },
      };
      try {
        this.agent.dispatch(
          {
            origin: this.origin,
            path: this.path,
            method: 'GET',
            headers: [...this.opts.headers, 'range', `bytes=${offset}-${last}`],
          },
          handler,
        );
      } catch (err) {
        fail(transportError(what, err));
      }
    });
  }

  async close(): Promise<void> {
    await this.agent.close().catch(() => this.agent.destroy().catch(() => {}));
  }
}
