import {
  Errno,
  FLAG_FUA,
  NbdError,
  debug,
  defineFilter,
  layerOf,
  logWarning,
  packageVersion,
  parseBool,
  parseDuration,
  toErrno,
  type Next,
} from '@nbdx/server/api';

const NAME = 'retry';
const VERSION = packageVersion(import.meta.url);

export interface RetrySettings {
  retries: number;
  delayMs: number;
  exponential: boolean;
  readonly: boolean;
}

export const DEFAULTS: Readonly<RetrySettings> = { retries: 5, delayMs: 2000, exponential: true, readonly: false };
const MAX_RETRIES = 1000;

/**
 * Errors that another attempt cannot change: the answer is about the request or the export
 * (read-only, out of space, not supported, bad argument), or the connection is closing. ENOTSUP
 * must also reach the core at once: it is how a zero falls back to writes.
 */
const FINAL = new Set<number>([Errno.EPERM, Errno.EINVAL, Errno.ENOSPC, Errno.ENOTSUP, Errno.ESHUTDOWN]);

export function isRetryable(err: unknown): boolean {
  return !FINAL.has(toErrno(err));
}

/** Wait `ms`, ending early (and failing) when the connection goes away. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  if (ms <= 0) return Promise.resolve();
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal!.reason);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** The error's message, after the name of the layer it came from when the core recorded one. */
function describe(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  const layer = layerOf(err);
  return layer ? `${layer}: ${message}` : message;
}

function seconds(ms: number): string {
  return ms >= 1000 ? `${ms / 1000} s` : `${ms} ms`;
}

interface Handle {
  /** Set once retry-readonly switched the layer below to read-only for this connection. */
  readonlyNow: boolean;
  reopens: number;
  /** Writes were acknowledged since the last successful flush. */
  unflushed: boolean;
  /** Acknowledged writes so far (to tell which ones a flush covered). */
  writes: number;
  /**
   * The layer below was reopened while writes were unflushed: the old context may have lost them,
   * so the next flush must not claim they are durable.
   */
  maybeLost: boolean;
}

/** Note an acknowledged write that is not durable yet (FUA writes are). */
async function wrote(h: Handle, flags: number, done: Promise<void>): Promise<void> {
  await done;
  if (!(flags & FLAG_FUA)) {
    h.unflushed = true;
    h.writes += 1;
  }
}

