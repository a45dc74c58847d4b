/**
 * A hand-driven NBD connection for tests that play a hostile or unusual client: bytes go out
 * exactly as written, and what comes back is collected for the test to pick apart.
 */
import * as net from 'node:net';
import * as C from '../wire/constants.js';
import { encodeInfoRequest, encodeOption, encodeRequest } from '../wire/codec.js';

export class RawSession {
  readonly sock: net.Socket;
  private chunks: Buffer[] = [];
  private length = 0;
  private listeners: Array<() => void> = [];
  closed = false;
  error: NodeJS.ErrnoException | null = null;
  readonly ready: Promise<void>;

  constructor(path: string) {
    this.sock = net.connect({ path, allowHalfOpen: true });
    this.ready = new Promise((resolve, reject) => {
      this.sock.once('connect', resolve);
      this.sock.once('error', reject);
    });
    this.sock.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.length += d.length;
      this.notify();
    });
    this.sock.on('error', (e) => {
      this.error = e;
      this.notify();
    });
    this.sock.on('end', () => {
      this.closed = true;
      this.notify();
    });
    this.sock.on('close', () => {
      this.closed = true;
      this.notify();
    });
  }

  static async open(path: string): Promise<RawSession> {
    const s = new RawSession(path);
    await s.ready;
    return s;
  }

  private notify(): void {
    for (const f of this.listeners.splice(0)) f();
  }

  /** Resolves when `test()` holds, or with false after `ms`. */
  waitUntil(test: () => boolean, ms: number): Promise<boolean> {
    return new Promise((resolve) => {
      const check = () => {
        if (test()) {
          clearTimeout(t);
          resolve(true);
        } else this.listeners.push(check);
      };
      const t = setTimeout(() => {
        this.listeners = this.listeners.filter((l) => l !== check);
        resolve(test());
      }, ms);
      check();
    });
  }

  get received(): Buffer {
    if (this.chunks.length > 1) this.chunks = [Buffer.concat(this.chunks)];
    return this.chunks[0] ?? Buffer.alloc(0);
  }

  get receivedLength(): number {
    return this.length;
  }

  send(...bufs: Buffer[]): void {
    this.sock.write(bufs.length === 1 ? bufs[0]! : Buffer.concat(bufs));
  }

  /** Wait for the server to close (EOF or reset); false if it did not within `ms`. */
  untilClosed(ms: number): Promise<boolean> {
    return this.waitUntil(() => this.closed || this.error !== null, ms);
  }

  destroy(): void {
    this.sock.destroy();
  }
}

export const GREETING_SIZE = 18;

export function clientFlags(flags = C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags);
  return b;
}

export function option(opt: number, data?: Buffer): Buffer {
  return encodeOption(opt, data);
}

export function go(name = ''): Buffer {
  return encodeOption(C.OPT_GO, encodeInfoRequest(name, []));
}

/** Bytes of a GO handshake's replies for a default export (INFO_EXPORT + ACK). */
export const GO_REPLY_SIZE = 20 + 12 + 20;

export function request(
  type: number,
  offset: number,
  length: number,
  opts: { cookie?: bigint; flags?: number; extended?: boolean } = {},
): Buffer {
  const extended = opts.extended ?? false;
  const b = Buffer.alloc(extended ? C.EXTENDED_REQUEST_SIZE : C.REQUEST_SIZE);
  encodeRequest(b, 0, extended, opts.flags ?? 0, type, opts.cookie ?? 1n, offset, length);
  return b;
}

/** The option replies in `data` (after the greeting): option number and reply type of each. */
export function optionReplies(data: Buffer, from = GREETING_SIZE): Array<{ option: number; type: number; length: number }> {
  const out: Array<{ option: number; type: number; length: number }> = [];
  let at = from;
  while (at + 20 <= data.length && data.readBigUInt64BE(at) === C.OPTION_REPLY_MAGIC) {
    const length = data.readUInt32BE(at + 16);
    out.push({ option: data.readUInt32BE(at + 8), type: data.readUInt32BE(at + 12), length });
    at += 20 + length;
  }
  return out;
}

/** A server's TLS settings for tests: required, TLS-PSK over TLS 1.2, one identity with its key. */
export function pskTls(identity: string, key: Buffer) {
  return {
    mode: 'require' as const,
    socketOptions: {
      ciphers: 'PSK',
      minVersion: 'TLSv1.2' as const,
      maxVersion: 'TLSv1.2' as const,
      pskCallback: (_sock: unknown, id: string) => (id === identity ? key : null),
    },
  };
}
