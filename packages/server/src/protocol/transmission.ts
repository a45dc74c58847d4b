import {
  Errno,
  FLAG_FAST_ZERO,
  FLAG_FUA,
  FLAG_MAY_TRIM,
  FLAG_REQ_ONE,
  NbdError,
  layerOf,
  errnoName,
  isFatalError,
  toErrno,
  type ReadResult,
  type ZeroSpan,
} from '../api/common.js';
import type { Context } from '../backend/context.js';
import { MAX_EXTENTS } from '../backend/extents.js';
import { Mutex, Semaphore } from '../backend/mutex.js';
import * as C from '../wire/constants.js';
import {
  chunkHeaderSize,
  decodeRequest,
  encodeErrorPayload,
  requestSize,
  writeChunkHeader,
  writeSimpleReplyHeader,
  type Request,
} from '../wire/codec.js';
import { writeU64 } from '../wire/bytes.js';
import { bufferPool } from './buffer-pool.js';
import { POLL_STOP, Poller } from './poller.js';
import type { Negotiated } from './handshake.js';
import type { ReplyWriter } from './reply-writer.js';
import type { ConnectionBudget } from './memory-budget.js';
import type { ProtocolSettings } from './settings.js';
import { ERRNO_COUNT, errnoIndex, opIndex, type ExportStats } from './stats.js';
import { PAUSE_BUDGET, PAUSE_QUEUE, PAUSE_TURN, type SocketReader } from './socket-reader.js';

/**
 * READ data starts this far into its reply buffer, with the reply header just before it: copying
 * into a cache-line-aligned destination is about twice as fast as into one at offset 16 or 28.
 */
const DATA_ALIGN = 64;
/** Holes smaller than this are sent as zero bytes: a hole chunk would cost more than it saves. */
const MIN_HOLE_CHUNK = 4096;
/** A WRITE this big makes the next read stage only a few bytes (see direct-reads.ts). */
const BIG_PAYLOAD = 64 * 1024;
/** WRITE payload still missing beyond which it is read straight into its buffer. */
const DIRECT_READ_MIN = 16 * 1024;
/**
 * Requests of one connection being served at once, at most. Each costs some memory beyond its
 * data (its parsed header, promises, closures), which the byte budget does not see: a client
 * pipelining tiny requests must still not make the server hold millions of them.
 */
const MAX_REQUESTS_IN_FLIGHT = 1024;
/**
 * Work one connection may start in one turn of the event loop: requests, and bytes of READ and
 * WRITE data. Beyond it the connection lets the others have their turn before going on, so a
 * client that pipelines thousands of requests per read cannot stall everyone else. Normal clients
 * (64 requests in flight, 16 MiB of data) stay within one turn.
 */
const TURN_REQUESTS = 256;
const TURN_BYTES = 32 * 1024 * 1024;
/** Hard cap on a compact-header WRITE payload we read and drop after rejecting the request. */
const MAX_DROPPABLE_PAYLOAD = 0xffffffff;

/**
 * Which command flags each command accepts, before checking what the export advertises. FUA is
 * allowed on every command once advertised (the spec: it has no effect where nothing is
 * written), as nbdkit does; READ, FLUSH, CACHE and BLOCK_STATUS simply ignore it.
 */
const VALID_FLAGS: Record<number, number> = {
  [C.CMD_READ]: C.CMD_FLAG_DF | C.CMD_FLAG_FUA,
  [C.CMD_WRITE]: C.CMD_FLAG_FUA,
  [C.CMD_DISC]: 0,
  [C.CMD_FLUSH]: C.CMD_FLAG_FUA,
  [C.CMD_TRIM]: C.CMD_FLAG_FUA,
  [C.CMD_CACHE]: C.CMD_FLAG_FUA,
  [C.CMD_WRITE_ZEROES]: C.CMD_FLAG_FUA | C.CMD_FLAG_NO_HOLE | C.CMD_FLAG_FAST_ZERO,
  [C.CMD_BLOCK_STATUS]: C.CMD_FLAG_REQ_ONE | C.CMD_FLAG_FUA,
};

/** Whose buffer a WRITE payload is in, which says what happens to it once the write is done. */
const enum Payload {
  /** A view of bytes the reader handed over (or none): nothing to give back. */
  Kept,
  /** From the buffer pool: back into it. */
  Pooled,
  /** The plugin's own memory (writeView): the plugin is told the core is done with it. */
  InPlace,
}

/** What a finished pending payload's buffer is. */
const payloadKind = (p: PendingWrite): Payload => (p.inPlace ? Payload.InPlace : p.buf !== null ? Payload.Pooled : Payload.Kept);

/** A WRITE (or other request with a payload) whose payload is still arriving. */
interface PendingWrite {
  req: Request;
  error: NbdError | null;
  /** Where the payload goes (pooled, or the plugin's own memory), or null when it is read and dropped. */
  buf: Buffer | null;
  /** `buf` is a view of the plugin's memory (writeView), not a pooled buffer. */
  inPlace: boolean;
  got: number;
}

/**
 * The transmission phase of one connection: parse requests as bytes arrive, run them with many
 * in flight, reply in completion order.
 */
