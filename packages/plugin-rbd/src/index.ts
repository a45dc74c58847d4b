import {
  EXTENT_HOLE,
  EXTENT_ZERO,
  Errno,
  FLAG_FAST_ZERO,
  FLAG_FUA,
  NbdError,
  debug,
  definePlugin,
  packageVersion,
  type Extent,
} from '@nbdx/server/api';
import {
  CONFIG_HELP,
  applyParam,
  completeConfig,
  exportImage,
  radosSettings,
  specName,
  type ImageSpec,
  type RawParams,
  type RbdConfig,
} from './config.js';
import { HOW_TO_GET_IT, loadNative, type ClusterHandle, type OpenedImage, type RbdNative } from './native.js';

export { parseImageSpec, completeConfig, applyParam, exportImage, specName, type RbdConfig, type ImageSpec } from './config.js';
export { loadNative, type RbdNative } from './native.js';

const NAME = 'rbd';

/** One open librbd image, shared by every connection to the same export. */
interface SharedImage {
  readonly key: string;
  readonly spec: ImageSpec;
  readonly opened: OpenedImage;
  /** Opened read-only: a snapshot, a read-only server, or a user whose caps allow no writes. */
  readonly readonly: boolean;
  refs: number;
  /** Held open for the server's life (the image= of a server without dynamic-export). */
  readonly pinned: boolean;
}

/** A connection's handle: the shared image and how this connection may use it. */
export interface RbdHandle {
  readonly image: SharedImage;
  readonly readonly: boolean;
}

/**
 * librados/librbd errors (negative errnos, as Node style codes) to NBD errors, with a message
 * that says what was being done. EACCES and EPERM are the cluster refusing the user's caps.
 */
export function toNbdError(err: unknown, what: string): NbdError {
  if (err instanceof NbdError) return err;
  const e = err as { code?: string; message?: string };
  const msg = `${what}: ${e.message ?? String(err)}`;
  switch (e.code) {
    case 'EACCES':
    case 'EPERM':
      return new NbdError(Errno.EPERM, `${msg} (the cephx user's caps do not allow this)`);
    case 'EROFS':
      return new NbdError(Errno.EPERM, msg);
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return new NbdError(Errno.ENOSPC, msg);
    case 'EINVAL':
    case 'ERANGE':
      return new NbdError(Errno.EINVAL, msg);
    case 'ENOTSUP':
    case 'EOPNOTSUPP':
      return new NbdError(Errno.ENOTSUP, msg);
    case 'ENOMEM':
      return new NbdError(Errno.ENOMEM, msg);
    case 'ETIMEDOUT':
      return new NbdError(Errno.EIO, `${msg} (timeout= reached: is the cluster healthy?)`);
    case 'ESHUTDOWN':
      // EBLOCKLISTED: the cluster has fenced this client; nothing on this connection can work.
      return new NbdError(Errno.EIO, `${msg} (this client was blocklisted by the cluster)`, { fatal: true });
    default:
      return new NbdError(Errno.EIO, msg);
  }
}

/** One clear line for a failed connection to the cluster (startup). */
function connectError(err: unknown, cfg: RbdConfig): NbdError {
  const e = err as { code?: string; message?: string };
  const user = `client.${cfg.id ?? 'admin'}`;
  const where = cfg.monHost ? `monitors ${cfg.monHost}` : `monitors from ${cfg.conf ?? 'the default ceph.conf'}`;
  let why: string;
  switch (e.code) {
    case 'ETIMEDOUT':
      // A wrong key looks the same as unreachable monitors: librados keeps hunting until the timeout.
      why = `no authenticated session within ${cfg.connectTimeoutS} s (are the monitors up, and is ${user}'s key right?)`;
      break;
    case 'EACCES':
    case 'EPERM':
      why = `authentication refused for ${user} (check keyring= and the key)`;
      break;
    case 'ENOENT':
      why = `no key for ${user} (give keyring=, or set keyring in the conf file)`;
      break;
    case 'EINVAL':
      why = `bad configuration: ${e.message}`;
      break;
    default:
      why = e.message ?? String(err);
  }
  return new NbdError(Errno.EINVAL, `cannot connect to the Ceph cluster (${where}): ${why}`);
}

/** One clear line for an image that cannot be opened. */
function openError(err: unknown, spec: ImageSpec, id: string | undefined): NbdError {
  const e = err as { code?: string; message?: string };
  const name = specName(spec);
  switch (e.code) {
    case 'ENOENT':
      if (/^pool /.test(e.message ?? '')) return new NbdError(Errno.EINVAL, `pool '${spec.pool}' does not exist (image ${name})`);
      return new NbdError(
        Errno.EINVAL,
        spec.snap !== undefined ? `image ${name}: no such image or snapshot` : `image ${name} does not exist`,
      );
    case 'EACCES':
    case 'EPERM':
      return new NbdError(Errno.EPERM, `image ${name}: permission denied for client.${id ?? 'admin'} (its cephx caps)`);
    default:
      return toNbdError(err, `image ${name}`);
  }
}

