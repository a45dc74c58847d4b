import { Errno, NbdError, isFatalError, parseBool, toErrno } from '@nbdx/server/api';

/** When the shared context is opened: while the server starts, or with the first connection. */
export type OpenMode = 'start' | 'lazy';

/** Which failures of the shared context make the next connection open a fresh one. */
export type ReopenPolicy = 'fatal' | 'error' | 'never';

export interface SharedOptions {
  /** The export opened below; undefined = the layer below's default export. */
  exportName: string | undefined;
  open: OpenMode;
  reopen: ReopenPolicy;
  /** undefined = decide (see README): read-write with a read-only fallback, or the first connection's flag. */
  readonly: boolean | undefined;
}

export function defaultOptions(): SharedOptions {
  return { exportName: undefined, open: 'start', reopen: 'fatal', readonly: undefined };
}

/** Apply one `shared-*` key. Returns false for keys that are not ours. */
export function applyOption(o: SharedOptions, key: string, value: string): boolean {
  switch (key) {
    case 'shared-export':
      o.exportName = value;
      return true;
    case 'shared-open':
      if (value !== 'start' && value !== 'lazy') {
        throw new NbdError(Errno.EINVAL, `shared-open: '${value}' is not one of start, lazy`);
      }
      o.open = value;
      return true;
    case 'shared-reopen':
      if (value !== 'fatal' && value !== 'error' && value !== 'never') {
        throw new NbdError(Errno.EINVAL, `shared-reopen: '${value}' is not one of fatal, error, never`);
      }
      o.reopen = value;
      return true;
    case 'shared-readonly':
      o.readonly = parseBool(value, 'shared-readonly');
      return true;
    default:
      return false;
  }
}

/**
 * Node error codes that mean "the thing behind this context is gone" (a socket to an upstream
 * server that was reset or refused): no later request on this context can succeed.
 */
const GONE_CODES = new Set([
  'ECONNRESET',
  'ECONNREFUSED',
  'ECONNABORTED',
  'EPIPE',
  'ENOTCONN',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'ERR_STREAM_DESTROYED',
]);

/** Error numbers that describe the request (bad range, read-only, no space), not the context. */
const REQUEST_ERRNOS = new Set<number>([Errno.EINVAL, Errno.EPERM, Errno.ENOSPC, Errno.ENOTSUP, Errno.EOVERFLOW]);

/**
 * A failure after which the context is beyond use: an error the layer below marked fatal
 * (NbdError's `fatal` option, as the nbd plugin does when its upstream connection is lost),
 * ESHUTDOWN, or a connection-level Node error.
 */
export function isFatal(err: unknown): boolean {
  if (isFatalError(err)) return true;
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && GONE_CODES.has(code)) return true;
  return toErrno(err) === Errno.ESHUTDOWN;
}

/** Whether this failure, under this policy, retires the shared context. */
export function retires(policy: ReopenPolicy, err: unknown): boolean {
  switch (policy) {
    case 'never':
      return false;
    case 'fatal':
      return isFatal(err);
    case 'error':
      return isFatal(err) || !REQUEST_ERRNOS.has(toErrno(err));
  }
}