export class Transmission {
  private readonly ctx: Context;
  private readonly extended: boolean;
  private readonly structured: boolean;
  /**
   * TLS: no READ replies from views. The encryption reads every byte in this process, where a view
   * of a mapped file that another program shrank is a SIGBUS for the whole server (a plain socket
   * write only fails with EFAULT); and TLS copies the bytes anyway, so a view saves little.
   */
  private readonly tls: boolean;
  private readonly headerSize: number;
  private readonly maxBlockStatusReply: number;
  /** Requests of this connection worked on at once: one (thread model) or -t N; null = any number. */
  private readonly connLock: Semaphore | null;
  private inFlight = 0;
  private paused = false;
  private sawDisc = false;
  /** The client sent EOF: what is queued is parsed, then the connection ends. */
  private inputEnded = false;
  private stopping = false;
  /** WRITE payload still to arrive for the request being parsed. */
  private pendingWrite: PendingWrite | null = null;
  private idleWaiters: Array<() => void> = [];
  /** Whether big WRITE payloads are read straight into their buffers (direct-reads.ts). */
  private readonly direct: boolean;
  /** Polls the socket for a while once everything is answered (poller.ts); needs direct reads. */
  private readonly poller: Poller | null;
  /** Requests started so far, and the counts of those and of reads when last idle. */
  private started = 0;
  private startedBytes = 0;
  /** A turn was yielded (see TURN_REQUESTS); parsing goes on from setImmediate. */
  private yielded = false;
  private startedAtIdle = 0;
  /** The last READ or WRITE started was BIG_PAYLOAD or more (then no polling, see idleIfDone). */
  private lastBig = false;
  private readsAtIdle = 0;
  /** Inside parse(): requests answered there wait for its end before the connection counts as idle. */
  private parsing = 0;
  private finished!: () => void;
  readonly done: Promise<void>;

  constructor(
    private readonly settings: ProtocolSettings,
    private readonly n: Negotiated,
    private readonly reader: SocketReader,
    private readonly writer: ReplyWriter,
    /** Request bytes being served and reply bytes not yet sent count here (memory-budget.ts). */
    private readonly budget: ConnectionBudget,
    /** Where this connection's requests are counted (--metrics); null: nothing is counted. */
    private readonly stats: ExportStats | null = null,
  ) {
    this.ctx = n.ctx;
    this.extended = n.extended;
    this.structured = n.structured;
    this.tls = n.isTls;
    this.headerSize = requestSize(n.extended);
    this.maxBlockStatusReply = C.EXTENDED_REPLY_SIZE + 8 + MAX_EXTENTS * (n.extended ? 16 : 8);
    this.connLock = settings.perConnectionLock
      ? new Mutex()
      : settings.requestsPerConnection > 0
        ? new Semaphore(settings.requestsPerConnection)
        : null;
    this.done = new Promise((resolve) => (this.finished = resolve));
    reader.onData = () => this.parse();
    reader.onEnd = (hard) => {
      // Gone without DISC (or the socket failed): nobody may wait for the replies, so long waits
      // below may end early. Still, what is answered goes out: a client that sent DISC and then
      // closed its sending side (libnbd) reads every reply it asked for.
      if (hard || !this.sawDisc) settings.abort?.abort(new NbdError(Errno.ESHUTDOWN, 'the client disconnected'));
      if (hard) return this.stop('client went away');
      // Every request that arrived before EOF is still answered (as nbdkit does): parse what is
      // queued, and end once nothing whole is left (parseHeld), also after a pause.
      this.inputEnded = true;
      if (!this.paused && !this.yielded) this.parse();
    };
    budget.onRelease = () => this.resumeIfRoom();
    writer.onBroken = () => {
      settings.abort?.abort(new NbdError(Errno.ESHUTDOWN, 'the client disconnected'));
      this.stop('the socket failed');
    };
    this.wakeFromServer = () => this.resumeIfRoom();
    // The handshake may have stopped reading because the client sent far ahead of it.
    reader.resume(PAUSE_QUEUE);
    this.direct = reader.useDirectReads();
    reader.onDirect = (n) => this.payloadArrived(n);
    // A paused or ending connection reads nothing more, polled or not.
    const readNow = () => (this.paused || this.yielded || this.stopping ? POLL_STOP : reader.readNow());
    this.poller = this.direct && settings.pollMaxNs > 0 ? new Poller(settings.pollMaxNs, readNow) : null;
    if (this.poller) {
      const poller = this.poller;
      reader.onWake = () => poller.woke();
    }
    // Which fast paths this socket got (they use Node internals; tests assert them per Node line).
    settings.debug(`fast paths: direct reads ${this.direct ? 'on' : 'off'}, polling ${this.poller ? 'on' : 'off'}`);
    this.parse();
  }

  private readonly wakeFromServer: () => void;

  /** Stop reading requests (input is dropped from now on); `done` resolves once in-flight requests have replied. */
  stop(reason: string): void {
    if (this.stopping) return;
    this.stopping = true;
    const polled = this.poller ? ` (${this.reader.polledReads} of ${this.reader.reads} reads found by polling)` : '';
    this.settings.debug(`connection ending: ${reason}${polled}`);
    this.reader.discardInput();
    // A payload that was arriving in the plugin's own memory never will now.
    const p = this.pendingWrite;
    if (p?.inPlace) {
      this.pendingWrite = null;
      this.giveBack(p.buf!, Payload.InPlace, false);
    }
    this.budget.server.cancel(this.wakeFromServer);
    this.budget.onRelease = null;
    this.whenIdle(() => this.finished());
  }