/** A fresh rbd plugin (module-level state would leak between servers in one process). */
export function createRbdPlugin() {
  let params: RawParams = {};
  let cfg: RbdConfig | undefined;
  let native: RbdNative | null = null;
  let cluster: ClusterHandle | undefined;
  /** Open (or opening) images by spec and mode. */
  const images = new Map<string, Promise<SharedImage>>();

  function rbd(): RbdNative {
    if (!native || !cluster) throw new NbdError(Errno.EIO, 'rbd: not connected to the cluster');
    return native;
  }

  function keyOf(spec: ImageSpec, readonly: boolean): string {
    return `${specName(spec)}\0${readonly ? 'ro' : 'rw'}`;
  }

  /**
   * The shared image for a spec, opened on first use. A snapshot is always read-only; a
   * writable open that the user's caps refuse falls back to read-only (connections then see a
   * read-only export rather than failing).
   */
  async function acquire(spec: ImageSpec, readonly: boolean, pinned = false): Promise<SharedImage> {
    const ro = readonly || spec.snap !== undefined;
    // A writable handle serves read-only connections too: no second open for them.
    const existing = images.get(keyOf(spec, false)) ?? images.get(keyOf(spec, ro));
    if (existing) {
      const img = await existing;
      img.refs++;
      return img;
    }
    const key = keyOf(spec, ro);
    const opening = (async (): Promise<SharedImage> => {
      const n = rbd();
      let opened: OpenedImage;
      let openedRo = ro;
      try {
        opened = await n.open(cluster!, spec.pool, spec.namespace || null, spec.image, spec.snap ?? null, ro);
      } catch (err) {
        const code = (err as { code?: string }).code;
        if (ro || (code !== 'EACCES' && code !== 'EPERM')) throw openError(err, spec, cfg!.id);
        debug(NAME, `image ${specName(spec)}: writable open refused (${code}); opening it read-only`);
        opened = await n.open(cluster!, spec.pool, spec.namespace || null, spec.image, null, true).catch((e2: unknown) => {
          throw openError(e2, spec, cfg!.id);
        });
        openedRo = true;
      }
      debug(
        NAME,
        `opened ${specName(spec)}${openedRo ? ' read-only' : ''}: ${opened.size} bytes, objects of ${opened.objectSize}` +
          `${opened.parentOverlap ? `, clone reading ${opened.parentOverlap} bytes from its parent` : ''}`,
      );
      return { key, spec, opened, readonly: openedRo, refs: 0, pinned };
    })();
    images.set(key, opening);
    try {
      const img = await opening;
      img.refs++;
      return img;
    } catch (err) {
      images.delete(key);
      throw err;
    }
  }

  async function release(img: SharedImage): Promise<void> {
    if (--img.refs > 0 || img.pinned) return;
    images.delete(img.key);
    await rbd()
      .close(img.opened.handle)
      .catch((err: unknown) => debug(NAME, `closing ${specName(img.spec)}: ${(err as Error).message}`));
  }

  return definePlugin<RbdHandle>({
    apiVersion: 2,
    name: NAME,
    version: packageVersion(import.meta.url),
    longname: 'nbdx Ceph RBD plugin',
    description: 'Serve Ceph RBD images through librbd.',
    magicConfigKey: 'image',
    configHelp: CONFIG_HELP,
    threadModel: 'parallel',

    load() {
      params = {};
      cfg = undefined;
    },

    config(key, value) {
      applyParam(params, key, value);
    },

    configComplete() {
      cfg = completeConfig(params);
    },

    async getReady() {
      const c = cfg!;
      const loaded = loadNative();
      if (!loaded.ops) throw new NbdError(Errno.EINVAL, `${loaded.reason}: ${HOW_TO_GET_IT}`);
      native = loaded.ops;
      debug(NAME, `librbd ${native.librbdVersion()} through ${loaded.path}`);
      let handle: ClusterHandle;
      try {
        handle = native.create(c.id ?? null, c.conf ?? null, [
          // librados would print its own complaints on stderr; the plugin says what failed, once.
          ['log_to_stderr', 'false'],
          ['err_to_stderr', 'false'],
          ...radosSettings(c),
        ]);
      } catch (err) {
        // The conf file or a setting is wrong: librados said which (nothing was sent yet).
        throw new NbdError(Errno.EINVAL, `Ceph configuration: ${(err as Error).message}`);
      }
      await native.connect(handle).catch((err: unknown) => {
        void native!.shutdown(handle);
        throw connectError(err, c);
      });
      cluster = handle;
      // One handle for the server's life: opened now so a missing image stops the server at once.
      if (!c.dynamicExport) await acquire(exportImage(c, ''), false, true);
    },

    async unload() {
      if (!native || !cluster) return;
      const all = await Promise.allSettled([...images.values()]);
      images.clear();
      for (const r of all) if (r.status === 'fulfilled') await native.close(r.value.opened.handle).catch(() => {});
      await native.shutdown(cluster);
      cluster = undefined;
    },

    dumpPlugin() {
      const n = loadNative();
      return { rbd_addon: n.ops ? 'yes' : 'no', ...(n.ops ? { librbd_version: n.ops.librbdVersion() } : {}) };
    },

    async listExports() {
      const c = cfg!;
      if (!c.dynamicExport) return [''];
      try {
        return await rbd().list(cluster!, c.pool, c.namespace || null);
      } catch (err) {
        throw toNbdError(err, `listing pool '${c.pool}'`);
      }
    },

    defaultExport() {
      return cfg!.dynamicExport ? (cfg!.image ?? '') : '';
    },

    async open(readonly, exportName) {
      const spec = exportImage(cfg!, exportName);
      const image = await acquire(spec, readonly);
      return { image, readonly: readonly || image.readonly };
    },

    close: (h) => release(h.image),

    getSize: (h) => h.image.opened.size,
    exportDescription: (h) => `Ceph RBD image ${specName(h.image.spec)}`,
    canWrite: (h) => !h.readonly,
    canFlush: () => true,
    canTrim: (h) => !h.readonly,
    canZero: () => true,
    canFastZero: () => true,
    canExtents: () => true,
    canFua: () => 'native',
    // librbd keeps one image coherent for every client (its cache is write-back per handle, and
    // connections here share the handle), so a flush on one connection covers all of them.
    canMultiConn: () => true,
    canCache: () => 'emulate',

    async pread(h, buf, offset) {
      try {
        await native!.read(h.image.opened.handle, buf, offset);
      } catch (err) {
        throw toNbdError(err, 'read');
      }
    },

    async pwrite(h, buf, offset, flags) {
      const n = native!;
      try {
        await n.write(h.image.opened.handle, buf, offset);
        if (flags & FLAG_FUA) await n.flush(h.image.opened.handle);
      } catch (err) {
        throw toNbdError(err, 'write');
      }
    },

    async flush(h) {
      try {
        await native!.flush(h.image.opened.handle);
      } catch (err) {
        throw toNbdError(err, 'flush');
      }
    },

    async trim(h, count, offset, flags) {
      const n = native!;
      try {
        await n.discard(h.image.opened.handle, offset, count);
        if (flags & FLAG_FUA) await n.flush(h.image.opened.handle);
      } catch (err) {
        throw toNbdError(err, 'trim');
      }
    },

    async zero(h, count, offset, flags) {
      const img = h.image.opened;
      // librbd zeroes by removing, truncating or zeroing objects: no data goes over the network,
      // except in a clone's range still backed by its parent, where the objects must be copied up
      // first. Only there is a fast zero impossible.
      if (flags & FLAG_FAST_ZERO && offset < img.parentOverlap) {
        throw new NbdError(Errno.ENOTSUP, 'fast zero: this range of the clone is still read from its parent');
      }
      const n = native!;
      try {
        await n.writeZeroes(img.handle, offset, count);
        if (flags & FLAG_FUA) await n.flush(img.handle);
      } catch (err) {
        throw toNbdError(err, 'zero');
      }
    },

    async extents(h, count, offset) {
      let triples: Float64Array;
      try {
        triples = await native!.diff(h.image.opened.handle, offset, count);
      } catch (err) {
        throw toNbdError(err, 'extents');
      }
      return allocationMap(triples, offset, count);
    },
  });
}

