import { readFile, stat } from 'node:fs/promises';
import {
  Errno,
  FLAG_FUA,
  FLAG_REQ_ONE,
  NbdError,
  debug,
  definePlugin,
  logError,
  packageVersion,
} from '@nbdx/server/api';
import { isAbstract, nodeReachesAbstract, showSocket } from './abstract.js';
import { CONFIG_HELP, URL_SHAPE, applyConfig, defaultSettings, type Settings } from './config.js';
import { bodyExcerpt, statusError, type Operation } from './errors.js';
import { ExtentCache, parseExtents, type ExtentMap } from './extents.js';
import { Connection, ConnectionPool, type Endpoint, type Response } from './http.js';
import { OLD_SERVER, parseOptions, poolSize, type ServerOptions } from './options.js';

const NAME = 'imageio';
const VERSION = packageVersion(import.meta.url);
/** Extents lists of hugely fragmented images are big, but not this big. */
const MAX_EXTENTS_BODY = 256 * 1024 * 1024;

/** Everything learnt at start-up and shared by every NBD connection. */
interface Session {
  options: ServerOptions;
  pool: ConnectionPool;
  /** Path of the ticket, e.g. /images/5f2c… */
  path: string;
  size: number;
  transport: 'tcp' | 'unix';
  endpoint: Endpoint;
  extents: ExtentCache;
}