  private whenIdle(fn: () => void): void {
    if (this.inFlight === 0) fn();
    else this.idleWaiters.push(fn);
  }

  /**
   * Parse and start what has arrived, `completed` (a WRITE whose payload just came in) first.
   * Replies are held until the end, so those a synchronous plugin gave go out together.
   */
  private parse(completed: PendingWrite | null = null): void {
    this.writer.hold();
    this.parsing++;
    try {
      if (completed) this.start(completed.req, completed.buf, null, payloadKind(completed));
      this.parseHeld();
    } finally {
      this.parsing--;
      this.writer.release();
    }
    this.idleIfDone();
  }

  /**
   * Everything asked so far is answered: the poller may look for what comes next, when that is
   * about to come: the client looks like one that waits for each answer (one read brought exactly
   * one request since the last time), or a WRITE payload is still arriving. Not while replies
   * wait for the socket: that client is busy taking them in and needs the CPU; nor for clients
   * that send several requests per read, which wake us soon enough anyway.
   */
  private idleIfDone(): void {
    if (!this.poller || this.inFlight !== 0 || this.paused || this.yielded || this.stopping || this.parsing > 0) return;
    // Never around big requests: serving one takes longer than the wake-up a poll saves, and a
    // bulk copy's client (nbdcopy) needs the CPU the poll burns waiting for the rest of its next
    // payload (docs/performance.md, third pass: 0.06-0.09 CPU-s/GiB of nbdcopy into a file).
    const p = this.pendingWrite;
    const oneByOne =
      !this.lastBig &&
      this.reader.stream.writableLength === 0 &&
      (p !== null
        ? p.req.length < BIG_PAYLOAD
        : this.started - this.startedAtIdle === 1 && this.reader.reads - this.readsAtIdle === 1);
    this.startedAtIdle = this.started;
    this.readsAtIdle = this.reader.reads;
    this.poller.idle(oneByOne);
  }

  private parseHeld(): void {
    const q = this.reader.queue;
    const bytesBefore = this.startedBytes;
    for (let requests = 0; !this.stopping; ) {
      if (requests >= TURN_REQUESTS || this.startedBytes - bytesBefore >= TURN_BYTES) {
        this.yieldTurn();
        return;
      }
      if (this.pendingWrite) {
        if (!this.takePayload()) return this.endIfInputEnded();
        continue;
      }
      if (q.length < this.headerSize) return this.endIfInputEnded();
      const req = decodeRequest(q.take(this.headerSize), this.extended);
      if (!req) return this.dropClient('bad request magic');
      requests++;
      if (!this.admit(req)) return;
      // Also after requests that failed at once: their replies count too.
      this.pauseIfFull();
      if (this.paused) return;
    }
  }

  /** Nothing whole is left of what the client sent before EOF. */
  private endIfInputEnded(): void {
    if (this.inputEnded) this.stop('client closed its sending side');
  }

  /**
   * Framing is broken: nothing after this point can be trusted to be a request. Stop reading;
   * the requests before it are still answered, then the connection closes.
   */
  private dropClient(why: string): void {
    this.settings.error(`${why}: closing the connection`);
    this.stop('broken framing');
  }

  /** Validate and start one request. Returns false when the connection must stop parsing. */
  private admit(req: Request): boolean {
    const { type, flags, length } = req;
    const hasPayload =
      type === C.CMD_WRITE || (this.extended && (flags & C.CMD_FLAG_PAYLOAD_LEN) !== 0);
    if (type === C.CMD_DISC) {
      this.sawDisc = true;
      this.stop('client sent DISC');
      return false;
    }
    const error = this.validate(req);
    if (this.direct) this.reader.expectBigPayload = type === C.CMD_WRITE && length >= BIG_PAYLOAD;
    if (hasPayload) {
      // With extended headers the length says how many payload bytes follow whatever the
      // command: more than we would ever accept is a client we cannot stay in step with (the
      // spec: the server should disconnect), not a payload to read and drop.
      if (this.extended ? length > this.settings.maxPayload : length > MAX_DROPPABLE_PAYLOAD) {
        this.dropClient(`request payload of ${length} bytes exceeds the maximum payload of ${this.settings.maxPayload}`);
        return false;
      }
      const keep = !error && type === C.CMD_WRITE;
      this.pendingWrite = { req, error, buf: null, inPlace: false, got: 0 };
      if (keep) {
        const q = this.reader.queue;
        // Where the plugin keeps these bytes, when it says (writeView): the payload goes there
        // directly, read by the kernel or copied once from what already arrived.
        const place = this.placeFor(req);
        if (place) {
          this.pendingWrite.buf = place;
          this.pendingWrite.inPlace = true;
          if (q.length >= length) {
            this.pendingWrite = null;
            q.copyInto(place, 0, length);
            this.start(req, place, null, Payload.InPlace);
          }
          return true;
        }
        // The payload is often in the bytes we already hold: a view of them when they are ours
        // to keep, otherwise (direct reads' reused staging buffer) one copy into a pooled buffer.
        if (q.length >= length) {
          this.pendingWrite = null;
          if (!this.reader.volatile) {
            this.start(req, q.take(length), null);
          } else {
            const payload = bufferPool.get(length);
            q.copyInto(payload, 0, length);
            this.start(req, payload, null, Payload.Pooled);
          }
          return true;
        }
        this.pendingWrite.buf = bufferPool.get(length);
      }
      return true;
    }
    this.start(req, null, error);
    return true;
  }

