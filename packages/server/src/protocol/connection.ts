import type { Duplex } from 'node:stream';
import { Errno, NbdError } from '../api/common.js';
import { HandshakeClose, negotiate } from './handshake.js';
import { ReplyWriter } from './reply-writer.js';
import type { ProtocolSettings } from './settings.js';
import { SocketReader } from './socket-reader.js';
import { Transmission } from './transmission.js';

let nextId = 1;

/**
 * One client connection from greeting to close. Nothing a client sends can throw out of here:
 * errors end this connection only.
 */
export class Connection {
  readonly id = nextId++;
  private transmission: Transmission | null = null;
  private reader: SocketReader;
  private writer: ReplyWriter;
  /** Aborted when the client vanishes or the server shuts down: see Next.signal. */
  private readonly abort = new AbortController();
  readonly closed: Promise<void>;

  constructor(
    private readonly settings: ProtocolSettings,
    stream: Duplex,
    private readonly output: Duplex = stream,
  ) {
    this.reader = new SocketReader(stream);
    // During the handshake (a slow open); the transmission installs its own handler.
    this.reader.onEnd = () => this.abort.abort(new NbdError(Errno.ESHUTDOWN, 'the client disconnected'));
    this.writer = new ReplyWriter(output);
    stream.on('error', () => {});
    output.on('error', () => {});
    this.closed = this.run();
  }

  private debug(message: string): void {
    this.settings.debug(`conn ${this.id}: ${message}`);
  }

  private async run(): Promise<void> {
    const { settings } = this;
    let ctx = null;
    try {
      await settings.backend.preconnect(settings.readonly);
      const n = await negotiate({ ...settings, abort: this.abort, debug: (m) => this.debug(m) }, this.reader, this.writer);
      if (!n) return;
      ctx = n.ctx;
      this.debug(
        `transmission: export '${ctx.exportName}' size ${ctx.size} flags 0x${n.flags.toString(16)}` +
          `${n.extended ? ' extended' : n.structured ? ' structured' : ''}${n.isTls ? ' tls' : ''}`,
      );
      this.transmission = new Transmission({ ...settings, abort: this.abort, debug: (m) => this.debug(m) }, n, this.reader, this.writer);
      await this.transmission.done;
      await this.writer.drained();
    } catch (err) {
      if (err instanceof HandshakeClose) this.debug(`handshake ended: ${err.message}`);
      else if (!this.reader.isEnded) settings.error(`conn ${this.id}: ${(err as Error).message}`);
      else this.debug(`client went away: ${(err as Error).message}`);
    } finally {
      if (ctx) await ctx.close().catch((e) => settings.error(`close: ${(e as Error).message}`));
      this.writer.close();
      this.reader.stream.end();
      if (this.output !== this.reader.stream) this.output.end();
    }
  }

  /** Shutting down: finish what is in flight, then close. */
  shutdown(): void {
    this.abort.abort(new NbdError(Errno.ESHUTDOWN, 'the server is shutting down'));
    if (this.transmission) this.transmission.stop('server shutting down');
    else this.reader.stream.destroy();
  }
}
