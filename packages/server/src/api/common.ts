import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * Types and constants shared by every version of the plugin and filter interfaces.
 * This folder imports nothing from the server, so plugin authors can depend on it alone.
 */

export type MaybePromise<T> = T | Promise<T>;

/** Flags passed to data callbacks (API version 2). The values match nbdkit's. */
export const FLAG_MAY_TRIM = 1 << 0;
export const FLAG_FUA = 1 << 1;
export const FLAG_REQ_ONE = 1 << 2;
export const FLAG_FAST_ZERO = 1 << 3;

/** Extent type bits, the same as the `base:allocation` metadata context. 0 = allocated data. */
export const EXTENT_HOLE = 1;
export const EXTENT_ZERO = 2;

export interface Extent {
  offset: number;
  length: number;
  /** Bitmask of EXTENT_HOLE and EXTENT_ZERO; 0 means allocated data. */
  type: number;
}

/**
 * What `extents` may hand back: an array (in any order), or an iterable or async iterable (a
 * generator), which must yield in ascending offset order: the core reads it only as far as the
 * answer needs (the first extent with REQ_ONE, at most 64 Ki extents otherwise) and then stops,
 * so a generator over a huge range does only the work that is used.
 */
export type ExtentSource = Iterable<Extent> | AsyncIterable<Extent>;

/**
 * A part of a read buffer that reads as zeroes, relative to the start of the buffer.
 * `pread` may return a list of these instead of filling those bytes: the core then answers
 * that part of the read with a hole chunk (or zero-fills it itself when the client cannot take
 * holes). Returning nothing means "the buffer is filled", so ordinary reads cost nothing extra.
 */
export interface ZeroSpan {
  start: number;
  length: number;
}
export type ReadResult = void | undefined | readonly ZeroSpan[];

/** Thread models, from the strictest to the most permissive. */
export type ThreadModel =
  | 'serialize_connections'
  | 'serialize_all_requests'
  | 'serialize_requests'
  | 'parallel';

export const THREAD_MODELS: readonly ThreadModel[] = [
  'serialize_connections',
  'serialize_all_requests',
  'serialize_requests',
  'parallel',
];

/** How FUA is handled: not at all, by a flush after the write, or by the layer itself. */
export type FuaMode = 'none' | 'emulate' | 'native';
/** How CACHE is handled: not at all, by reading and discarding, or by the layer itself. */
export type CacheMode = 'none' | 'emulate' | 'native';

export interface BlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface ExportEntry {
  name: string;
  description?: string;
}

export const Errno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

export interface NbdErrorOptions {
  /**
   * The connection cannot go on (say, the upstream server behind a proxy is gone): the core
   * replies to this request with the error, stops reading requests from the client, lets the
   * requests in flight reply, then closes the client connection. The server keeps running.
   */
  fatal?: boolean;
}

/** Throw this (or any Error with a Node `code`) from a callback to choose the NBD error. */
/**
 * Marks NbdErrors by a registry symbol rather than by class identity: a plugin installed with its
 * own copy of @nbdx/server (npm puts one beside it when versions differ) throws that copy's
 * NbdError, which must still carry its errno through this copy's core.
 */
const NBD_ERROR = Symbol.for('nbdx.NbdError');

export class NbdError extends Error {
  readonly errno: number;
  /** See NbdErrorOptions.fatal. */
  readonly fatal: boolean;
  constructor(errno: number, message?: string, options?: NbdErrorOptions) {
    super(message ?? errnoName(errno));
    this.name = 'NbdError';
    this.errno = errno;
    this.fatal = options?.fatal ?? false;
  }

  get [NBD_ERROR](): true {
    return true;
  }

  /**
   * `err instanceof NbdError` holds for NbdErrors of every copy of this module; subclasses
   * (`instanceof PartitionError`) keep the ordinary prototype check.
   */
  static override [Symbol.hasInstance](value: unknown): boolean {
    if (this !== NbdError) return Function.prototype[Symbol.hasInstance].call(this, value);
    return value !== null && typeof value === 'object' && (value as Record<symbol, unknown>)[NBD_ERROR] === true;
  }
}

/** True when an error thrown by a callback ends the client connection (`fatal: true` on any error). */
export function isFatalError(err: unknown): boolean {
  return (err as { fatal?: unknown } | null)?.fatal === true;
}