  /** Move WRITE payload bytes out of the queue; true once the whole payload is in. */
  private takePayload(): boolean {
    const p = this.pendingWrite!;
    const q = this.reader.queue;
    // Payload is arriving through the queue: a direct target set earlier may no longer be where
    // the next bytes belong (a read armed before it was set brought them here instead). It is
    // set again below if still wanted; left stale, the next read would land in a finished buffer.
    this.reader.directTarget = null;
    const want = p.req.length - p.got;
    const m = Math.min(want, q.length);
    if (m === 0 && want > 0) return false;
    if (p.buf) q.copyInto(p.buf, p.got, m);
    else q.skip(m);
    p.got += m;
    if (p.got < p.req.length) {
      // Nothing else is queued: let the socket read the rest of a big payload into place.
      if (this.direct && p.buf && q.length === 0 && p.req.length - p.got >= DIRECT_READ_MIN) {
        this.reader.directTarget = p.buf.subarray(p.got, p.req.length);
      }
      return false;
    }
    this.pendingWrite = null;
    this.start(p.req, p.buf, p.error ?? (p.req.type === C.CMD_WRITE ? null : this.unsupportedPayload()), payloadKind(p));
    return true;
  }

  /** The plugin's own memory for a WRITE's payload (see PluginV2.writeView), or null. */
  private placeFor(req: Request): Buffer | null {
    let v: Uint8Array | undefined;
    try {
      v = this.ctx.writeView(req.length, req.offset);
    } catch {
      return null; // the ordinary path reports whatever is wrong
    }
    if (!v) return null;
    return Buffer.isBuffer(v) ? v : Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  }

  /** A direct read put `n` more payload bytes in place. */
  private payloadArrived(n: number): void {
    const p = this.pendingWrite;
    if (!p?.buf) {
      // Cannot happen while directTarget is kept in step with pendingWrite; never crash for it.
      this.dropClient('internal error: a direct read arrived with no payload waiting for it');
      return;
    }
    p.got += n;
    if (p.got < p.req.length) {
      this.reader.directTarget = p.buf!.subarray(p.got, p.req.length);
      this.idleIfDone();
      return;
    }
    this.pendingWrite = null;
    this.parse(p);
  }

  private unsupportedPayload(): NbdError {
    return new NbdError(Errno.EINVAL, 'this command takes no payload');
  }

  /** The spec's checks, in the order that gives the most useful error. */
  private validate(req: Request): NbdError | null {
    const { type, flags, offset, length } = req;
    const f = this.n.flags;
    if (type > C.CMD_BLOCK_STATUS) return new NbdError(Errno.EINVAL, `unknown command ${type}`);
    const name = C.CMD_NAMES[type];
    let allowed = VALID_FLAGS[type]!;
    if (this.extended && type === C.CMD_WRITE) allowed |= C.CMD_FLAG_PAYLOAD_LEN;
    if (flags & ~allowed) return new NbdError(Errno.EINVAL, `${name}: flags 0x${flags.toString(16)} are not valid here`);
    if (flags & C.CMD_FLAG_FUA && !(f & C.TF_SEND_FUA)) return new NbdError(Errno.EINVAL, `${name}: FUA was not advertised`);
    if (flags & C.CMD_FLAG_DF && !(f & C.TF_SEND_DF)) return new NbdError(Errno.EINVAL, `${name}: DF was not negotiated`);
    if (flags & C.CMD_FLAG_FAST_ZERO && !(f & C.TF_SEND_FAST_ZERO)) {
      return new NbdError(Errno.EINVAL, `${name}: FAST_ZERO was not advertised`);
    }
    switch (type) {
      case C.CMD_FLUSH:
        if (!(f & C.TF_SEND_FLUSH)) return new NbdError(Errno.EINVAL, 'FLUSH is not supported by this export');
        return null;
      case C.CMD_TRIM:
        if (f & C.TF_READ_ONLY) return new NbdError(Errno.EPERM, 'TRIM: the export is read-only');
        if (!(f & C.TF_SEND_TRIM)) return new NbdError(Errno.EINVAL, 'TRIM is not supported by this export');
        break;
      case C.CMD_WRITE_ZEROES:
        if (f & C.TF_READ_ONLY) return new NbdError(Errno.EPERM, 'WRITE_ZEROES: the export is read-only');
        if (!(f & C.TF_SEND_WRITE_ZEROES)) return new NbdError(Errno.EINVAL, 'WRITE_ZEROES is not supported by this export');
        break;
      case C.CMD_WRITE:
        if (f & C.TF_READ_ONLY) return new NbdError(Errno.EPERM, 'WRITE: the export is read-only');
        break;
      case C.CMD_CACHE:
        if (!(f & C.TF_SEND_CACHE)) return new NbdError(Errno.EINVAL, 'CACHE is not supported by this export');
        break;
      case C.CMD_BLOCK_STATUS:
        if (this.n.baseAllocation === null) {
          return new NbdError(Errno.EINVAL, 'BLOCK_STATUS: no metadata context was selected');
        }
        break;
    }
    if (length === 0) return new NbdError(Errno.EINVAL, `${name}: zero-length request`);
    const { minimum, maximum } = this.n.blockSize;
    if ((type === C.CMD_READ || type === C.CMD_WRITE) && length > maximum) {
      return new NbdError(Errno.EINVAL, `${name}: ${length} bytes exceeds the maximum block size of ${maximum}`);
    }
    const size = this.ctx.size;
    // The spec lets a server reject requests not aligned to its minimum block size; the layers
    // that declared it rely on never seeing them. A request may end at an unaligned export end.
    if (minimum > 1 && (offset % minimum !== 0 || (length % minimum !== 0 && offset + length !== size))) {
      return new NbdError(Errno.EINVAL, `${name}: offset ${offset} length ${length} is not aligned to the minimum block size of ${minimum}`);
    }
    if (!(offset + length <= size)) {
      const errno = type === C.CMD_WRITE || type === C.CMD_WRITE_ZEROES ? Errno.ENOSPC : Errno.EINVAL;
      return new NbdError(errno, `${name}: offset ${offset} + length ${length} is beyond the end of the export (${size})`);
    }
    return null;
  }

