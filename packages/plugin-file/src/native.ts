import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * The small N-API addon in native/file_ops.c ("the native helper"). Every range call resolves on
 * the libuv thread pool; errors carry a Node style `code` (ENOSPC, EOPNOTSUPP, ...). Arguments are
 * always (fd, offset, length[, mode]).
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
  /**
   * Read-only mmap(MAP_SHARED) of the file's first `length` bytes as an ArrayBuffer, one mapping
   * per `key` (the file's device and inode) and length for the whole process; null when the
   * kernel refuses. Missing in helpers built before it existed (a prebuild from an older release).
   */
  mapShared?(fd: number, length: number, key: string): ArrayBuffer | null;
  /** Whether every page of that range of a mapShared buffer is in memory (mincore). */
  resident?(map: ArrayBuffer, offset: number, length: number): boolean;
  /** This user is done with a mapShared mapping; the last one lets the file go (late reads see zeroes). */
  detach?(map: ArrayBuffer): void;
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

/**
 * The outcome of looking for the helper. `tried` has one entry per candidate that did not load,
 * with the reason (for -v); `reason` is the short one for the start-up warning.
 */
export type NativeLoad =
  | { ops: NativeOps; path: string; tried: string[] }
  | { ops: null; reason: string; tried: string[] };

/**
 * What the plugin does differently without the helper (open-file.ts has the fallbacks), as the
 * start-up warning says it.
 */
export const WITHOUT_NATIVE_HELPER =
  'sparse files are served as all data, trim does nothing, zeroing writes zeroes (no fast zero), ' +
  'CACHE reads the range, FUA is write + fdatasync, fadvise= and cache=none have no effect';

export type Libc = 'glibc' | 'musl';

/** What `process.report.getReport()` tells about the C library (the parts read here). */
export interface LibcReport {
  header?: { glibcVersionRuntime?: string };
  sharedObjects?: string[];
}

/**
 * The C library this Node runs on. glibc builds of Node put the runtime glibc version in the
 * report header; musl has no such field, but its loader (ld-musl-ARCH.so.1) is among the shared
 * objects. Anything else (another libc, a trimmed report) is undefined: no prebuild is tried then.
 */
export function detectLibc(report: LibcReport = process.report.getReport() as LibcReport): Libc | undefined {
  if (report.header?.glibcVersionRuntime) return 'glibc';
  if (report.sharedObjects?.some((s) => /(^|\/)(ld-musl-|libc\.musl-)/.test(s))) return 'musl';
  return undefined;
}

/**
 * The prebuilds/ folder name for a machine: `linux-x64-glibc`, `linux-arm64-musl`, ...; other
 * systems have one C library, so no suffix (`darwin-arm64`). null for Linux with an unknown libc.
 * scripts/build-addon.mjs names them the same way (a test checks that they agree).
 */
export function prebuildTarget(platform: string, arch: string, libc: Libc | undefined): string | null {
  if (platform !== 'linux') return `${platform}-${arch}`;
  return libc ? `${platform}-${arch}-${libc}` : null;
}

/** Where to look: a package root (holding build/ and prebuilds/) and the prebuild to try there. */
export interface NativeLocation {
  root: string;
  /** The prebuilds/ folder for this machine; null when none can match (see prebuildTarget). */
  target: string | null;
  /** Platform, for the short reason when nothing is found (default process.platform). */
  platform?: string;
}

/**
 * The package root: both src/native.ts (tests) and the bundled dist/index.js sit one folder
 * below it, where node-gyp puts build/ and the package carries prebuilds/.
 */
export function packageRoot(): string {
  return fileURLToPath(new URL('..', import.meta.url));
}

/** This machine's location: the package root, and the prebuild for its platform, CPU and libc. */
export function hostLocation(): NativeLocation {
  // The libc check reads a diagnostic report (a few ms), so only where a suffix is needed.
  const libc = process.platform === 'linux' ? detectLibc() : undefined;
  return { root: packageRoot(), target: prebuildTarget(process.platform, process.arch, libc) };
}

/**
 * The files to try, in order: a build made on this machine by the install script (node-gyp,
 * Release then Debug) before the prebuilt binary shipped in the package, because a local build
 * was compiled against this very system and may be newer than the prebuild (a source checkout).
 */
export function candidatePaths(location: NativeLocation): string[] {
  const { root, target } = location;
  const paths = [join(root, 'build/Release/file_ops.node'), join(root, 'build/Debug/file_ops.node')];
  if (target) paths.push(join(root, 'prebuilds', target, 'file_ops.node'));
  return paths;
}

function looksLikeHelper(m: unknown): m is NativeOps {
  const o = m as Partial<NativeOps> | null;
  return typeof o?.map === 'function' && typeof o.fallocate === 'function' && typeof o.features === 'object';
}

/** The first line of a loader error, without the absolute path dlopen puts in front of it. */
function firstLine(message: string, path: string): string {
  const line = message.split('\n', 1)[0]!.trim();
  return line.startsWith(`${path}: `) ? line.slice(path.length + 2) : line;
}

/** Try each candidate once, without caching (loadNative caches the host's answer). Never throws. */
export function loadNativeFrom(location: NativeLocation): NativeLoad {
  const require = createRequire(import.meta.url);
  const tried: string[] = [];
  const failures: string[] = [];
  const rel = (p: string) => (p.startsWith(location.root) ? p.slice(location.root.length).replace(/^\//, '') : p);
  for (const path of candidatePaths(location)) {
    if (!existsSync(path)) {
      tried.push(`${path}: not there`);
      continue;
    }
    let why: string;
    try {
      const m: unknown = require(path);
      if (looksLikeHelper(m)) return { ops: m, path, tried };
      why = 'not the file plugin helper (no map/fallocate/features)';
    } catch (err) {
      why = firstLine((err as Error).message, path);
    }
    tried.push(`${path}: ${why}`);
    failures.push(`${rel(path)}: ${why}`);
  }
  return { ops: null, reason: shortReason(location, failures), tried };
}

function shortReason(location: NativeLocation, failures: string[]): string {
  // A file that is there but does not load says most (a wrong libc, a too old glibc).
  if (failures.length) return failures[failures.length - 1]!;
  const platform = location.platform ?? process.platform;
  if (platform !== 'linux') return `it is Linux-only, this is ${platform}`;
  if (!location.target) return 'not built, and the C library is neither glibc nor musl, so no prebuild fits';
  return `not built, and no prebuild for ${location.target}`;
}

let cached: NativeLoad | undefined;

/**
 * The helper for this process, looked for once. Never throws: when it is missing the plugin
 * degrades (see README, "The native helper"). NBDX_FILE_NO_ADDON=1 turns it off on purpose.
 */
export function loadNative(): NativeLoad {
  if (cached) return cached;
  if (process.env.NBDX_FILE_NO_ADDON === '1') {
    cached = { ops: null, reason: 'disabled by NBDX_FILE_NO_ADDON=1', tried: [] };
  } else {
    cached = loadNativeFrom(hostLocation());
  }
  return cached;
}
