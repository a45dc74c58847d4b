import { Errno, NbdError } from '@nbdx/server/api';

/** What an NBD request was doing when the server refused it; chooses the errno for 416. */
export type Operation = 'read' | 'write' | 'zero' | 'flush' | 'extents' | 'options' | 'size';

/** The first line(s) of a server's error body, trimmed to something a log line can hold. */
export function bodyExcerpt(body: Buffer | string, max = 200): string {
  const text = (typeof body === 'string' ? body : body.toString('utf8')).replace(/\s+/g, ' ').trim();
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

/**
 * Turn an unexpected HTTP status into the NBD error a user can act on:
 * - 403 (no such ticket, expired, cancelled, "forbids write") → EPERM with the server's message;
 * - 416 (range outside the ticket) → EINVAL for reads, ENOSPC for writes and zeroes;
 * - 400 → EINVAL; everything else (5xx, 404, 405, …) → EIO with the status and the body's start.
 */
export function statusError(op: Operation, what: string, status: number, statusText: string, body: Buffer | string): NbdError {
  const excerpt = bodyExcerpt(body);
  const reason = statusText ? ` ${statusText}` : '';
  if (status === 403) {
    return new NbdError(Errno.EPERM, `${what}: access denied by the imageio server: ${excerpt || `403${reason}`}`);
  }
  if (status === 416) {
    const errno = op === 'write' || op === 'zero' ? Errno.ENOSPC : Errno.EINVAL;
    return new NbdError(errno, `${what}: outside the image according to the imageio server (416${reason})${excerpt ? `: ${excerpt}` : ''}`);
  }
  const errno = status === 400 ? Errno.EINVAL : Errno.EIO;
  return new NbdError(errno, `${what}: imageio server answered ${status}${reason}${excerpt ? `: ${excerpt}` : ''}`);
}

/** Error codes that mean "the connection went away under us" (nothing else is known). */
const CONNECTION_LOST = new Set([
  'UND_ERR_SOCKET',
  'ECONNRESET',
  'EPIPE',
  'ECONNREFUSED',
  'ECONNABORTED',
  'UND_ERR_CLOSED',
  // Node's own words for "the socket closed while we were writing to it"
  'ERR_STREAM_WRITE_AFTER_END',
  'ERR_STREAM_DESTROYED',
]);

export function isConnectionLost(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && CONNECTION_LOST.has(code);
}

/** Wrap a transport failure (socket error, TLS error, timeout) as EIO, keeping its message. */
export function transportError(what: string, err: unknown): NbdError {
  if (err instanceof NbdError) return new NbdError(err.errno, `${what}: ${err.message}`);
  const e = err as { message?: string; code?: string } | null;
  const code = e?.code ? ` (${e.code})` : '';
  const wrapped = new NbdError(Errno.EIO, `${what}: ${e?.message ?? String(err)}${code}`);
  wrapped.cause = err;
  return wrapped;
}
