import { existsSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  Errno,
  FLAG_REQ_ONE,
  NbdError,
  debug,
  defineFilter,
  logError,
  parseBool,
  parseSize,
  packageVersion,
  TempFile,
  type ExportEntry,
  type LayerBelow,
} from '@nbdx/server/api';
import { Overlay } from './overlay.js';

export { Overlay, type Below } from './overlay.js';
export { BlockMap, BELOW, BELOW_STALE, DATA, ZERO, ZERO_STALE, type BlockState } from './block-map.js';
export { BlockLocks } from './block-locks.js';
/** The overlay's file: the server's TempFile (re-exported where it used to live). */
export { TempFile } from '@nbdx/server/api';

const NAME = 'cow';
export const DEFAULT_BLOCK_SIZE = 64 * 1024;
export const MIN_BLOCK_SIZE = 4096;
export const MAX_BLOCK_SIZE = 2 ** 32;

/** Parse cow-block-size: a power of two from 4 KiB to 4 GiB. */
export function parseBlockSize(value: string): number {
  const n = parseSize(value, 'cow-block-size');
  if (n < MIN_BLOCK_SIZE || n > MAX_BLOCK_SIZE || !Number.isInteger(Math.log2(n))) {
    throw new NbdError(
      Errno.EINVAL,
      `cow-block-size: '${value}' must be a power of two from 4K to 4G (for example 64K or 1M)`,
    );
  }
  return n;
}

/** cow-on-read: on, off, or on only while the file PATH exists. */
export type CopyOnRead = boolean | { path: string };

export function parseCopyOnRead(value: string): CopyOnRead {
  try {
    return parseBool(value, 'cow-on-read');
  } catch {
    if (value.trim() === '') throw new NbdError(Errno.EINVAL, 'cow-on-read: expected true, false or a PATH');
    return { path: path.resolve(value) };
  }
}

/** cow-io: how the overlay file is read and written. */
export type CowIo = 'sync' | 'async' | 'auto';
/** With cow-io=auto, requests up to this size use synchronous I/O. */
export const AUTO_SYNC_LIMIT = 64 * 1024;

export function syncLimitOf(io: CowIo): number {
  return io === 'sync' ? Infinity : io === 'async' ? -1 : AUTO_SYNC_LIMIT;
}

/** cow-max-overlays: how many exports of the layer below may have an overlay (default). */
export const DEFAULT_MAX_OVERLAYS = 256;

export function parseMaxOverlays(value: string): number {
  const n = /^\s*\d+\s*$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n) || n < 1) {
    throw new NbdError(Errno.EINVAL, `cow-max-overlays: '${value}' is not a whole number of at least 1`);
  }
  return n;
}

/**
 * Which export of the layer below `exportName` reaches: the key of its overlay. Called once the
 * layer below has opened `exportName`, so the name is one it accepts. The filter API gives an
 * open export no identity of its own, so this goes by what the layer below says about its names:
 *
 * - `''` is the layer below's default export, under the name that export is listed with;
 * - a name the layer below lists is that export;
 * - a name it does not list, when it lists exactly one export and that export is its default,
 *   reaches that one export. That is how a layer without export names looks (a plugin without
 *   listExports, memory, file=, nbd without dynamic-export, shared): each serves its one export
 *   whatever name a client gives, and client-chosen names must not each get an overlay;
 * - any other name is an export the layer below serves without listing it (dynamic exports):
 *   it keeps its own overlay, under that name, counted against cow-max-overlays.
 *
 * `known` tells whether a key already has an overlay: such a name was resolved before, to itself,
 * so it needs no listing again (listing may cost a round trip to an upstream server).
 */
export async function overlayKey(
  below: LayerBelow,
  exportName: string,
  isTls: boolean,
  known: (key: string) => boolean = () => false,
): Promise<string> {
  // Asked as cow opens below: read-only. A layer that cannot say keeps the name as given.
  const defaultName = () => below.defaultExport(true, isTls).catch(() => undefined);
  let def: string | undefined;
  let name = exportName;
  if (name === '') {
    def = await defaultName();
    name = def ?? '';
  }
  if (known(name)) return name;
  let list: ExportEntry[];
  try {
    list = await below.listExports(true, isTls);
  } catch {
    // Without a listing nothing says two names are one export: keep them apart (and bounded).
    return name;
  }
  if (list.some((e) => e.name === name)) return name;
  if (list.length === 1) {
    if (def === undefined) def = await defaultName();
    if (def !== undefined && list[0]!.name === def) return def;
  }
  return name;
}

interface Handle {
  overlay: Overlay;
  /** The export size, from the layer below. */
  size: number;
}

/**
 * A fresh `cow` filter: a writable copy-on-write overlay over any export. The layer below is only
 * ever opened read-only; writes land in a sparse, already-unlinked temporary file in TMPDIR,
 * shared by every connection to the same export and gone when the server stops.
 */
