import { existsSync, statfsSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  Errno,
  NbdError,
  debug,
  defineFilter,
  logError,
  parseBool,
  parseSize,
  packageVersion,
  TempFile,
  type Next,
} from '@nbdx/server/api';
import { CacheStore, type CacheMode } from './store.js';

export { CacheStore, type CacheMode, type Below, type StoreOptions, type StoreStats } from './store.js';
/** The cache's file: the server's TempFile (the name it had when it lived here). */
export { TempFile as SlotFile } from '@nbdx/server/api';
export { BlockLocks } from './block-locks.js';

const NAME = 'cache';
export const DEFAULT_BLOCK_SIZE = 64 * 1024;
/** Pieces of the cache file up to this size are read and written synchronously (TempFile.syncLimit). */
const SYNC_LIMIT = 64 * 1024;
export const MIN_BLOCK_SIZE = 4096;
export const MAX_BLOCK_SIZE = 64 * 1024 * 1024;

/** cache-min-block-size: a power of two from 4K to 64M. */
export function parseBlockSize(value: string): number {
  const n = parseSize(value, 'cache-min-block-size');
  if (n < MIN_BLOCK_SIZE || n > MAX_BLOCK_SIZE || !Number.isInteger(Math.log2(n))) {
    throw new NbdError(
      Errno.EINVAL,
      `cache-min-block-size: '${value}' must be a power of two from 4K to 64M (for example 64K or 1M)`,
    );
  }
  return n;
}

export function parseMode(value: string): CacheMode {
  if (value === 'writeback' || value === 'writethrough' || value === 'unsafe') return value;
  throw new NbdError(Errno.EINVAL, `cache: '${value}' is not one of writeback, writethrough, unsafe`);
}

/** A percentage for cache-high-threshold / cache-low-threshold: a whole number from 1 to 100. */
export function parseThreshold(value: string, key: string): number {
  const n = /^\s*\d+\s*$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n) || n < 1 || n > 100) {
    throw new NbdError(Errno.EINVAL, `${key}: '${value}' is not a whole percentage from 1 to 100`);
  }
  return n;
}

/** cache-on-read: on, off, or on only while the file PATH exists. */
export type CacheOnRead = boolean | { path: string };

export function parseCacheOnRead(value: string): CacheOnRead {
  try {
    return parseBool(value, 'cache-on-read');
  } catch {
    if (!path.isAbsolute(value)) {
      throw new NbdError(Errno.EINVAL, `cache-on-read: '${value}' is not true, false or an absolute /PATH`);
    }
    return { path: value };
  }
}

/** The block size actually used: the larger of the parameter and the cache file system's block. */
export function effectiveBlockSize(min: number, dir: string): number {
  let fsBlock = 0;
  try {
    fsBlock = statfsSync(dir).bsize;
  } catch {
    // An unreadable directory fails later, when the file is created, with a clearer message.
  }
  let bs = min;
  while (bs < fsBlock && bs < MAX_BLOCK_SIZE) bs *= 2;
  return bs;
}

interface Entry {
  store: Promise<CacheStore>;
  refs: number;
  /** Connections that can write below: dirty data must be written back before the last goes. */
  writers: number;
}

interface Handle {
  key: string;
  store?: CacheStore;
  writer: boolean;
}

/**
 * A fresh `cache` filter: a local cache of the layer below in an unlinked temporary file. One
 * cache per export, shared by every connection open to it (so multi-conn clients see one set of
 * data); it is written back (writeback, unsafe) and dropped when the last of them closes.
 */