  /** `kind`: whose memory the payload is in, so it goes back where it belongs once the request is done. */
  private start(req: Request, payload: Buffer | null, error: NbdError | null, kind = Payload.Kept): void {
    const stats = this.stats;
    if (stats !== null) stats.requests[opIndex(req.type)]++;
    if (error) {
      if (kind !== Payload.Kept) this.giveBack(payload!, kind);
      this.replyError(req, error, true);
      return;
    }
    if (this.settings.traceRequests) {
      this.settings.debug(`${C.CMD_NAMES[req.type] ?? req.type} ${req.length} bytes at ${req.offset} flags 0x${req.flags.toString(16)} cookie ${req.cookie}`);
    }
    const cost = this.costOf(req);
    this.started++;
    if (req.type === C.CMD_READ || req.type === C.CMD_WRITE) {
      this.startedBytes += req.length;
      this.lastBig = req.length >= BIG_PAYLOAD;
    }
    this.inFlight++;
    let t0 = 0;
    if (stats !== null) {
      stats.inFlight++;
      t0 = performance.now();
    }
    this.budget.take(cost);
    this.pauseIfFull();
    const lock = this.settings.requestLock;
    let pending: void | Promise<void>;
    if (this.connLock || lock) {
      const run = () => this.execute(req, payload);
      pending = (this.connLock ?? lock!).run(() => (this.connLock && lock ? lock.run(run) : run()));
    } else {
      pending = this.executeNow(req, payload);
    }
    if (pending === undefined) {
      // Answered already (a synchronous plugin): no promise turn at all.
      if (kind !== Payload.Kept) this.giveBack(payload!, kind);
      this.finish(cost, req.type, t0);
      return;
    }
    pending.then(
      () => {
        // Plugins may not keep the buffer after pwrite returns, so it can be reused.
        if (kind !== Payload.Kept) this.giveBack(payload!, kind);
        this.finish(cost, req.type, t0);
      },
      (err) => {
        this.settings.error(`internal error: ${(err as Error).stack ?? err}`);
        if (kind === Payload.InPlace) this.giveBack(payload!, kind);
        this.finish(cost, req.type, t0);
      },
    );
  }

  /** A payload buffer the request is done with: back to the pool, or the plugin told (releaseView). */
  private giveBack(payload: Buffer, kind: Payload, completed = true): void {
    if (kind === Payload.Pooled) bufferPool.put(payload);
    else this.releaseView(payload, completed);
  }

  /** Tell the plugin the core is done with one of its views; its failure is logged, not thrown. */
  private releaseView(view: Uint8Array, completed: boolean): void {
    try {
      this.ctx.releaseView(view, completed);
    } catch (err) {
      this.settings.error(`releaseView: ${(err as Error).message}`);
    }
  }

  /**
   * What a request may make us hold until it is answered: its data for READ and WRITE, the
   * largest reply for BLOCK_STATUS (its reply is built later, after many may have started).
   */
  private costOf(req: Request): number {
    if (req.type === C.CMD_READ || req.type === C.CMD_WRITE) return req.length;
    // The reply, and the lists it is built from (several times its size while they live).
    if (req.type === C.CMD_BLOCK_STATUS) return 4 * this.maxBlockStatusReply;
    return 0;
  }

  /** A request of command `type`, started at `t0` (performance.now(), when counted), is done. */
  private finish(cost: number, type: number, t0: number): void {
    const stats = this.stats;
    if (stats !== null) {
      stats.inFlight--;
      stats.observe(opIndex(type), (performance.now() - t0) / 1000);
    }
    this.inFlight--;
    this.budget.give(cost);
    // An answer that came later (an asynchronous plugin): the connection may be idle now.
    this.idleIfDone();
    if (this.inFlight === 0 && this.idleWaiters.length) {
      const w = this.idleWaiters;
      this.idleWaiters = [];
      for (const fn of w) fn();
    }
  }

