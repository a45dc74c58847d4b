/**
 * A test imageio server (tests and bench only; not part of the package's dist). It follows
 * /work/shared/imageio-api.md: OPTIONS (also the read-only, 405 and 204 forms), Range GET with
 * 206/416, PUT with Content-Range and a required Content-Length, PATCH zero/flush with JSON
 * booleans, extents, per-connection flush tracking, 403 after expiry, silent close of idle
 * connections, optional TLS and an optional Unix socket (the "local service").
 *
 * The image is kept in memory in blocks; a block never written (or zeroed whole on a sparse
 * ticket) is unallocated and reported as a zero extent (`hole` too with `reportHoles`).
 */
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { rmSync } from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import type { AddressInfo, Socket } from 'node:net';

export type Op = 'read' | 'write';

export interface TestServerOptions {
  /** Ticket size in bytes: requests past it get 416, Content-Range totals say it. */
  size: number;
  /**
   * Size of the backend (the NBD export behind the ticket), default `size`. A real ticket may be
   * smaller than its backend: the extents then cover the whole backend, past the ticket's end.
   */
  backendSize?: number;
  /**
   * Behave like imageio's proxy mode (the http backend): each client connection fetches the
   * extents from "upstream" on its first extents request and answers every later one on that
   * connection from that copy, writes or not. No Unix socket is advertised (the engine's proxy
   * has no local service) unless `advertiseUnixSocket` says otherwise.
   */
  proxy?: boolean;
  ticket?: string;
  ops?: Op[];
  /** 'old-405': daemon < 1.3 (no OPTIONS); 'old-204': old proxy. Both: GET/PUT only, always flush. */
  mode?: 'modern' | 'old-405' | 'old-204';
  /** Override the advertised features (modern mode). */
  features?: string[];
  maxReaders?: number;
  maxWriters?: number;
  /** Leave max_readers/max_writers out of OPTIONS (an older server: clients assume 1). */
  omitMax?: boolean;
  /** Also serve the local service on this Unix socket: a path, or an abstract name "\0…". */
  unixSocket?: string;
  /** What OPTIONS says in unix_socket (default: `unixSocket`, or nothing). */
  advertiseUnixSocket?: string | null;
  tls?: { key: string | Buffer; cert: string | Buffer };
  /** Idle connections are closed silently after this long (default 60 s). */
  inactivityTimeoutMs?: number;
  /** The ticket expires this long after the last request (default 300 s). */
  ticketTimeoutMs?: number;
  reportHoles?: boolean;
  /** Zero deallocates whole blocks (default true). */
  sparse?: boolean;
  blockSize?: number;
  /** Delay every PUT and PATCH by this much (to spread concurrent writes over connections). */
  writeDelayMs?: number;
  /** Content-Range of GET answers ends with `*` instead of the size (an old server). */
  hideSize?: boolean;
  host?: string;
  /**
   * Keep every request in `requests` (default true; the tests look at it). A long bench turns
   * it off: tens of thousands of kept log objects made every garbage collection slower, a cost
   * the real daemon does not have. `counts` is kept either way.
   */
  keepRequests?: boolean;
}

export interface ConnectionStats {
  id: number;
  transport: 'tcp' | 'unix';
  requests: number;
  /** PUTs and zeroes on this connection. */
  writes: number;
  /** Writes since this connection's backend was last flushed. */
  unflushed: number;
  /** PATCH flush requests. */
  flushes: number;
  /** PUTs with flush=y (or old-server PUTs, which always flush). */
  flushedPuts: number;
  closed: boolean;
  closedIdle: boolean;
  /** Proxy mode: extents requests answered from this connection's copy. */
  staleExtents?: number;
}

export interface RequestLog {
  conn: number;
  transport: 'tcp' | 'unix';
  method: string;
  url: string;
  status: number;
  /** The JSON body of a PATCH. */
  json?: unknown;
  dropped?: boolean;
}

/**
 * Sparse in-memory image, kept the way a real backend keeps it: a few large slabs of memory
 * (allocated on first write) and one byte per block saying whether the block is allocated.
 * Why not one Buffer per block: a 1 GiB image would be 16384 small heap objects, and every
 * major garbage collection (frequent while request bodies come in as new Buffers) walked
 * them all: a quarter of this server's CPU per GiB written, a cost the real daemon, which
 * writes to a file or an NBD server, does not have.
 */