export function createCowFilter() {
  let blockSize = DEFAULT_BLOCK_SIZE;
  let onRead: CopyOnRead = false;
  let onCache = false;
  let io: CowIo = 'auto';
  let dir = os.tmpdir();
  let maxOverlays = DEFAULT_MAX_OVERLAYS;
  /**
   * One overlay per export of the layer below, keyed by overlayKey(): never by the name a client
   * typed, or every new name would cost a temporary file and a descriptor for the server's life.
   */
  const overlays = new Map<string, Promise<Overlay>>();

  function overlayFor(key: string): Promise<Overlay> {
    let p = overlays.get(key);
    if (!p) {
      // Overlays are never dropped while the server runs (their data would vanish under clients
      // that come back), so the number of them is bounded instead.
      if (overlays.size >= maxOverlays) {
        return Promise.reject(
          new NbdError(
            Errno.ENOSPC,
            `${NAME}: export '${key}' needs an overlay of its own, but ${overlays.size} exports have one already ` +
              `(cow-max-overlays=${maxOverlays})`,
          ),
        );
      }
      p = TempFile.create(dir, 'nbdx-cow-').then((file) => {
        file.syncLimit = syncLimitOf(io);
        debug(NAME, `overlay for export '${key}': block size ${blockSize}, in ${dir}, cow-io=${io}`);
        return new Overlay(file, blockSize);
      });
      overlays.set(key, p);
      p.catch(() => overlays.delete(key));
    }
    return p;
  }

  function copyOnRead(): boolean {
    if (typeof onRead === 'boolean') return onRead;
    return existsSync(onRead.path);
  }

  return defineFilter<Handle>({
    apiVersion: 2,
    name: NAME,
    version: packageVersion(import.meta.url),
    longname: 'nbdx copy-on-write filter',
    description: 'Makes any export writable: writes go to a temporary overlay, the layer below is never changed.',
    configHelp: [
      'cow-block-size=SIZE         overlay block size, a power of two from 4K to 4G (default 64K)',
      'cow-on-read=true|false|PATH copy blocks into the overlay when they are read (PATH: while PATH exists)',
      'cow-on-cache=true|false     copy blocks into the overlay on NBD_CMD_CACHE (default false)',
      'cow-io=auto|sync|async      overlay file I/O: synchronous up to 64K (default), always, or never',
      `cow-max-overlays=N          at most N exports of the layer below get an overlay (default ${DEFAULT_MAX_OVERLAYS})`,
    ].join('\n'),
    threadModel: 'parallel',

    load() {
      blockSize = DEFAULT_BLOCK_SIZE;
      onRead = false;
      onCache = false;
      io = 'auto';
      maxOverlays = DEFAULT_MAX_OVERLAYS;
    },

    config(next, key, value) {
      switch (key) {
        case 'cow-block-size':
          blockSize = parseBlockSize(value);
          return;
        case 'cow-on-read':
          onRead = parseCopyOnRead(value);
          return;
        case 'cow-on-cache':
          onCache = parseBool(value, 'cow-on-cache');
          return;
        case 'cow-io':
          if (value !== 'auto' && value !== 'sync' && value !== 'async') {
            throw new NbdError(Errno.EINVAL, `cow-io: '${value}' is not one of auto, sync, async`);
          }
          io = value;
          return;
        case 'cow-max-overlays':
          maxOverlays = parseMaxOverlays(value);
          return;
        default:
          return next(key, value);
      }
    },

    async getReady() {
      // TMPDIR is read now (not at import) and checked, so a bad one stops the server at start-up.
      dir = os.tmpdir();
      try {
        await (await TempFile.create(dir, 'nbdx-cow-')).close();
      } catch (err) {
        throw new NbdError(
          Errno.EIO,
          `${NAME}: cannot create the overlay in ${dir} (set TMPDIR to a writable directory): ${(err as Error).message}`,
        );
      }
    },

    async unload() {
      const all = [...overlays.values()];
      overlays.clear();
      for (const p of all) {
        try {
          await (await p).close();
        } catch (err) {
          logError(NAME, `closing an overlay: ${(err as Error).message}`);
        }
      }
    },

    dumpPlugin() {
      return {
        cow_block_size_default: DEFAULT_BLOCK_SIZE,
        cow_on_read: 'true,false,PATH',
        cow_on_cache: 'true,false',
        cow_max_overlays_default: DEFAULT_MAX_OVERLAYS,
      };
    },

    async open(next, _readonly, exportName, isTls) {
      // The layer below is never written: open it read-only whatever the client asked for.
      // It is opened first, so a name it refuses never gets as far as creating an overlay. If
      // anything below fails, the core closes what was opened.
      await next.open(true, exportName);
      const key = await overlayKey(next, exportName, isTls, (k) => overlays.has(k));
      return { overlay: await overlayFor(key), size: 0 };
    },

    async prepare(next, h) {
      h.size = await next.getSize();
    },

    canWrite: () => true,
    canFlush: () => true,
    canTrim: () => true,
    canZero: () => true,
    // Whole blocks are zeroed in the map, partial ones with at most two small writes: always fast.
    canFastZero: () => true,
    canExtents: () => true,
    // The overlay is temporary: there is nothing a flush or FUA could make more durable.
    canFua: () => 'native',
    // Every connection to an export shares one overlay (whatever name it reached the export by),
    // and flush has nothing to do.
    canMultiConn: () => true,
    async canCache(next) {
      if (onCache) return 'native';
      return (await next.canCache()) === 'none' ? 'none' : 'native';
    },

    pread(next, h, buf, offset) {
      if (onRead !== false && h.overlay.hasBelow(offset, buf.length) && copyOnRead()) {
        return h.overlay.copyUp(next, h.size, offset, buf.length).then(() => h.overlay.read(next, buf, offset));
      }
      return h.overlay.read(next, buf, offset);
    },
    pwrite: (next, h, buf, offset) => h.overlay.write(next, h.size, buf, offset),
    flush: () => {},
    trim: (next, h, count, offset) => h.overlay.zero(next, h.size, count, offset),
    zero: (next, h, count, offset) => h.overlay.zero(next, h.size, count, offset),
    extents: (next, h, count, offset, flags) => h.overlay.extents(next, count, offset, (flags & FLAG_REQ_ONE) !== 0),
    async cache(next, h, count, offset) {
      if (onCache) return h.overlay.copyUp(next, h.size, offset, count);
      return h.overlay.cacheBelow(next, offset, count);
    },
  });
}

export default createCowFilter();
