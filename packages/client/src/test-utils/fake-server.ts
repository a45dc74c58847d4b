/**
 * A small scriptable NBD server for tests that need exact control over what goes on the wire
 * (extended headers, interleaved chunks, protocol violations). Built on the shared wire codec.
 * Not part of the package's public API.
 */
import net from 'node:net';
import {
  NBD,
  ChunkQueue,
  encodeGreeting,
  decodeOptionHeader,
  encodeOptionReply,
  decodeInfoRequest,
  encodeInfoExport,
  encodeInfoString,
  encodeInfoBlockSize,
  decodeMetaContextRequest,
  encodeMetaContextReply,
  encodeServerReply,
  encodeExportNameReply,
  decodeRequest,
  writeSimpleReplyHeader,
  writeChunkHeader,
  chunkHeaderSize,
  encodeErrorPayload,
  encodeBlockStatus,
  writeU64,
  type StatusDescriptor,
} from '@nbdx/server/wire';

export interface FakeRequest {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
  payload?: Buffer;
}

export interface FakeServerOptions {
  size?: number;
  /** Greeting flags (default FIXED_NEWSTYLE | NO_ZEROES). */
  handshakeFlags?: number;
  /** Accept NBD_OPT_EXTENDED_HEADERS (default false: ERR_UNSUP). */
  extended?: boolean;
  /** Accept NBD_OPT_STRUCTURED_REPLY (default true). */
  structured?: boolean;
  /** Support NBD_OPT_GO/INFO (default true; false answers ERR_UNSUP). */
  go?: boolean;
  /** Transmission flags (default: HAS_FLAGS + flush, FUA, trim, zeroes, DF, cache, fast zero). */
  flags?: number;
  /** Context names offered (default ['base:allocation']). */
  contexts?: string[];
  blockSize?: { minimum: number; preferred: number; maximum: number };
  /** Don't send the greeting at all (for timeout tests). */
  silent?: boolean;
  /**
   * Custom handling of a transmission request. Return true when handled; otherwise the default
   * in-memory behaviour applies.
   */
  onRequest?: (req: FakeRequest, conn: FakeConn) => boolean | void;
}

const DEFAULT_FLAGS =
  NBD.TF_HAS_FLAGS |
  NBD.TF_SEND_FLUSH |
  NBD.TF_SEND_FUA |
  NBD.TF_SEND_TRIM |
  NBD.TF_SEND_WRITE_ZEROES |
  NBD.TF_SEND_DF |
  NBD.TF_SEND_CACHE |
  NBD.TF_SEND_FAST_ZERO;

/** Byte reader over a socket for the fake server's handshake and request parsing. */
class Reader {
  readonly q = new ChunkQueue();
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private ended = false;

  constructor(sock: net.Socket) {
    sock.on('data', (c: Buffer) => {
      this.q.push(c);
      this.pump();
    });
    const end = (): void => {
      this.ended = true;
      const w = this.waiter;
      this.waiter = null;
      w?.reject(new Error('eof'));
    };
    sock.on('end', end);
    sock.on('close', end);
    sock.on('error', () => undefined);
  }

  private pump(): void {
    const w = this.waiter;
    if (w && this.q.length >= w.n) {
      this.waiter = null;
      w.resolve(Buffer.from(w.n > 0 ? this.q.take(w.n) : Buffer.alloc(0)));
    }
  }

  read(n: number): Promise<Buffer> {
    if (n === 0) return Promise.resolve(Buffer.alloc(0));
    if (this.q.length >= n) return Promise.resolve(Buffer.from(this.q.take(n)));
    if (this.ended) return Promise.reject(new Error('eof'));
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }
}

export class FakeConn {
  extended = false;
  structured = false;
  noZeroes = false;
  exportName = '';
  readonly contexts = new Map<number, string>();
  readonly requests: FakeRequest[] = [];
  /** Number of 'data' events seen during transmission (to observe write batching). */
  dataEvents = 0;

  constructor(
    readonly sock: net.Socket,
    private readonly server: FakeServer,
  ) {}

  write(b: Uint8Array): void {
    if (!this.sock.destroyed) this.sock.write(b);
  }

  /** Send one structured/extended chunk. */
  chunk(req: FakeRequest, type: number, flags: number, payload: Uint8Array = Buffer.alloc(0)): void {
    const hs = chunkHeaderSize(this.extended);
    const b = Buffer.allocUnsafe(hs + payload.length);
    writeChunkHeader(b, 0, this.extended, flags, type, req.cookie, req.offset, payload.length);
    b.set(payload, hs);
    this.write(b);
  }

  /** OFFSET_DATA chunk with `data` at absolute `offset`. */
  data(req: FakeRequest, offset: number, data: Uint8Array, done: boolean): void {
    const p = Buffer.allocUnsafe(8 + data.length);
    writeU64(p, offset, 0);
    p.set(data, 8);
    this.chunk(req, NBD.REPLY_TYPE_OFFSET_DATA, done ? NBD.REPLY_FLAG_DONE : 0, p);
  }