export class BlockStore {
  private readonly slabs: (Buffer | undefined)[];
  /** Bytes per slab: a whole number of blocks, at most SLAB bytes (less for small images). */
  private readonly slabSize: number;
  /** 1 for an allocated block (written, or zeroed without deallocation). */
  private readonly map: Uint8Array;

  constructor(
    readonly size: number,
    readonly blockSize = 64 * 1024,
  ) {
    const SLAB = 16 * 1024 * 1024;
    this.slabSize = Math.max(blockSize, Math.floor(Math.min(SLAB, Math.max(size, 1)) / blockSize) * blockSize);
    this.slabs = new Array<Buffer | undefined>(Math.ceil(size / this.slabSize));
    this.map = new Uint8Array(Math.ceil(size / blockSize));
  }

  /** A copy of the bytes (unallocated ones read as zero). */
  read(offset: number, length: number): Buffer {
    const out = Buffer.alloc(length);
    this.each(offset, length, (slab, inSlab, pos, n) => {
      if (slab) slab.copy(out, pos, inSlab, inSlab + n);
    });
    return out;
  }

  /**
   * The bytes without a copy when they lie in one allocated slab (what a server streaming from
   * its backend sends), else a copy. Only valid until the next write or zero.
   */
  view(offset: number, length: number): Buffer {
    const s = Math.floor(offset / this.slabSize);
    const inSlab = offset - s * this.slabSize;
    const slab = this.slabs[s];
    if (slab && inSlab + length <= this.slabSize) return slab.subarray(inSlab, inSlab + length);
    return this.read(offset, length);
  }

  write(offset: number, data: Uint8Array): void {
    this.each(offset, data.length, (slab, inSlab, pos, n, s) => {
      const target = slab ?? (this.slabs[s] = Buffer.alloc(this.slabSize));
      target.set(data.subarray(pos, pos + n), inSlab);
    });
    this.mark(offset, data.length, 1);
  }

  zero(offset: number, length: number, deallocate: boolean): void {
    this.each(offset, length, (slab, inSlab, _pos, n) => {
      if (slab) slab.fill(0, inSlab, inSlab + n);
    });
    if (!deallocate) {
      this.mark(offset, length, 1);
      return;
    }
    // Only whole blocks become unallocated (a hole punched in a file does the same).
    const first = Math.ceil(offset / this.blockSize);
    const end = Math.floor(Math.min(offset + length, this.size) / this.blockSize);
    if (end > first) this.map.fill(0, first, end);
  }

  allocated(block: number): boolean {
    return this.map[block] === 1;
  }

  /** The zero-context extents imageio would report, merged. */
  extents(reportHoles: boolean): { start: number; length: number; zero: boolean; hole: boolean }[] {
    const out: { start: number; length: number; zero: boolean; hole: boolean }[] = [];
    const nblocks = this.map.length;
    for (let b = 0; b < nblocks; b++) {
      const start = b * this.blockSize;
      const length = Math.min(this.blockSize, this.size - start);
      const zero = this.map[b] !== 1;
      const hole = zero && reportHoles;
      const last = out[out.length - 1];
      if (last && last.zero === zero && last.hole === hole) last.length += length;
      else out.push({ start, length, zero, hole });
    }
    return out;
  }

  /** Mark the blocks touched by [offset, offset+length) (writes allocate partial blocks too). */
  private mark(offset: number, length: number, value: 0 | 1): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((Math.min(offset + length, this.size) - 1) / this.blockSize);
    this.map.fill(value, first, last + 1);
  }

  /** Walk [offset, offset+length) slab by slab. */
  private each(
    offset: number,
    length: number,
    fn: (slab: Buffer | undefined, inSlab: number, pos: number, n: number, index: number) => void,
  ): void {
    let pos = 0;
    while (pos < length) {
      const abs = offset + pos;
      const s = Math.floor(abs / this.slabSize);
      const inSlab = abs - s * this.slabSize;
      const n = Math.min(this.slabSize - inSlab, length - pos);
      fn(this.slabs[s], inSlab, pos, n, s);
      pos += n;
    }
  }
}

interface ConnState extends ConnectionStats {
  /** Proxy mode: the extents as fetched on this connection's first extents request. */
  extentsCopy?: { start: number; length: number; zero: boolean; hole: boolean }[];
  socket: Socket;
  idleTimer: NodeJS.Timeout | null;
  busy: number;
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly extraHeaders: Record<string, string> = {},
  ) {
    super(message);
  }
}

