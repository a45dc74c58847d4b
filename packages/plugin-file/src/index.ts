import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { Errno, FLAG_REQ_ONE, NbdError, debug, definePlugin, logWarning, packageVersion, sharedBuffer } from '@nbdx/server/api';
import { exportPath, listDirExports, badExportName } from './export-dir.js';
import { WITHOUT_NATIVE_HELPER, loadNative, type NativeOps } from './native.js';
import { Mappings, OpenFile, type Fadvise } from './open-file.js';

export interface FilePluginOptions {
  /** false: do not load the addon, as if it had not been built (to exercise the fallbacks). */
  native?: boolean;
}

const FADVISE_VALUES: readonly Fadvise[] = ['normal', 'random', 'sequential'];

/** A fresh file plugin (module-level state would leak between servers in one process). */
export function createFilePlugin(options: FilePluginOptions = {}) {
  let file: string | undefined;
  let dir: string | undefined;
  let defaultExportName: string | undefined;
  let cacheNone = false;
  let fadvise: Fadvise = 'normal';
  let mmap = true;
  /** This instance's mappings (mmap=auto with the helper), made in getReady. */
  let mappings: Mappings | null = null;
  let native: NativeOps | null = null;
  /** Handles open in the whole process (shared memory), made in getReady. */
  let clients: Int32Array | undefined;

  /**
   * Pick the helper up and say how it went: a debug line when it loaded; when it did not, one
   * line at the default level (an operator should know sparse files lose their holes) with the
   * short reason, and the full list of tried paths under -v. A caller that passed
   * `native: false` asked for the fallbacks, so that is only a debug line.
   */
  function resolveNative(): void {
    if (options.native === false) {
      native = null;
      debug('file', `native helper not used (createFilePlugin({ native: false })): ${WITHOUT_NATIVE_HELPER}`);
      return;
    }
    const loaded = loadNative();
    native = loaded.ops;
    if (loaded.ops) {
      debug('file', `native helper loaded from ${loaded.path}`);
      return;
    }
    logWarning('file', `native helper not available (${loaded.reason}): ${WITHOUT_NATIVE_HELPER}`);
    if (loaded.tried.length) debug('file', `native helper: tried ${loaded.tried.join('; ')}`);
  }

  return definePlugin<OpenFile>({
    apiVersion: 2,
    name: 'file',
    version: packageVersion(import.meta.url),
    longname: 'nbdx file plugin',
    description: 'Serve a file or block device, or every file in a directory as its own export.',
    magicConfigKey: 'file',
    configHelp: [
      'file=PATH            the file or block device to serve (the bare value: nbdx file disk.img)',
      'dir=DIR              serve every regular file and block device in DIR; the export name picks one\n                     (directory=DIR is the same, as in nbdkit)',
      'default-export=NAME  with dir=: the file served to clients that ask for the default export ""',
      'cache=default|none   none: drop pages from the page cache after each read and write',
      'fadvise=normal|random|sequential  access pattern hint given to the kernel (default normal)',
      'mmap=auto|off        auto: files on tmpfs/ramfs are mapped read-only and READ replies\n                     go to the socket straight from the file pages (default auto)',
    ].join('\n'),
    threadModel: 'parallel',
    // Every copy opens the file itself, and the data lives in the file: worker threads are safe.
    workerThreads: true,

    config(key, value) {
      switch (key) {
        case 'file':
          if (file !== undefined) throw new NbdError(Errno.EINVAL, 'file= given more than once');
          if (value === '') throw new NbdError(Errno.EINVAL, 'file= needs a path');
          file = resolve(value);
          break;
        case 'dir':
        case 'directory': // nbdkit's other name for it
          if (dir !== undefined) throw new NbdError(Errno.EINVAL, 'dir= given more than once');
          if (value === '') throw new NbdError(Errno.EINVAL, `${key}= needs a path`);
          dir = resolve(value);
          break;
        case 'default-export': {
          const why = badExportName(value);
          if (why) throw new NbdError(Errno.EINVAL, `default-export: ${why}`);
          defaultExportName = value;
          break;
        }
        case 'cache':
          if (value !== 'default' && value !== 'none') {
            throw new NbdError(Errno.EINVAL, `cache: '${value}' is not one of default, none`);
          }
          cacheNone = value === 'none';
          break;
        case 'fadvise':
          if (!FADVISE_VALUES.includes(value as Fadvise)) {
            throw new NbdError(Errno.EINVAL, `fadvise: '${value}' is not one of ${FADVISE_VALUES.join(', ')}`);
          }
          fadvise = value as Fadvise;
          break;
        case 'mmap':
          if (value !== 'auto' && value !== 'off') {
            throw new NbdError(Errno.EINVAL, `mmap: '${value}' is not one of auto, off`);
          }
          mmap = value === 'auto';
          break;
        default:
          throw new NbdError(Errno.EINVAL, `unknown parameter '${key}' (see nbdx file --help)`);
      }
    },

    configComplete() {
      if (file !== undefined && dir !== undefined) {
        throw new NbdError(Errno.EINVAL, 'give either file= or dir=, not both');
      }
      if (file === undefined && dir === undefined) {
        throw new NbdError(Errno.EINVAL, 'file= or dir= is required: nbdx file disk.img, or nbdx file dir=DIR');
      }
      if (defaultExportName !== undefined && dir === undefined) {
        throw new NbdError(Errno.EINVAL, 'default-export= only makes sense with dir=');
      }
    },

    async getReady() {
      resolveNative();
      // Handles open in the whole process, worker threads included (same buffer in every thread).
      clients = new Int32Array(sharedBuffer('file plugin: open handles', 4));
      mappings = mmap && native?.mapShared ? new Mappings(native) : null;
      if (file !== undefined) {
        const st = await stat(file).catch((err: Error) => {
          throw new NbdError(Errno.EINVAL, `file=${file}: ${err.message}`);
        });
        if (!st.isFile() && !st.isBlockDevice()) {
          throw new NbdError(Errno.EINVAL, `file=${file}: not a regular file or block device`);
        }
      } else {
        const st = await stat(dir!).catch((err: Error) => {
          throw new NbdError(Errno.EINVAL, `dir=${dir}: ${err.message}`);
        });
        if (!st.isDirectory()) throw new NbdError(Errno.EINVAL, `dir=${dir}: not a directory`);
      }
    },

    dumpPlugin() {
      const n = (native ?? loadNative().ops) as NativeOps | null;
      return {
        file_addon: n ? 'yes' : 'no',
        file_extents: n?.features.seekData ? 'yes' : 'no',
        file_fallocate: n?.features.fallocate ? 'yes' : 'no',
        file_fadvise: n?.features.fadvise ? 'yes' : 'no',
        file_dir: 'yes',
      };
    },

    async listExports() {
      if (dir === undefined) return [''];
      return listDirExports(dir);
    },

    defaultExport() {
      return dir === undefined ? '' : (defaultExportName ?? '');
    },

    async open(readonly, exportName) {
      let path: string;
      if (file !== undefined) path = file;
      else if (exportName === '') {
        throw new NbdError(
          Errno.EINVAL,
          'no default export in dir= mode: ask for a file by name (nbdinfo --list shows them) or set default-export=NAME',
        );
      } else path = exportPath(dir!, exportName);
      return OpenFile.open(path, readonly, { cacheNone, fadvise, native, mappings, clients });
    },

    close: (h) => h.close(),

    // Handles closed last may have left their mapping lingering (MAP_LINGER_MS).
    unload: () => mappings?.releaseAll(),

    getSize: (h) => h.size,
    canWrite: (h) => !h.readonly,
    canFlush: () => true,
    isRotational: (h) => h.isRotational(),
    canTrim: (h) => h.canTrim,
    // Zero is always offered: fallocate when the kernel can, else ENOTSUP so the core writes zeroes.
    canZero: () => true,
    canFastZero: () => true,
    canExtents: (h) => h.canExtents,
    canFua: () => 'native',
    // Every connection opens the same inode, so a flush on one covers writes made on the others.
    canMultiConn: () => true,
    canCache: (h) => (h.canNativeCache ? 'native' : 'emulate'),

    pread: (h, buf, offset) => h.pread(buf, offset),
    readView: (h, count, offset) => h.readView(count, offset),
    pwrite: (h, buf, offset, flags) => h.pwrite(buf, offset, flags),
    flush: (h) => h.flush(),
    trim: (h, count, offset, flags) => h.trim(count, offset, flags),
    zero: (h, count, offset, flags) => h.zero(count, offset, flags),
    extents: (h, count, offset, flags) => h.extents(count, offset, (flags & FLAG_REQ_ONE) !== 0),
    cache: (h, count, offset) => h.cache(count, offset),
  });
}

export default createFilePlugin();
export { OpenFile, Mappings, MAX_EXTENTS, MAP_LINGER_MS } from './open-file.js';
export { loadNative, type NativeOps, type NativeLoad } from './native.js';
export { badExportName, listDirExports } from './export-dir.js';
