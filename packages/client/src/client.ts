import { EventEmitter } from 'node:events';
import net from 'node:net';
import * as tls from 'node:tls';
import type { Duplex } from 'node:stream';
import {
  NBD,
  ChunkQueue,
  readU64,
  decodeGreeting,
  decodeOldstyleGreeting,
  OLDSTYLE_GREETING_SIZE,
  encodeClientFlags,
  encodeOption,
  decodeOptionReplyHeader,
  encodeInfoRequest,
  decodeInfoReply,
  encodeMetaContextRequest,
  decodeMetaContextReply,
  decodeServerReply,
  decodeExportNameReply,
  encodeRequest,
  decodeReplyHeader,
  decodeErrorPayload,
  decodeBlockStatus,
  decodeOffsetHole,
} from '@nbdx/server/wire';
import {
  ERRNO,
  NbdConnectionError,
  NbdOptionError,
  NbdProtocolError,
  NbdRequestError,
  NbdTlsError,
  commandName,
} from './errors.js';
import { resolveTarget, type NbdTarget, type ResolvedTarget } from './target.js';
import { planTls, tlsFailure, type TlsOptions, type TlsPlan } from './tls.js';

// ---------------------------------------------------------------------------------------------
// Public types

export interface ConnectOptions extends TlsOptions {
  /** Export to open; overrides the name in a URI. Default: the URI's name, else `''`. */
  exportName?: string;
  /** Negotiate structured replies (NBD_OPT_STRUCTURED_REPLY). Default true. Turning this off
   * also turns off extended headers and metadata contexts. */
  structuredReplies?: boolean;
  /** Try NBD_OPT_EXTENDED_HEADERS first (falls back to structured replies on any error reply).
   * Default true. */
  extendedHeaders?: boolean;
  /** Metadata contexts to select with NBD_OPT_SET_META_CONTEXT when structured replies are on.
   * Default `['base:allocation']`; `[]` selects none. */
  metaContexts?: readonly string[];
  /** NBD_INFO_* items requested with NBD_OPT_GO. Default NAME, DESCRIPTION, BLOCK_SIZE. */
  requestInfos?: readonly number[];
  /** Milliseconds allowed for connecting plus the whole handshake. Default 30000; 0 = none. */
  timeout?: number;
  /** Refuse servers that do not offer fixed newstyle negotiation (oldstyle, plain newstyle).
   * Default false: such servers are used through their only way in (no options). */
  fixedNewstyleOnly?: boolean;
  /** Check requests made through the friendly methods before sending them, like libnbd's strict
   * mode: advertised commands and flags, read-only, bounds, minimum block size alignment.
   * Default true. `request()` never checks. */
  strict?: boolean;
  /** Receive large data chunks straight into the destination buffer (uses net's `onread`; only
   * for plain sockets this client opens itself, never with TLS on). Default true. */
  directReads?: boolean;
  /** Milliseconds a request may wait for its reply. When the oldest request in flight has waited
   * this long the server is taken for gone: the connection is closed and every request fails
   * with an NbdConnectionError whose `code` is `'ETIMEDOUT'`. Default 0: wait for ever. */
  requestTimeout?: number;
}

export interface BlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** One block status descriptor. */
export interface Extent {
  length: number;
  flags: number;
}

/** A range inside a caller's buffer (used for the zero ranges of preadInto). */
export interface Span {
  start: number;
  length: number;
}

export interface RawRequest {
  /** NBD.CMD_* (any number; sent as is). */
  type: number;
  flags?: number;
  offset?: number;
  length?: number;
  /** Bytes sent right after the header (for WRITE). With extended headers remember
   * NBD.CMD_FLAG_PAYLOAD_LEN: nothing is added for you. */
  payload?: Uint8Array;
}

/** One structured/extended reply chunk as received (for request()). */
export interface RawChunk {
  type: number;
  flags: number;
  /** Payload length from the chunk header. */
  payloadLength: number;
  /** OFFSET_DATA / OFFSET_HOLE: absolute offset; ERROR_OFFSET: the offset it names. */
  offset?: number;
  /** OFFSET_DATA: data bytes; OFFSET_HOLE: hole length. */
  length?: number;
  errno?: number;
  message?: string;
  contextId?: number;
  context?: string;
  extents?: Extent[];
}

export interface RawReply {
  /** NBD error number; 0 on success (the first error chunk's, or the simple reply's). */
  error: number;
  /** The server's error message, if it sent one. */
  message?: string;
  /** Offset from an ERROR_OFFSET chunk. */
  errorOffset?: number;
  /** READ: the bytes received (holes read as zeroes). Absent when no data or hole arrived. */
  data?: Buffer;
  /** Structured/extended chunks in arrival order (empty for a simple reply). */
  chunks: RawChunk[];
  /** True when the server answered with a simple reply. */
  simple: boolean;
  /** BLOCK_STATUS: extents per context name. */
  status?: Map<string, Extent[]>;
  /** A protocol rule the reply broke (request() reports instead of rejecting). */
  violation?: string;
}

export interface ExportInfo {
  /** The name that was asked for. */
  exportName: string;
  /** Canonical name, if the server sent NBD_INFO_NAME. */
  name?: string;
  size: number;
  transmissionFlags: number;
  description?: string;
  blockSize?: BlockSize;
}

export interface ExportListEntry {
  name: string;
  description: string;
}

export interface NegotiationOptions extends TlsOptions {
  /** Milliseconds for the whole exchange. Default 30000; 0 = none. */
  timeout?: number;
  /** NBD_INFO_* items for info(). Default NAME, DESCRIPTION, BLOCK_SIZE. */
  requestInfos?: readonly number[];
}

// ---------------------------------------------------------------------------------------------
// Internals

const DEFAULT_INFOS = [NBD.INFO_NAME, NBD.INFO_DESCRIPTION, NBD.INFO_BLOCK_SIZE] as const;
const MAX_OPTION_REPLY = 16 * 1024 * 1024;
const MAX_META_PAYLOAD = 64 * 1024 * 1024 + 64;
const U32_MAX = 0xffffffff;

// Request modes.
const M_RAW = 0;
const M_READ_ZERO = 1; // pread: holes zero-filled
const M_READ_SPANS = 2; // preadInto: holes reported
const M_STATUS = 3;
const M_PLAIN = 4;

// Receive states.
const RS_HEADER = 0;
const RS_PAYLOAD = 1; // whole payload of a non-data chunk
const RS_DATA_OFFSET = 2; // the 8-byte offset of OFFSET_DATA
const RS_DATA = 3; // data bytes going into rdst (or skipped when rdst is null)

// Write batching.
const SLAB_SIZE = 64 * 1024;
const COPY_PAYLOAD_MAX = 8 * 1024;
// Direct receive.
const SCRATCH_SIZE = 256 * 1024;
const SCRATCH_MIN = 64 * 1024;
const DIRECT_MIN = 16 * 1024;

interface Pending {
  cookie: bigint;
  type: number;
  flags: number;
  offset: number;
  length: number;
  mode: number;
  buf: Buffer | null;
  bufAt: number;
  holes: Span[] | null;
  spans: number[] | null;
  covered: number;
  simple: boolean;
  errno: number;
  message: string | undefined;
  errorOffset: number | undefined;
  violation: string | undefined;
  status: Map<string, Extent[]> | null;
  chunks: RawChunk[] | null;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  /** Date.now() when sent; only kept with a request timeout. */
  sentAt: number;
}

interface OptionReply {
  type: number;
  data: Buffer;
}

type Phase = 'handshake' | 'transmission' | 'closing' | 'closed';

export interface NbdClient {
  on(event: 'close', listener: (error?: Error) => void): this;
  once(event: 'close', listener: (error?: Error) => void): this;
  off(event: 'close', listener: (error?: Error) => void): this;
  emit(event: 'close', error?: Error): boolean;
}

/**
 * An NBD client connection. Create one with `NbdClient.connect()`. Any number of requests may be
 * in flight; replies are matched by cookie.
 *
 * Events: `'close' (error?)` once the connection is gone; `error` is set unless the close was
 * asked for (disconnect()/close()).
 */
