/**
 * @nbdx/native: the few socket operations the nbdx server needs and Node's net module does not
 * offer, from a small N-API addon (native/socket_ops.c). Optional: the server loads it when it is
 * installed and works without it.
 *
 * - `dup` gives an accepted connection a second descriptor, so the thread that accepted it can
 *   hand it to a worker thread and close its own handle (libuv closes whatever it wraps).
 * - `setBuffer` raises a socket's send buffer: a Unix socket's default (about 208 KiB) holds less
 *   than one 256 KiB READ reply, so without it a bulk copy goes in lock-step.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface SocketOps {
  /** A duplicate of `fd` (close-on-exec). Throws an Error with `code` on failure. */
  dup(fd: number): number;
  /** SO_SNDBUF (kind SEND) or SO_RCVBUF (RECEIVE), in bytes as the kernel reports it. */
  getBuffer(fd: number, kind: BufferKind): number;
  /** Ask for `bytes`; returns what the kernel granted (doubled, capped by net.core.wmem_max/rmem_max). */
  setBuffer(fd: number, kind: BufferKind, bytes: number): number;
}

export const SEND = 0;
export const RECEIVE = 1;
export type BufferKind = typeof SEND | typeof RECEIVE;

export type NativeLoad = { ops: SocketOps; path: string } | { ops: null; reason: string };

/** prebuilds/ folder name: linux-x64-glibc, linux-arm64-musl, ...; null for an unknown Linux libc. */
export function prebuildTarget(): string | null {
  if (process.platform !== 'linux') return `${process.platform}-${process.arch}`;
  const report = process.report.getReport() as { header?: { glibcVersionRuntime?: string }; sharedObjects?: string[] };
  if (report.header?.glibcVersionRuntime) return `linux-${process.arch}-glibc`;
  if (report.sharedObjects?.some((s) => /(^|\/)(ld-musl-|libc\.musl-)/.test(s))) return `linux-${process.arch}-musl`;
  return null;
}

/** src/index.ts (tests) and dist/index.js (built) both sit one folder below the package root. */
const root = fileURLToPath(new URL('..', import.meta.url));

/** A build made here (node-gyp, by the install script) first: it matches this very system. */
export function candidatePaths(): string[] {
  const target = prebuildTarget();
  const paths = [join(root, 'build/Release/socket_ops.node'), join(root, 'build/Debug/socket_ops.node')];
  if (target) paths.push(join(root, 'prebuilds', target, 'socket_ops.node'));
  return paths;
}

let cached: NativeLoad | undefined;

/** The helper for this process, looked for once; never throws. NBDX_NATIVE_NO_ADDON=1 turns it off. */
export function loadSocketOps(): NativeLoad {
  if (cached) return cached;
  if (process.env.NBDX_NATIVE_NO_ADDON === '1') return (cached = { ops: null, reason: 'disabled by NBDX_NATIVE_NO_ADDON=1' });
  if (process.platform !== 'linux') return (cached = { ops: null, reason: `it is Linux-only, this is ${process.platform}` });
  const require = createRequire(import.meta.url);
  let reason = `not built, and no prebuild for ${prebuildTarget() ?? 'this C library'}`;
  for (const path of candidatePaths()) {
    if (!existsSync(path)) continue;
    try {
      const m = require(path) as Partial<SocketOps>;
      if (typeof m.dup === 'function' && typeof m.setBuffer === 'function' && typeof m.getBuffer === 'function') {
        return (cached = { ops: m as SocketOps, path });
      }
      reason = `${path}: not the socket helper`;
    } catch (err) {
      reason = (err as Error).message.split('\n', 1)[0]!;
    }
  }
  return (cached = { ops: null, reason });
}
