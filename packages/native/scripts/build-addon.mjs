#!/usr/bin/env node
// The package's `install` script: makes native/socket_ops.c usable on this machine.
//   - A published package carries prebuilds/<platform>-<arch>-<libc>/socket_ops.node; when the one
//     for this machine loads (checked in a child Node), nothing is built.
//   - Otherwise, and always in a source checkout (src/ is there, the C file may be newer than any
//     prebuild) or with --from-source / NBDX_NATIVE_BUILD_FROM_SOURCE=1, node-gyp builds
//     build/Release/socket_ops.node (the loader tries that first).
// nbdx works without this helper (the server then keeps the system's socket buffer sizes and
// serves on one thread), so a failure warns and exits 0, unless NBDX_NATIVE_REQUIRE_ADDON=1.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const fromSource =
  process.argv.includes('--from-source') ||
  process.env.NBDX_NATIVE_BUILD_FROM_SOURCE === '1' ||
  process.env.npm_config_build_from_source === 'true';

function give(message) {
  if (process.env.NBDX_NATIVE_REQUIRE_ADDON === '1') {
    console.error(`@nbdx/native: ${message} (NBDX_NATIVE_REQUIRE_ADDON=1)`);
    process.exit(1);
  }
  console.warn(`@nbdx/native: ${message}; nbdx runs without it (system socket buffers, one thread)`);
  process.exit(0);
}

/** prebuilds/ folder name, the same rule as src/index.ts. */
function target() {
  if (process.platform !== 'linux') return `${process.platform}-${process.arch}`;
  const report = process.report.getReport();
  if (report.header?.glibcVersionRuntime) return `linux-${process.arch}-glibc`;
  if (report.sharedObjects?.some((s) => /(^|\/)(ld-musl-|libc\.musl-)/.test(s))) return `linux-${process.arch}-musl`;
  return null;
}

if (process.platform !== 'linux') give('the helper is Linux-only');

if (!fromSource && !existsSync(join(root, 'src', 'index.ts'))) {
  const t = target();
  const file = t && join(root, 'prebuilds', t, 'socket_ops.node');
  if (file && existsSync(file)) {
    const check = "const m = require(process.argv[1]); if (typeof m.dup !== 'function') throw new Error('not socket_ops')";
    if (spawnSync(process.execPath, ['-e', check, file], { stdio: 'ignore' }).status === 0) process.exit(0);
  }
  console.log(`@nbdx/native: no usable prebuild for ${t ?? 'this C library'}; building from source`);
}

/** node-gyp: installed beside us, on PATH (npm and pnpm put theirs there), or npm's own copy. */
function nodeGyp() {
  try {
    return [process.execPath, createRequire(import.meta.url).resolve('node-gyp/bin/node-gyp.js')];
  } catch {
    // not installed beside us
  }
  if (spawnSync('node-gyp', ['--version'], { stdio: 'ignore' }).status === 0) return ['node-gyp'];
  const prefix = join(dirname(process.execPath), '..');
  for (const p of ['lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js', 'node_modules/npm/node_modules/node-gyp/bin/node-gyp.js']) {
    if (existsSync(join(prefix, p))) return [process.execPath, join(prefix, p)];
  }
  return null;
}

const gyp = nodeGyp();
if (!gyp) give('node-gyp not found, helper not built');
// Node's own headers when this Node ships them: no download.
const prefix = join(dirname(process.execPath), '..');
const nodedir =
  process.env.npm_config_nodedir ?? (existsSync(join(prefix, 'include/node/node_api.h')) && existsSync(join(prefix, 'include/node/common.gypi')) ? prefix : undefined);
const r = spawnSync(gyp[0], [...gyp.slice(1), 'rebuild', ...(nodedir ? [`--nodedir=${nodedir}`] : [])], { cwd: root, stdio: 'inherit' });
if (r.status !== 0) give(`node-gyp rebuild failed (exit ${r.status ?? r.signal})`);
