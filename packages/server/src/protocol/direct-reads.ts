/**
 * Receiving WRITE payloads straight into their buffers.
 *
 * A Node socket normally reads into a fresh 64 KiB buffer per read, which we then copy into the
 * payload buffer: two copies of every written byte and a stream of short-lived 64 KiB
 * allocations for the garbage collector. Node's `onread` socket option (read into a buffer the
 * caller supplies, and pick the next one after each read) avoids both, but it is only offered for
 * sockets a program creates itself, not for the ones a server accepts. This module turns the same
 * mechanism on for an accepted socket, using the socket's own `onread` fields (found by their
 * symbol names on a probe socket) and its handle's `useUserBuffer`. When anything it needs is
 * missing (another Node version, a TLS socket, a pipe), it declines and reading stays as it was.
 */
import { readSync } from 'node:fs';
import * as net from 'node:net';
import * as tls from 'node:tls';
import { POLL_EMPTY, POLL_STOP } from './poller.js';

interface OnreadSymbols {
  buffer: symbol;
  callback: symbol;
  generator: symbol;
}

let symbols: OnreadSymbols | null | undefined;

/** Staging bytes read after a big WRITE: a request header and the start of its payload. */
const SMALL_STAGING = 4096;

function onreadSymbols(): OnreadSymbols | null {
  if (symbols !== undefined) return symbols;
  const probe = new net.Socket({ onread: { buffer: () => Buffer.alloc(1), callback: () => true } } as net.SocketConstructorOpts);
  const byName = new Map(Object.getOwnPropertySymbols(probe).map((s) => [s.description, s]));
  const buffer = byName.get('kBuffer');
  const callback = byName.get('kBufferCb');
  const generator = byName.get('kBufferGen');
  symbols = buffer && callback && generator ? { buffer, callback, generator } : null;
  probe.destroy();
  return symbols;
}

export interface DirectReader {
  /**
   * `onRead(n, buf)` gets every read: `buf` is either a buffer `nextBuffer()` returned or the
   * shared staging buffer, valid only during the call. Return false to pause reading.
   */
  onRead: (nread: number, buf: Buffer) => boolean;
  /**
   * Where the next read should land: a payload buffer's free part, or null for the staging
   * buffer. `small` asks for only a little staging: after a big WRITE the next request is
   * probably another, and its payload should mostly arrive by direct read, not through staging.
   */
  nextBuffer: () => Uint8Array | null;
  small?: () => boolean;
}

/** A socket switched to direct reads. */
export interface DirectReads {
  /**
   * Read what has arrived without waiting, into the buffer the next read would use, and hand it
   * to `onRead` as a read by the event loop would: bytes read, POLL_EMPTY, or POLL_STOP when
   * the socket is closed or failed (the event loop reports that itself) or has no descriptor.
   */
  readNow(): number;
}

/** Switch `stream` to reading into supplied buffers. Returns null when that is not possible. */
export function enableDirectReads(stream: unknown, reader: DirectReader, stagingSize = 64 * 1024): DirectReads | null {
  if (!(stream instanceof net.Socket) || stream instanceof tls.TLSSocket) return null;
  const handle = (stream as unknown as { _handle?: { useUserBuffer?: (b: Uint8Array) => void; fd?: number } })._handle;
  if (!handle || typeof handle.useUserBuffer !== 'function') return null;
  const sym = onreadSymbols();
  if (!sym) return null;
  const s = stream as unknown as Record<symbol, unknown>;
  if (s[sym.buffer] !== null && s[sym.buffer] !== undefined) return null; // already in that mode
  const staging = Buffer.allocUnsafeSlow(stagingSize);
  s[sym.buffer] = staging;
  s[sym.callback] = (nread: number, buf: Buffer) => reader.onRead(nread, buf);
  const smallStaging = staging.subarray(0, SMALL_STAGING);
  const next = (): Uint8Array => reader.nextBuffer() ?? (reader.small?.() ? smallStaging : staging);
  s[sym.generator] = next;
  handle.useUserBuffer(staging);
  const fd = handle.fd;
  return {
    readNow() {
      if (typeof fd !== 'number' || fd < 0 || stream.destroyed) return POLL_STOP;
      const buf = next();
      let n: number;
      try {
        n = readSync(fd, buf, 0, buf.byteLength, null);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        return code === 'EAGAIN' || code === 'EWOULDBLOCK' ? POLL_EMPTY : POLL_STOP;
      }
      if (n === 0) return POLL_STOP;
      reader.onRead(n, buf as Buffer);
      // Where the event loop's next read lands, as it would have chosen after its own read
      // (a payload's remainder moves on as it fills).
      const following = next();
      s[sym.buffer] = following;
      handle.useUserBuffer!(following);
      return n;
    },
  };
}
