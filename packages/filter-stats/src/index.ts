import * as fs from 'node:fs';
import * as path from 'node:path';
import { performance } from 'node:perf_hooks';
import { Errno, NbdError, defineFilter, logError, packageVersion, parseBool, parseDuration } from '@nbdx/server/api';
import { formatReport, newStats, type AllStats } from './report.js';

export { formatReport, newStats, humanSize, humanRate, fixed, sizeBits, alignmentBits, OPERATIONS, OperationStats } from './report.js';
export type { AllStats, Operation } from './report.js';

export interface StatsSettings {
  /** Absolute path of the statistics file (required). */
  file?: string;
  /** Append to the file instead of replacing it. */
  append: boolean;
  /** Share of requests covered by the size breakdown, 0..1 (0: no breakdown). nbdkit's default 0.95. */
  threshold: number;
  /** Milliseconds between intermediate reports; 0 (default): only at unload, as nbdkit. */
  intervalMs: number;
}

/** `statsthreshold`: a whole percentage from 0 to 100, as nbdkit takes it. */
export function parseThreshold(value: string): number {
  if (!/^\s*\d+\s*$/.test(value)) {
    throw new NbdError(Errno.EINVAL, `statsthreshold: could not parse '${value}' as a whole number of percent (0 to 100)`);
  }
  const n = Number(value);
  if (n > 100) throw new NbdError(Errno.EINVAL, 'statsthreshold must be between 0 and 100 (percent)');
  return n / 100;
}

/** Write all of `text` at `position` (null: at the current position / end). */
function writeAll(fd: number, text: string, position: number | null): Promise<void> {
  const buf = Buffer.from(text);
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      if (done >= buf.length) return resolve();
      fs.write(fd, buf, done, buf.length - done, position === null ? null : position + done, (err, n) =>
        err ? reject(err) : step(done + n),
      );
    };
    step(0);
  });
}

function writeAllSync(fd: number, text: string, position: number | null): void {
  const buf = Buffer.from(text);
  let done = 0;
  while (done < buf.length) done += fs.writeSync(fd, buf, done, buf.length - done, position === null ? null : position + done);
}

/**
 * A fresh stats filter (its own settings and counters). The default export is one instance for
 * the command line; tests and embedders call this to get independent ones.
 */
export function createStatsFilter() {
  const settings: StatsSettings = { append: false, threshold: 0.95, intervalMs: 0 };
  const stats: AllStats = newStats();
  let histogram = true;
  let fd: number | undefined;
  /** Regular file: reports written in place; otherwise (a pipe, /dev/stderr) just written. */
  let seekable = false;
  /** Where this run's reports start (the end of the file when appending). */
  let base = 0;
  let start = 0;
  let timer: NodeJS.Timeout | undefined;
  /** The intermediate report being written, so the final one never overtakes it. */
  let writing: Promise<void> = Promise.resolve();

  const now = (): number => performance.now();

  /** The report so far, as it will be written. */
  const report = (): string => formatReport(stats, now() - start, settings.threshold);

  function intermediate(): void {
    writing = writing.then(async () => {
      if (fd === undefined) return;
      const text = report();
      if (seekable && !settings.append) {
        // Replace the previous report: the file always holds one complete report.
        await writeAll(fd, text, 0);
        fs.ftruncateSync(fd, Buffer.byteLength(text));
      } else if (seekable) {
        await writeAll(fd, text, base);
        base += Buffer.byteLength(text);
      } else {
        await writeAll(fd, text, null);
      }
    }).catch((err: Error) => logError('stats', `${settings.file}: ${err.message}`));
  }

  return defineFilter({
    apiVersion: 2,
    name: 'stats',
    version: packageVersion(import.meta.url),
    longname: 'nbdx stats filter',
    description: 'Statistics about NBD operations (counts, bytes, time, request sizes), written to a file at exit.',
    configHelp: [
      'statsfile=FILE          (required) the file to write the statistics to',
      'statsappend=BOOL        append to the file instead of replacing it (default false)',
      'statsthreshold=PERCENT  share of requests the size breakdown covers, 0 (none) to 100 (default 95)',
      'statsinterval=SECS|NNms also write the statistics so far this often (default 0: only at exit)',
    ].join('\n'),
    threadModel: 'parallel',

    config(next, key, value) {
      switch (key) {
        case 'statsfile':
          settings.file = path.resolve(value);
          return;
        case 'statsappend':
          settings.append = parseBool(value, key);
          return;
        case 'statsthreshold':
          settings.threshold = parseThreshold(value);
          histogram = settings.threshold !== 0;
          return;
        case 'statsinterval':
          settings.intervalMs = parseDuration(value, key);
          return;
        default:
          return next(key, value);
      }
    },

    async configComplete(next) {
      if (!settings.file) throw new NbdError(Errno.EINVAL, 'stats filter requires statsfile parameter');
      await next();
    },

    getReady() {
      const file = settings.file!;
      try {
        // No O_APPEND even when appending: intermediate reports are written at known positions.
        fd = fs.openSync(file, settings.append ? fs.constants.O_WRONLY | fs.constants.O_CREAT : 'w', 0o666);
        seekable = fs.fstatSync(fd).isFile();
        base = seekable && settings.append ? fs.fstatSync(fd).size : 0;
      } catch (err) {
        throw new NbdError(Errno.EINVAL, `open: ${file}: ${(err as Error).message}`);
      }
      start = now();
      if (settings.intervalMs > 0) {
        timer = setInterval(intermediate, settings.intervalMs);
        timer.unref();
      }
    },

    async unload() {
      if (timer) clearInterval(timer);
      timer = undefined;
      await writing;
      if (fd === undefined) return;
      const f = fd;
      fd = undefined;
      try {
        const text = report();
        if (seekable && !settings.append) {
          writeAllSync(f, text, 0);
          fs.ftruncateSync(f, Buffer.byteLength(text));
        } else {
          writeAllSync(f, text, seekable ? base : null);
        }
      } finally {
        fs.closeSync(f);
      }
    },

    // Each data call: one clock reading before, one after, a few additions. Failed requests are
    // not counted (as nbdkit).
    async pread(next, _h, buf, offset, flags) {
      const t0 = now();
      const r = await next.pread(buf, offset, flags);
      stats.read.record(buf.length, offset, now() - t0, histogram);
      return r;
    },
    async pwrite(next, _h, buf, offset, flags) {
      const t0 = now();
      await next.pwrite(buf, offset, flags);
      stats.write.record(buf.length, offset, now() - t0, histogram);
    },
    async trim(next, _h, count, offset, flags) {
      const t0 = now();
      await next.trim(count, offset, flags);
      stats.trim.record(count, offset, now() - t0, histogram);
    },
    async zero(next, _h, count, offset, flags) {
      const t0 = now();
      await next.zero(count, offset, flags);
      stats.zero.record(count, offset, now() - t0, histogram);
    },
    async extents(next, _h, count, offset, flags) {
      const t0 = now();
      const r = await next.extents(count, offset, flags);
      // As nbdkit: the bytes asked about, not the length of the extents answered.
      stats.extents.record(count, offset, now() - t0, histogram);
      return r;
    },
    async cache(next, _h, count, offset, flags) {
      const t0 = now();
      await next.cache(count, offset, flags);
      stats.cache.record(count, offset, now() - t0, histogram);
    },
    async flush(next, _h, flags) {
      const t0 = now();
      await next.flush(flags);
      stats.flush.record(0, 0, now() - t0, histogram);
    },
  });
}

export default createStatsFilter();
