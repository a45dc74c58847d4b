import { Errno, FLAG_FAST_ZERO, NbdError, defineFilter, parseBool, parseDuration, packageVersion } from '@nbdx/server/api';
import { Waits } from './waits.js';

export { Waits } from './waits.js';

interface Handle {
  waits: Waits;
}

/** Delays in milliseconds, 0 = none. */
export interface DelaySettings {
  read: number;
  write: number;
  zero: number;
  trim: number;
  extents: number;
  cache: number;
  open: number;
  close: number;
  /** Whether fast zero requests wait like other zeroes (true) or fail with ENOTSUP at once (false). */
  fastZero: boolean;
}

/**
 * A fresh delay filter (its own configuration). The default export is one instance for the
 * command line; tests and embedders call this to get independent ones.
 */
export function createDelayFilter() {
  const d: DelaySettings = { read: 0, write: 0, zero: 0, trim: 0, extents: 0, cache: 0, open: 0, close: 0, fastZero: true };
  /** Every open handle, so unload can end whatever is still waiting. */
  const live = new Set<Waits>();

  return defineFilter<Handle>({
    apiVersion: 2,
    name: 'delay',
    version: packageVersion(import.meta.url),
    longname: 'nbdx delay filter',
    description: 'Delay requests by a fixed time, to simulate a slow or remote server.',
    configHelp: [
      'rdelay=SECS|NNms         delay reads (same as delay-read)',
      'wdelay=SECS|NNms         delay writes, zeroes and trims',
      'delay-read=SECS|NNms     delay reads',
      'delay-write=SECS|NNms    delay writes',
      'delay-zero=SECS|NNms     delay zeroes (see delay-fast-zero)',
      'delay-trim=SECS|NNms     delay trims',
      'delay-extents=SECS|NNms  delay block status (extents)',
      'delay-cache=SECS|NNms    delay cache requests',
      'delay-open=SECS|NNms     delay opening a connection',
      'delay-close=SECS|NNms    delay closing a connection after NBD_CMD_DISC',
      'delay-fast-zero=BOOL     fast zeroes wait too (true, default) or fail at once with ENOTSUP (false)',
    ].join('\n'),
    threadModel: 'parallel',
    // No state beyond the configuration: each worker thread may have its own copy.
    workerThreads: true,

    config(next, key, value) {
      switch (key) {
        case 'rdelay':
        case 'delay-read':
          d.read = parseDuration(value, key);
          return;
        case 'wdelay':
          d.write = d.zero = d.trim = parseDuration(value, key);
          return;
        case 'delay-write':
          d.write = parseDuration(value, key);
          return;
        case 'delay-zero':
          d.zero = parseDuration(value, key);
          return;
        case 'delay-trim':
          d.trim = parseDuration(value, key);
          return;
        case 'delay-extents':
          d.extents = parseDuration(value, key);
          return;
        case 'delay-cache':
          d.cache = parseDuration(value, key);
          return;
        case 'delay-open':
          d.open = parseDuration(value, key);
          return;
        case 'delay-close':
          d.close = parseDuration(value, key);
          return;
        case 'delay-fast-zero':
          d.fastZero = parseBool(value, key);
          return;
        default:
          return next(key, value);
      }
    },

    dumpPlugin() {
      return { delay_units: 'seconds,ms' };
    },

    unload() {
      for (const w of live) w.cancelAll('the server is shutting down');
      live.clear();
    },

    async open(next) {
      // The connection's abort signal (core ≥ the per-connection signal); without one, delays
      // run their course and only close/unload end them.
      const waits = new Waits(next.signal);
      if (d.open) await waits.sleep(d.open);
      live.add(waits);
      return { waits };
    },

    async close(h) {
      try {
        // Only a client that said goodbye (DISC) is delayed: after an abrupt disconnect or
        // during shutdown the signal is already aborted and this returns at once.
        if (d.close) await h.waits.sleep(d.close).catch(() => {});
      } finally {
        h.waits.cancelAll();
        live.delete(h.waits);
      }
    },

    // Each data call: without a delay, a direct call through (no timer, no extra promise).
    pread: (next, h, buf, offset, flags) =>
      d.read ? h.waits.sleep(d.read).then(() => next.pread(buf, offset, flags)) : next.pread(buf, offset, flags),
    pwrite: (next, h, buf, offset, flags) =>
      d.write ? h.waits.sleep(d.write).then(() => next.pwrite(buf, offset, flags)) : next.pwrite(buf, offset, flags),
    // Without a delay the plugin's views pass through (replies sent from its memory); with one,
    // the request must wait, so it goes through pread/pwrite.
    readView: (next, _h, count, offset) => (d.read ? undefined : next.readView?.(count, offset)),
    writeView: (next, _h, count, offset) => (d.write ? undefined : next.writeView?.(count, offset)),
    trim: (next, h, count, offset, flags) =>
      d.trim ? h.waits.sleep(d.trim).then(() => next.trim(count, offset, flags)) : next.trim(count, offset, flags),
    extents: (next, h, count, offset, flags) =>
      d.extents
        ? h.waits.sleep(d.extents).then(() => next.extents(count, offset, flags))
        : next.extents(count, offset, flags),
    cache: (next, h, count, offset, flags) =>
      d.cache ? h.waits.sleep(d.cache).then(() => next.cache(count, offset, flags)) : next.cache(count, offset, flags),

    zero(next, h, count, offset, flags) {
      if (!d.zero) return next.zero(count, offset, flags);
      if (flags & FLAG_FAST_ZERO && !d.fastZero) {
        throw new NbdError(Errno.ENOTSUP, 'fast zero refused without waiting (delay-fast-zero=false)');
      }
      return h.waits.sleep(d.zero).then(() => next.zero(count, offset, flags));
    },

    // With delay-fast-zero=false this filter answers fast zeroes itself (at once, ENOTSUP), so it
    // can always advertise them.
    canFastZero: (next) => (d.zero && !d.fastZero ? true : next.canFastZero()),
  });
}

export default createDelayFilter();
