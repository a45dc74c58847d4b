import {
  EXTENT_HOLE,
  EXTENT_ZERO,
  FLAG_REQ_ONE,
  Errno,
  NbdError,
  definePlugin,
  parseSize,
  type Extent,
  packageVersion,
  isWorkerCopy,
  sharedBuffer,
  sharedBuffers,
} from '@nbdx/server/api';
import { constants } from 'node:buffer';
import { SparseArray } from './sparse.js';

const MAX_LENGTH = constants.MAX_LENGTH;

type Allocator = 'sparse' | 'malloc';

interface Disk {
  read(buf: Uint8Array, offset: number): ReturnType<SparseArray['read']>;
  write(buf: Uint8Array, offset: number): void;
  zero(count: number, offset: number): void;
  extents(count: number, offset: number, maxExtents?: number): Iterable<Extent>;
  /** The bytes at a fixed place in memory, for replies sent and payloads received without a copy. */
  view?(count: number, offset: number, write: boolean): Buffer | undefined;
  /** The core is done with a view (see PluginV2.releaseView). */
  releaseView?(view: Uint8Array, completed: boolean): void;
}

/**
 * allocator=malloc: one flat buffer of the whole size, zero-filled by the system, which commits
 * its pages only as they are written. It is shared memory (sharedBuffer), so that with
 * `--workers` every thread serves the same disk.
 */
class FlatDisk implements Disk {
  readonly bytes: Buffer;
  constructor(size: number) {
    this.bytes = Buffer.from(sharedBuffer('memory allocator=malloc', size));
  }
  read(buf: Uint8Array, offset: number) {
    this.bytes.copy(buf, 0, offset, offset + buf.length);
    return undefined;
  }
  write(buf: Uint8Array, offset: number) {
    // The core read the payload straight into place (view): nothing to copy.
    if (buf.buffer === this.bytes.buffer && buf.byteOffset === this.bytes.byteOffset + offset) return;
    this.bytes.set(buf, offset);
  }
  // Every byte has its fixed place for the life of the disk (trim and zero write zeroes there),
  // so views of it can be handed to the core for replies and payloads.
  view(count: number, offset: number) {
    return this.bytes.subarray(offset, offset + count);
  }
  zero(count: number, offset: number) {
    this.bytes.fill(0, offset, offset + count);
  }
  extents(count: number, offset: number) {
    return [{ offset, length: count, type: 0 }];
  }
}

/**
 * Sparse disks made by this copy of the module so far. The server's main thread and each worker
 * thread load the module once and make the command line's disk first, so the n-th disk has the
 * same names in every thread. A main thread (or a program embedding servers) always makes a new
 * disk, skipping names a server that was never unloaded still holds.
 */
let sparseDisks = 0;

/** The names of this copy's next sparse disk. */
function sparseDiskNames(): string {
  const prefix = (n: number) => `memory allocator=sparse #${n}: `;
  if (!isWorkerCopy()) while (sharedBuffers().has(prefix(sparseDisks) + 'control')) sparseDisks++;
  return prefix(sparseDisks++);
}

/**
 * A RAM disk shared by every connection. Every call is synchronous and, with worker threads, one
 * step under the disk's lock (sparse) or a copy into a flat buffer (malloc), so requests never
 * interleave inside one call and the plugin can be fully parallel.
 */
export function createMemoryPlugin() {
  let size: number | undefined;
  let allocator: Allocator = 'sparse';
  let disk: Disk;
  /** Names of the shared buffers of this plugin's sparse disk, forgotten at unload. */
  const names: string[] = [];

  return definePlugin({
    apiVersion: 2,
    name: 'memory',
    version: packageVersion(import.meta.url),
    longname: 'nbdx memory plugin',
    description: 'A RAM disk: sparse (default) or one flat buffer.',
    magicConfigKey: 'size',
    configHelp: [
      'size=SIZE            (required) size of the disk: 1G, 512M, 1T, or bytes',
      'allocator=sparse     memory taken on first write, 4 KiB at a time, freed by trim/zero (default)',
      'allocator=malloc     one buffer of the whole size (shared memory: served on every --workers thread)',
    ].join('\n'),
    threadModel: 'parallel',
    // Both allocators keep the disk in shared memory, which every worker thread sees.
    workerThreads: true,

    config(key, value) {
      if (key === 'size') size = parseSize(value, 'size');
      else if (key === 'allocator') {
        if (value !== 'sparse' && value !== 'malloc') {
          throw new NbdError(Errno.EINVAL, `allocator: '${value}' is not one of sparse, malloc`);
        }
        allocator = value;
      } else throw new NbdError(Errno.EINVAL, `unknown parameter '${key}'`);
    },
    configComplete() {
      if (size === undefined) throw new NbdError(Errno.EINVAL, 'size is required: nbdx memory SIZE (e.g. 1G)');
      if (allocator === 'malloc' && size > MAX_LENGTH) {
        throw new NbdError(
          Errno.EINVAL,
          `allocator=malloc: ${size} bytes is more than one buffer can hold here (${MAX_LENGTH}); use allocator=sparse (the default)`,
        );
      }
    },
    getReady() {
      if (allocator === 'sparse') {
        const prefix = sparseDiskNames();
        disk = new SparseArray(size!, (role, bytes, max) => {
          names.push(prefix + role);
          return sharedBuffer(prefix + role, bytes, max);
        });
        return;
      }
      try {
        disk = new FlatDisk(size!);
      } catch (err) {
        throw new NbdError(Errno.ENOMEM, `allocator=malloc: cannot allocate ${size} bytes: ${(err as Error).message.replace(/^cannot allocate \d+ bytes of shared memory: /, '')}`);
      }
    },
    unload() {
      // The memory goes once no thread holds the disk.
      for (const n of names) sharedBuffers().delete(n);
    },
    dumpPlugin() {
      return { memory_allocators: 'sparse,malloc' };
    },

    open: () => ({}),
    getSize: () => size!,
    canWrite: () => true,
    canFlush: () => true,
    canTrim: () => true,
    canZero: () => true,
    canFastZero: () => true,
    canExtents: () => true,
    canFua: () => 'native',
    canMultiConn: () => true,
    canCache: () => 'native',

    pread: (_h, buf, offset) => disk.read(buf, offset),
    // Replies sent from the disk itself and payloads received into it: always for
    // allocator=malloc, for sparse where the range is one piece of memory (see SparseArray.view).
    readView: (_h, count, offset) => disk.view?.(count, offset, false),
    writeView: (_h, count, offset) => disk.view?.(count, offset, true),
    releaseView: (_h, view, completed) => disk.releaseView?.(view, completed),
    pwrite: (_h, buf, offset) => disk.write(buf, offset),
    // RAM is as durable as it gets: flush and FUA have nothing to do.
    flush: () => {},
    trim: (_h, count, offset) => disk.zero(count, offset),
    zero: (_h, count, offset) => disk.zero(count, offset),
    // With REQ_ONE the core keeps only the first extent, so there is no point working out more.
    // (Without it the core reads a short answer's uncovered tail as HOLE, so never stop early.)
    extents: (_h, count, offset, flags) =>
      disk.extents(count, offset, flags & FLAG_REQ_ONE ? 1 : undefined),
    cache: () => {},
  });
}

export default createMemoryPlugin();
export { SparseArray, EXTENT_HOLE, EXTENT_ZERO };