const TLS_HINT_CODES = new Set([
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_GET_ISSUER_CERT',
  'CERT_HAS_EXPIRED',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);

/** Check the status; anything else is logged (the user must see an expired ticket) and thrown. */
function expect(r: Response, status: number, op: Operation, what: string): void {
  if (r.status === status) return;
  const err = statusError(op, what, r.status, r.statusText, r.body);
  logError(NAME, err.message);
  throw err;
}

/** Send OPTIONS for the ticket on a throw-away connection and interpret the answer. */
async function fetchOptions(endpoint: Endpoint, path: string, timeoutMs: number, where: string): Promise<ServerOptions> {
  const probe = new Connection(0, endpoint, timeoutMs);
  try {
    let r: Response;
    try {
      r = await probe.request({ method: 'OPTIONS', path }, `OPTIONS ${where}`);
    } catch (err) {
      const code = ((err as Error).cause as { code?: unknown } | undefined)?.code;
      if (typeof code === 'string' && TLS_HINT_CODES.has(code)) {
        throw new NbdError(
          Errno.EIO,
          `${(err as Error).message}: give the engine's CA with cafile=FILE (or insecure=true to skip verification)`,
        );
      }
      throw err;
    }
    if (r.status === 200) {
      const allow = r.headers.allow;
      return parseOptions(r.body.toString('utf8'), Array.isArray(allow) ? allow.join(',') : allow);
    }
    // daemon < 1.3 answers 405; the old proxy 204 with no body.
    if (r.status === 405 || r.status === 204) return { ...OLD_SERVER };
    // 404 "No handler for …", 400 "Ticket id is required": the server is there, the path is wrong.
    if (r.status === 404 || r.status === 400) {
      throw new NbdError(
        Errno.EINVAL,
        `url: ${where} does not name an imageio ticket (the server answered ${r.status}${r.statusText ? ` ${r.statusText}` : ''}: ` +
          `${bodyExcerpt(r.body)}); expected ${URL_SHAPE}`,
      );
    }
    throw statusError('options', `OPTIONS ${where}`, r.status, r.statusText, r.body);
  } finally {
    await probe.destroy();
  }
}

/**
 * Why the advertised socket cannot be tried from here, or null when it can: abstract names are
 * tried (whether one answers for the ticket is the "same host" test), filesystem paths only
 * when they exist here as sockets.
 */
async function socketProblem(name: string): Promise<string | null> {
  if (isAbstract(name)) return null;
  if (!name.startsWith('/')) return 'not an absolute path';
  try {
    return (await stat(name)).isSocket() ? null : 'not a socket on this host';
  } catch {
    return 'not on this host';
  }
}

/** The SIZE at the end of a Content-Range (`bytes F-L/SIZE`, or "bytes STAR/SIZE" on a 416). */
function sizeFromContentRange(value: string | string[] | undefined): number | null {
  const text = Array.isArray(value) ? value[0] : value;
  const m = text ? /\/\s*(\d+)\s*$/.exec(text) : null;
  if (!m) return null;
  const n = Number(m[1]);
  return Number.isSafeInteger(n) ? n : null;
}

/** A fresh imageio plugin (all state lives in this closure; use one per server). */
export function createImageioPlugin() {
  const settings: Settings = defaultSettings();
  let session: Session | null = null;

  const s = (): Session => {
    if (!session) throw new NbdError(Errno.EIO, 'imageio: not connected to the server (start-up did not finish)');
    return session;
  };

  async function start(): Promise<void> {
    const url = settings.url!;
    const path = url.pathname;
    const ca = settings.cafile === null ? undefined : await readCa(settings.cafile);
    const tcp: Endpoint = { origin: url.origin, ca, insecure: settings.insecure };
    const options = await fetchOptions(tcp, path, settings.timeoutMs, url.origin + path);
    debug(
      NAME,
      options.old
        ? 'old imageio server (OPTIONS not supported): no zero, flush or extents; one connection'
        : `features [${options.features.join(', ')}], max_readers ${options.maxReaders}, max_writers ${options.maxWriters}` +
            `${options.writable ? '' : ', read-only ticket'}, unix_socket ${JSON.stringify(options.unixSocket)}`,
    );

    // Transport: the server's local Unix socket (no TLS: less CPU per byte) when it answers for
    // this ticket from here, else the URL's host. A socket that answers for the ticket is the
    // same daemon (another daemon on this host would not know the ticket).
    const tryLocal = async (socketPath: string, why: string): Promise<Endpoint | null> => {
      const local: Endpoint = { origin: 'http://localhost', socketPath };
      try {
        await fetchOptions(local, path, settings.timeoutMs, `unix:${showSocket(socketPath)}`);
        return local;
      } catch (err) {
        const hint =
          isAbstract(socketPath) && !nodeReachesAbstract()
            ? ` (Node.js ${process.versions.node} cannot reach abstract sockets; Node.js 22 and later can)`
            : '';
        if (settings.unixSocket !== 'auto') throw new NbdError(Errno.EIO, `${(err as Error).message}${hint}`);
        debug(NAME, `not using the ${why} Unix socket ${showSocket(socketPath)}: ${(err as Error).message}${hint}; using ${url.origin}`);
        return null;
      }
    };
    let local: Endpoint | null = null;
    if (settings.unixSocket === 'auto') {
      if (options.unixSocket) {
        const problem = await socketProblem(options.unixSocket);
        if (problem) debug(NAME, `not using the advertised Unix socket ${showSocket(options.unixSocket)}: ${problem}; using ${url.origin}`);
        else local = await tryLocal(options.unixSocket, 'advertised');
      }
    } else if (settings.unixSocket !== 'never') {
      local = await tryLocal(settings.unixSocket, 'given');
    }
    const endpoint = local ?? tcp;
    const transport: Session['transport'] = local ? 'unix' : 'tcp';
    if (local) {
      const how = isAbstract(endpoint.socketPath!) ? 'abstract socket' : 'socket file';
      debug(NAME, `data goes over the local Unix socket ${showSocket(endpoint.socketPath!)} (${how}, plain HTTP, no TLS)`);
    } else {
      debug(NAME, `data goes over ${url.origin}${url.protocol === 'https:' ? ' (TLS)' : ''}`);
    }

    const pool = new ConnectionPool(poolSize(options, settings.connections), endpoint, settings.timeoutMs);
    const extents = new ExtentCache(() => fetchExtents(endpoint, path));
    session = { options, pool, path, size: 0, transport, endpoint, extents };
    try {
      session.size = await findSize(session);
    } catch (err) {
      session = null;
      await pool.close();
      throw err;
    }
    debug(NAME, `size ${session.size}, ${pool.size} connection(s) over ${transport === 'unix' ? `unix:${showSocket(endpoint.socketPath!)}` : url.origin}`);
  }

  async function readCa(file: string): Promise<string> {
    try {
      return await readFile(file, 'utf8');
    } catch (err) {
      throw new NbdError(Errno.EINVAL, `cafile: cannot read '${file}': ${(err as Error).message}`);
    }
  }

  /**
   * The extents, always on a connection of their own, closed afterwards. imageio's proxy mode
   * (the http backend) fetches the extents from upstream once per client connection and never
   * again, even after writes on that very connection; a new connection gets a new backend and a
   * fresh list. The direct daemon asks its backend every time, so this costs it one connection
   * set-up per fetch, and fetches happen only at the first block status and after writes.
   */
  async function fetchExtents(endpoint: Endpoint, path: string): Promise<ExtentMap> {
    const what = 'extents';
    const c = new Connection(-1, endpoint, settings.timeoutMs);
    try {
      const r = await c.request({ method: 'GET', path: `${path}/extents`, maxBody: MAX_EXTENTS_BODY }, what);
      expect(r, 200, 'extents', what);
      const map = parseExtents(r.body.toString('utf8'));
      debug(NAME, `extents: ${map.count} extent(s) up to ${map.end}, fetched on a connection of their own`);
      return map;
    } finally {
      await c.destroy();
    }
  }

  /**
   * size=, else the ticket's size: imageio ends the Content-Range of a ranged GET with it
   * ("bytes 0-0/SIZE", "bytes STAR/SIZE" on a 416 for an empty ticket). The extents cover the
   * whole backend, which may be bigger than the ticket, so their end is only the fallback for
   * servers that send "/STAR".
   */
  async function findSize(ss: Session): Promise<number> {
    if (settings.size !== null) return settings.size;
    const one = new Uint8Array(1);
    const what = 'size probe (GET bytes=0-0)';
    const r = await ss.pool.use((c) =>
      c.request({ method: 'GET', path: ss.path, headers: { range: 'bytes=0-0' }, into: one, intoStatus: 206 }, what),
    );
    if (r.status === 206 || r.status === 416) {
      const size = sizeFromContentRange(r.headers['content-range']);
      if (size !== null) return size;
    } else if (r.status === 200) {
      throw new NbdError(
        Errno.EINVAL,
        `url: ${settings.url!.origin}${ss.path} does not name an imageio ticket (a ranged GET answered 200, not 206); expected ${URL_SHAPE}`,
      );
    } else {
      throw statusError('size', what, r.status, r.statusText, r.body);
    }
    if (ss.options.extents) {
      const map = await ss.extents.get();
      debug(NAME, 'the server does not tell the ticket size in Content-Range: using the end of its extents');
      return map.end;
    }
    throw new NbdError(
      Errno.EINVAL,
      'size: this imageio server does not tell the image size (no size in Content-Range, no extents): give size=SIZE',
    );
  }

  return definePlugin({
    apiVersion: 2,
    name: NAME,
    version: VERSION,
    longname: 'nbdx oVirt imageio plugin',
    description: 'Read and write a disk through the oVirt ovirt-imageio HTTP API (what virt-v2v rhv-upload does).',
    magicConfigKey: 'url',
    configHelp: CONFIG_HELP,
    threadModel: 'parallel',

    config(key, value) {
      applyConfig(settings, key, value);
    },
    configComplete() {
      if (!settings.url) {
        throw new NbdError(Errno.EINVAL, 'url is required: nbdx imageio url=https://HOST:54322/images/TICKET');
      }
    },
    getReady: start,
    async unload() {
      const ss = session;
      session = null;
      await ss?.pool.close();
    },

    open: () => ({}),
    getSize: () => s().size,
    canWrite: () => s().options.writable,
    // With the flush feature NBD flush becomes PATCH flush; without it (old servers) every PUT
    // is flushed by the server before it answers, so there is never anything left to flush.
    canFlush: () => true,
    canFua: () => 'native',
    canTrim: () => false,
    canZero: () => true,
    // Emulated zeroes (no "zero" feature) are refused at once for FAST_ZERO, which is fast.
    canFastZero: () => !s().options.zero,
    canExtents: () => s().options.extents,
    // One NBD flush covers every pooled HTTP connection, whichever NBD connection wrote.
    canMultiConn: () => true,
    canCache: () => 'none',
    isRotational: () => false,

    async pread(_h, buf, offset) {
      if (buf.length === 0) return;
      const ss = s();
      const what = `read offset ${offset} length ${buf.length}`;
      const last = offset + buf.length - 1;
      await ss.pool.use(async (c) => {
        const r = await c.request(
          { method: 'GET', path: ss.path, headers: { range: `bytes=${offset}-${last}` }, into: buf, intoStatus: 206 },
          what,
        );
        expect(r, 206, 'read', what);
        const cr = r.headers['content-range'];
        const m = typeof cr === 'string' ? /^bytes (\d+)-(\d+)/.exec(cr) : null;
        if (m && (Number(m[1]) !== offset || Number(m[2]) !== last)) {
          throw new NbdError(Errno.EIO, `${what}: the server sent the range ${cr}`);
        }
      });
    },

    async pwrite(_h, buf, offset, flags) {
      if (buf.length === 0) return;
      const ss = s();
      const fua = (flags & FLAG_FUA) !== 0;
      const what = `write offset ${offset} length ${buf.length}${fua ? ' (FUA)' : ''}`;
      // flush=n for bulk data, flush=y for FUA; old servers flush every PUT and get no query.
      const query = ss.options.flush ? (fua ? '?flush=y' : '?flush=n') : '';
      ss.extents.invalidate();
      try {
        await ss.pool.use(async (c) => {
          c.dirty = true;
          const r = await c.request(
            {
              method: 'PUT',
              path: ss.path + query,
              headers: { 'content-range': `bytes ${offset}-${offset + buf.length - 1}/*` },
              body: buf,
            },
            what,
          );
          expect(r, 200, 'write', what);
          // flush=y flushed this connection's backend, earlier writes on it included.
          if (fua && ss.options.flush) c.dirty = false;
        });
      } finally {
        ss.extents.invalidate();
      }
    },

    async zero(_h, count, offset, flags) {
      if (count === 0) return;
      const ss = s();
      const fua = (flags & FLAG_FUA) !== 0;
      if (!ss.options.zero || (fua && !ss.options.flush)) {
        // The core writes zeroes instead (PUTs, which such a server flushes itself).
        throw new NbdError(Errno.ENOTSUP, 'zero: this imageio server has no zero operation');
      }
      const what = `zero offset ${offset} length ${count}${fua ? ' (FUA)' : ''}`;
      const body = JSON.stringify({ op: 'zero', offset, size: count, flush: fua });
      ss.extents.invalidate();
      try {
        await ss.pool.use(async (c) => {
          c.dirty = true;
          const r = await c.request(
            { method: 'PATCH', path: ss.path, headers: { 'content-type': 'application/json' }, body },
            what,
          );
          expect(r, 200, 'zero', what);
          if (fua) c.dirty = false;
        });
      } finally {
        ss.extents.invalidate();
      }
    },

    async flush() {
      const ss = s();
      if (!ss.options.flush) return;
      const body = JSON.stringify({ op: 'flush' });
      // Borrow every connection (in-flight writes finish first), flush each one that wrote.
      await ss.pool.useAll(async (conns) => {
        const results = await Promise.allSettled(
          conns
            .filter((c) => c.dirty)
            .map(async (c) => {
              const what = `flush (connection ${c.index})`;
              const r = await c.request(
                { method: 'PATCH', path: ss.path, headers: { 'content-type': 'application/json' }, body },
                what,
              );
              expect(r, 200, 'flush', what);
              c.dirty = false;
            }),
        );
        const failed = results.find((x): x is PromiseRejectedResult => x.status === 'rejected');
        if (failed) throw failed.reason;
      });
    },

    async extents(_h, count, offset, flags) {
      // The core keeps requests inside the export, whose size is the ticket's: extents past it
      // (the rest of a bigger backend) are never looked at.
      const map = await s().extents.get();
      const one = (flags & FLAG_REQ_ONE) !== 0;
      const list = map.lookup(offset, count, one);
      // A list that stops short of the request (a backend smaller than the ticket, a server
      // that left a gap at the end): the rest is reported as data, which is never wrong.
      const last = list[list.length - 1];
      const covered = last ? last.offset + last.length : offset;
      if (covered < offset + count && (!one || list.length === 0)) list.push({ offset: covered, length: offset + count - covered, type: 0 });
      return list;
    },
  });
}

export default createImageioPlugin();
export { ExtentMap, ExtentCache, parseExtents } from './extents.js';
export { parseOptions, poolSize, type ServerOptions } from './options.js';
