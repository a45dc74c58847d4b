import { NBD } from '@nbdx/server/wire';

/** NBD error numbers (as sent on the wire) and their names. */
export const ERRNO = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EPROTO: 71,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

const ERRNO_NAMES: Record<number, string> = {};
for (const [name, value] of Object.entries(ERRNO)) ERRNO_NAMES[value] = name;

/** The name of an NBD error number (`'EINVAL'`), or `'E<n>'` for a number the protocol does not define. */
export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `E${errno}`;
}

const REPLY_NAMES: Record<number, string> = {
  [NBD.REP_ACK]: 'ACK',
  [NBD.REP_SERVER]: 'SERVER',
  [NBD.REP_INFO]: 'INFO',
  [NBD.REP_META_CONTEXT]: 'META_CONTEXT',
  [NBD.REP_ERR_UNSUP]: 'ERR_UNSUP',
  [NBD.REP_ERR_POLICY]: 'ERR_POLICY',
  [NBD.REP_ERR_INVALID]: 'ERR_INVALID',
  [NBD.REP_ERR_PLATFORM]: 'ERR_PLATFORM',
  [NBD.REP_ERR_TLS_REQD]: 'ERR_TLS_REQD',
  [NBD.REP_ERR_UNKNOWN]: 'ERR_UNKNOWN',
  [NBD.REP_ERR_SHUTDOWN]: 'ERR_SHUTDOWN',
  [NBD.REP_ERR_BLOCK_SIZE_REQD]: 'ERR_BLOCK_SIZE_REQD',
  [NBD.REP_ERR_TOO_BIG]: 'ERR_TOO_BIG',
  [NBD.REP_ERR_EXT_HEADER_REQD]: 'ERR_EXT_HEADER_REQD',
};

/** Name of an option reply type (`'ERR_UNSUP'`), or its hex value when unknown. */
export function replyTypeName(type: number): string {
  return REPLY_NAMES[type] ?? `0x${(type >>> 0).toString(16)}`;
}

/** Name of an option (`'GO'`), or its number when unknown. */
export function optionName(option: number): string {
  return NBD.OPTION_NAMES[option] ?? String(option);
}

/** Name of a command (`'READ'`), or its number when unknown. */
export function commandName(type: number): string {
  return NBD.CMD_NAMES[type] ?? `CMD_${type}`;
}

/** Base class of every error this package raises on purpose. */
export class NbdError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** The server answered an option during the handshake with an error reply. */
export class NbdOptionError extends NbdError {
  /** The option that failed (NBD.OPT_*). */
  readonly option: number;
  readonly optionName: string;
  /** The reply type (NBD.REP_ERR_*). */
  readonly replyType: number;
  readonly replyTypeName: string;
  /** The human-readable text the server sent with the error, if any. */
  readonly serverMessage: string | undefined;

  constructor(option: number, replyType: number, serverMessage?: string, hint?: string) {
    const text = serverMessage ? `: ${serverMessage}` : '';
    super(`NBD_OPT_${optionName(option)} failed with NBD_REP_${replyTypeName(replyType)}${text}${hint ? ` (${hint})` : ''}`);
    this.option = option;
    this.optionName = optionName(option);
    this.replyType = replyType;
    this.replyTypeName = replyTypeName(replyType);
    this.serverMessage = serverMessage || undefined;
  }
}

export interface RequestErrorDetails {
  /** Command type (NBD.CMD_*), when the error belongs to one request. */
  command?: number;
  /** The text the server sent in its error chunk. */
  serverMessage?: string;
  /** Offset from an ERROR_OFFSET chunk. */
  errorOffset?: number;
  /** True when the client refused the request before sending it (strict checks). */
  local?: boolean;
}

/**
 * A request failed. `errno` is the NBD error number (EIO, EINVAL, ...); `message` is the server's
 * error message when it sent one.
 */
export class NbdRequestError extends NbdError {
  readonly errno: number;
  readonly errnoName: string;
  readonly command: number | undefined;
  readonly commandName: string | undefined;
  readonly serverMessage: string | undefined;
  readonly errorOffset: number | undefined;
  /** True when the client refused the request itself, without sending it. */
  readonly local: boolean;

  constructor(errno: number, message: string | undefined, details: RequestErrorDetails = {}) {
    const cmd = details.command === undefined ? undefined : commandName(details.command);
    super(message || `${cmd ? `NBD_CMD_${cmd}` : 'request'} failed with ${errnoName(errno)}`);
    this.errno = errno;
    this.errnoName = errnoName(errno);
    this.command = details.command;
    this.commandName = cmd;
    this.serverMessage = details.serverMessage || undefined;
    this.errorOffset = details.errorOffset;
    this.local = details.local ?? false;
  }
}

/** The connection is gone (closed, reset, killed, or torn down after a framing error). errno is EIO. */
export class NbdConnectionError extends NbdRequestError {
  /** The socket error behind this, if there was one. */
  override readonly cause: unknown;
  constructor(message: string, cause?: unknown) {
    super(ERRNO.EIO, message);
    this.cause = cause;
  }
}

/**
 * The server broke a protocol rule. During transmission this fails the one request concerned
 * (errno EIO) when the stream can still be followed; otherwise the connection is closed and every
 * request fails with NbdConnectionError.
 */
export class NbdProtocolError extends NbdRequestError {
  constructor(message: string, command?: number) {
    super(ERRNO.EIO, `protocol error: ${message}`, command === undefined ? {} : { command });
  }
}

/**
 * TLS could not be set up: a credential file is missing or bad, the server does not offer TLS
 * while it is required, or the TLS handshake failed (wrong key, certificate not verified). `code`
 * is the underlying error code when there is one (`'ENOENT'`, `'ERR_TLS_CERT_ALTNAME_INVALID'`,
 * `'ERR_SSL_...'`), `'ENOTLS'` when the server has no TLS.
 */
export class NbdTlsError extends NbdConnectionError {
  readonly code: string;
  constructor(message: string, code: string, cause?: unknown) {
    super(message, cause);
    this.code = code;
  }
}
