/**
 * One HTTP/1.1 keep-alive connection to an imageio server, written for the data path.
 *
 * Why not a general client: a read is "GET with a Range, answer 206 with exactly N bytes", and
 * those N bytes should land in the NBD reply buffer with no copy and no allocation. Node's
 * `onread` option lets a socket read into a buffer the caller picks before every read, so while
 * a body is expected the kernel (or OpenSSL, for TLS) writes it straight into the reply buffer;
 * everything else (status line, headers, error bodies, JSON) goes through one small buffer per
 * connection. A general client (undici, node:http) reads each 64 KiB into a new Buffer, copies
 * it once more for its parser, and hands it over to be copied again: that garbage was most of
 * the read path's GC time and a third of its CPU.
 *
 * What this client does not do, because imageio does not need it: pipelining (one request at a
 * time per connection, as imageio's backends are per connection anyway), HEAD, compression,
 * redirects, proxies. Responses may carry Content-Length, chunked encoding, or neither (body up
 * to the close).
 */
import * as net from 'node:net';
import * as tls from 'node:tls';
import type { IncomingHttpHeaders } from 'node:http';
import { Errno, NbdError } from '@nbdx/server/api';

/** Where the connection goes: the URL's host (TCP, maybe TLS) or a Unix socket. */
export interface Endpoint {
  /** `https://host:port` or `http://host:port` (for a Unix socket, `http://localhost`). */
  origin: string;
  /** A filesystem Unix socket, or an abstract one ("\0name"; Node.js 22+ reaches those). */
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

/** Status line and headers must fit here (imageio sends about 250 bytes). */
const HEAD_BUFFER = 16 * 1024;
/** At most this much per read while waiting for headers. */
const HEAD_READ = 4096;
const EMPTY = Buffer.alloc(0);

export class WireError extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
  }
}

/** An error that reached the request before any response byte: safe to send again. */
export const NOT_ANSWERED = Symbol('not answered');

type BodyMode = 'none' | 'into' | 'collect';

/** The request on the wire and what has come back for it so far. */
interface Exchange {
  spec: RequestSpec;
  resolve: (r: Response) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
  /** A byte of the answer arrived. */
  answered: boolean;
  /** The request body was fully handed to the kernel. */
  sent: boolean;
  headDone: boolean;
  status: number;
  statusText: string;
  headers: IncomingHttpHeaders;
  mode: BodyMode;
  /** Body bytes still expected; -1: until the server closes; -2: chunked. */
  remaining: number;
  filled: number;
  chunks: Buffer[];
  kept: number;
  /** Close the socket after this answer (Connection: close, HTTP/1.0, protocol trouble). */
  closeAfter: boolean;
  chunk: ChunkState;
}

interface ChunkState {
  /** 'size' line, 'data' (left bytes in the chunk), 'crlf' after data, 'trailer' lines, 'done'. */
  phase: 'size' | 'data' | 'crlf' | 'trailer' | 'done';
  left: number;
}

export class WireConnection {
  private socket: net.Socket | null = null;
  private readonly host: string;
  private readonly port: number;
  private readonly tls: boolean;
  private readonly hostHeader: string;
  /** Status line, headers, small bodies; body bytes of `into` answers bypass it. */
  private readonly head = Buffer.allocUnsafe(HEAD_BUFFER);
  private headLen = 0;
  private ex: Exchange | null = null;
  /** The last read went into `ex.spec.into` rather than `head`. */
  private readingInto = false;

  constructor(
    private readonly endpoint: Endpoint,
    private readonly timeoutMs: number,
  ) {
    const u = new URL(endpoint.origin);
    this.tls = u.protocol === 'https:';
    this.host = u.hostname.replace(/^\[|\]$/g, '');
    this.port = Number(u.port) || (this.tls ? 443 : 80);
    this.hostHeader = endpoint.socketPath ? 'localhost' : u.host;
  }

