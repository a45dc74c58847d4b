import type { Duplex } from 'node:stream';
import { Errno, NbdError } from '../api/common.js';
import { HandshakeClose, negotiate } from './handshake.js';
import { ConnectionBudget } from './memory-budget.js';
import { ReplyWriter } from './reply-writer.js';
import type { ProtocolSettings } from './settings.js';
import { SocketReader } from './socket-reader.js';
import type { ExportStats } from './stats.js';
import { Transmission } from './transmission.js';

let nextId = 1;
/** With worker threads, one counter in shared memory numbers the connections of every thread. */
let sharedIds: Int32Array | null = null;

/**
 * Number connections from a counter shared between threads (logs then name each connection
 * once, whichever thread serves it). The first call creates it, continuing from this thread's
 * count; worker threads pass the one they were given.
 */
export function shareConnectionIds(counter?: Int32Array): Int32Array {
  sharedIds = counter ?? new Int32Array(new SharedArrayBuffer(4)).fill(nextId - 1);
  return sharedIds;
}

function newConnectionId(): number {
  return sharedIds ? Atomics.add(sharedIds, 0, 1) + 1 : nextId++;
}

/**
 * How long the last replies may take to reach a client at the end of a connection before the
 * socket is closed anyway (a client that stopped reading must not keep the connection open).
 */
const LINGER_MS = 5_000;

/** How long a client in the handshake has, once the server shuts down, to hear ERR_SHUTDOWN. */
const SHUTDOWN_GRACE_MS = 300;

/**
 * One client connection from greeting to close. Nothing a client sends can throw out of here:
 * errors end this connection only.
 *
 * How a connection ends: input is dropped at once (nothing more is read), every request already
 * taken is answered and its reply handed to the socket, the layers' close runs, and only then is
 * the socket closed in both directions, so a client that waits for EOF after DISC sees it after
 * close has run.
 */
export class Connection {
  readonly id = newConnectionId();
  private transmission: Transmission | null = null;
  private reader: SocketReader;
  private writer: ReplyWriter;
  private readonly budget: ConnectionBudget;
  /** Aborted when the client vanishes or the server shuts down: see Next.signal. */
  private readonly abort = new AbortController();
  private shuttingDown = false;
  readonly closed: Promise<void>;

  constructor(
    private readonly settings: ProtocolSettings,
    stream: Duplex,
    private readonly output: Duplex = stream,
  ) {
    this.reader = new SocketReader(stream);
    // During the handshake (a slow open); the transmission installs its own handler.
    this.reader.onEnd = () => this.abort.abort(new NbdError(Errno.ESHUTDOWN, 'the client disconnected'));
    this.budget = new ConnectionBudget(settings.serverBudget, settings.maxConnectionMemory);
    this.writer = new ReplyWriter(output, this.budget);
    stream.on('error', () => {});
    output.on('error', () => {});
    if (settings.stats) {
      settings.stats.connectionsAccepted++;
      settings.stats.connectionsOpen++;
    }
    this.closed = this.run();
  }

  private debug(message: string): void {
    this.settings.debug(`conn ${this.id}: ${message}`);
  }

  private async run(): Promise<void> {
    const { settings } = this;
    let ctx = null;
    let exportStats: ExportStats | null = null;
    let timer: NodeJS.Timeout | null = null;
    try {
      await settings.backend.preconnect(settings.readonly);
      if (settings.handshakeTimeoutMs > 0) {
        timer = setTimeout(() => {
          this.reader.fail(new HandshakeClose(`handshake not finished after ${settings.handshakeTimeoutMs / 1000} s`));
        }, settings.handshakeTimeoutMs);
        timer.unref();
      }
      const n = await negotiate(
        { ...settings, abort: this.abort, shuttingDown: () => this.shuttingDown, debug: (m) => this.debug(m) },
        this.reader,
        this.writer,
      );
      if (timer) clearTimeout(timer);
      if (!n) return;
      ctx = n.ctx;
      if (settings.stats) {
        exportStats = settings.stats.forExport(ctx.exportName);
        exportStats.connections++;
        exportStats.connectionsOpen++;
      }
      this.debug(
        `transmission: export '${ctx.exportName}' size ${ctx.size} flags 0x${n.flags.toString(16)}` +
          `${n.extended ? ' extended' : n.structured ? ' structured' : ''}${n.isTls ? ' tls' : ''}`,
      );
      this.transmission = new Transmission(
        { ...settings, abort: this.abort, debug: (m) => this.debug(m) },
        n,
        this.reader,
        this.writer,
        this.budget,
        exportStats,
      );
      await this.transmission.done;
    } catch (err) {
      if (!ctx && settings.stats) settings.stats.handshakeFailures++;
      if (err instanceof HandshakeClose) this.debug(`handshake ended: ${err.message}`);
      else if (!this.reader.isEnded) settings.error(`conn ${this.id}: ${(err as Error).message}`);
      else this.debug(`client went away: ${(err as Error).message}`);
    } finally {
      if (timer) clearTimeout(timer);
      this.reader.discardInput();
      // The replies go out before close runs and before the client sees EOF.
      await this.lingerFor(this.writer.settled());
      this.transmission?.reportUnloggedErrors();
      if (ctx) await ctx.close().catch((e) => settings.error(`close: ${(e as Error).message}`));
      this.writer.close();
      this.budget.close();
      await this.closeStreams();
      if (exportStats) exportStats.connectionsOpen--;
      if (settings.stats) settings.stats.connectionsOpen--;
    }
  }

  /** Wait for `p`, at most LINGER_MS, and not at all once the socket is gone. */
  private lingerFor(p: Promise<void>): Promise<void> {
    const s = this.output;
    if (s.destroyed || !s.writable) return Promise.resolve();
    return new Promise((resolve) => {
      const t = setTimeout(done, LINGER_MS);
      s.once('close', done);
      void p.then(done);
      function done() {
        clearTimeout(t);
        s.off('close', done);
        resolve();
      }
    });
  }

  /**
   * Close both directions: FIN after the last reply, then let go of the descriptor. After
   * STARTTLS the TLS socket is ended first, so the client gets close_notify before the FIN (a
   * TLS close without it looks like a truncation attack to the client).
   */
  private async closeStreams(): Promise<void> {
    const input = this.reader.stream;
    const streams = input === this.output ? [input] : [input, this.output];
    for (const s of streams) {
      await new Promise<void>((resolve) => {
        if (s.destroyed) return resolve();
        const t = setTimeout(finish, LINGER_MS);
        s.once('close', finish);
        function finish() {
          clearTimeout(t);
          s.off('close', finish);
          s.destroy();
          resolve();
        }
        // A stream whose writing side is done (or never existed) is simply closed.
        if (s.writableEnded || !s.writable) finish();
        else s.end(finish);
      });
    }
  }

  /** Shutting down: finish what is in flight, then close. */
  shutdown(): void {
    this.shuttingDown = true;
    this.abort.abort(new NbdError(Errno.ESHUTDOWN, 'the server is shutting down'));
    if (this.transmission) return this.transmission.stop('server shutting down');
    // In the handshake: options already sent or arriving now get NBD_REP_ERR_SHUTDOWN
    // (handshake.ts); a client that sends nothing more is closed after a moment.
    setTimeout(() => this.reader.fail(new HandshakeClose('the server is shutting down')), SHUTDOWN_GRACE_MS).unref();
  }
}