/** A fresh retry filter (settings live in this closure). */
export function createRetryFilter() {
  const s: RetrySettings = { ...DEFAULTS };

  /**
   * Run `call` on the layer below; when it fails with an error worth retrying, wait, reopen the
   * whole layer below (a fresh plugin connection) and call again, up to `retries` times. A failed
   * reopen uses up a retry too, and the next one tries to reopen again.
   */
  async function withRetry<T>(next: Next, h: Handle, what: string, write: boolean, call: (n: Next) => Promise<T>): Promise<T> {
    let n = next;
    let delay = s.delayMs;
    let reopened = true;
    for (let attempt = 0; ; attempt++) {
      let failure: unknown;
      if (reopened) {
        if (write && h.readonlyNow) {
          throw new NbdError(Errno.EPERM, `${what}: refused, the layer below was reopened read-only after a failure (retry-readonly)`);
        }
        try {
          return await call(n);
        } catch (err) {
          if (!isRetryable(err)) throw err;
          failure = err;
        }
      }
      if (attempt >= s.retries) {
        if (s.retries > 0) logWarning(NAME, `${what}: giving up after ${s.retries} retries`);
        throw failure ?? new NbdError(Errno.EIO, `${what}: the layer below could not be reopened`);
      }
      if (failure !== undefined) {
        logWarning(NAME, `${what} failed (${describe(failure)}); retry ${attempt + 1} of ${s.retries} in ${seconds(delay)}`);
      }
      await sleep(delay, n.signal);
      if (s.exponential) delay *= 2;
      if (!n.reopen) throw failure;
      try {
        n = await n.reopen(s.readonly ? { readonly: true } : undefined);
        h.reopens += 1;
        if (h.unflushed) h.maybeLost = true;
        if (s.readonly) h.readonlyNow = true;
        reopened = true;
      } catch (err) {
        if (toErrno(err) === Errno.ESHUTDOWN) throw err;
        logWarning(NAME, `${what}: reopening the layer below failed (${describe(err)})`);
        reopened = false;
      }
    }
  }

  return defineFilter<Handle>({
    apiVersion: 2,
    name: NAME,
    version: VERSION,
    longname: 'nbdx retry filter',
    description: 'Reopen the layer below and retry requests that fail (temporary network failures).',
    configHelp: [
      `retries=N              retry each request up to N times (default ${DEFAULTS.retries})`,
      `retry-delay=SECS       wait this long before the first retry (default ${DEFAULTS.delayMs / 1000}; 100ms works too)`,
      'retry-exponential=no   wait the same time before every retry (default yes: double it each time)',
      'retry-readonly=yes     after a failure, reopen the layer below read-only for this connection',
    ].join('\n'),
    threadModel: 'parallel',

    config(next, key, value) {
      switch (key) {
        case 'retries': {
          const n = Number(value);
          if (!/^\s*\d+\s*$/.test(value) || !Number.isSafeInteger(n) || n > MAX_RETRIES) {
            throw new NbdError(Errno.EINVAL, `retries: '${value}' is not a whole number from 0 to ${MAX_RETRIES}`);
          }
          s.retries = n;
          return;
        }
        case 'retry-delay':
          s.delayMs = parseDuration(value, 'retry-delay');
          return;
        case 'retry-exponential':
          s.exponential = parseBool(value, 'retry-exponential');
          return;
        case 'retry-readonly':
          s.readonly = parseBool(value, 'retry-readonly');
          return;
        default:
          return next(key, value);
      }
    },

    dumpPlugin: () => ({ retry_retries: s.retries, retry_delay_ms: s.delayMs }),

    // Opening is retried too (the server may be down when the client connects), but without a
    // reopen: nothing is open yet.
    async open(opener, readonly, exportName) {
      let delay = s.delayMs;
      for (let attempt = 0; ; attempt++) {
        try {
          await opener.open(readonly, exportName);
          return { readonlyNow: false, reopens: 0, unflushed: false, writes: 0, maybeLost: false };
        } catch (err) {
          if (!isRetryable(err) || attempt >= s.retries) throw err;
          logWarning(NAME, `open failed (${describe(err)}); retry ${attempt + 1} of ${s.retries} in ${seconds(delay)}`);
          await sleep(delay, opener.signal);
          if (s.exponential) delay *= 2;
        }
      }
    },
    close(h) {
      if (h.reopens > 0) debug(NAME, `connection closed after ${h.reopens} reopen(s) of the layer below`);
    },

    pread: (next, h, buf, offset, flags) =>
      withRetry(next, h, `read ${buf.length} bytes at ${offset}`, false, (n) => n.pread(buf, offset, flags)),
    pwrite: (next, h, buf, offset, flags) =>
      wrote(h, flags, withRetry(next, h, `write ${buf.length} bytes at ${offset}`, true, (n) => n.pwrite(buf, offset, flags))),
    async flush(next, h, flags) {
      // A write acknowledged before a reopen lived in the old context: flushing the new one says
      // nothing about it.
      const writesBefore = h.writes;
      await withRetry(next, h, 'flush', false, (n) => n.flush(flags));
      // Writes acknowledged while this flush ran may not be covered by it.
      if (h.writes === writesBefore) h.unflushed = false;
      if (h.maybeLost) {
        h.maybeLost = false;
        throw new NbdError(
          Errno.EIO,
          'flush: the layer below was reopened after a failure while writes were not yet flushed; they may be lost',
        );
      }
    },
    trim: (next, h, count, offset, flags) =>
      wrote(h, flags, withRetry(next, h, `trim ${count} bytes at ${offset}`, true, (n) => n.trim(count, offset, flags))),
    zero: (next, h, count, offset, flags) =>
      wrote(h, flags, withRetry(next, h, `zero ${count} bytes at ${offset}`, true, (n) => n.zero(count, offset, flags))),
    extents: (next, h, count, offset, flags) =>
      withRetry(next, h, `extents of ${count} bytes at ${offset}`, false, (n) => n.extents(count, offset, flags)),
    cache: (next, h, count, offset, flags) =>
      withRetry(next, h, `cache ${count} bytes at ${offset}`, false, (n) => n.cache(count, offset, flags)),
  });
}

export default createRetryFilter();