  hole(req: FakeRequest, offset: number, length: number, done: boolean): void {
    const p = Buffer.allocUnsafe(12);
    writeU64(p, offset, 0);
    p.writeUInt32BE(length, 8);
    this.chunk(req, NBD.REPLY_TYPE_OFFSET_HOLE, done ? NBD.REPLY_FLAG_DONE : 0, p);
  }

  error(req: FakeRequest, errno: number, message: string, done = true): void {
    this.chunk(req, NBD.REPLY_TYPE_ERROR, done ? NBD.REPLY_FLAG_DONE : 0, encodeErrorPayload(errno, message));
  }

  done(req: FakeRequest): void {
    this.chunk(req, NBD.REPLY_TYPE_NONE, NBD.REPLY_FLAG_DONE);
  }

  /** Simple reply (with data for READ success). */
  simple(req: FakeRequest, errno: number, data?: Uint8Array): void {
    const b = Buffer.allocUnsafe(16 + (data ? data.length : 0));
    writeSimpleReplyHeader(b, 0, errno, req.cookie);
    if (data) b.set(data, 16);
    this.write(b);
  }

  /** Success without data: NONE chunk, or a simple reply without structured replies. */
  ok(req: FakeRequest): void {
    if (this.structured) this.done(req);
    else this.simple(req, 0);
  }

  fail(req: FakeRequest, errno: number, message = ''): void {
    if (this.structured) this.error(req, errno, message);
    else this.simple(req, errno);
  }

  blockStatus(req: FakeRequest, contextId: number, extents: StatusDescriptor[], done: boolean, ext = this.extended): void {
    const type = ext ? NBD.REPLY_TYPE_BLOCK_STATUS_EXT : NBD.REPLY_TYPE_BLOCK_STATUS;
    this.chunk(req, type, done ? NBD.REPLY_FLAG_DONE : 0, encodeBlockStatus(contextId, extents, ext));
  }

  /** The default behaviour: an in-memory disk. */
  serveDefault(req: FakeRequest): void {
    const disk = this.server.disk;
    const end = req.offset + req.length;
    switch (req.type) {
      case NBD.CMD_READ: {
        if (end > disk.length) return this.fail(req, 22, 'read past the end');
        const data = disk.subarray(req.offset, end);
        if (this.structured) this.data(req, req.offset, data, true);
        else this.simple(req, 0, data);
        return;
      }
      case NBD.CMD_WRITE:
        if (end > disk.length) return this.fail(req, 28, 'write past the end');
        req.payload!.copy(disk, req.offset);
        return this.ok(req);
      case NBD.CMD_WRITE_ZEROES:
      case NBD.CMD_TRIM:
        if (end > disk.length) return this.fail(req, 22, 'past the end');
        disk.fill(0, req.offset, end);
        return this.ok(req);
      case NBD.CMD_BLOCK_STATUS: {
        if (this.contexts.size === 0) return this.fail(req, 22, 'no contexts');
        const ids = [...this.contexts.keys()];
        ids.forEach((id, i) => this.blockStatus(req, id, [{ length: req.length, flags: 0 }], i === ids.length - 1));
        return;
      }
      case NBD.CMD_FLUSH:
      case NBD.CMD_CACHE:
        return this.ok(req);
      default:
        return this.fail(req, 22, 'unknown command');
    }
  }