  /** Kinds of error already logged on this connection, and how many were not logged again. */
  private readonly loggedErrors = new Set<string>();
  private unloggedErrors = 0;

  /**
   * Errors are logged by default, naming the layer (`file: error: READ ...`), but only the first
   * of each kind (layer, command, errno) per connection: a client repeating a failing request
   * must not flood the log. `-v` shows every one. `layer` null: the client's request was invalid.
   */
  private logError(cmd: string, errno: number, layer: string | null, text: string): void {
    const line = layer === null ? `error: invalid request: ${text}` : `${layer}: error: ${text}`;
    const kind = `${layer ?? ''}\0${cmd}\0${errno}`;
    // Requests cut short because the client left or the server is stopping are not failures.
    const expected = errno === Errno.ESHUTDOWN && this.settings.abort?.signal.aborted === true;
    if (expected || this.loggedErrors.has(kind)) {
      if (!expected) this.unloggedErrors++;
      this.settings.debug(line);
      return;
    }
    this.loggedErrors.add(kind);
    this.settings.error(line);
  }

  /** At the end: how many errors were only counted (see logError). */
  reportUnloggedErrors(): void {
    if (this.unloggedErrors > 0) {
      this.settings.error(`${this.unloggedErrors} more error(s) like the ones above on this connection (-v shows each)`);
    }
  }

  /** Let other connections run; parse the rest of what was read in the next turn. */
  private yieldTurn(): void {
    if (this.yielded) return;
    this.yielded = true;
    this.reader.pause(PAUSE_TURN);
    setImmediate(() => {
      this.yielded = false;
      this.reader.resume(PAUSE_TURN);
      if (!this.stopping) this.parse();
    });
  }

  /** Stop reading while this connection holds too much (memory-budget.ts) or serves too many requests. */
  private pauseIfFull(): void {
    if (this.paused || (!this.budget.full && this.inFlight < MAX_REQUESTS_IN_FLIGHT)) return;
    this.paused = true;
    this.reader.pause(PAUSE_BUDGET);
    this.budget.server.wait(this.wakeFromServer);
  }

  private resumeIfRoom(): void {
    if (!this.paused || this.stopping || this.inFlight > MAX_REQUESTS_IN_FLIGHT / 2) return;
    if (!this.budget.roomy) {
      this.budget.server.wait(this.wakeFromServer);
      return;
    }
    this.paused = false;
    this.budget.server.cancel(this.wakeFromServer);
    this.reader.resume(PAUSE_BUDGET);
    this.parse();
  }

  /** Queue a READ reply held in `b` (pooled), which goes back once the socket has sent it. */
  private pushReadReply(reply: Uint8Array, b: Buffer): void {
    this.writer.pushThen(reply, () => bufferPool.put(b));
  }

  /**
   * READ and WRITE without promises when the layers below answer at once; everything else, and
   * any layer that answers later, through execute(). Returns undefined once the reply is queued.
   */
  private executeNow(req: Request, payload: Buffer | null): void | Promise<void> {
    if (req.type === C.CMD_READ) return this.read(req);
    if (req.type !== C.CMD_WRITE) return this.execute(req, payload);
    let done: void | Promise<void>;
    try {
      done = this.ctx.pwriteNow(payload!, req.offset, req.flags & C.CMD_FLAG_FUA ? FLAG_FUA : 0);
    } catch (err) {
      this.replyError(req, err);
      return;
    }
    if (!isPromiseLike(done)) {
      this.replyOk(req);
      return;
    }
    return done.then(
      () => this.replyOk(req),
      (err) => this.replyError(req, err),
    );
  }

  private async execute(req: Request, payload: Buffer | null): Promise<void> {
    const ctx = this.ctx;
    const fua = req.flags & C.CMD_FLAG_FUA ? FLAG_FUA : 0;
    try {
      switch (req.type) {
        case C.CMD_READ:
          return await this.read(req);
        case C.CMD_WRITE:
          await ctx.pwrite(payload!, req.offset, fua);
          break;
        case C.CMD_FLUSH:
          await ctx.flush(0);
          break;
        case C.CMD_TRIM:
          await ctx.trim(req.length, req.offset, fua);
          break;
        case C.CMD_CACHE:
          await ctx.cache(req.length, req.offset, 0);
          break;
        case C.CMD_WRITE_ZEROES: {
          let flags = fua;
          if (!(req.flags & C.CMD_FLAG_NO_HOLE)) flags |= FLAG_MAY_TRIM;
          if (req.flags & C.CMD_FLAG_FAST_ZERO) flags |= FLAG_FAST_ZERO;
          await ctx.zero(req.length, req.offset, flags);
          break;
        }
        case C.CMD_BLOCK_STATUS:
          return await this.blockStatus(req);
      }
      this.replyOk(req);
    } catch (err) {
      this.replyError(req, err);
    }
  }

  // ---- replies ---------------------------------------------------------------------------------

