import { Errno, NbdError } from '@nbdx/server/api';

/** Where in the plugin's life a status came: at start-up (open) or answering a read. */
export type Phase = 'open' | 'read';

/** The start of a server's error body, trimmed to something a log line can hold. */
export function bodyExcerpt(body: Buffer | string, max = 200): string {
  const text = (typeof body === 'string' ? body : body.toString('utf8')).replace(/\s+/g, ' ').trim();
  return text.length > max ? `${text.slice(0, max)}…` : text;
}

/**
 * The NBD error for an HTTP status a request did not expect:
 * - 404/410: the resource is gone; at start-up ENOENT (a Node code: the command line says "not
 *   found"), while reading EIO (NBD has no ENOENT, and the disk was there a moment ago);
 * - 401/403: EPERM (credentials or headers are wrong);
 * - 416: EINVAL (a range beyond the resource: it shrank under us);
 * - everything else (5xx, 400, 3xx not followed): EIO with the status and the body's start.
 */
export function statusError(phase: Phase, what: string, status: number, statusText: string, body: Buffer | string): NbdError {
  const excerpt = bodyExcerpt(body);
  const tail = `${status}${statusText ? ` ${statusText}` : ''}${excerpt ? `: ${excerpt}` : ''}`;
  if (status === 404 || status === 410) {
    const err = new NbdError(Errno.EIO, `${what}: not found on the server (${tail})`);
    if (phase === 'open') Object.assign(err, { code: 'ENOENT' });
    return err;
  }
  if (status === 401 || status === 403) {
    return new NbdError(Errno.EPERM, `${what}: access denied (${tail}); check user=, password=, cookie= and header=`);
  }
  if (status === 416) return new NbdError(Errno.EINVAL, `${what}: outside the resource according to the server (${tail})`);
  return new NbdError(Errno.EIO, `${what}: the server answered ${tail}`);
}

/** Error codes meaning "the connection went away before we learnt anything". */
const CONNECTION_LOST = new Set(['UND_ERR_SOCKET', 'ECONNRESET', 'EPIPE', 'ECONNABORTED', 'UND_ERR_CLOSED']);

export function isConnectionLost(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && CONNECTION_LOST.has(code);
}

/** Certificate problems, which get a hint about cafile= and sslverify=false. */
const TLS_CODES = new Set([
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_GET_ISSUER_CERT',
  'CERT_HAS_EXPIRED',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);

/** Wrap a transport failure (socket, TLS, timeout) as EIO, keeping its message and code. */
export function transportError(what: string, err: unknown): NbdError {
  if (err instanceof NbdError) return new NbdError(err.errno, `${what}: ${err.message}`);
  const e = err as { message?: string; code?: string; cause?: { code?: string } } | null;
  const code = e?.code ?? e?.cause?.code;
  const hint = code && TLS_CODES.has(code) ? ': trust the server with cafile=FILE or capath=DIR (or sslverify=false)' : '';
  const wrapped = new NbdError(Errno.EIO, `${what}: ${e?.message ?? String(err)}${code ? ` (${code})` : ''}${hint}`);
  wrapped.cause = err;
  return wrapped;
}