export class TestImageioServer {
  readonly ticket: string;
  /** The backend: `backendSize` (default `size`) bytes. */
  readonly store: BlockStore;
  /** The ticket's size (≤ the backend's). */
  readonly size: number;
  readonly options: TestServerOptions;
  ops: Op[];
  readonly connections: ConnectionStats[] = [];
  readonly requests: RequestLog[] = [];
  /** Requests per method, kept even when `requests` is not. */
  readonly counts = new Map<string, number>();
  private states = new WeakMap<Socket, ConnState>();
  private servers: http.Server[] = [];
  private expired = false;
  private expiresAt = 0;
  private drop = 0;
  private stall = 0;
  private failures: { status: number; body: string }[] = [];
  private stalled: http.ServerResponse[] = [];
  port = 0;
  url = '';

  private constructor(options: TestServerOptions) {
    this.options = options;
    this.ticket = options.ticket ?? randomUUID();
    this.ops = options.ops ?? ['read', 'write'];
    this.size = options.size;
    this.store = new BlockStore(options.backendSize ?? options.size, options.blockSize);
    if (this.store.size < this.size) throw new Error('backendSize must not be smaller than size');
    this.touch();
  }

  static async start(options: TestServerOptions): Promise<TestImageioServer> {
    const s = new TestImageioServer(options);
    await s.listen();
    return s;
  }

  private async listen(): Promise<void> {
    const o = this.options;
    const handler = (transport: 'tcp' | 'unix') => (req: http.IncomingMessage, res: http.ServerResponse) =>
      void this.handle(transport, req, res);
    const tcp = o.tls ? https.createServer({ key: o.tls.key, cert: o.tls.cert }, handler('tcp')) : http.createServer(handler('tcp'));
    this.tune(tcp);
    tcp.listen(0, o.host ?? '127.0.0.1');
    await once(tcp, 'listening');
    this.servers.push(tcp);
    this.port = (tcp.address() as AddressInfo).port;
    this.url = `${o.tls ? 'https' : 'http'}://${o.host ?? '127.0.0.1'}:${this.port}/images/${this.ticket}`;
    if (o.unixSocket) {
      const local = http.createServer(handler('unix'));
      this.tune(local);
      // An abstract name ("\0…") is bound with its real length on Node 22+, as Python binds it.
      if (!o.unixSocket.startsWith('\0')) rmSync(o.unixSocket, { force: true });
      local.listen(o.unixSocket);
      await once(local, 'listening');
      this.servers.push(local);
    }
  }

  private tune(server: http.Server): void {
    // Idle connections are handled by our own inactivity timer, as imageio does.
    server.keepAliveTimeout = 0;
    server.requestTimeout = 0;
    server.headersTimeout = 60_000;
  }

  get inactivityTimeoutMs(): number {
    return this.options.inactivityTimeoutMs ?? 60_000;
  }

  private touch(): void {
    this.expiresAt = Date.now() + (this.options.ticketTimeoutMs ?? 300_000);
  }

  // ---- test hooks ---------------------------------------------------------------------------
  /** Make the ticket expire now: every later request gets 403. */
  expire(): void {
    this.expired = true;
  }
  /** Close the connection of the next `n` requests without answering (a race with idle close). */
  dropNext(n = 1): void {
    this.drop += n;
  }
  /** Never answer the next `n` requests. */
  stallNext(n = 1): void {
    this.stall += n;
  }
  /** Answer the next request with this status and body. */
  failNext(status: number, body: string): void {
    this.failures.push({ status, body });
  }
  /** How many requests came in on each listener ('tcp' or 'unix'). */
  requestsOn(transport: 'tcp' | 'unix'): number {
    return this.requests.filter((r) => r.transport === transport).length;
  }
  /** Connections that wrote and were not flushed since. */
  dirtyConnections(): ConnectionStats[] {
    return this.connections.filter((c) => c.unflushed > 0);
  }
  /** Close idle connections now, silently (as when the inactivity timeout fires). */
  closeIdleConnections(): number {
    let n = 0;
    for (const c of this.connections as ConnState[]) {
      if (!c.closed && c.busy === 0) {
        c.closedIdle = true;
        c.socket.destroy();
        n++;
      }
    }
    return n;
  }