const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM',
  5: 'EIO',
  12: 'ENOMEM',
  22: 'EINVAL',
  28: 'ENOSPC',
  75: 'EOVERFLOW',
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
};

export function errnoName(errno: number): string {
  return ERRNO_NAMES[errno] ?? `errno ${errno}`;
}

const CODE_TO_ERRNO: Record<string, number> = {
  EPERM: 1,
  EROFS: 1,
  EACCES: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EDQUOT: 28,
  EFBIG: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  EOPNOTSUPP: 95,
  ESHUTDOWN: 108,
};

/** The NBD error number for anything a callback threw: NbdError, a Node system error, or EIO. */
export function toErrno(err: unknown): number {
  if (err instanceof NbdError) return err.errno;
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && code in CODE_TO_ERRNO) return CODE_TO_ERRNO[code]!;
  return Errno.EIO;
}

/** True when a callback said "not supported", which makes the core fall back (zero → writes). */
export function isNotSupported(err: unknown): boolean {
  return toErrno(err) === Errno.ENOTSUP;
}

// ---------------------------------------------------------------------------------------------
// Logging: the server installs the sink; plugins call debug()/log() without importing the server.

export type LogSink = (level: 'debug' | 'info' | 'error', source: string, message: string) => void;
// The sink lives in a process-wide registry slot, not in this module: a plugin that loaded its own
// copy of @nbdx/server must still log through the server's sink (-v, syslog, --log=null).
const SINK = Symbol.for('nbdx.logSink');
const registry = globalThis as unknown as Record<symbol, LogSink | undefined>;
const defaultSink: LogSink = (level, source, message) => {
  if (level !== 'debug') process.stderr.write(`nbdx: ${source}: ${message}\n`);
};

export function setLogSink(next: LogSink): void {
  registry[SINK] = next;
}

function sink(level: 'debug' | 'info' | 'error', source: string, message: string): void {
  (registry[SINK] ?? defaultSink)(level, source, message);
}

/** Debug output, shown with `-v`. `source` is usually the plugin or filter name. */
export function debug(source: string, message: string): void {
  sink('debug', source, message);
}

export function logError(source: string, message: string): void {
  sink('error', source, message);
}

/**
 * A warning shown at the default level (`nbdx: SOURCE: warning: MESSAGE`): for something the
 * operator should know at start-up, such as a plugin running without an optional helper.
 */
export function logWarning(source: string, message: string): void {
  sink('info', source, `warning: ${message}`);
}

// ---------------------------------------------------------------------------------------------
// The version of the package a module belongs to, so `--version` and `--dump-plugin` stay true
// after a release without hand-edited constants.

/**
 * Version from the nearest package.json above a module (pass `import.meta.url`). Bundlers may
 * move code into chunks, so this walks up instead of assuming a depth.
 */
export function packageVersion(moduleUrl: string): string {
  let dir = path.dirname(fileURLToPath(moduleUrl));
  for (;;) {
    const file = path.join(dir, 'package.json');
    if (fs.existsSync(file)) {
      const version = (JSON.parse(fs.readFileSync(file, 'utf8')) as { version?: string }).version;
      if (version) return version;
    }
    const up = path.dirname(dir);
    if (up === dir) return '0.0.0';
    dir = up;
  }
}

// ---------------------------------------------------------------------------------------------
// Parsing helpers every plugin needs, so sizes and booleans mean the same everywhere.

const SIZE_SUFFIX: Record<string, number> = {
  '': 1,
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
  s: 512,
};

/** Parse `1G`, `512M`, `4k`, `100` (bytes), `2s` (512-byte sectors); also `1GiB`/`1GB`. */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bkmgtpes]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) throw new NbdError(Errno.EINVAL, `${what}: could not parse '${text}' as a size`);
  const value = Number(m[1]) * SIZE_SUFFIX[m[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(value)) {
    throw new NbdError(Errno.EINVAL, `${what}: '${text}' is not a whole number of bytes below 2^53`);
  }
  return value;
}

/** The longest duration a timer can wait (setTimeout's limit), in milliseconds. */
export const MAX_DURATION_MS = 2 ** 31 - 1;

