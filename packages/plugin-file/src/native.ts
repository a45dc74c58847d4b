import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

/**
 * The small N-API addon in native/file_ops.c, built into build/Release by `node-gyp` when the
 * package is installed. Every range call resolves on the libuv thread pool; errors carry a Node
 * style `code` (ENOSPC, EOPNOTSUPP, ...). Arguments are always (fd, offset, length[, mode]).
 */
export interface NativeOps {
  fallocate(fd: number, offset: number, length: number, mode: number): Promise<void>;
  fadvise(fd: number, offset: number, length: number, advice: number): Promise<void>;
  /** SEEK_DATA/SEEK_HOLE walk: offset, length, type triples; after maxExtents-1 the rest is data. */
  map(fd: number, offset: number, length: number, maxExtents: number): Promise<Float64Array>;
  discard(fd: number, offset: number, length: number): Promise<void>;
  zeroout(fd: number, offset: number, length: number): Promise<void>;
  /** sync_file_range (when wasWrite) then POSIX_FADV_DONTNEED. */
  evict(fd: number, offset: number, length: number, wasWrite: number): Promise<void>;
  /** pwritev2(RWF_DSYNC) of the whole buffer: a write with FUA. */
  pwriteDsync(fd: number, buf: Uint8Array, offset: number): Promise<number>;
  /** preadv2(RWF_NOWAIT), synchronous: bytes read, -1 if not cached, -2 if unsupported. */
  preadNowait(fd: number, buf: Uint8Array, position: number): number;
  blockDeviceSize(fd: number): number;
  sectorSize(fd: number): number;
  constants: {
    FALLOC_FL_KEEP_SIZE: number;
    FALLOC_FL_PUNCH_HOLE: number;
    FALLOC_FL_ZERO_RANGE: number;
    POSIX_FADV_NORMAL?: number;
    POSIX_FADV_RANDOM?: number;
    POSIX_FADV_SEQUENTIAL?: number;
    POSIX_FADV_WILLNEED?: number;
  };
  features: {
    fallocate: boolean;
    seekData: boolean;
    fadvise: boolean;
    pwriteDsync: boolean;
    blockIoctls: boolean;
  };
}

export type NativeLoad = { ops: NativeOps; path: string } | { ops: null; reason: string };

let cached: NativeLoad | undefined;

/**
 * Candidate locations of the addon, relative to this module. Both src/native.ts (tests) and the
 * bundled dist/index.js sit one folder below the package root, where node-gyp puts build/.
 */
function candidates(): string[] {
  const root = fileURLToPath(new URL('..', import.meta.url));
  return ['build/Release/file_ops.node', 'build/Debug/file_ops.node'].map((p) => root + p);
}

/** Load the addon once. Never throws: when it is missing the plugin degrades (see README). */
export function loadNative(): NativeLoad {
  if (cached) return cached;
  if (process.env.NBDX_FILE_NO_ADDON === '1') {
    cached = { ops: null, reason: 'disabled by NBDX_FILE_NO_ADDON=1' };
    return cached;
  }
  const require = createRequire(import.meta.url);
  const tried: string[] = [];
  for (const path of candidates()) {
    if (!existsSync(path)) {
      tried.push(`${path} (not built)`);
      continue;
    }
    try {
      cached = { ops: require(path) as NativeOps, path };
      return cached;
    } catch (err) {
      tried.push(`${path} (${(err as Error).message})`);
    }
  }
  cached = { ops: null, reason: `addon not loaded: ${tried.join('; ')}` };
  return cached;
}
