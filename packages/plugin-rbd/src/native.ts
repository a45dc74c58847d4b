import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** A cluster connection (librados `rados_t`), opaque to JavaScript. */
export type ClusterHandle = { readonly __brand: 'rbd-cluster' };
/** An open image (librbd `rbd_image_t` with its I/O context), opaque to JavaScript. */
export type ImageHandle = { readonly __brand: 'rbd-image' };

export interface OpenedImage {
  handle: ImageHandle;
  size: number;
  objectSize: number;
  /** RBD_FEATURE_* bits. */
  features: number;
  /** Bytes at the start a clone still reads from its parent (0: not a clone, or flattened). */
  parentOverlap: number;
}

/**
 * The N-API addon in native/rbd_ops.c. Data calls resolve from librbd's own completions (no
 * thread per request); the others run on the libuv thread pool. Errors carry a Node style `code`
 * (ENOENT, EACCES, ETIMEDOUT, ...).
 */
export interface RbdNative {
  create(id: string | null, conf: string | null, settings: [string, string][]): ClusterHandle;
  connect(cluster: ClusterHandle): Promise<void>;
  shutdown(cluster: ClusterHandle): Promise<void>;
  open(cluster: ClusterHandle, pool: string, namespace: string | null, image: string, snap: string | null, readonly: boolean): Promise<OpenedImage>;
  close(image: ImageHandle): Promise<void>;
  list(cluster: ClusterHandle, pool: string, namespace: string | null): Promise<string[]>;
  /** rbd_diff_iterate2 in whole-object mode: (offset, length, exists) triples. */
  diff(image: ImageHandle, offset: number, length: number): Promise<Float64Array>;
  read(image: ImageHandle, buf: Uint8Array, offset: number): Promise<number>;
  write(image: ImageHandle, buf: Uint8Array, offset: number): Promise<number>;
  discard(image: ImageHandle, offset: number, length: number): Promise<number>;
  writeZeroes(image: ImageHandle, offset: number, length: number): Promise<number>;
  flush(image: ImageHandle): Promise<number>;
  librbdVersion(): string;
}

export type NativeLoad = { ops: RbdNative; path: string } | { ops: null; reason: string };

/** How to get the addon, for the one line printed when it is missing. */
export const HOW_TO_GET_IT =
  'install librbd (Debian/Ubuntu: apt-get install librbd1; to build the addon also librbd-dev, then npm rebuild @nbdx/plugin-rbd)';

/** The package root: src/native.ts (tests) and the bundled dist/index.js both sit one level below. */
export function packageRoot(): string {
  return fileURLToPath(new URL('..', import.meta.url));
}

/** The prebuilds/ folder for this machine (same rule as scripts/build-addon.mjs), or null. */
export function prebuildTarget(): string | null {
  if (process.platform !== 'linux') return null;
  const report = process.report.getReport() as { header?: { glibcVersionRuntime?: string } };
  return report.header?.glibcVersionRuntime ? `linux-${process.arch}-glibc` : null;
}

/** A build made here (node-gyp) first: it was compiled against this system's librbd. */
export function candidatePaths(root = packageRoot()): string[] {
  const target = prebuildTarget();
  return [
    join(root, 'build/Release/rbd_ops.node'),
    join(root, 'build/Debug/rbd_ops.node'),
    ...(target ? [join(root, 'prebuilds', target, 'rbd_ops.node')] : []),
  ];
}

function firstLine(message: string, path: string): string {
  const line = message.split('\n', 1)[0]!.trim();
  return line.startsWith(`${path}: `) ? line.slice(path.length + 2) : line;
}

let cached: NativeLoad | undefined;

/** The addon, looked for once per process. Never throws. NBDX_RBD_NO_ADDON=1 turns it off. */
export function loadNative(): NativeLoad {
  if (cached) return cached;
  if (process.env.NBDX_RBD_NO_ADDON === '1') {
    // As if the addon could not be built here (tests of the message users then see).
    cached = { ops: null, reason: 'the librbd addon is disabled (NBDX_RBD_NO_ADDON=1)' };
    return cached;
  }
  const require = createRequire(import.meta.url);
  const failures: string[] = [];
  for (const path of candidatePaths()) {
    if (!existsSync(path)) continue;
    try {
      const m = require(path) as Partial<RbdNative>;
      if (typeof m.open === 'function' && typeof m.read === 'function') {
        cached = { ops: m as RbdNative, path };
        return cached;
      }
      failures.push(`${path}: not the rbd plugin addon`);
    } catch (err) {
      // A missing librbd.so.1 shows here: "librbd.so.1: cannot open shared object file".
      failures.push(firstLine((err as Error).message, path));
    }
  }
  const reason =
    process.platform !== 'linux'
      ? `the librbd addon is built for Linux only (this is ${process.platform})`
      : failures.length
        ? `the librbd addon does not load (${failures[failures.length - 1]})`
        : 'the librbd addon is not built';
  cached = { ops: null, reason };
  return cached;
}