  async run(): Promise<void> {
    const o = this.server.options;
    const r = new Reader(this.sock);
    if (o.silent) return;
    const hflags = o.handshakeFlags ?? NBD.FLAG_FIXED_NEWSTYLE | NBD.FLAG_NO_ZEROES;
    this.write(encodeGreeting(hflags));
    const cflags = (await r.read(4)).readUInt32BE(0);
    this.noZeroes = (cflags & NBD.FLAG_C_NO_ZEROES) !== 0;
    this.server.clientFlags.push(cflags);
    const size = this.server.disk.length;
    const tflags = o.flags ?? DEFAULT_FLAGS;
    for (;;) {
      const h = decodeOptionHeader(await r.read(16));
      if (!h) return void this.sock.destroy();
      const data = await r.read(h.length);
      this.server.options_seen.push(h.option);
      const reply = (type: number, payload?: Uint8Array): void => this.write(encodeOptionReply(h.option, type, payload));
      const err = (type: number, msg: string): void => reply(type, Buffer.from(msg));
      switch (h.option) {
        case NBD.OPT_EXPORT_NAME:
          this.exportName = data.toString();
          this.write(encodeExportNameReply(size, tflags, this.noZeroes));
          return this.transmission(r);
        case NBD.OPT_ABORT:
          reply(NBD.REP_ACK);
          this.sock.end();
          return;
        case NBD.OPT_EXTENDED_HEADERS:
          if (!o.extended) err(NBD.REP_ERR_UNSUP, 'no extended headers here');
          else {
            this.extended = true;
            this.structured = true;
            reply(NBD.REP_ACK);
          }
          break;
        case NBD.OPT_STRUCTURED_REPLY:
          if (o.structured === false) err(NBD.REP_ERR_UNSUP, 'no structured replies here');
          else {
            this.structured = true;
            reply(NBD.REP_ACK);
          }
          break;
        case NBD.OPT_LIST:
          reply(NBD.REP_SERVER, encodeServerReply('one', 'first export'));
          reply(NBD.REP_SERVER, encodeServerReply('two'));
          reply(NBD.REP_ACK);
          break;
        case NBD.OPT_SET_META_CONTEXT: {
          const m = decodeMetaContextRequest(data);
          if (!m) {
            err(NBD.REP_ERR_INVALID, 'bad request');
            break;
          }
          const offered = o.contexts ?? [NBD.CONTEXT_BASE_ALLOCATION];
          this.contexts.clear();
          let id = 10;
          for (const q of m.queries) {
            if (!offered.includes(q)) continue;
            this.contexts.set(id, q);
            reply(NBD.REP_META_CONTEXT, encodeMetaContextReply(id, q));
            id++;
          }
          reply(NBD.REP_ACK);
          break;
        }
        case NBD.OPT_INFO:
        case NBD.OPT_GO: {
          if (o.go === false) {
            err(NBD.REP_ERR_UNSUP, 'no GO here');
            break;
          }
          const req = decodeInfoRequest(data);
          if (!req) {
            err(NBD.REP_ERR_INVALID, 'bad info request');
            break;
          }
          if (req.name !== '' && req.name !== 'fake') {
            err(NBD.REP_ERR_UNKNOWN, `no export named ${req.name}`);
            break;
          }
          reply(NBD.REP_INFO, encodeInfoExport(size, tflags));
          if (req.infos.includes(NBD.INFO_NAME)) reply(NBD.REP_INFO, encodeInfoString(NBD.INFO_NAME, 'fake'));
          if (req.infos.includes(NBD.INFO_DESCRIPTION)) reply(NBD.REP_INFO, encodeInfoString(NBD.INFO_DESCRIPTION, 'a fake disk'));
          if (o.blockSize) {
            const bs = o.blockSize;
            reply(NBD.REP_INFO, encodeInfoBlockSize(bs.minimum, bs.preferred, bs.maximum));
          }
          reply(NBD.REP_INFO, encodeInfoString(77, 'an info type nobody knows'));
          reply(NBD.REP_ACK);
          if (h.option === NBD.OPT_GO) {
            this.exportName = req.name;
            return this.transmission(r);
          }
          break;
        }
        default:
          err(NBD.REP_ERR_UNSUP, `option ${h.option} unsupported`);
      }
    }
  }

  private async transmission(r: Reader): Promise<void> {
    this.sock.on('data', () => this.dataEvents++);
    const hs = this.extended ? NBD.EXTENDED_REQUEST_SIZE : NBD.REQUEST_SIZE;
    for (;;) {
      let hb: Buffer;
      try {
        hb = await r.read(hs);
      } catch {
        return;
      }
      const d = decodeRequest(hb, this.extended);
      if (!d) return void this.sock.destroy();
      const req: FakeRequest = { ...d };
      const hasPayload = this.extended ? (d.flags & NBD.CMD_FLAG_PAYLOAD_LEN) !== 0 : d.type === NBD.CMD_WRITE;
      if (hasPayload) req.payload = await r.read(d.length);
      this.requests.push(req);
      if (d.type === NBD.CMD_DISC) {
        this.sock.end();
        return;
      }
      const handled = this.server.options.onRequest?.(req, this);
      if (!handled) this.serveDefault(req);
    }
  }
}

export class FakeServer {
  readonly disk: Buffer;
  readonly conns: FakeConn[] = [];
  readonly clientFlags: number[] = [];
  readonly options_seen: number[] = [];
  private readonly server: net.Server;

  private constructor(
    readonly options: FakeServerOptions,
    readonly path: string,
  ) {
    this.disk = Buffer.alloc(options.size ?? 1024 * 1024);
    this.server = net.createServer((sock) => {
      const c = new FakeConn(sock, this);
      this.conns.push(c);
      c.run().catch(() => sock.destroy());
    });
  }

  /** Listen on a Unix socket path, or on TCP `127.0.0.1` with an ephemeral port when `path` is 'tcp'. */
  static async start(path: string, options: FakeServerOptions = {}): Promise<FakeServer> {
    const s = new FakeServer(options, path);
    await new Promise<void>((resolve, reject) => {
      s.server.once('error', reject);
      if (path === 'tcp') s.server.listen(0, '127.0.0.1', () => resolve());
      else s.server.listen(path, () => resolve());
    });
    return s;
  }

  /** TCP port (when started with 'tcp'). */
  get port(): number {
    return (this.server.address() as net.AddressInfo).port;
  }

  get last(): FakeConn {
    return this.conns[this.conns.length - 1]!;
  }

  async close(): Promise<void> {
    for (const c of this.conns) c.sock.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