export class NbdClient extends EventEmitter {
  private socket: Duplex | null = null;
  private readonly queue = new ChunkQueue();
  private phase: Phase = 'handshake';
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private deathError: NbdConnectionError | null = null;
  private discSent = false;
  private closeRequested = false;
  private readonly drainWaiters: Array<() => void> = [];
  private readonly closeWaiters: Array<() => void> = [];
  /** The plain socket under TLS, once STARTTLS wrapped it. */
  private rawSocket: Duplex | null = null;
  /** Takes our listeners off the socket (before STARTTLS hands it to TLS). */
  private detach: (() => void) | null = null;
  /** Fails a handshake step that waits on something other than bytes (the TLS handshake). */
  private stepAbort: ((e: Error) => void) | null = null;
  private _tls = false;
  /** Set from the TLS handshake until the first option reply inside TLS arrives. */
  private tlsFresh: TlsPlan | null = null;

  private readonly strict: boolean;
  private readonly directReads: boolean;
  private readonly requestTimeout: number;
  private watchdog: NodeJS.Timeout | null = null;

  // Negotiated.
  private _size = 0;
  private _flags = 0;
  private _exportName = '';
  private _description: string | undefined;
  private _blockSize: BlockSize | undefined;
  private _structured = false;
  private _extended = false;
  private readonly _contexts = new Map<string, number>();
  private readonly contextNames = new Map<number, string>();

  // Requests.
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;

  // Receive state.
  private rs = RS_HEADER;
  private rp: Pending | null = null;
  private rflags = 0;
  private rtype = 0;
  private rlen = 0;
  private rremaining = 0;
  private rdst: Buffer | null = null;
  private rdstAt = 0;
  private rsimple = false;
  private rrec: RawChunk | null = null;

  // Direct receive (onread).
  private scratch: Buffer = Buffer.allocUnsafe(0);
  private scratchAt = 0;
  private readIsDirect = false;

  // Send batching.
  private slab: Buffer = Buffer.allocUnsafe(0);
  private slabAt = 0;
  private segStart = 0;
  private out: Uint8Array[] = [];
  private flushScheduled = false;
  private readonly flushFn = (): void => this.flushOut();

  private constructor(options: { strict?: boolean; directReads?: boolean; requestTimeout?: number }) {
    super();
    this.strict = options.strict ?? true;
    this.directReads = options.directReads ?? true;
    const rt = options.requestTimeout ?? 0;
    if (!(Number.isFinite(rt) && rt >= 0)) throw new RangeError(`requestTimeout must be a number of milliseconds >= 0, got ${rt}`);
    this.requestTimeout = rt;
  }

  // -------------------------------------------------------------------------------------------
  // Properties

  /** Export size in bytes. */
  get size(): number {
    return this._size;
  }
  /** Transmission flags (NBD.TF_*). */
  get transmissionFlags(): number {
    return this._flags;
  }
  /** Export name in use (the canonical name when the server sent NBD_INFO_NAME). */
  get exportName(): string {
    return this._exportName;
  }
  get description(): string | undefined {
    return this._description;
  }
  /** Block size constraints, when the server sent NBD_INFO_BLOCK_SIZE. */
  get blockSize(): BlockSize | undefined {
    return this._blockSize;
  }
  /** True when structured replies are in use (also true with extended headers). */
  get structuredReplies(): boolean {
    return this._structured;
  }
  get extendedHeaders(): boolean {
    return this._extended;
  }
  /** True when the connection runs inside TLS (libnbd's get_tls_negotiated). */
  get tlsNegotiated(): boolean {
    return this._tls;
  }
  /** Selected metadata contexts: name -> context id. */
  get metaContexts(): Map<string, number> {
    return this._contexts;
  }
  /** Number of requests waiting for their reply. */
  get inFlight(): number {
    return this.pending.size;
  }
  /** True until the connection is closed or closing. */
  get isOpen(): boolean {
    return this.phase === 'transmission';
  }
  get readOnly(): boolean {
    return this.tf(NBD.TF_READ_ONLY);
  }
  get canFlush(): boolean {
    return this.tf(NBD.TF_SEND_FLUSH);
  }
  get canFua(): boolean {
    return this.tf(NBD.TF_SEND_FUA);
  }
  get canTrim(): boolean {
    return this.tf(NBD.TF_SEND_TRIM);
  }
  get canZero(): boolean {
    return this.tf(NBD.TF_SEND_WRITE_ZEROES);
  }
  get canFastZero(): boolean {
    return this.tf(NBD.TF_SEND_FAST_ZERO);
  }
  get canCache(): boolean {
    return this.tf(NBD.TF_SEND_CACHE);
  }
  get canMultiConn(): boolean {
    return this.tf(NBD.TF_CAN_MULTI_CONN);
  }
  get canDf(): boolean {
    return this.tf(NBD.TF_SEND_DF);
  }
  get isRotational(): boolean {
    return this.tf(NBD.TF_ROTATIONAL);
  }
  private tf(bit: number): boolean {
    return (this._flags & NBD.TF_HAS_FLAGS) !== 0 && (this._flags & bit) !== 0;
  }

  // -------------------------------------------------------------------------------------------
  // Connecting

  /** Connect, negotiate and enter transmission. */
  static async connect(target: NbdTarget, options: ConnectOptions = {}): Promise<NbdClient> {
    const client = new NbdClient(options);
    await client.withTimeout(options.timeout, async () => {
      const t = resolveTarget(target);
      const plan = planTls(options, t);
      const uriExport = await client.open(t, plan === null);
      const exportName = options.exportName ?? uriExport ?? '';
      await client.handshake(exportName, options, plan);
    });
    return client;
  }

  /** List the server's exports with NBD_OPT_LIST. */
  static async list(target: NbdTarget, options: NegotiationOptions = {}): Promise<ExportListEntry[]> {
    const client = new NbdClient({ directReads: false });
    return client.negotiateOnly(options, target, async () => {
      const replies = await client.option(NBD.OPT_LIST);
      const out: ExportListEntry[] = [];
      for (const r of replies) {
        if (r.type !== NBD.REP_SERVER) continue;
        try {
          out.push(decodeServerReply(r.data));
        } catch (e) {
          throw new NbdProtocolError((e as Error).message);
        }
      }
      return out;
    });
  }

  /** Ask about one export with NBD_OPT_INFO, without entering transmission. */
  static async info(target: NbdTarget, exportName?: string, options: NegotiationOptions = {}): Promise<ExportInfo> {
    const client = new NbdClient({ directReads: false });
    return client.negotiateOnly(options, target, async (uriExport) => {
      const name = exportName ?? uriExport ?? '';
      const infos = options.requestInfos ?? DEFAULT_INFOS;
      const replies = await client.option(NBD.OPT_INFO, encodeInfoRequest(name, infos));
      const info = client.applyInfos(replies, name);
      return {
        exportName: name,
        ...(info.name !== undefined ? { name: info.name } : {}),
        size: client._size,
        transmissionFlags: client._flags,
        ...(client._description !== undefined ? { description: client._description } : {}),
        ...(client._blockSize ? { blockSize: client._blockSize } : {}),
      };
    });
  }

  private async withTimeout<T>(timeout: number | undefined, fn: () => Promise<T>): Promise<T> {
    const ms = timeout ?? 30_000;
    let timer: NodeJS.Timeout | undefined;
    if (ms > 0) {
      timer = setTimeout(() => {
        const err = new NbdConnectionError(`connect timed out after ${ms} ms`);
        (err as { code?: string }).code = 'ETIMEDOUT';
        this.die(err);
      }, ms);
    }
    try {
      return await fn();
    } catch (e) {
      // After an option error the protocol wants a soft disconnect (NBD_OPT_ABORT).
      if (e instanceof NbdOptionError && this.phase === 'handshake') await this.abortNegotiation();
      this.die(e instanceof NbdConnectionError ? e : new NbdConnectionError(`handshake failed: ${(e as Error).message}`, e));
      // A timeout or close reported while waiting wins over secondary errors.
      throw this.timeoutOr(e);
    } finally {
      if (timer) clearTimeout(timer);
    }
  }