  private replyOk(req: Request): void {
    if (this.stats !== null) this.stats.bytes[opIndex(req.type)] += req.length;
    const w = this.writer;
    if (this.extended) {
      const at = w.reserve(C.EXTENDED_REPLY_SIZE);
      writeChunkHeader(w.arena, at, true, C.REPLY_FLAG_DONE, C.REPLY_TYPE_NONE, req.cookie, req.offsetExact ?? req.offset, 0);
    } else {
      const at = w.reserve(C.SIMPLE_REPLY_SIZE);
      writeSimpleReplyHeader(w.arena, at, 0, req.cookie);
    }
  }

  private replyError(req: Request, err: unknown, invalid = false): void {
    const errno = toErrno(err);
    const message = err instanceof Error ? err.message : String(err);
    const cmd = C.CMD_NAMES[req.type] ?? `command ${req.type}`;
    if (this.stats !== null) this.stats.errors[opIndex(req.type) * ERRNO_COUNT + errnoIndex(errno)]++;
    this.logError(cmd, errno, invalid ? null : (layerOf(err) ?? this.settings.backend.plugin.plugin.name), `${cmd} ${req.length} bytes at ${req.offset}: ${message} (${errnoName(errno)})`);
    const w = this.writer;
    if (this.structured) {
      const payload = encodeErrorPayload(errno, message);
      const hs = chunkHeaderSize(this.extended);
      const at = w.reserve(hs + payload.length);
      writeChunkHeader(w.arena, at, this.extended, C.REPLY_FLAG_DONE, C.REPLY_TYPE_ERROR, req.cookie, req.offsetExact ?? req.offset, payload.length);
      payload.copy(w.arena, at + hs);
    } else {
      const at = w.reserve(C.SIMPLE_REPLY_SIZE);
      writeSimpleReplyHeader(w.arena, at, errno, req.cookie);
    }
    // The layer below is beyond use: no more requests on this connection (see NbdErrorOptions).
    if (isFatalError(err)) this.stop(`fatal error: ${message}`);
  }

  /**
   * The reply straight from the plugin's memory when it offers a view (readView: no copy at
   * all), otherwise read into a pooled reply buffer; replies at once when the layer below
   * answered at once.
   */
  private read(req: Request): void | Promise<void> {
    let view: Uint8Array | undefined;
    try {
      view = this.tls ? undefined : this.ctx.readView(req.length, req.offset);
    } catch {
      view = undefined; // the ordinary path reports whatever is wrong
    }
    if (view) return this.replyReadView(req, view);
    const b = bufferPool.get(DATA_ALIGN + req.length);
    const data = b.subarray(DATA_ALIGN);
    let result: ReadResult | Promise<ReadResult>;
    try {
      result = this.ctx.preadNow(data, req.offset, 0);
    } catch (err) {
      return this.readFailed(req, b, err);
    }
    if (!isPromiseLike(result)) return this.replyRead(req, b, data, result);
    return result.then(
      (r) => this.replyRead(req, b, data, r),
      (err) => this.readFailed(req, b, err),
    );
  }

  /** A READ reply whose data is a view of the plugin's memory: the header, then the view as is. */
  private replyReadView(req: Request, view: Uint8Array): void {
    if (this.stats !== null) this.stats.bytes[C.CMD_READ] += req.length;
    const w = this.writer;
    if (!this.structured) {
      const at = w.reserve(C.SIMPLE_REPLY_SIZE);
      writeSimpleReplyHeader(w.arena, at, 0, req.cookie);
    } else {
      const hs = chunkHeaderSize(this.extended);
      const at = w.reserve(hs + 8);
      writeChunkHeader(w.arena, at, this.extended, C.REPLY_FLAG_DONE, C.REPLY_TYPE_OFFSET_DATA, req.cookie, req.offset, 8 + req.length);
      writeU64(w.arena, req.offset, at + hs);
    }
    // The plugin learns when the socket is done with its memory (releaseView).
    w.pushThen(view, () => this.releaseView(view, true));
  }

  private readFailed(req: Request, b: Buffer, err: unknown): void {
    bufferPool.put(b);
    this.replyError(req, err);
  }