/**
 * Parse a duration as nbdkit's delay and timeout parameters take it: seconds (`2`, `0.5`, `.25`,
 * `2s`) or milliseconds (`100ms`, `0.5ms`). Returns milliseconds, fractions kept.
 */
export function parseDuration(text: string, what = 'duration'): number {
  const m = /^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*$/i.exec(text);
  if (!m) {
    throw new NbdError(
      Errno.EINVAL,
      `${what}: could not parse '${text}' as a duration: give seconds (2, 0.5, 2s) or milliseconds (100ms)`,
    );
  }
  const ms = Number(m[1]) * (m[2]?.toLowerCase() === 'ms' ? 1 : 1000);
  if (!(ms <= MAX_DURATION_MS)) {
    throw new NbdError(Errno.EINVAL, `${what}: '${text}' is longer than the longest wait possible (${MAX_DURATION_MS} ms)`);
  }
  return ms;
}

export function parseBool(text: string, what = 'value'): boolean {
  const t = text.trim().toLowerCase();
  if (['1', 'true', 'yes', 'on', 'y'].includes(t)) return true;
  if (['0', 'false', 'no', 'off', 'n'].includes(t)) return false;
  throw new NbdError(Errno.EINVAL, `${what}: could not parse '${text}' as a boolean`);
}

const LAYER = Symbol.for('nbdx.layer');

/**
 * Remember which layer an error came from, for the log line that reports it ("nbdx: file: error:
 * ..."). The first layer it passes through names it (the one it started in, or the nearest one
 * above); layers further up leave the name alone.
 */
export function tagLayer<E>(err: E, layer: string): E {
  if (err !== null && typeof err === 'object' && !(LAYER in err)) {
    try {
      Object.defineProperty(err, LAYER, { value: layer });
    } catch {
      // a frozen object: no name then
    }
  }
  return err;
}

/** The layer tagLayer() recorded for `err`, if any. */
export function layerOf(err: unknown): string | undefined {
  return err !== null && typeof err === 'object' ? ((err as Record<symbol, unknown>)[LAYER] as string | undefined) : undefined;
}

const SHARED = Symbol.for('nbdx.sharedBuffers');

/** The shared buffers of this server, by name (on globalThis, so every copy of this module agrees). */
export function sharedBuffers(): Map<string, SharedArrayBuffer> {
  const g = globalThis as { [SHARED]?: Map<string, SharedArrayBuffer> };
  return (g[SHARED] ??= new Map());
}

/**
 * Memory every thread of the server sees (`nbdx --workers`): the first call with a name makes a
 * zero-filled SharedArrayBuffer of `byteLength` bytes (the system commits pages only as they are
 * written); the worker threads, started after the main thread's layers are ready, get the same
 * buffer for the same name. A layer that keeps its disk in one can declare `workerThreads`.
 *
 * With `maxByteLength`, the buffer is growable up to that many bytes: only address space is
 * reserved beyond `byteLength`, and `grow()` in any thread is seen by all of them. A later call
 * with the name gets the buffer as it is now (it may have grown), whatever lengths it passes.
 *
 * Throws EINVAL when the name exists with another length (or growable where a fixed buffer was
 * asked for, or the reverse), ENOMEM when it cannot be had.
 */
export function sharedBuffer(name: string, byteLength: number, maxByteLength?: number): SharedArrayBuffer {
  const all = sharedBuffers();
  const had = all.get(name);
  const growable = maxByteLength !== undefined;
  if (had) {
    if (had.growable !== growable || (!growable && had.byteLength !== byteLength)) {
      const what = (b: boolean, n: number) => (b ? 'growable' : `${n} bytes`);
      throw new NbdError(Errno.EINVAL, `shared buffer '${name}' is ${what(had.growable, had.byteLength)}, not ${what(growable, byteLength)}`);
    }
    return had;
  }
  let made: SharedArrayBuffer;
  try {
    made = growable ? new SharedArrayBuffer(byteLength, { maxByteLength }) : new SharedArrayBuffer(byteLength);
  } catch (err) {
    const how = growable ? `${byteLength} bytes (growable to ${maxByteLength})` : `${byteLength} bytes`;
    throw new NbdError(Errno.ENOMEM, `cannot allocate ${how} of shared memory: ${(err as Error).message}`);
  }
  all.set(name, made);
  return made;
}