  private timeoutOr(e: unknown): unknown {
    const d = this.deathError as { code?: string } | null;
    return d && d.code === 'ETIMEDOUT' ? d : e;
  }

  private async negotiateOnly<T>(
    options: NegotiationOptions,
    target: NbdTarget,
    fn: (uriExport: string | undefined) => Promise<T>,
  ): Promise<T> {
    try {
      return await this.withTimeout(options.timeout, async () => {
        const t = resolveTarget(target);
        const plan = planTls(options, t);
        const uriExport = await this.open(t, false);
        const g = await this.greet(true);
        if (g.oldstyle || !g.fixed) throw new NbdProtocolError('server does not support fixed newstyle negotiation');
        if (plan) await this.startTls(plan);
        const result = await fn(uriExport);
        await this.abortNegotiation();
        return result;
      });
    } finally {
      this.close();
    }
  }

  /** Send NBD_OPT_ABORT and give the server a moment to acknowledge before closing. */
  private async abortNegotiation(): Promise<void> {
    const sock = this.socket;
    if (!sock || sock.destroyed || this.deathError) return;
    sock.write(encodeOption(NBD.OPT_ABORT));
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.read(NBD.OPTION_REPLY_HEADER_SIZE).catch(() => undefined),
      new Promise<void>((resolve) => {
        timer = setTimeout(resolve, 1000);
      }),
    ]);
    clearTimeout(timer);
  }

  /** Open the transport. Returns the export name from a URI target, if any. */
  private async open(t: ResolvedTarget, mayReadDirect: boolean): Promise<string | undefined> {
    if (t.kind === 'socket') {
      this.attach(t.socket, false);
      return undefined;
    }
    // onread hands net's reads to us; a socket that may be wrapped in TLS must not use it.
    const onread = this.directReads && mayReadDirect
      ? { buffer: (): Uint8Array => this.nextReadBuffer(), callback: (n: number, b: Uint8Array): boolean => this.onRead(n, b) }
      : undefined;
    const sock =
      t.kind === 'tcp'
        ? net.connect({ host: t.host, port: t.port, noDelay: true, ...(onread ? { onread } : {}) })
        : net.connect({ path: t.path, ...(onread ? { onread } : {}) });
    this.attach(sock, onread !== undefined);
    await new Promise<void>((resolve, reject) => {
      const done = (): void => {
        sock.off('connect', onConnect);
        sock.off('error', onError);
        sock.off('close', onClose);
      };
      const onError = (e: Error): void => {
        done();
        reject(e);
      };
      const onClose = (): void => {
        done();
        reject(this.deathError ?? new NbdConnectionError('connection closed while connecting'));
      };
      const onConnect = (): void => {
        done();
        resolve();
      };
      sock.once('connect', onConnect);
      sock.once('error', onError);
      sock.once('close', onClose);
    });
    return t.exportName;
  }

  private attach(sock: Duplex, usesOnread: boolean): void {
    this.socket = sock;
    const onData = (chunk: Buffer): void => this.onData(chunk);
    const onError = (e: Error): void => this.die(new NbdConnectionError(`connection error: ${e.message}`, e));
    const onEnd = (): void => this.die(new NbdConnectionError('server closed the connection'));
    const onClose = (): void => this.die(new NbdConnectionError('connection closed'));
    if (!usesOnread) sock.on('data', onData);
    sock.on('error', onError);
    sock.on('end', onEnd);
    sock.on('close', onClose);
    this.detach = () => {
      sock.off('data', onData);
      sock.off('error', onError);
      sock.off('end', onEnd);
      sock.off('close', onClose);
    };
  }

  /**
   * NBD_OPT_STARTTLS, then the TLS handshake over the same socket. Returns false when the server
   * refused STARTTLS and the mode lets us go on in clear.
   */
  private async startTls(plan: TlsPlan): Promise<boolean> {
    try {
      await this.option(NBD.OPT_STARTTLS);
    } catch (e) {
      if (!(e instanceof NbdOptionError)) throw e;
      if (plan.mode === 'on') return false;
      const text = e.serverMessage ? `: ${e.serverMessage}` : '';
      throw new NbdTlsError(`TLS is required but the server does not offer it (NBD_OPT_STARTTLS got NBD_REP_${e.replyTypeName}${text})`, 'ENOTLS', e);
    }
    if (this.queue.length > 0) throw new NbdProtocolError('the server sent bytes after acknowledging NBD_OPT_STARTTLS');
    const raw = this.socket!;
    this.detach?.();
    // Errors now surface on the TLS socket; this keeps a late one on the raw socket harmless.
    raw.on('error', () => {});
    const secure = tls.connect({ ...plan.options, socket: raw });
    this.rawSocket = raw;
    this.socket = secure;
    await new Promise<void>((resolve, reject) => {
      const done = (): void => {
        this.stepAbort = null;
        secure.off('secureConnect', onSecure);
        secure.off('error', onError);
        secure.off('close', onClose);
      };
      const onSecure = (): void => {
        done();
        this.attach(secure, false);
        this._tls = true;
        this.tlsFresh = plan;
        resolve();
      };
      const onError = (e: Error): void => {
        done();
        reject(tlsFailure(e, plan));
      };
      const onClose = (): void => {
        done();
        reject(tlsFailure(null, plan));
      };
      this.stepAbort = (e) => {
        done();
        reject(e);
      };
      secure.once('secureConnect', onSecure);
      secure.once('error', onError);
      secure.once('close', onClose);
    });
    return true;
  }

  // -------------------------------------------------------------------------------------------
  // Handshake

  private async greet(requireFixed: boolean): Promise<{ oldstyle: boolean; fixed: boolean; noZeroes: boolean; first?: Buffer }> {
    const first = await this.read(NBD.GREETING_SIZE);
    const g = decodeGreeting(first);
    if (g === null) throw new NbdProtocolError('the server did not send an NBD greeting');
    if (g.style === 'oldstyle') {
      if (requireFixed) throw new NbdProtocolError('server uses oldstyle negotiation (fixed newstyle required)');
      return { oldstyle: true, fixed: false, noZeroes: false, first };
    }
    const fixed = (g.flags & NBD.FLAG_FIXED_NEWSTYLE) !== 0;
    const noZeroes = (g.flags & NBD.FLAG_NO_ZEROES) !== 0;
    if (!fixed && requireFixed) throw new NbdProtocolError('server does not offer fixed newstyle negotiation');
    const flags = (fixed ? NBD.FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? NBD.FLAG_C_NO_ZEROES : 0);
    this.socket!.write(encodeClientFlags(flags));
    return { oldstyle: false, fixed, noZeroes };
  }

  private async handshake(exportName: string, o: ConnectOptions, plan: TlsPlan | null): Promise<void> {
    if (Buffer.byteLength(exportName) > NBD.MAX_STRING) throw new RangeError('export name longer than 4096 bytes');
    const g = await this.greet(o.fixedNewstyleOnly ?? false);
    if (plan?.mode === 'require' && (g.oldstyle || !g.fixed)) {
      const style = g.oldstyle ? 'oldstyle' : 'plain newstyle';
      throw new NbdTlsError(`TLS is required but the server uses ${style} negotiation, which has no TLS`, 'ENOTLS');
    }
    // Everything negotiated below happens inside TLS when it is up (STARTTLS resets the rest).
    if (plan && g.fixed && !g.oldstyle) await this.startTls(plan);
    if (g.oldstyle) {
      const rest = await this.read(OLDSTYLE_GREETING_SIZE - NBD.GREETING_SIZE);
      const { size, flags } = decodeOldstyleGreeting(Buffer.concat([g.first!, rest]));
      this._size = size;
      this._flags = flags;
      this._exportName = '';
      this.enterTransmission();
      return;
    }
    if (!g.fixed) {
      await this.exportNameOption(exportName, g.noZeroes);
      this.enterTransmission();
      return;
    }

    if (o.structuredReplies ?? true) {
      if (o.extendedHeaders ?? true) {
        if (await this.tryOption(NBD.OPT_EXTENDED_HEADERS)) {
          this._extended = true;
          this._structured = true;
        }
      }
      if (!this._extended && (await this.tryOption(NBD.OPT_STRUCTURED_REPLY))) this._structured = true;
    }

    const contexts = o.metaContexts ?? [NBD.CONTEXT_BASE_ALLOCATION];
    if (this._structured && contexts.length > 0) {
      let replies: OptionReply[] = [];
      try {
        replies = await this.option(NBD.OPT_SET_META_CONTEXT, encodeMetaContextRequest(exportName, contexts));
      } catch (e) {
        if (!(e instanceof NbdOptionError) || e.replyType === NBD.REP_ERR_TLS_REQD) throw e;
        // The server cannot select contexts: go on without block status.
      }
      for (const r of replies) {
        if (r.type !== NBD.REP_META_CONTEXT) continue;
        if (r.data.length < 4) throw new NbdProtocolError('NBD_REP_META_CONTEXT reply too short');
        const { id, name } = decodeMetaContextReply(r.data);
        this._contexts.set(name, id);
        this.contextNames.set(id, name);
      }
    }

    const infos = o.requestInfos ?? DEFAULT_INFOS;
    let replies: OptionReply[] | null = null;
    try {
      replies = await this.option(NBD.OPT_GO, encodeInfoRequest(exportName, infos));
    } catch (e) {
      // Old servers without NBD_OPT_GO; not allowed once extended headers were agreed.
      if (!(e instanceof NbdOptionError) || e.replyType !== NBD.REP_ERR_UNSUP || this._extended) throw e;
    }
    if (replies) {
      const info = this.applyInfos(replies, exportName);
      this._exportName = info.name ?? exportName;
    } else {
      await this.exportNameOption(exportName, g.noZeroes);
    }
    this.enterTransmission();
  }

  /** Returns true on ACK, false on an error reply. */
  private async tryOption(option: number): Promise<boolean> {
    try {
      await this.option(option);
      return true;
    } catch (e) {
      if (e instanceof NbdOptionError && e.replyType !== NBD.REP_ERR_TLS_REQD) return false;
      throw e;
    }
  }

  private applyInfos(replies: OptionReply[], exportName: string): { name?: string } {
    let gotExport = false;
    let name: string | undefined;
    for (const r of replies) {
      if (r.type !== NBD.REP_INFO) continue;
      if (r.data.length < 2) throw new NbdProtocolError('NBD_REP_INFO reply too short');
      let info: ReturnType<typeof decodeInfoReply>;
      try {
        info = decodeInfoReply(r.data);
      } catch (e) {
        throw new NbdProtocolError((e as Error).message);
      }
      switch (info.type) {
        case NBD.INFO_EXPORT: {
          const i = info as { size: number; flags: number };
          this._size = i.size;
          this._flags = i.flags;
          gotExport = true;
          break;
        }
        case NBD.INFO_NAME:
          name = (info as { name: string }).name;
          break;
        case NBD.INFO_DESCRIPTION:
          this._description = (info as { description: string }).description;
          break;
        case NBD.INFO_BLOCK_SIZE: {
          const i = info as BlockSize & { type: number };
          this._blockSize = { minimum: i.minimum, preferred: i.preferred, maximum: i.maximum };
          break;
        }
        default:
          break; // unknown info types are ignored
      }
    }
    if (!gotExport) throw new NbdProtocolError(`no NBD_INFO_EXPORT for export "${exportName}"`);
    return name === undefined ? {} : { name };
  }

  private async exportNameOption(exportName: string, noZeroes: boolean): Promise<void> {
    this.socket!.write(encodeOption(NBD.OPT_EXPORT_NAME, Buffer.from(exportName, 'utf8')));
    let b: Buffer;
    try {
      b = await this.read(noZeroes ? 10 : 134);
    } catch (e) {
      if (e instanceof NbdConnectionError && (e as { code?: string }).code !== 'ETIMEDOUT') {
        throw new NbdConnectionError(`server closed the connection after NBD_OPT_EXPORT_NAME "${exportName}" (no such export?)`, e);
      }
      throw e;
    }
    const { size, flags } = decodeExportNameReply(b);
    this._size = size;
    this._flags = flags;
    this._exportName = exportName;
  }

  /** Send an option and collect its replies up to ACK. Error replies throw NbdOptionError. */
  private async option(option: number, data?: Uint8Array): Promise<OptionReply[]> {
    this.socket!.write(encodeOption(option, data));
    const out: OptionReply[] = [];
    for (;;) {
      const h = decodeOptionReplyHeader(await this.readOptionReply());
      if (h === null) throw new NbdProtocolError('bad option reply magic');
      if (h.option !== option) {
        throw new NbdProtocolError(`reply for option ${h.option} while waiting for option ${option}`);
      }
      if (h.length > MAX_OPTION_REPLY) throw new NbdProtocolError(`option reply of ${h.length} bytes is too large`);
      const payload = h.length > 0 ? await this.read(h.length) : Buffer.alloc(0);
      if (h.type === NBD.REP_ACK) return out;
      if (h.type >= NBD.REP_FLAG_ERROR) {
        const hint =
          h.type === NBD.REP_ERR_TLS_REQD && !this._tls
            ? "the server requires TLS: use an nbds:// or nbds+unix:// URI, or tls: 'require'"
            : undefined;
        throw new NbdOptionError(option, h.type, payload.toString('utf8'), hint);
      }
      out.push({ type: h.type, data: payload });
    }
  }

  /**
   * The header of an option reply. With TLS 1.3 the server checks our certificate after our side
   * of the handshake is done, so its refusal shows up as a close here: say so.
   */
  private async readOptionReply(): Promise<Buffer> {
    const plan = this.tlsFresh;
    if (plan === null) return this.read(NBD.OPTION_REPLY_HEADER_SIZE);
    try {
      return await this.read(NBD.OPTION_REPLY_HEADER_SIZE);
    } catch (e) {
      if (!(e instanceof NbdConnectionError) || e instanceof NbdTlsError || (e as { code?: string }).code === 'ETIMEDOUT') throw e;
      const why =
        plan.kind === 'psk'
          ? 'refused our key'
          : plan.options.cert
            ? `refused our client certificate (from ${plan.source})`
            : 'wants a client certificate (none was sent: put client-cert.pem and client-key.pem in the tls-certificates directory)';
      throw new NbdTlsError(`TLS: the server closed the connection right after the TLS handshake; it probably ${why}`, 'ECONNRESET', e);
    } finally {
      this.tlsFresh = null;
    }
  }

  /** Wait for exactly n handshake bytes (copied, so they outlive the receive buffer). */
  private read(n: number): Promise<Buffer> {
    if (this.deathError) return Promise.reject(this.deathError);
    if (this.queue.length >= n) return Promise.resolve(Buffer.from(this.queue.take(n)));
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }

  private enterTransmission(): void {
    if (!(this._flags & NBD.TF_HAS_FLAGS)) this._flags = 0;
    this.phase = 'transmission';
    this.waiter = null;
    if (this.requestTimeout > 0) {
      const every = Math.min(1000, Math.max(10, this.requestTimeout / 4));
      this.watchdog = setInterval(() => this.checkStuck(), every);
      this.watchdog.unref();
    }
    if (this.queue.length > 0) this.parse();
  }

  // -------------------------------------------------------------------------------------------
  // Friendly requests

  /** Read `count` bytes at `offset`. Holes come back as zeroes. */
  pread(count: number, offset: number, flags = 0): Promise<Buffer> {
    const err = this.precheck(NBD.CMD_READ, flags, offset, count);
    if (err) return Promise.reject(err);
    const buf = Buffer.allocUnsafe(count);
    if (count === 0) return Promise.resolve(buf);
    return this.readParts(buf, offset, flags, M_READ_ZERO, null).then(() => buf);
  }

  /**
   * Read `buf.length` bytes at `offset` into `buf`. Data is written into `buf`; ranges the server
   * reported as holes are NOT written: they are returned (relative to the start of `buf`, sorted,
   * merged) and read as zeroes. A simple reply never has holes.
   */
  preadInto(buf: Uint8Array, offset: number, flags = 0): Promise<Span[]> {
    const b = Buffer.isBuffer(buf) ? buf : Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
    const err = this.precheck(NBD.CMD_READ, flags, offset, b.length);
    if (err) return Promise.reject(err);
    if (b.length === 0) return Promise.resolve([]);
    const holes: Span[] = [];
    return this.readParts(b, offset, flags, M_READ_SPANS, holes).then(() => mergeSpans(holes));
  }

  /** Write `buf` at `offset`. The buffer is sent without copying: do not change it until this settles. */
  pwrite(buf: Uint8Array, offset: number, flags = 0): Promise<void> {
    const err = this.precheck(NBD.CMD_WRITE, flags, offset, buf.length);
    if (err) return Promise.reject(err);
    if (buf.length === 0) return Promise.resolve();
    const f = this._extended ? flags | NBD.CMD_FLAG_PAYLOAD_LEN : flags;
    const max = this.payloadLimit();
    if (buf.length <= max) return this.start(NBD.CMD_WRITE, f, offset, buf.length, M_PLAIN, buf) as Promise<void>;
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < buf.length; at += max) {
      const n = Math.min(max, buf.length - at);
      parts.push(this.start(NBD.CMD_WRITE, f, offset + at, n, M_PLAIN, buf.subarray(at, at + n)));
    }
    return Promise.all(parts).then(() => undefined);
  }

  /** NBD_CMD_FLUSH. */
  flush(flags = 0): Promise<void> {
    const err = this.precheck(NBD.CMD_FLUSH, flags, 0, 0);
    if (err) return Promise.reject(err);
    return this.start(NBD.CMD_FLUSH, flags, 0, 0, M_PLAIN) as Promise<void>;
  }

  /** NBD_CMD_TRIM (a hint: the range may read back as anything afterwards). */
  trim(count: number, offset: number, flags = 0): Promise<void> {
    return this.ranged(NBD.CMD_TRIM, count, offset, flags, this.lengthLimit());
  }

  /** NBD_CMD_CACHE (prefetch hint). */
  cache(count: number, offset: number, flags = 0): Promise<void> {
    return this.ranged(NBD.CMD_CACHE, count, offset, flags, this.payloadLimit());
  }

  /** NBD_CMD_WRITE_ZEROES. Flags: CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_FAST_ZERO. */
  zero(count: number, offset: number, flags = 0): Promise<void> {
    const limit = flags & NBD.CMD_FLAG_FAST_ZERO ? this.lengthLimit() : this.payloadLimit();
    return this.ranged(NBD.CMD_WRITE_ZEROES, count, offset, flags, limit);
  }

  /**
   * NBD_CMD_BLOCK_STATUS for every selected context. Returns extents per context name, as the
   * server sent them: they may describe less than `count`, and the last extent may run past it.
   * `count` is clamped to what one request can carry.
   */
  blockStatus(count: number, offset: number, flags = 0): Promise<Map<string, Extent[]>> {
    const err = this.precheck(NBD.CMD_BLOCK_STATUS, flags, offset, count);
    if (err) return Promise.reject(err);
    const n = Math.min(count, this.lengthLimit());
    return this.start(NBD.CMD_BLOCK_STATUS, flags, offset, n, M_STATUS) as Promise<Map<string, Extent[]>>;
  }

  /**
   * Send exactly this request (no checks, no flags added) and report the reply as it came:
   * `{error, message?, data?, chunks, ...}`. Rejects only when the connection is gone (or the
   * header cannot be encoded). A DISC request resolves once queued and starts the close.
   */
  request(req: RawRequest): Promise<RawReply> {
    if (this.phase !== 'transmission') return Promise.reject(this.closedError());
    const { type, flags = 0, offset = 0, length = 0, payload } = req;
    if (type === NBD.CMD_DISC) {
      try {
        this.sendRequest(this.nextCookie++, type, flags, offset, length, payload);
      } catch (e) {
        return Promise.reject(e as Error);
      }
      this.discSent = true;
      this.phase = 'closing';
      this.flushOut();
      return Promise.resolve({ error: 0, chunks: [], simple: false });
    }
    return this.start(type, flags, offset, length, M_RAW, payload) as Promise<RawReply>;
  }

  /**
   * Wait for the requests in flight, send NBD_CMD_DISC and close. New requests are refused from
   * the moment this is called. Resolves once the socket is closed.
   */
  async disconnect(): Promise<void> {
    if (this.phase === 'closed') return;
    const closed = new Promise<void>((resolve) => this.closeWaiters.push(resolve));
    if (this.phase === 'transmission') {
      this.phase = 'closing';
      if (this.pending.size > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
      if (this.phase !== 'closing' || this.discSent) return closed;
      this.discSent = true;
      this.sendRequest(this.nextCookie++, NBD.CMD_DISC, 0, 0, 0);
      this.flushOut();
      this.socket?.end();
      const timer = setTimeout(() => this.close(), 5000);
      timer.unref();
      await closed;
      clearTimeout(timer);
      return;
    }
    // Handshake phase, or DISC already sent (by request()) or being sent (a concurrent call).
    if (this.phase === 'handshake') this.close();
    const timer = setTimeout(() => this.close(), 5000);
    timer.unref();
    await closed;
    clearTimeout(timer);
  }

  /** Close the socket now. Requests in flight reject with an EIO NbdConnectionError. */
  close(): void {
    this.closeRequested = true;
    this.die(new NbdConnectionError('connection closed by the client'));
  }

  // -------------------------------------------------------------------------------------------
  // Request plumbing

  private ranged(cmd: number, count: number, offset: number, flags: number, limit: number): Promise<void> {
    const err = this.precheck(cmd, flags, offset, count);
    if (err) return Promise.reject(err);
    if (count === 0) return Promise.resolve();
    if (count <= limit) return this.start(cmd, flags, offset, count, M_PLAIN) as Promise<void>;
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < count; at += limit) parts.push(this.start(cmd, flags, offset + at, Math.min(limit, count - at), M_PLAIN));
    return Promise.all(parts).then(() => undefined);
  }

  private readParts(buf: Buffer, offset: number, flags: number, mode: number, holes: Span[] | null): Promise<unknown> {
    const max = this.payloadLimit();
    if (buf.length <= max) return this.start(NBD.CMD_READ, flags, offset, buf.length, mode, undefined, buf, 0, holes);
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < buf.length; at += max) {
      const n = Math.min(max, buf.length - at);
      parts.push(this.start(NBD.CMD_READ, flags, offset + at, n, mode, undefined, buf, at, holes));
    }
    return Promise.all(parts);
  }

  /** Largest READ/WRITE/CACHE/WRITE_ZEROES length per request. */
  private payloadLimit(): number {
    const bs = this._blockSize;
    let max = bs ? bs.maximum : NBD.DEFAULT_MAX_PAYLOAD;
    if (max > U32_MAX) max = U32_MAX;
    const min = bs && bs.minimum > 0 ? bs.minimum : 1;
    max -= max % min;
    return max > 0 ? max : min;
  }

  /** Largest effect length of one request (TRIM, FAST_ZERO, BLOCK_STATUS). */
  private lengthLimit(): number {
    if (this._extended) return Number.MAX_SAFE_INTEGER;
    const min = this._blockSize && this._blockSize.minimum > 0 ? this._blockSize.minimum : 1;
    return U32_MAX - (U32_MAX % min);
  }

  private closedError(): NbdConnectionError {
    if (this.deathError) return new NbdConnectionError(`connection is closed (${this.deathError.message})`, this.deathError);
    if (this.phase === 'closing') return new NbdConnectionError('connection is closing');
    return new NbdConnectionError('connection is not open');
  }

  private precheck(cmd: number, flags: number, offset: number, count: number): NbdRequestError | null {
    if (this.phase !== 'transmission') return this.closedError();
    const local = (errno: number, msg: string): NbdRequestError =>
      new NbdRequestError(errno, msg, { command: cmd, local: true });
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(count) || count < 0) {
      return local(ERRNO.EINVAL, 'offset and count must be non-negative integers');
    }
    if (!Number.isInteger(flags) || flags < 0 || flags > 0xffff) return local(ERRNO.EINVAL, `bad command flags ${flags}`);
    if (!this.strict) return null;
    const name = `NBD_CMD_${commandName(cmd)}`;
    let allowed = 0;
    let supported = true;
    let writes = false;
    switch (cmd) {
      case NBD.CMD_READ:
        if (this.canDf) allowed |= NBD.CMD_FLAG_DF;
        break;
      case NBD.CMD_WRITE:
        writes = true;
        if (this.canFua) allowed |= NBD.CMD_FLAG_FUA;
        break;
      case NBD.CMD_FLUSH:
        supported = this.canFlush;
        break;
      case NBD.CMD_TRIM:
        writes = true;
        supported = this.canTrim;
        if (this.canFua) allowed |= NBD.CMD_FLAG_FUA;
        break;
      case NBD.CMD_CACHE:
        supported = this.canCache;
        break;
      case NBD.CMD_WRITE_ZEROES:
        writes = true;
        supported = this.canZero;
        allowed |= NBD.CMD_FLAG_NO_HOLE;
        if (this.canFua) allowed |= NBD.CMD_FLAG_FUA;
        if (this.canFastZero) allowed |= NBD.CMD_FLAG_FAST_ZERO;
        break;
      case NBD.CMD_BLOCK_STATUS:
        supported = this._contexts.size > 0;
        allowed |= NBD.CMD_FLAG_REQ_ONE;
        break;
    }
    if (!supported) {
      const why = cmd === NBD.CMD_BLOCK_STATUS ? 'no metadata context was negotiated' : 'the server does not advertise it';
      return local(ERRNO.EINVAL, `${name} is not available: ${why}`);
    }
    if (writes && this.readOnly) return local(ERRNO.EPERM, `${name} on a read-only export`);
    if (flags & ~allowed) {
      return local(ERRNO.EINVAL, `flags 0x${(flags & ~allowed).toString(16)} not valid for ${name} on this connection`);
    }
    if (cmd === NBD.CMD_FLUSH) return null;
    if (cmd === NBD.CMD_BLOCK_STATUS && count === 0) return local(ERRNO.EINVAL, `${name} with length 0`);
    if (offset + count > this._size) {
      return local(cmd === NBD.CMD_WRITE || cmd === NBD.CMD_WRITE_ZEROES ? ERRNO.ENOSPC : ERRNO.EINVAL,
        `${name} of ${count} bytes at ${offset} goes past the end of the export (${this._size} bytes)`);
    }
    const min = this._blockSize?.minimum ?? 1;
    if (min > 1 && (offset % min !== 0 || count % min !== 0)) {
      return local(ERRNO.EINVAL, `${name} offset and length must be multiples of the minimum block size ${min}`);
    }
    return null;
  }

  private start(
    type: number,
    flags: number,
    offset: number,
    length: number,
    mode: number,
    payload?: Uint8Array,
    buf: Buffer | null = null,
    bufAt = 0,
    holes: Span[] | null = null,
  ): Promise<unknown> {
    if (this.phase !== 'transmission') return Promise.reject(this.closedError());
    return new Promise((resolve, reject) => {
      const cookie = this.nextCookie++;
      try {
        this.sendRequest(cookie, type, flags, offset, length, payload);
      } catch (e) {
        reject(e as Error);
        return;
      }
      const p: Pending = {
        cookie,
        type,
        flags,
        offset,
        length,
        mode,
        buf,
        bufAt,
        holes,
        spans: null,
        covered: 0,
        simple: false,
        errno: 0,
        message: undefined,
        errorOffset: undefined,
        violation: undefined,
        status: null,
        chunks: mode === M_RAW ? [] : null,
        resolve,
        reject,
        sentAt: this.requestTimeout > 0 ? Date.now() : 0,
      };
      this.pending.set(cookie, p);
    });
  }

  /** Queue one request (header, plus payload) for the next batched write. */
  private sendRequest(cookie: bigint, type: number, flags: number, offset: number, length: number, payload?: Uint8Array): void {
    const hsize = this._extended ? NBD.EXTENDED_REQUEST_SIZE : NBD.REQUEST_SIZE;
    const copy = payload !== undefined && payload.length <= COPY_PAYLOAD_MAX;
    const need = hsize + (copy ? payload.length : 0);
    if (this.slab.length - this.slabAt < need) {
      this.cutSegment();
      this.slab = Buffer.allocUnsafe(Math.max(SLAB_SIZE, need));
      this.slabAt = 0;
      this.segStart = 0;
    }
    encodeRequest(this.slab, this.slabAt, this._extended, flags, type, cookie, offset, length);
    this.slabAt += hsize;
    if (payload !== undefined && payload.length > 0) {
      if (copy) {
        this.slab.set(payload, this.slabAt);
        this.slabAt += payload.length;
      } else {
        this.cutSegment();
        this.out.push(payload);
      }
    }
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      process.nextTick(this.flushFn);
    }
  }

  private cutSegment(): void {
    if (this.slabAt > this.segStart) {
      this.out.push(this.slab.subarray(this.segStart, this.slabAt));
      this.segStart = this.slabAt;
    }
  }

  /** Write everything queued: one write, or a corked series that goes out as one writev. */
  private flushOut(): void {
    this.flushScheduled = false;
    this.cutSegment();
    const out = this.out;
    if (out.length === 0) return;
    this.out = [];
    const sock = this.socket;
    if (!sock || sock.destroyed || this.phase === 'closed') return;
    if (out.length === 1) {
      sock.write(out[0]!);
      return;
    }
    sock.cork();
    for (const b of out) sock.write(b);
    sock.uncork();
  }

  // -------------------------------------------------------------------------------------------
  // Receiving

  /** onread: choose where the next socket read lands. */
  private nextReadBuffer(): Uint8Array {
    if (this.rs === RS_DATA && this.rdst !== null && this.queue.length === 0 && this.rremaining >= DIRECT_MIN && this.phase !== 'closed') {
      this.readIsDirect = true;
      return this.rdst.subarray(this.rdstAt, this.rdstAt + this.rremaining);
    }
    this.readIsDirect = false;
    // Nothing in the queue refers to the scratch buffer any more: start it over.
    if (this.queue.length === 0) this.scratchAt = 0;
    if (this.scratch.length - this.scratchAt < SCRATCH_MIN) {
      this.scratch = Buffer.allocUnsafe(SCRATCH_SIZE);
      this.scratchAt = 0;
    }
    return this.scratch.subarray(this.scratchAt);
  }

  /** onread: `n` bytes arrived in the buffer nextReadBuffer() returned. */
  private onRead(n: number, buf: Uint8Array): boolean {
    if (this.phase === 'closed') return true;
    if (this.readIsDirect) {
      this.rdstAt += n;
      this.rremaining -= n;
      if (this.rremaining === 0) {
        this.endData();
        this.parse();
      }
      return true;
    }
    this.scratchAt += n;
    this.onData((buf as Buffer).subarray(0, n));
    return true;
  }

  private onData(chunk: Buffer): void {
    if (this.phase === 'closed') return;
    this.queue.push(chunk);
    if (this.phase === 'handshake') {
      const w = this.waiter;
      if (w && this.queue.length >= w.n) {
        this.waiter = null;
        w.resolve(Buffer.from(this.queue.take(w.n)));
      }
      return;
    }
    this.parse();
  }

  private parse(): void {
    try {
      this.parseLoop();
    } catch (e) {
      this.fatal(`client error while parsing replies: ${(e as Error).message}`);
    }
  }

  private parseLoop(): void {
    const q = this.queue;
    while (this.phase !== 'closed') {
      switch (this.rs) {
        case RS_HEADER: {
          if (q.length < 4) return;
          const magic = q.peekU32(0);
          let size: number;
          if (this._extended) {
            if (magic !== NBD.EXTENDED_REPLY_MAGIC) return this.fatal(`expected an extended reply, got magic 0x${magic.toString(16)}`);
            size = NBD.EXTENDED_REPLY_SIZE;
          } else if (magic === NBD.SIMPLE_REPLY_MAGIC) {
            size = NBD.SIMPLE_REPLY_SIZE;
          } else if (magic === NBD.STRUCTURED_REPLY_MAGIC && this._structured) {
            size = NBD.STRUCTURED_REPLY_SIZE;
          } else {
            return this.fatal(`unexpected reply magic 0x${magic.toString(16)}`);
          }
          if (q.length < size) return;
          const h = decodeReplyHeader(q.take(size));
          if (h === null || h === 'short') return this.fatal('undecodable reply header');
          const p = this.pending.get(h.cookie);
          if (p === undefined) return this.fatal(`reply for unknown cookie ${h.cookie}`);
          if (h.kind === 'simple') this.onSimple(p, h.error);
          else this.onChunkHeader(p, h.flags, h.type, h.offset, h.length);
          break;
        }
        case RS_PAYLOAD: {
          if (q.length < this.rlen) return;
          const b = this.rlen > 0 ? q.take(this.rlen) : Buffer.alloc(0);
          this.rs = RS_HEADER;
          this.onChunkPayload(this.rp!, b);
          break;
        }
        case RS_DATA_OFFSET: {
          if (q.length < 8) return;
          this.beginData(readU64(q.take(8), 0));
          break;
        }
        case RS_DATA: {
          const n = Math.min(q.length, this.rremaining);
          if (n > 0) {
            if (this.rdst !== null) q.copyInto(this.rdst, this.rdstAt, n);
            else q.skip(n);
            this.rdstAt += n;
            this.rremaining -= n;
          }
          if (this.rremaining > 0) return;
          this.endData();
          break;
        }
      }
    }
  }

  private onSimple(p: Pending, error: number): void {
    p.simple = true;
    if (error !== 0) {
      p.errno = error;
      this.complete(p);
      return;
    }
    if (p.type === NBD.CMD_READ && p.length > 0) {
      // Simple READ success: `length` bytes of data follow.
      this.rp = p;
      this.rsimple = true;
      this.rflags = 0;
      addSpan(p, 0, p.length);
      this.startData(p, 0, p.length);
      return;
    }
    this.complete(p);
  }

  private onChunkHeader(p: Pending, flags: number, type: number, hOffset: number, length: number): void {
    this.rp = p;
    this.rflags = flags;
    this.rtype = type;
    this.rlen = length;
    this.rsimple = false;
    this.rrec = null;
    if (p.chunks) {
      this.rrec = { type, flags, payloadLength: length };
      p.chunks.push(this.rrec);
    }
    if (this._extended && hOffset !== p.offset) {
      violate(p, `extended reply offset ${hOffset} does not match the request offset ${p.offset}`);
    }
    switch (type) {
      case NBD.REPLY_TYPE_NONE:
        if (!(flags & NBD.REPLY_FLAG_DONE)) violate(p, 'NONE chunk without the DONE flag');
        if (length !== 0) {
          violate(p, 'NONE chunk with a payload');
          this.skipPayload(length);
          return;
        }
        this.chunkDone();
        return;
      case NBD.REPLY_TYPE_OFFSET_DATA:
        if (length < 8) {
          violate(p, `OFFSET_DATA chunk of ${length} bytes`);
          this.skipPayload(length);
          return;
        }
        this.rremaining = length - 8;
        this.rs = RS_DATA_OFFSET;
        return;
      case NBD.REPLY_TYPE_OFFSET_HOLE:
      case NBD.REPLY_TYPE_BLOCK_STATUS:
      case NBD.REPLY_TYPE_BLOCK_STATUS_EXT:
        break;
      default:
        if (!(type & NBD.REPLY_TYPE_FLAG_ERROR)) {
          // The spec demands a hard disconnect for unknown non-error chunk types.
          this.fatal(`unknown reply chunk type ${type}`);
          return;
        }
    }
    if (length > MAX_META_PAYLOAD) {
      this.fatal(`reply chunk type ${type} with an oversized payload of ${length} bytes`);
      return;
    }
    this.rs = RS_PAYLOAD;
  }

  private skipPayload(length: number): void {
    this.rdst = null;
    this.rremaining = length;
    this.rs = RS_DATA;
  }

  private onChunkPayload(p: Pending, b: Buffer): void {
    const type = this.rtype;
    const rec = this.rrec;
    if (type === NBD.REPLY_TYPE_OFFSET_HOLE) {
      const h = decodeOffsetHole(b);
      if (h === null) violate(p, `OFFSET_HOLE chunk of ${b.length} bytes`);
      else {
        if (rec) {
          rec.offset = h.offset;
          rec.length = h.length;
        }
        this.onHole(p, h.offset, h.length);
      }
    } else if (type === NBD.REPLY_TYPE_BLOCK_STATUS || type === NBD.REPLY_TYPE_BLOCK_STATUS_EXT) {
      this.onStatus(p, type, b, rec);
    } else {
      // An error chunk (known or not: all start with errno u32, message length u16, message).
      if (b.length < 6) violate(p, `error chunk of ${b.length} bytes`);
      else {
        const msgLen = b.readUInt16BE(4);
        const extra = type === NBD.REPLY_TYPE_ERROR_OFFSET ? 8 : 0;
        if (6 + msgLen + extra > b.length || (type === NBD.REPLY_TYPE_ERROR && 6 + msgLen !== b.length)) {
          violate(p, `error chunk message length ${msgLen} does not fit its ${b.length}-byte payload`);
        }
        const e = decodeErrorPayload(b);
        let errno = e.errno;
        if (errno === 0) {
          violate(p, 'error chunk with error number 0');
          errno = ERRNO.EIO;
        }
        if (rec) {
          rec.errno = errno;
          if (e.message) rec.message = e.message;
          if (type === NBD.REPLY_TYPE_ERROR_OFFSET && e.offset !== undefined) rec.offset = e.offset;
        }
        if (p.errno === 0) {
          p.errno = errno;
          p.message = e.message || undefined;
          if (type === NBD.REPLY_TYPE_ERROR_OFFSET && e.offset !== undefined) {
            p.errorOffset = e.offset;
            if (e.offset < p.offset || e.offset >= p.offset + p.length) {
              violate(p, `ERROR_OFFSET offset ${e.offset} outside the request`);
            }
          }
        }
      }
    }
    this.chunkDone();
  }

  private onHole(p: Pending, offset: number, length: number): void {
    if (p.type !== NBD.CMD_READ) return violate(p, 'OFFSET_HOLE chunk in reply to a non-READ request');
    const rel = offset - p.offset;
    if (length === 0) return violate(p, 'OFFSET_HOLE chunk of length 0');
    if (rel < 0 || rel + length > p.length) {
      return violate(p, `hole ${offset}+${length} outside the request ${p.offset}+${p.length}`);
    }
    if (!addSpan(p, rel, length)) return violate(p, `hole ${offset}+${length} overlaps earlier content`);
    if (p.mode === M_READ_SPANS) {
      const start = p.bufAt + rel;
      const holes = p.holes!;
      const last = holes[holes.length - 1];
      if (last && last.start + last.length === start) last.length += length;
      else holes.push({ start, length });
    } else if (p.mode === M_READ_ZERO) {
      p.buf!.fill(0, p.bufAt + rel, p.bufAt + rel + length);
    } else if (p.mode === M_RAW) {
      this.rawBuf(p); // zero-filled on allocation
    }
  }

  private onStatus(p: Pending, type: number, b: Buffer, rec: RawChunk | null): void {
    if (p.type !== NBD.CMD_BLOCK_STATUS) return violate(p, 'block status chunk in reply to a non-BLOCK_STATUS request');
    if (type === NBD.REPLY_TYPE_BLOCK_STATUS_EXT && !this._extended) {
      return violate(p, 'BLOCK_STATUS_EXT chunk without extended headers');
    }
    let d: ReturnType<typeof decodeBlockStatus>;
    try {
      d = decodeBlockStatus(b, type === NBD.REPLY_TYPE_BLOCK_STATUS_EXT);
    } catch (e) {
      return violate(p, (e as Error).message);
    }
    const name = this.contextNames.get(d.contextId);
    if (rec) {
      rec.contextId = d.contextId;
      if (name !== undefined) rec.context = name;
      rec.extents = d.extents;
    }
    if (name === undefined) return violate(p, `block status for unknown context id ${d.contextId}`);
    const ext = d.extents;
    if (ext.length === 0) return violate(p, `block status for ${name} without extents`);
    const status = (p.status ??= new Map());
    if (status.has(name)) return violate(p, `two block status chunks for ${name}`);
    status.set(name, ext);
    let before = 0;
    for (let i = 0; i < ext.length; i++) {
      if (ext[i]!.length === 0) return violate(p, `zero-length extent in block status for ${name}`);
      if (i < ext.length - 1) before += ext[i]!.length;
    }
    if (ext.length > 1 && p.length > 0 && before >= p.length) {
      return violate(p, `block status for ${name} has extents starting past the request`);
    }
    if (p.flags & NBD.CMD_FLAG_REQ_ONE && (ext.length !== 1 || ext[0]!.length > p.length)) {
      return violate(p, `block status for ${name} with REQ_ONE must be one extent within the request`);
    }
  }

  private beginData(offset: number): void {
    const p = this.rp!;
    const n = this.rremaining;
    if (this.rrec) {
      this.rrec.offset = offset;
      this.rrec.length = n;
    }
    if (p.type !== NBD.CMD_READ) {
      violate(p, 'OFFSET_DATA chunk in reply to a non-READ request');
      return this.skipPayload(n);
    }
    const rel = offset - p.offset;
    if (n === 0) violate(p, 'OFFSET_DATA chunk without data');
    if (rel < 0 || rel + n > p.length) {
      violate(p, `data ${offset}+${n} outside the request ${p.offset}+${p.length}`);
      return this.skipPayload(n);
    }
    if (!addSpan(p, rel, n)) {
      violate(p, `data ${offset}+${n} overlaps earlier content`);
      return this.skipPayload(n);
    }
    this.startData(p, rel, n);
  }

  private startData(p: Pending, rel: number, n: number): void {
    const dst = p.mode === M_RAW ? this.rawBuf(p) : p.buf!;
    this.rdst = dst;
    this.rdstAt = p.bufAt + rel;
    this.rremaining = n;
    this.rs = RS_DATA;
  }

  private endData(): void {
    this.rs = RS_HEADER;
    this.rdst = null;
    if (this.rsimple) {
      this.rsimple = false;
      this.complete(this.rp!);
      return;
    }
    this.chunkDone();
  }

  private chunkDone(): void {
    this.rs = RS_HEADER;
    if (this.rflags & NBD.REPLY_FLAG_DONE) this.complete(this.rp!);
  }

  private rawBuf(p: Pending): Buffer {
    if (p.buf === null) p.buf = Buffer.alloc(p.length);
    return p.buf;
  }

  private complete(p: Pending): void {
    this.pending.delete(p.cookie);
    this.rp = null;
    if (p.type === NBD.CMD_READ && !p.simple && p.errno === 0 && p.covered !== p.length && p.violation === undefined) {
      p.violation = `read reply covers ${p.covered} of ${p.length} bytes`;
    }
    if (p.mode === M_RAW) {
      const r: RawReply = { error: p.errno, chunks: p.chunks ?? [], simple: p.simple };
      if (p.message !== undefined) r.message = p.message;
      if (p.errorOffset !== undefined) r.errorOffset = p.errorOffset;
      if (p.buf !== null) r.data = p.buf;
      if (p.status !== null) r.status = p.status;
      if (p.violation !== undefined) r.violation = p.violation;
      p.resolve(r);
    } else if (p.violation !== undefined) {
      p.reject(new NbdProtocolError(p.violation, p.type));
    } else if (p.errno !== 0) {
      const details = { command: p.type, ...(p.message ? { serverMessage: p.message } : {}), ...(p.errorOffset !== undefined ? { errorOffset: p.errorOffset } : {}) };
      p.reject(new NbdRequestError(p.errno, p.message, details));
    } else if (p.mode === M_STATUS) {
      const status = p.status ?? new Map<string, Extent[]>();
      for (const name of this._contexts.keys()) {
        if (!status.has(name)) {
          p.reject(new NbdProtocolError(`block status reply has no extents for ${name}`, p.type));
          return this.afterComplete();
        }
      }
      p.resolve(status);
    } else {
      p.resolve(undefined);
    }
    this.afterComplete();
  }

  private afterComplete(): void {
    if (this.pending.size === 0 && this.drainWaiters.length > 0) {
      for (const w of this.drainWaiters.splice(0)) w();
    }
  }

  /** With a request timeout: give up on a server that leaves the oldest request unanswered. */
  private checkStuck(): void {
    const oldest = this.pending.values().next().value as Pending | undefined;
    if (!oldest) return;
    const waited = Date.now() - oldest.sentAt;
    if (waited < this.requestTimeout) return;
    const err = new NbdConnectionError(
      `no reply from the server for ${waited} ms (NBD_CMD_${commandName(oldest.type)}; request timeout ${this.requestTimeout} ms)`,
    );
    (err as { code?: string }).code = 'ETIMEDOUT';
    this.die(err);
  }

  /** Broken framing: the stream cannot be followed any further. */
  private fatal(message: string): void {
    this.die(new NbdConnectionError(`protocol error: ${message}`));
  }

  /** The connection is gone: fail everything, close the socket, emit 'close' once. */
  private die(err: NbdConnectionError): void {
    if (this.phase === 'closed') return;
    const clean = this.closeRequested || this.discSent;
    this.phase = 'closed';
    this.deathError = err;
    if (this.watchdog) clearInterval(this.watchdog);
    this.watchdog = null;
    this.flushScheduled = false;
    this.out = [];
    const pend = [...this.pending.values()];
    this.pending.clear();
    for (const p of pend) p.reject(err);
    const w = this.waiter;
    this.waiter = null;
    w?.reject(err);
    this.stepAbort?.(err);
    this.socket?.destroy();
    this.rawSocket?.destroy();
    for (const d of this.drainWaiters.splice(0)) d();
    for (const c of this.closeWaiters.splice(0)) c();
    this.emit('close', clean ? undefined : err);
  }
}