  /** Send one request and wait for its whole answer. Never more than one at a time. */
  request(spec: RequestSpec): Promise<Response> {
    if (this.ex) return Promise.reject(new Error('imageio: a connection got a second request while busy (bug)'));
    return new Promise<Response>((resolve, reject) => {
      const ex: Exchange = {
        spec,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.fail(new WireError(`no complete answer from the imageio server within ${this.timeoutMs / 1000} s`, 'ETIMEDOUT'));
        }, this.timeoutMs),
        answered: false,
        sent: false,
        headDone: false,
        status: 0,
        statusText: '',
        headers: {},
        mode: 'none',
        remaining: 0,
        filled: 0,
        chunks: [],
        kept: 0,
        closeAfter: false,
        chunk: { phase: 'size', left: 0 },
      };
      this.ex = ex;
      try {
        this.send(ex);
      } catch (err) {
        this.fail(err as Error);
      }
    });
  }

  private connect(): net.Socket {
    // Node asks `buffer()` for the next read's buffer when the socket is set up and then right
    // after each read's callback, so the state it looks at must be settled by then.
    this.headLen = 0;
    const onread = {
      // The rest of the reply buffer while its body is coming, otherwise the free part of the
      // head buffer.
      buffer: (): Uint8Array => {
        const ex = this.ex;
        if (ex && ex.mode === 'into' && ex.headDone && ex.remaining > 0) {
          this.readingInto = true;
          return ex.spec.into!.subarray(ex.filled, ex.filled + ex.remaining);
        }
        this.readingInto = false;
        // Before the headers are in, read little at a time: what comes with them of a body
        // bound for the reply buffer has to be copied there.
        const end = ex?.headDone ? HEAD_BUFFER : Math.min(HEAD_BUFFER, this.headLen + HEAD_READ);
        return this.head.subarray(this.headLen, end);
      },
      callback: (n: number): boolean => {
        this.onRead(n);
        return true;
      },
    };
    let socket: net.Socket;
    if (this.endpoint.socketPath) {
      socket = net.connect({ path: this.endpoint.socketPath, onread });
    } else if (this.tls) {
      // `onread` works on TLS sockets too (Node passes it down to the net.Socket underneath);
      // @types/node lists it only for net.
      socket = tls.connect({
        host: this.host,
        port: this.port,
        servername: net.isIP(this.host) ? undefined : this.host,
        ca: this.endpoint.ca,
        rejectUnauthorized: !this.endpoint.insecure,
        ALPNProtocols: ['http/1.1'],
        ...({ onread } as object),
      });
    } else {
      socket = net.connect({ host: this.host, port: this.port, onread });
    }
    socket.setNoDelay(true);
    socket.on('error', (err) => {
      if (this.socket === socket) this.lost(err);
    });
    socket.on('close', () => {
      if (this.socket === socket) this.lost(null);
    });
    this.socket = socket;
    return socket;
  }

  private send(ex: Exchange): void {
    // A socket the server has half-closed (FIN seen, 'close' not yet) is not reused.
    const reuse = this.socket && !this.socket.destroyed && this.socket.writable;
    if (!reuse) this.drop();
    const socket = reuse ? this.socket! : this.connect();
    const spec = ex.spec;
    let head = `${spec.method} ${spec.path} HTTP/1.1\r\nhost: ${this.hostHeader}\r\n`;
    if (spec.headers) for (const k in spec.headers) head += `${k}: ${spec.headers[k]}\r\n`;
    const body = spec.body;
    if (body !== undefined) {
      // Always an explicit Content-Length: imageio does not understand chunked bodies.
      const length = typeof body === 'string' ? Buffer.byteLength(body) : body.length;
      head += `content-length: ${length}\r\n`;
    }
    head += '\r\n';
    const done = (err?: Error | null) => {
      if (!err && this.ex === ex) ex.sent = true;
    };
    if (body === undefined || body.length === 0) {
      socket.write(head, 'latin1', done);
      return;
    }
    // One writev for head and body.
    socket.cork();
    socket.write(head, 'latin1');
    if (typeof body === 'string') socket.write(body, 'utf8', done);
    else socket.write(body, done);
    socket.uncork();
  }

  /** n bytes arrived, in the reply buffer (`readingInto`) or at `head[headLen]`. */
  private onRead(n: number): void {
    const ex = this.ex;
    if (!ex) {
      // Nothing asked for: a server that talks out of turn cannot be trusted with the next request.
      this.drop();
      return;
    }
    ex.answered = true;
    if (this.readingInto) {
      ex.filled += n;
      ex.remaining -= n;
      if (ex.remaining === 0) this.complete(ex);
      return;
    }
    this.headLen += n;
    this.parse(ex);
  }

  /** Consume what the head buffer holds: status line and headers, then (non-into) body bytes. */
  private parse(ex: Exchange): void {
    let pos = 0;
    while (this.ex === ex) {
      if (!ex.headDone) {
        const end = this.head.indexOf('\r\n\r\n', pos, 'latin1');
        if (end < 0 || end >= this.headLen) {
          if (this.headLen - pos >= HEAD_BUFFER) {
            this.fail(new NbdError(Errno.EIO, `the server sent more than ${HEAD_BUFFER} bytes of headers`));
            return;
          }
          break;
        }
        const text = this.head.toString('latin1', pos, end);
        pos = end + 4;
        if (!this.headers(ex, text)) return;
        continue;
      }
      const avail = this.headLen - pos;
      if (avail === 0 && ex.remaining !== 0) break;
      const used = this.body(ex, pos, avail);
      pos += used;
      if (used === 0) break; // a chunk-size line not complete yet
    }
    // Keep what was not consumed at the start of the head buffer.
    if (pos > 0) {
      if (pos < this.headLen) this.head.copyWithin(0, pos, this.headLen);
      this.headLen -= pos;
    }
    if (this.ex !== ex && this.headLen > 0 && this.socket) {
      // Bytes after a complete answer: nothing was asked, so the connection is out of step.
      this.drop();
    }
  }

  /** Parse a status line and headers; false when the exchange was failed. */
  private headers(ex: Exchange, text: string): boolean {
    const lines = text.split('\r\n');
    const m = /^HTTP\/1\.([01]) (\d{3})(?: (.*))?$/.exec(lines[0]!);
    if (!m) {
      this.fail(new NbdError(Errno.EIO, `the server's answer is not HTTP/1.x: ${JSON.stringify(lines[0]!.slice(0, 80))}`));
      return false;
    }
    const status = Number(m[2]);
    const headers: IncomingHttpHeaders = {};
    for (let i = 1; i < lines.length; i++) {
      const line = lines[i]!;
      const colon = line.indexOf(':');
      if (colon <= 0) continue;
      const name = line.slice(0, colon).trim().toLowerCase();
      const value = line.slice(colon + 1).trim();
      const old = headers[name];
      if (old === undefined) headers[name] = value;
      else if (Array.isArray(old)) old.push(value);
      else headers[name] = [old, value];
    }
    if (status < 200) return true; // 100 Continue and friends: the real answer follows
    ex.headDone = true;
    ex.status = status;
    ex.statusText = m[3] ?? '';
    ex.headers = headers;
    const connection = String(headers.connection ?? '').toLowerCase();
    ex.closeAfter = connection.includes('close') || (m[1] === '0' && !connection.includes('keep-alive'));
    const te = String(headers['transfer-encoding'] ?? '').toLowerCase();
    const cl = headers['content-length'];
    const spec = ex.spec;
    if (status === 204 || status === 304) {
      ex.remaining = 0;
    } else if (te !== '' && te !== 'identity') {
      if (!te.endsWith('chunked')) {
        this.fail(new NbdError(Errno.EIO, `the server sent an unsupported transfer-encoding '${te}'`));
        return false;
      }
      ex.remaining = -2;
    } else if (cl !== undefined) {
      const n = Number(cl);
      if (!/^\d+$/.test(String(cl)) || !Number.isSafeInteger(n)) {
        this.fail(new NbdError(Errno.EIO, `the server sent an invalid content-length '${String(cl)}'`));
        return false;
      }
      ex.remaining = n;
    } else {
      ex.remaining = -1;
      ex.closeAfter = true;
    }
    if (spec.into && status === (spec.intoStatus ?? 200)) {
      if (ex.remaining !== spec.into.length) {
        this.fail(
          new NbdError(Errno.EIO, `expected ${spec.into.length} bytes, the server announced ${cl ?? 'no content-length'}`),
        );
        return false;
      }
      ex.mode = 'into';
    } else {
      ex.mode = 'collect';
    }
    if (ex.remaining === 0) this.complete(ex);
    return true;
  }

  /** Take body bytes from head[pos, pos+avail); returns how many were consumed. */
  private body(ex: Exchange, pos: number, avail: number): number {
    if (ex.remaining >= 0) {
      const take = Math.min(avail, ex.remaining);
      this.keep(ex, this.head.subarray(pos, pos + take));
      ex.remaining -= take;
      if (ex.remaining === 0) this.complete(ex);
      return take;
    }
    if (ex.remaining === -1) {
      this.keep(ex, this.head.subarray(pos, pos + avail));
      return avail;
    }
    return this.chunked(ex, pos, avail);
  }

  /** Chunked bodies (not from imageio itself, but a front proxy may send them). */
  private chunked(ex: Exchange, pos: number, avail: number): number {
    const c = ex.chunk;
    const end = pos + avail;
    let p = pos;
    while (p < end && this.ex === ex) {
      if (c.phase === 'data') {
        const take = Math.min(c.left, end - p);
        this.keep(ex, this.head.subarray(p, p + take));
        c.left -= take;
        p += take;
        if (c.left === 0) c.phase = 'crlf';
        continue;
      }
      const nl = this.head.indexOf('\r\n', p, 'latin1');
      if (nl < 0 || nl + 2 > end) break; // wait for the whole line
      const line = this.head.toString('latin1', p, nl);
      p = nl + 2;
      if (c.phase === 'crlf') {
        if (line !== '') {
          this.fail(new NbdError(Errno.EIO, 'the server sent a malformed chunked body'));
          return p - pos;
        }
        c.phase = 'size';
      } else if (c.phase === 'size') {
        const size = parseInt(line.split(';')[0]!.trim(), 16);
        if (!Number.isSafeInteger(size) || size < 0 || !/^[0-9a-f]+$/i.test(line.split(';')[0]!.trim())) {
          this.fail(new NbdError(Errno.EIO, 'the server sent a malformed chunk size'));
          return p - pos;
        }
        if (size === 0) c.phase = 'trailer';
        else {
          c.left = size;
          c.phase = 'data';
        }
      } else if (c.phase === 'trailer') {
        if (line === '') {
          c.phase = 'done';
          ex.remaining = 0;
          this.complete(ex);
        }
      }
    }
    return p - pos;
  }

  /** Body bytes of a non-into answer: copy (they live in the head buffer) up to maxBody. */
  private keep(ex: Exchange, bytes: Buffer): void {
    if (ex.mode === 'into') {
      // The first body bytes, read together with the headers.
      ex.spec.into!.set(bytes, ex.filled);
      ex.filled += bytes.length;
      return;
    }
    const max = ex.spec.maxBody ?? 64 * 1024;
    if (ex.kept >= max || bytes.length === 0) return;
    const part = bytes.length > max - ex.kept ? bytes.subarray(0, max - ex.kept) : bytes;
    ex.chunks.push(Buffer.from(part));
    ex.kept += part.length;
  }

  private complete(ex: Exchange): void {
    if (this.ex !== ex) return;
    this.ex = null;
    clearTimeout(ex.timer);
    // A request body the server answered without reading leaves the connection unusable.
    if (ex.closeAfter || !ex.sent) this.drop();
    const body = ex.chunks.length === 0 ? EMPTY : ex.chunks.length === 1 ? ex.chunks[0]! : Buffer.concat(ex.chunks);
    ex.resolve({ status: ex.status, statusText: ex.statusText, headers: ex.headers, body });
  }

  /** The socket failed or closed. */
  private lost(err: Error | null): void {
    const socket = this.socket;
    this.socket = null;
    socket?.destroy();
    const ex = this.ex;
    if (!ex) return;
    if (!err && ex.headDone && ex.remaining === -1) {
      this.complete(ex); // body delimited by the close
      return;
    }
    if (!err && ex.headDone && ex.mode === 'into' && ex.remaining > 0) {
      this.fail(new NbdError(Errno.EIO, `short read: got ${ex.filled} of ${ex.spec.into!.length} bytes`));
      return;
    }
    this.fail(err ?? new WireError('the imageio server closed the connection', ex.answered ? 'UND_ERR_SOCKET' : 'ECONNRESET'));
  }

  private fail(err: Error): void {
    const ex = this.ex;
    if (!ex) return;
    this.ex = null;
    clearTimeout(ex.timer);
    if (!ex.answered) (err as { [NOT_ANSWERED]?: boolean })[NOT_ANSWERED] = true;
    this.drop();
    ex.reject(err);
  }

  /** Forget the socket (the next request opens a new one, and resets the head buffer). */
  private drop(): void {
    const socket = this.socket;
    this.socket = null;
    socket?.destroy();
  }

  /** Close the socket once idle; a request in flight is failed. */
  close(): void {
    if (this.ex) this.fail(new WireError('the connection was closed', 'UND_ERR_CLOSED'));
    const socket = this.socket;
    this.socket = null;
    socket?.end();
    socket?.destroySoon();
  }

  destroy(): void {
    if (this.ex) this.fail(new WireError('the connection was closed', 'UND_ERR_CLOSED'));
    this.drop();
  }
}
