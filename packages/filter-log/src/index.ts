import * as path from 'node:path';
import {
  Errno,
  FLAG_FAST_ZERO,
  FLAG_FUA,
  FLAG_MAY_TRIM,
  FLAG_REQ_ONE,
  NbdError,
  defineFilter,
  logError,
  packageVersion,
  parseBool,
} from '@nbdx/server/api';
import { failure, formatExtents, hex, modeNumber, shellQuote, timestamp } from './format.js';
import { LineWriter } from './writer.js';

export { timestamp, shellQuote, formatExtents, modeNumber, failure } from './format.js';
export { LineWriter } from './writer.js';

interface Handle {
  /** Connection number, from 1, in the order connections opened. */
  connection: number;
  /** The last request id on this connection (ids count from 1). */
  id: number;
  exportName: string;
  tls: boolean;
}

const bit = (flags: number, f: number): number => (flags & f ? 1 : 0);

/**
 * A fresh log filter (its own file and counters). The default export is one instance for the
 * command line; tests and embedders call this to get independent ones.
 */
export function createLogFilter() {
  let file: string | undefined;
  let append = false;
  let out: LineWriter | undefined;
  let connections = 0;
  let preconnectId = 0;
  let listId = 0;

  /** A line for a request's start (`Read id=1 offset=0x0 count=0x200 ...`). */
  function enter(h: Handle | null, id: number, act: string, args: string): void {
    out?.write(
      `${timestamp()}${h ? ` connection=${h.connection}` : ''} ${act} id=${id}${args ? ` ${args}` : ''} ...\n`,
    );
  }
  /** A line for its end (`...Read id=1 return=0`). */
  function leave(h: Handle | null, id: number, act: string, args: string): void {
    out?.write(`${timestamp()}${h ? ` connection=${h.connection}` : ''} ...${act} id=${id} ${args}\n`);
  }
  /** A line on its own (`Connect …`, `Disconnect …`). */
  function print(h: Handle | null, act: string, args: string): void {
    out?.write(`${timestamp()}${h ? ` connection=${h.connection}` : ''} ${act}${args ? ` ${args}` : ''}\n`);
  }

  /** Run one request between its two lines; a failure is logged with its NBD error and rethrown. */
  async function logged<T>(h: Handle, act: string, args: string, call: () => Promise<T>): Promise<T> {
    const id = ++h.id;
    enter(h, id, act, args);
    try {
      const r = await call();
      leave(h, id, act, 'return=0');
      return r;
    } catch (err) {
      leave(h, id, act, failure(err));
      throw err;
    }
  }

  return defineFilter<Handle>({
    apiVersion: 2,
    name: 'log',
    version: packageVersion(import.meta.url),
    longname: 'nbdx log filter',
    description: 'Log every connection and request to a file, in the format of nbdkit\'s log filter.',
    configHelp: [
      'logfile=FILE     the file to write the log to (without it the filter does nothing)',
      'logappend=BOOL   append to the file instead of replacing it (default false)',
    ].join('\n'),
    threadModel: 'parallel',

    config(next, key, value) {
      switch (key) {
        case 'logfile':
          file = path.resolve(value);
          return;
        case 'logappend':
          append = parseBool(value, key);
          return;
        case 'logscript':
          throw new NbdError(Errno.EINVAL, 'logscript: not supported by the nbdx log filter (use logfile=FILE)');
        default:
          return next(key, value);
      }
    },

    getReady() {
      if (!file) return;
      try {
        out = LineWriter.open(file, append, (err) => logError('log', `${file}: ${err.message}; logging stopped`));
      } catch (err) {
        throw new NbdError(Errno.EINVAL, `open: ${file}: ${(err as Error).message}`);
      }
      print(null, 'Ready', '');
    },

    async unload() {
      const w = out;
      out = undefined;
      await w?.close();
    },

    async preconnect(_below, readonly) {
      if (!out) return;
      const id = ++preconnectId;
      enter(null, id, 'Preconnect', `readonly=${readonly ? 1 : 0}`);
      leave(null, id, 'Preconnect', 'return=0');
    },

    async listExports(below, readonly, isTls) {
      if (!out) return below.listExports(readonly, isTls);
      const id = ++listId;
      enter(null, id, 'ListExports', `readonly=${readonly ? 1 : 0} tls=${isTls ? 1 : 0}`);
      try {
        const list = await below.listExports(readonly, isTls);
        leave(null, id, 'ListExports', `exports=(${list.map((e) => shellQuote(e.name)).join(' ')}) return=0`);
        return list;
      } catch (err) {
        leave(null, id, 'ListExports', failure(err));
        throw err;
      }
    },

    async open(next, _readonly, exportName, isTls) {
      await next.open();
      return { connection: ++connections, id: 0, exportName, tls: isTls };
    },

    async prepare(next, h) {
      if (!out) return;
      const [size, bs, w, f, r, t, z, fua, e, c, fz] = await Promise.all([
        next.getSize(),
        next.blockSize(),
        next.canWrite(),
        next.canFlush(),
        next.isRotational(),
        next.canTrim(),
        next.canZero(),
        next.canFua(),
        next.canExtents(),
        next.canCache(),
        next.canFastZero(),
      ]);
      const n = (b: boolean): number => (b ? 1 : 0);
      print(
        h,
        'Connect',
        `export=${shellQuote(h.exportName)} tls=${n(h.tls)} size=${hex(size)} ` +
          `minsize=${hex(bs?.minimum ?? 0)} prefsize=${hex(bs?.preferred ?? 0)} maxsize=${hex(bs?.maximum ?? 0)} ` +
          // nbdx's canZero says only whether zero works; nbdkit's 2 is "native", its common case.
          `write=${n(w)} flush=${n(f)} rotational=${n(r)} trim=${n(t)} zero=${z ? 2 : 0} fua=${modeNumber(fua)} ` +
          `extents=${n(e)} cache=${modeNumber(c)} fast_zero=${n(fz)}`,
      );
    },

    finalize(_next, h) {
      if (out) print(h, 'Disconnect', `transactions=${h.id}`);
    },

    pread(next, h, buf, offset, flags) {
      if (!out) return next.pread(buf, offset, flags);
      return logged(h, 'Read', `offset=${hex(offset)} count=${hex(buf.length)}`, () => next.pread(buf, offset, flags));
    },
    pwrite(next, h, buf, offset, flags) {
      if (!out) return next.pwrite(buf, offset, flags);
      return logged(h, 'Write', `offset=${hex(offset)} count=${hex(buf.length)} fua=${bit(flags, FLAG_FUA)}`, () =>
        next.pwrite(buf, offset, flags),
      );
    },
    flush(next, h, flags) {
      if (!out) return next.flush(flags);
      return logged(h, 'Flush', '', () => next.flush(flags));
    },
    trim(next, h, count, offset, flags) {
      if (!out) return next.trim(count, offset, flags);
      return logged(h, 'Trim', `offset=${hex(offset)} count=${hex(count)} fua=${bit(flags, FLAG_FUA)}`, () =>
        next.trim(count, offset, flags),
      );
    },
    zero(next, h, count, offset, flags) {
      if (!out) return next.zero(count, offset, flags);
      return logged(
        h,
        'Zero',
        `offset=${hex(offset)} count=${hex(count)} trim=${bit(flags, FLAG_MAY_TRIM)} fua=${bit(flags, FLAG_FUA)} fast=${bit(flags, FLAG_FAST_ZERO)}`,
        () => next.zero(count, offset, flags),
      );
    },
    cache(next, h, count, offset, flags) {
      if (!out) return next.cache(count, offset, flags);
      return logged(h, 'Cache', `offset=${hex(offset)} count=${hex(count)}`, () => next.cache(count, offset, flags));
    },
    async extents(next, h, count, offset, flags) {
      if (!out) return next.extents(count, offset, flags);
      const id = ++h.id;
      enter(h, id, 'Extents', `offset=${hex(offset)} count=${hex(count)} req_one=${bit(flags, FLAG_REQ_ONE)}`);
      try {
        const list = await next.extents(count, offset, flags);
        leave(h, id, 'Extents', `extents=(${formatExtents(list)}) return=0`);
        return list;
      } catch (err) {
        leave(h, id, 'Extents', failure(err));
        throw err;
      }
    },
  });
}

export default createLogFilter();