function violate(p: Pending, message: string): void {
  if (p.violation === undefined) p.violation = message;
}

/**
 * Record that [start, start+len) of the request is covered; false when it overlaps earlier
 * content. Intervals are kept sorted and merged (usually there is just one).
 */
function addSpan(p: Pending, start: number, len: number): boolean {
  const end = start + len;
  const iv = p.spans;
  if (iv === null) {
    p.spans = [start, end];
    p.covered = len;
    return true;
  }
  const n = iv.length;
  if (start >= iv[n - 1]!) {
    if (start === iv[n - 1]) iv[n - 1] = end;
    else iv.push(start, end);
    p.covered += len;
    return true;
  }
  let i = 0;
  while (i < n && iv[i + 1]! <= start) i += 2;
  if (i < n && iv[i]! < end) return false;
  iv.splice(i, 0, start, end);
  if (i > 0 && iv[i - 1] === start) {
    iv[i - 1] = end;
    iv.splice(i, 2);
    i -= 2;
  }
  if (i + 2 < iv.length && iv[i + 2] === iv[i + 1]) {
    iv[i + 1] = iv[i + 3]!;
    iv.splice(i + 2, 2);
  }
  p.covered += len;
  return true;
}

/** Sort spans and merge touching ones. */
function mergeSpans(spans: Span[]): Span[] {
  if (spans.length < 2) return spans;
  spans.sort((a, b) => a.start - b.start);
  const out: Span[] = [spans[0]!];
  for (let i = 1; i < spans.length; i++) {
    const s = spans[i]!;
    const last = out[out.length - 1]!;
    if (last.start + last.length === s.start) last.length += s.length;
    else out.push(s);
  }
  return out;
}