  async close(): Promise<void> {
    for (const res of this.stalled) res.destroy();
    for (const c of this.connections as ConnState[]) {
      if (c.idleTimer) clearTimeout(c.idleTimer);
      c.socket.destroy();
    }
    await Promise.all(this.servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
    if (this.options.unixSocket && !this.options.unixSocket.startsWith('\0')) rmSync(this.options.unixSocket, { force: true });
  }

  // ---- connections ---------------------------------------------------------------------------
  private stateOf(socket: Socket, transport: 'tcp' | 'unix'): ConnState {
    let st = this.states.get(socket);
    if (!st) {
      st = {
        id: this.connections.length,
        transport,
        requests: 0,
        writes: 0,
        unflushed: 0,
        flushes: 0,
        flushedPuts: 0,
        closed: false,
        closedIdle: false,
        socket,
        idleTimer: null,
        busy: 0,
      };
      const s = st;
      this.states.set(socket, st);
      this.connections.push(st);
      socket.on('close', () => {
        s.closed = true;
        if (s.idleTimer) clearTimeout(s.idleTimer);
      });
    }
    return st;
  }

  private idle(st: ConnState): void {
    if (st.idleTimer) clearTimeout(st.idleTimer);
    st.idleTimer = setTimeout(() => {
      if (st.busy === 0 && !st.closed) {
        st.closedIdle = true;
        st.socket.destroy(); // silently: FIN, no response
      }
    }, this.inactivityTimeoutMs);
  }

  // ---- requests ------------------------------------------------------------------------------
  private async handle(transport: 'tcp' | 'unix', req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const st = this.stateOf(req.socket, transport);
    st.requests++;
    st.busy++;
    if (st.idleTimer) clearTimeout(st.idleTimer);
    const log: RequestLog = { conn: st.id, transport, method: req.method ?? '', url: req.url ?? '', status: 0 };
    if (this.options.keepRequests !== false) this.requests.push(log);
    this.counts.set(log.method, (this.counts.get(log.method) ?? 0) + 1);
    res.on('finish', () => {
      st.busy--;
      if (st.busy === 0) this.idle(st);
    });
    res.on('close', () => {
      if (!res.writableFinished) st.busy = Math.max(0, st.busy - 1);
    });

    if (this.drop > 0) {
      this.drop--;
      log.dropped = true;
      req.socket.destroy();
      return;
    }
    if (this.stall > 0) {
      this.stall--;
      this.stalled.push(res);
      return;
    }
    try {
      const failure = this.failures.shift();
      if (failure) throw new HttpError(failure.status, failure.body);
      await this.route(st, req, res, log);
    } catch (err) {
      const e = err instanceof HttpError ? err : new HttpError(500, 'Server failed to perform the request, check logs');
      log.status = e.status;
      if (res.headersSent) {
        req.socket.destroy();
        return;
      }
      const body = `${e.message}\n`;
      const headers: Record<string, string> = {
        'content-type': 'text/plain; charset=UTF-8',
        'content-length': String(Buffer.byteLength(body)),
        ...e.extraHeaders,
      };
      // An error before the request body was read (or any 403) closes the connection.
      if (e.status === 403 || !req.complete) headers.connection = 'close';
      res.writeHead(e.status, headers);
      res.end(body);
    }
  }

  private async route(st: ConnState, req: http.IncomingMessage, res: http.ServerResponse, log: RequestLog): Promise<void> {
    const u = new URL(req.url ?? '/', 'http://x');
    const path = decodeURIComponent(u.pathname);
    const method = req.method ?? '';
    const old = this.options.mode === 'old-405' || this.options.mode === 'old-204';
    if (!['GET', 'PUT', 'PATCH', 'POST', 'DELETE', 'OPTIONS', 'HEAD'].includes(method)) {
      throw new HttpError(405, `Method '${method}' not allowed`);
    }
    if (path === '/images/*' && method === 'OPTIONS' && !old) {
      return this.json(res, log, { unix_socket: this.advertisedSocket(), features: ['checksum', 'extents', 'flush', 'zero'] });
    }
    // imageio routes "/images/(.*)/extents" and "/images/(.*)": a trailing slash is part of the
    // ticket id ("/images/T/" asks for the ticket "T/").
    const m = /^\/images\/(.*?)(\/extents)?$/.exec(path);
    if (!m) throw new HttpError(404, `No handler for '${path}'`);
    if (m[1] === '') throw new HttpError(400, 'Ticket id is required');
    if (m[2] && old) throw new HttpError(404, `No handler for '${path}'`);
    if (m[1] !== this.ticket) throw new HttpError(403, `You are not allowed to access this resource: No such ticket ${m[1]}`);
    if (this.expired || Date.now() > this.expiresAt) {
      this.expired = true;
      throw new HttpError(403, `You are not allowed to access this resource: Transfer=${this.ticket} expired`);
    }
    const write = method === 'PUT' || method === 'PATCH';
    if (write && !this.ops.includes('write')) {
      throw new HttpError(403, `You are not allowed to access this resource: Ticket ${this.ticket} forbids write`);
    }
    try {
      if (m[2]) {
        if (method !== 'GET') throw new HttpError(405, `Method '${method}' not defined for ${path}`);
        return this.extents(st, u, res, log);
      }
      switch (method) {
        case 'OPTIONS':
          return this.optionsRequest(res, log);
        case 'GET':
          return await this.get(req, res, log);
        case 'PUT':
          return await this.put(st, req, res, u, log);
        case 'PATCH':
          if (old) throw new HttpError(405, `Method 'PATCH' not defined for ${path}`);
          return await this.patch(st, req, res, log);
        default:
          throw new HttpError(405, `Method '${method}' not defined for ${path}`);
      }
    } finally {
      this.touch();
    }
  }

  private advertisedSocket(): string | undefined {
    const a = this.options.advertiseUnixSocket;
    if (a === null) return undefined;
    if (a === undefined && this.options.proxy) return undefined;
    return a ?? this.options.unixSocket;
  }

  private json(res: http.ServerResponse, log: RequestLog, value: unknown, extra: Record<string, string> = {}): void {
    const body = JSON.stringify(value);
    log.status = 200;
    res.writeHead(200, { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)), ...extra });
    res.end(body);
  }

  private optionsRequest(res: http.ServerResponse, log: RequestLog): void {
    const o = this.options;
    if (o.mode === 'old-405') throw new HttpError(405, `Method 'OPTIONS' not defined for /images/${this.ticket}`);
    if (o.mode === 'old-204') {
      log.status = 204;
      res.writeHead(204);
      res.end();
      return;
    }
    const writable = this.ops.includes('write');
    const features = o.features ?? (writable ? ['checksum', 'extents', 'flush', 'zero'] : ['checksum', 'extents']);
    const value: Record<string, unknown> = {};
    const sock = this.advertisedSocket();
    if (sock !== undefined) value.unix_socket = sock;
    value.features = features;
    if (!o.omitMax) {
      value.max_readers = o.maxReaders ?? 8;
      value.max_writers = o.maxWriters ?? 8;
    }
    this.json(res, log, value, { allow: writable ? 'OPTIONS,GET,PUT,PATCH' : 'OPTIONS,GET' });
  }

  private extents(st: ConnState, u: URL, res: http.ServerResponse, log: RequestLog): void {
    const context = u.searchParams.get('context') ?? 'zero';
    if (context === 'dirty') throw new HttpError(404, 'Ticket does not support dirty extents');
    if (context !== 'zero') throw new HttpError(400, `Invalid context '${context}'`);
    // Like imageio, the whole backend's extents, also past the end of a smaller ticket.
    if (!this.options.proxy) return this.json(res, log, this.store.extents(!!this.options.reportHoles));
    if (st.extentsCopy) st.staleExtents = (st.staleExtents ?? 0) + 1;
    else st.extentsCopy = this.store.extents(!!this.options.reportHoles);
    this.json(res, log, st.extentsCopy);
  }

  private async get(req: http.IncomingMessage, res: http.ServerResponse, log: RequestLog): Promise<void> {
    // Ranges are checked against the ticket; without a Range the whole image is min(ticket, backend).
    const size = Math.min(this.size, this.store.size);
    const range = req.headers.range;
    let first = 0;
    let last = size - 1;
    let status = 200;
    if (range !== undefined) {
      const m = /^bytes=(\d+)-(\d*)$/.exec(range);
      const tooBig = () => new HttpError(416, 'Requested range not satisfiable', { 'content-range': `bytes */${this.size}` });
      if (!m) throw tooBig();
      first = Number(m[1]);
      last = m[2] === '' ? size - 1 : Number(m[2]);
      if (first > last || last >= size) throw tooBig();
      status = 206;
    }
    const length = last - first + 1;
    const headers: Record<string, string> = {
      'content-length': String(length),
      'content-type': 'application/octet-stream',
      'content-disposition': 'attachment',
    };
    if (status === 206) headers['content-range'] = `bytes ${first}-${last}/${this.options.hideSize ? '*' : this.size}`;
    log.status = status;
    res.writeHead(status, headers);
    const step = 1024 * 1024;
    for (let pos = 0; pos < length; pos += step) {
      const chunk = this.store.view(first + pos, Math.min(step, length - pos));
      if (!res.write(chunk)) await once(res, 'drain');
    }
    res.end();
  }

  private async put(
    st: ConnState,
    req: http.IncomingMessage,
    res: http.ServerResponse,
    u: URL,
    log: RequestLog,
  ): Promise<void> {
    const old = this.options.mode === 'old-405' || this.options.mode === 'old-204';
    const flushParam = u.searchParams.get('flush') ?? 'y';
    if (!old && flushParam !== 'y' && flushParam !== 'n') throw new HttpError(400, `Invalid flush value '${flushParam}'`);
    const cl = req.headers['content-length'];
    if (cl === undefined || req.headers['transfer-encoding'] !== undefined) {
      throw new HttpError(400, 'Content-Length header is required');
    }
    const length = Number(cl);
    let offset = 0;
    const cr = req.headers['content-range'];
    if (cr !== undefined) {
      const m = /^bytes (\d+)-(\d+|\*)\/(\d+|\*)$/.exec(cr);
      if (!m) throw new HttpError(400, `Invalid Content-Range: ${cr}`);
      offset = Number(m[1]);
      if (m[2] !== '*' && Number(m[2]) < offset) throw new HttpError(400, `Invalid Content-Range: ${cr}`);
      if (m[2] !== '*' && m[3] !== '*' && Number(m[2]) >= Number(m[3])) throw new HttpError(400, `Invalid Content-Range: ${cr}`);
    }
    if (offset + length > this.size) {
      throw new HttpError(416, 'Requested range not satisfiable', { 'content-range': `bytes */${this.size}` });
    }
    st.writes++;
    st.unflushed++;
    let pos = 0;
    for await (const chunk of req as AsyncIterable<Buffer>) {
      const take = Math.min(chunk.length, length - pos);
      if (take > 0) this.store.write(offset + pos, chunk.subarray(0, take));
      pos += chunk.length;
    }
    if (pos !== length) throw new HttpError(400, `partial content: got ${pos} of ${length} bytes`);
    await this.delay();
    if (old || flushParam === 'y') {
      st.flushedPuts++;
      st.unflushed = 0;
    }
    log.status = 200;
    res.writeHead(200, { 'content-length': '0' });
    res.end();
  }

  private async patch(st: ConnState, req: http.IncomingMessage, res: http.ServerResponse, log: RequestLog): Promise<void> {
    if (req.headers['content-length'] === undefined) throw new HttpError(400, 'Content-Length header is required');
    const chunks: Buffer[] = [];
    for await (const chunk of req as AsyncIterable<Buffer>) chunks.push(chunk);
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(Buffer.concat(chunks).toString('utf8')) as Record<string, unknown>;
    } catch (err) {
      throw new HttpError(400, `Invalid JSON message: ${(err as Error).message}`);
    }
    log.json = msg;
    if (msg === null || typeof msg !== 'object') throw new HttpError(400, 'Invalid JSON message: not an object');
    const op = msg.op;
    if (op !== 'zero' && op !== 'flush') {
      throw new HttpError(400, `Unsupported value ${JSON.stringify(op)} for 'op', expecting one of ['flush', 'zero']`);
    }
    await this.delay();
    if (op === 'flush') {
      st.flushes++;
      st.unflushed = 0;
      log.status = 200;
      res.writeHead(200, { 'content-length': '0' });
      res.end();
      return;
    }
    const int = (key: string, required: boolean, dflt: number): number => {
      const v = msg[key];
      if (v === undefined) {
        if (required) throw new HttpError(400, `Missing required value for '${key}'`);
        return dflt;
      }
      if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) throw new HttpError(400, `Invalid value for '${key}': ${JSON.stringify(v)}`);
      return v;
    };
    const size = int('size', true, 0);
    const offset = int('offset', false, 0);
    const flush = msg.flush ?? false;
    if (typeof flush !== 'boolean') throw new HttpError(400, `Boolean required ${JSON.stringify(flush)}`);
    if (offset + size > this.size) {
      throw new HttpError(416, 'Requested range not satisfiable', { 'content-range': `bytes */${this.size}` });
    }
    st.writes++;
    st.unflushed++;
    this.store.zero(offset, size, this.options.sparse ?? true);
    if (flush) st.unflushed = 0;
    log.status = 200;
    res.writeHead(200, { 'content-length': '0' });
    res.end();
  }

  private async delay(): Promise<void> {
    const ms = this.options.writeDelayMs ?? 0;
    if (ms > 0) await new Promise((r) => setTimeout(r, ms));
  }
}
