import {
  Errno,
  NbdError,
  defineFilter,
  layerOf,
  logWarning,
  packageVersion,
  parseBool,
  parseDuration,
  toErrno,
  type Next,
} from '@nbdx/server/api';

const NAME = 'retry-request';
const VERSION = packageVersion(import.meta.url);

export interface RetryRequestSettings {
  retries: number;
  delayMs: number;
  retryOpen: boolean;
}

export const DEFAULTS: Readonly<RetryRequestSettings> = { retries: 2, delayMs: 2000, retryOpen: true };
const MAX_RETRIES = 1000;

/**
 * Errors another attempt cannot change (read-only, out of space, not supported, bad argument) or
 * that mean the connection is closing. ENOTSUP also has to reach the core at once: it is how a
 * zero falls back to writes.
 */
const FINAL = new Set<number>([Errno.EPERM, Errno.EINVAL, Errno.ENOSPC, Errno.ENOTSUP, Errno.ESHUTDOWN]);

export function isRetryable(err: unknown): boolean {
  return !FINAL.has(toErrno(err));
}

/** Wait `ms`, ending early (and failing) when the connection goes away. */
function sleep(ms: number, signal?: AbortSignal): Promise<void> {
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

/** A fresh retry-request filter (settings live in this closure). */
export function createRetryRequestFilter() {
  const s: RetryRequestSettings = { ...DEFAULTS };

  /** Call again on the same context, `delay` apart, up to `retries` more times. */
  async function again<T>(signal: AbortSignal | undefined, what: string, call: () => Promise<T>): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await call();
      } catch (err) {
        if (!isRetryable(err) || attempt >= s.retries) {
          if (attempt > 0 && isRetryable(err)) logWarning(NAME, `${what}: giving up after ${s.retries} retries`);
          throw err;
        }
        logWarning(NAME, `${what} failed (${describe(err)}); retry ${attempt + 1} of ${s.retries} in ${s.delayMs / 1000} s`);
        await sleep(s.delayMs, signal);
      }
    }
  }

  const on = <T>(next: Next, what: string, call: () => Promise<T>) => again(next.signal, what, call);

  return defineFilter({
    apiVersion: 2,
    name: NAME,
    version: VERSION,
    longname: 'nbdx retry-request filter',
    description: 'Retry single requests that fail, on the same connection to the layer below.',
    configHelp: [
      `retry-request-retries=N     retry each request up to N times (default ${DEFAULTS.retries})`,
      `retry-request-delay=SECS    wait this long between attempts (default ${DEFAULTS.delayMs / 1000}; 100ms works too)`,
      'retry-request-open=false    do not retry opening the layer below',
    ].join('\n'),
    threadModel: 'parallel',

    config(next, key, value) {
      switch (key) {
        case 'retry-request-retries': {
          const n = Number(value);
          if (!/^\s*\d+\s*$/.test(value) || !Number.isSafeInteger(n) || n > MAX_RETRIES) {
            throw new NbdError(Errno.EINVAL, `retry-request-retries: '${value}' is not a whole number from 0 to ${MAX_RETRIES}`);
          }
          s.retries = n;
          return;
        }
        case 'retry-request-delay':
          s.delayMs = parseDuration(value, 'retry-request-delay');
          return;
        case 'retry-request-open':
          s.retryOpen = parseBool(value, 'retry-request-open');
          return;
        default:
          return next(key, value);
      }
    },

    async open(opener, readonly, exportName) {
      if (!s.retryOpen) {
        await opener.open(readonly, exportName);
        return {};
      }
      await again(opener.signal, 'open', () => opener.open(readonly, exportName));
      return {};
    },

    pread: (next, _h, buf, offset, flags) => on(next, `read ${buf.length} bytes at ${offset}`, () => next.pread(buf, offset, flags)),
    pwrite: (next, _h, buf, offset, flags) => on(next, `write ${buf.length} bytes at ${offset}`, () => next.pwrite(buf, offset, flags)),
    flush: (next, _h, flags) => on(next, 'flush', () => next.flush(flags)),
    trim: (next, _h, count, offset, flags) => on(next, `trim ${count} bytes at ${offset}`, () => next.trim(count, offset, flags)),
    zero: (next, _h, count, offset, flags) => on(next, `zero ${count} bytes at ${offset}`, () => next.zero(count, offset, flags)),
    extents: (next, _h, count, offset, flags) =>
      on(next, `extents of ${count} bytes at ${offset}`, () => next.extents(count, offset, flags)),
    cache: (next, _h, count, offset, flags) => on(next, `cache ${count} bytes at ${offset}`, () => next.cache(count, offset, flags)),
  });
}

export default createRetryRequestFilter();
