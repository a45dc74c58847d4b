import { Errno, FLAG_FUA, NbdError, debug, definePlugin, logError, packageVersion } from '@nbdx/server/api';
import { CONFIG_HELP, DEFAULT_OBJECT_SIZE, applyConfig, checkSettings, defaultSettings, type Settings } from './config.js';
import { ReadCoalescer } from './coalesce.js';
import { ObjectDisk, type DiskStats } from './disk.js';
import { openManifest } from './manifest.js';
import { Store, storeOptions } from './store.js';

const NAME = 's3';
const VERSION = packageVersion(import.meta.url);

/** Layout 1: one existing object, read-only. */
interface ObjectImage {
  kind: 'object';
  key: string;
  size: number;
  /** Every read is pinned to this ETag, so a replaced object is an error, not mixed content. */
  etag: string | null;
  reads: ReadCoalescer;
}

interface PrefixDisk {
  kind: 'prefix';
  disk: ObjectDisk;
}

/** A fresh S3 plugin (all state lives in this closure; use one per server). */
export function createS3Plugin() {
  const settings: Settings = defaultSettings();
  let store: Store | null = null;
  let layout: ObjectImage | PrefixDisk | null = null;

  const ready = (): ObjectImage | PrefixDisk => {
    if (!layout) throw new NbdError(Errno.EIO, 's3: not connected to the store (start-up did not finish)');
    return layout;
  };
  const diskOf = (): ObjectDisk => {
    const l = ready();
    if (l.kind !== 'prefix') throw new NbdError(Errno.EPERM, 'the key= layout is read-only');
    return l.disk;
  };

  async function start(): Promise<void> {
    const st = new Store(storeOptions(settings));
    try {
      if (settings.key !== null) {
        const info = await st.head(settings.key);
        if (!info) throw new NbdError(Errno.EINVAL, `${st.where(settings.key)}: no such object`);
        layout = { kind: 'object', key: settings.key, size: info.size, etag: info.etag, reads: new ReadCoalescer(st) };
        debug(NAME, `${st.where(settings.key)}: ${info.size} bytes, ETag ${info.etag ?? '(none)'}`);
      } else {
        const prefix = settings.prefix!;
        const { geometry, created } = await openManifest(st, prefix, settings.size, settings.objectSize, DEFAULT_OBJECT_SIZE);
        layout = { kind: 'prefix', disk: new ObjectDisk(st, prefix, geometry, settings.writeBuffer) };
        debug(
          NAME,
          `${created ? 'created' : 'opened'} disk ${st.where(prefix)}: ${geometry.size} bytes in objects of ${geometry.objectSize}`,
        );
      }
    } catch (err) {
      st.destroy();
      throw err;
    }
    store = st;
  }

  async function flushDisk(why: string): Promise<void> {
    const l = layout;
    if (l?.kind !== 'prefix') return;
    try {
      await l.disk.flush();
    } catch (err) {
      logError(NAME, `${why}: writing back buffered data failed: ${(err as Error).message}`);
      throw err;
    }
  }

  const plugin = definePlugin({
    apiVersion: 2,
    name: NAME,
    version: VERSION,
    longname: 'nbdx S3 plugin',
    description: 'A disk in an S3-compatible object store: one object (read-only) or fixed-size objects under a prefix.',
    configHelp: CONFIG_HELP,
    threadModel: 'parallel',

    config: (key, value) => applyConfig(settings, key, value),
    configComplete() {
      checkSettings(settings);
    },
    getReady: start,
    async unload() {
      try {
        await flushDisk('shutting down');
      } catch {
        // logged; nothing else can be done at exit
      }
      const st = stats();
      if (st) debug(NAME, `requests: ${Object.entries(st).map(([k, v]) => `${k} ${v}`).join(', ')}`);
      store?.destroy();
      store = null;
      layout = null;
    },
    dumpPlugin: () => ({ s3_layouts: 'key,prefix', s3_sdk: '@aws-sdk/client-s3' }),

    open: () => ({}),
    // A client that disconnects without flushing still gets its writes stored (the buffer is
    // shared, so this also stores other connections' writes: harmless, they are acknowledged).
    async close() {
      try {
        await flushDisk('connection closed');
      } catch {
        // logged
      }
    },
    getSize() {
      const l = ready();
      return l.kind === 'object' ? l.size : l.disk.geometry.size;
    },
    canWrite: () => ready().kind === 'prefix',
    canFlush: () => ready().kind === 'prefix',
    canFua: () => (ready().kind === 'prefix' ? 'native' : 'none'),
    canTrim: () => ready().kind === 'prefix',
    canZero: () => ready().kind === 'prefix',
    // Zeroing is deleting whole objects and buffering zeroes at the edges: never slower than writing.
    canFastZero: () => ready().kind === 'prefix',
    canExtents: () => ready().kind === 'prefix',
    // One buffer and one store for every connection: a flush on any connection covers all writes.
    canMultiConn: () => true,
    canCache: () => 'none',
    isRotational: () => false,

    async pread(_h, buf, offset) {
      if (buf.length === 0) return;
      const l = ready();
      if (l.kind === 'prefix') return l.disk.read(buf, offset);
      const got = await l.reads.read(l.key, offset, buf, l.etag ?? undefined);
      if (!got || got.bytes < buf.length) {
        throw new NbdError(Errno.EIO, `${store!.where(l.key)}: the object is gone or shorter than when the server started`);
      }
    },

    async pwrite(_h, buf, offset, flags) {
      if (buf.length === 0) return;
      await diskOf().write(buf, offset, (flags & FLAG_FUA) !== 0);
    },

    async flush() {
      await flushDisk('flush');
    },

    async trim(_h, count, offset, flags) {
      if (count === 0) return;
      await diskOf().zero(count, offset, (flags & FLAG_FUA) !== 0);
    },

    async zero(_h, count, offset, flags) {
      if (count === 0) return;
      await diskOf().zero(count, offset, (flags & FLAG_FUA) !== 0);
    },

    extents(_h, count, offset) {
      return diskOf().extents(count, offset);
    },
  });
  /** Counters of the prefix= disk (PUTs, DELETEs, merges, conflicts), for tests and debugging. */
  const stats = (): (Partial<DiskStats> & { gets: number; reads: number }) | null => {
    if (!layout) return null;
    return layout.kind === 'prefix' ? { ...layout.disk.stats, ...layout.disk.reads.stats } : { ...layout.reads.stats };
  };
  return Object.assign(plugin, { stats });
}

export default createS3Plugin();
export { ObjectDisk, objectName, type Geometry, type DiskStats } from './disk.js';
export { Ranges } from './ranges.js';
export { Store, storeOptions } from './store.js';
export { parseManifest, encodeManifest, manifestKey } from './manifest.js';