  /** `b` is the pooled buffer holding `data` at DATA_ALIGN; it goes back once the socket wrote it. */
  private replyRead(req: Request, b: Buffer, data: Buffer, result: ReadResult): void {
    const len = req.length;
    if (this.stats !== null) this.stats.bytes[C.CMD_READ] += len;
    if (!this.structured) {
      // One buffer for header and data: the plugin filled the data in place.
      fillHoles(data, result);
      const reply = b.subarray(DATA_ALIGN - C.SIMPLE_REPLY_SIZE);
      writeSimpleReplyHeader(reply, 0, 0, req.cookie);
      this.pushReadReply(reply, b);
      return;
    }
    const hs = chunkHeaderSize(this.extended);
    const prefix = hs + 8;
    const holes = result && result.length ? bigHoles(data, result) : null;
    if (!holes || holes.length === 0 || req.flags & C.CMD_FLAG_DF) {
      if (result && result.length) fillHoles(data, result);
      const reply = b.subarray(DATA_ALIGN - prefix);
      writeChunkHeader(reply, 0, this.extended, C.REPLY_FLAG_DONE, C.REPLY_TYPE_OFFSET_DATA, req.cookie, req.offset, 8 + len);
      writeU64(reply, req.offset, hs);
      this.pushReadReply(reply, b);
      return;
    }
    // Data and hole chunks in order; the last one carries DONE. Chunk headers go to the writer's
    // arena, data as views of `b`, which goes back to the pool once all of them were sent.
    const w = this.writer;
    let pos = 0;
    const chunk = (hole: boolean, start: number, length: number, last: boolean) => {
      const flags = last ? C.REPLY_FLAG_DONE : 0;
      const at = w.reserve(hs + (hole ? 12 : 8));
      const off = req.offset + start;
      if (hole) {
        writeChunkHeader(w.arena, at, this.extended, flags, C.REPLY_TYPE_OFFSET_HOLE, req.cookie, req.offset, 12);
        writeU64(w.arena, off, at + hs);
        w.arena.writeUInt32BE(length, at + hs + 8);
      } else {
        writeChunkHeader(w.arena, at, this.extended, flags, C.REPLY_TYPE_OFFSET_DATA, req.cookie, req.offset, 8 + length);
        writeU64(w.arena, off, at + hs);
        w.push(data.subarray(start, start + length));
      }
    };
    for (let i = 0; i < holes.length; i++) {
      const h = holes[i]!;
      if (h.start > pos) chunk(false, pos, h.start - pos, false);
      pos = h.start + h.length;
      chunk(true, h.start, h.length, i === holes.length - 1 && pos >= len);
    }
    if (pos < len) chunk(false, pos, len - pos, true);
    // All holes: nothing refers to `b`. Otherwise the views keep all of it until they are sent,
    // so all of it counts against the budget until then.
    if (holes.length === 1 && holes[0]!.start === 0 && holes[0]!.length === len) bufferPool.put(b);
    else w.whenWritten(() => bufferPool.put(b), b.length);
  }

  private async blockStatus(req: Request): Promise<void> {
    let extents;
    try {
      const flags = req.flags & C.CMD_FLAG_REQ_ONE ? FLAG_REQ_ONE : 0;
      extents = await this.ctx.extents(req.length, req.offset, flags);
    } catch (err) {
      return this.replyError(req, err);
    }
    if (this.stats !== null) this.stats.bytes[C.CMD_BLOCK_STATUS] += req.length;
    // Compact replies carry 32-bit lengths; extended ones 64-bit. The reply may cover less than
    // asked, never more than the advertised maximum payload.
    const fit = Math.floor((this.n.blockSize.maximum - 8) / (this.extended ? 16 : 8));
    if (extents.length > fit) extents = extents.slice(0, Math.max(1, fit));
    // Header and descriptors are written straight into the writer's arena: no list of
    // descriptors and no payload buffer per reply (see memory-budget.ts on why objects matter).
    const w = this.writer;
    const ext = this.extended;
    const type = ext ? C.REPLY_TYPE_BLOCK_STATUS_EXT : C.REPLY_TYPE_BLOCK_STATUS;
    const hs = chunkHeaderSize(ext);
    const payloadLength = (ext ? 8 : 4) + extents.length * (ext ? 16 : 8);
    const at = w.reserve(hs + payloadLength);
    const out = w.arena;
    writeChunkHeader(out, at, ext, C.REPLY_FLAG_DONE, type, req.cookie, req.offset, payloadLength);
    out.writeUInt32BE(this.n.baseAllocation!, at + hs);
    let p = at + hs + 4;
    if (ext) {
      out.writeUInt32BE(extents.length, p);
      p += 4;
      for (const e of extents) {
        writeU64(out, e.length, p);
        writeU64(out, e.type, p + 8);
        p += 16;
      }
    } else {
      for (const e of extents) {
        out.writeUInt32BE(e.length, p);
        out.writeUInt32BE(e.type, p + 4);
        p += 8;
      }
    }
  }
}

function isPromiseLike<T>(v: T | Promise<T>): v is Promise<T> {
  return typeof (v as { then?: unknown } | undefined)?.then === 'function';
}

/** Zero the spans a plugin reported as holes, for replies that must carry every byte. */
function fillHoles(data: Uint8Array, result: ReadResult): void {
  if (!result) return;
  for (const h of result) data.fill(0, h.start, h.start + h.length);
}

/** Sorted, merged, bounds-checked holes worth a hole chunk; small ones are zero-filled. */
function bigHoles(data: Uint8Array, spans: readonly ZeroSpan[]): ZeroSpan[] {
  const sorted = spans
    .map((s) => ({ start: Math.max(0, s.start), length: Math.min(s.start + s.length, data.length) - Math.max(0, s.start) }))
    .filter((s) => s.length > 0)
    .sort((a, b) => a.start - b.start);
  const merged: ZeroSpan[] = [];
  for (const s of sorted) {
    const last = merged[merged.length - 1];
    if (last && s.start <= last.start + last.length) {
      last.length = Math.max(last.length, s.start + s.length - last.start);
    } else merged.push({ ...s });
  }
  const out: ZeroSpan[] = [];
  for (const s of merged) {
    if (s.length >= MIN_HOLE_CHUNK) out.push(s);
    else data.fill(0, s.start, s.start + s.length);
  }
  return out;
}