/**
 * rbd_diff_iterate2 triples (offset, length, exists) as base:allocation extents over
 * [offset, offset+count): what librbd reports as existing is data; everything else was never
 * written (or was discarded) and reads as zeroes, so it is a hole that is zero.
 */
export function allocationMap(triples: Float64Array, offset: number, count: number): Extent[] {
  const spans: [number, number, boolean][] = [];
  for (let i = 0; i + 2 < triples.length; i += 3) spans.push([triples[i]!, triples[i + 1]!, triples[i + 2]! !== 0]);
  spans.sort((a, b) => a[0] - b[0]);
  const end = offset + count;
  const out: Extent[] = [];
  const push = (o: number, l: number, type: number) => {
    const last = out[out.length - 1];
    if (last && last.type === type && last.offset + last.length === o) last.length += l;
    else out.push({ offset: o, length: l, type });
  };
  let pos = offset;
  for (const [o, l, exists] of spans) {
    const s = Math.max(o, pos);
    const e = Math.min(o + l, end);
    if (e <= s) continue;
    if (s > pos) push(pos, s - pos, EXTENT_HOLE | EXTENT_ZERO);
    push(s, e - s, exists ? 0 : EXTENT_HOLE | EXTENT_ZERO);
    pos = e;
  }
  if (pos < end) push(pos, end - pos, EXTENT_HOLE | EXTENT_ZERO);
  return out;
}

export default createRbdPlugin();