export function createCacheFilter() {
  let mode: CacheMode = 'writeback';
  let minBlockSize = DEFAULT_BLOCK_SIZE;
  let maxSize = Infinity;
  let high = 95;
  let low = 80;
  let onRead: CacheOnRead = false;
  let dir: string | undefined;
  let blockSize = DEFAULT_BLOCK_SIZE;
  const entries = new Map<string, Entry>();
  /** Stores whose last connection is closing: a new one for the same export waits for them. */
  const closing = new Map<string, Promise<void>>();

  function cacheOnRead(): boolean {
    if (typeof onRead === 'boolean') return onRead;
    return existsSync(onRead.path);
  }

  async function acquire(key: string, size: number, writer: boolean): Promise<CacheStore> {
    for (;;) {
      const wait = closing.get(key);
      if (!wait) break;
      await wait;
    }
    let entry = entries.get(key);
    if (!entry) {
      const store = TempFile.create(dir!, 'nbdx-cache-').then((file) => {
        // Cached blocks are recent: in the page cache, a synchronous copy beats the thread pool.
        file.syncLimit = SYNC_LIMIT;
        debug(NAME, `cache for export '${key}': ${size} bytes, block size ${blockSize}, cache=${mode}, in ${dir}`);
        return new CacheStore(file, size, { blockSize, mode, maxSize, highThreshold: high, lowThreshold: low }, NAME);
      });
      entry = { store, refs: 0, writers: 0 };
      entries.set(key, entry);
      store.catch(() => entries.delete(key));
    }
    entry.refs++;
    if (writer) entry.writers++;
    try {
      return await entry.store;
    } catch (err) {
      entry.refs--;
      if (writer) entry.writers--;
      throw new NbdError(Errno.EIO, `cannot create the cache file in ${dir}: ${(err as Error).message}`);
    }
  }

  /**
   * Nothing acknowledged is lost when clients go without a flush (writeback and unsafe alike):
   * when the last connection that can write closes, what is still dirty is written below through
   * it (read-only connections that stay cannot make anything dirty, nor write it back).
   */
  async function writeBackOnClose(key: string, store: CacheStore, next: Next): Promise<void> {
    if (store.dirtyBlocks === 0) return;
    try {
      await store.writeBack(next);
      if (await next.canFlush()) await next.flush(0);
    } catch (err) {
      logError(NAME, `export '${key}': writing back ${store.dirtyBlocks} dirty blocks on close failed: ${(err as Error).message}`);
    }
  }

  async function release(key: string, next: Next, writer: boolean): Promise<void> {
    const entry = entries.get(key);
    if (!entry) return;
    if (writer && --entry.writers === 0 && entry.refs > 1) await writeBackOnClose(key, await entry.store, next);
    if (--entry.refs > 0) return;
    entries.delete(key);
    let done!: () => void;
    closing.set(key, new Promise<void>((resolve) => (done = resolve)));
    try {
      const store = await entry.store;
      if (writer) await writeBackOnClose(key, store, next);
      await store.close();
    } finally {
      closing.delete(key);
      done();
    }
  }

  const filter = defineFilter<Handle>({
    apiVersion: 2,
    name: NAME,
    version: packageVersion(import.meta.url),
    longname: 'nbdx cache filter',
    description: 'A local cache of the layer below in a temporary file: writeback, writethrough or unsafe.',
    configHelp: [
      'cache=writeback|writethrough|unsafe  when writes reach the layer below (default writeback)',
      'cache-min-block-size=SIZE            cache block, a power of two from 4K (default 64K, at least the file system block)',
      'cache-max-size=SIZE                  limit the cache file to SIZE; least recently used blocks are dropped',
      'cache-high-threshold=N               start reclaiming at N% of cache-max-size (default 95)',
      'cache-low-threshold=N                reclaim down to N% of cache-max-size (default 80)',
      'cache-on-read=true|false|/PATH       keep blocks that are read too (default false; /PATH: while it exists)',
      'cachedir=DIR                         where the temporary file goes (default $TMPDIR or /tmp)',
    ].join('\n'),
    threadModel: 'parallel',

    load() {
      mode = 'writeback';
      minBlockSize = DEFAULT_BLOCK_SIZE;
      maxSize = Infinity;
      high = 95;
      low = 80;
      onRead = false;
      dir = undefined;
    },

    config(next, key, value) {
      switch (key) {
        case 'cache':
          mode = parseMode(value);
          return;
        case 'cache-min-block-size':
          minBlockSize = parseBlockSize(value);
          return;
        case 'cache-max-size':
          maxSize = parseSize(value, key);
          if (maxSize === 0) throw new NbdError(Errno.EINVAL, `${key}: must be more than 0`);
          return;
        case 'cache-high-threshold':
          high = parseThreshold(value, key);
          return;
        case 'cache-low-threshold':
          low = parseThreshold(value, key);
          return;
        case 'cache-on-read':
          onRead = parseCacheOnRead(value);
          return;
        case 'cachedir':
          if (value.trim() === '') throw new NbdError(Errno.EINVAL, 'cachedir: expected a directory');
          dir = path.resolve(value);
          return;
        default:
          return next(key, value);
      }
    },

    configComplete(next) {
      if (!(low < high)) {
        throw new NbdError(Errno.EINVAL, `cache-low-threshold (${low}) must be below cache-high-threshold (${high})`);
      }
      return next();
    },

    async getReady() {
      // TMPDIR is read now (not at import) and checked, so a bad one stops the server at start-up.
      dir ??= os.tmpdir();
      try {
        await (await TempFile.create(dir, 'nbdx-cache-')).close();
      } catch (err) {
        throw new NbdError(
          Errno.EIO,
          `${NAME}: cannot create the cache file in ${dir} (set cachedir= or TMPDIR to a writable directory): ${(err as Error).message}`,
        );
      }
      blockSize = effectiveBlockSize(minBlockSize, dir);
      if (maxSize < blockSize) {
        throw new NbdError(Errno.EINVAL, `cache-max-size (${maxSize}) is smaller than one cache block (${blockSize})`);
      }
    },

    async unload() {
      const all = [...entries.values()];
      entries.clear();
      for (const e of all) {
        try {
          await (await e.store).close();
        } catch {
          // creation failed: nothing to close
        }
      }
    },

    dumpPlugin() {
      return {
        cache_modes: 'writeback,writethrough,unsafe',
        cache_min_block_size_default: DEFAULT_BLOCK_SIZE,
        cache_on_read: 'true,false,/PATH',
      };
    },

    async open(next, readonly, exportName, isTls) {
      await next.open(readonly, exportName);
      // The default export may be reached as '' or by its name: both share one cache.
      const key = exportName === '' ? await next.defaultExport(readonly, isTls).catch(() => '') : exportName;
      return { key, writer: false };
    },

    async prepare(next, h) {
      h.writer = await next.canWrite();
      h.store = await acquire(h.key, await next.getSize(), h.writer);
    },

    async finalize(next, h) {
      if (h.store) await release(h.key, next, h.writer);
    },

    // The cache writes back itself; FUA is honoured by writing through (writeback), ignored by unsafe.
    canFua: () => 'native',
    async canFlush() {
      return true;
    },
    canMultiConn: (next) => (mode === 'unsafe' ? true : next.canMultiConn()),
    canCache: () => 'native',

    pread(next, h, buf, offset) {
      return h.store!.read(next, buf, offset, cacheOnRead());
    },
    pwrite: (next, h, buf, offset, flags) => h.store!.write(next, buf, offset, flags),
    flush: (next, h, flags) => h.store!.flush(next, flags),
    trim: (next, h, count, offset, flags) => h.store!.zeroOrTrim(next, count, offset, flags, false),
    zero: (next, h, count, offset, flags) => h.store!.zeroOrTrim(next, count, offset, flags, true),
    extents: (next, h, count, offset, flags) => h.store!.extents(next, count, offset, flags),
    cache: (next, h, count, offset) => h.store!.prefetch(next, count, offset),
  });
  return Object.assign(filter, {
    /** The caches open right now, by export (tests, embedders that want the counters). */
    async caches(): Promise<Map<string, CacheStore>> {
      const out = new Map<string, CacheStore>();
      for (const [key, e] of entries) out.set(key, await e.store);
      return out;
    },
  });
}

export default createCacheFilter();
