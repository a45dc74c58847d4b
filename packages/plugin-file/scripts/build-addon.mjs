#!/usr/bin/env node
// The package's `install` script: makes the native helper (native/file_ops.c) usable here.
//   1. The prebuilt binary for this machine (prebuilds/<platform>-<arch>-<libc>/file_ops.node,
//      shipped in the package) is loaded in a child Node; if that works, nothing is built: fast,
//      and no compiler needed.
//   2. Otherwise node-gyp builds build/Release/file_ops.node from source (the loader tries that
//      first at run time, then the prebuild).
// NBDX_FILE_BUILD_FROM_SOURCE=1 (or npm's --build-from-source) goes straight to 2, and so does a
// source checkout (src/ is there; it is not published), where the C file may be newer than any
// prebuild lying around. The plugin works without the helper (README, "The native helper"), so a
// failure warns and exits 0, unless NBDX_FILE_REQUIRE_ADDON=1 (for CI) makes it an error.
// `--from-source` is step 2 only (the build:addon script); `--print-target` prints the prebuild
// folder name this machine uses and exits (tests compare it with the loader's).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const required = process.env.NBDX_FILE_REQUIRE_ADDON === '1';

/** Same rule as src/native.ts (detectLibc, prebuildTarget): linux-x64-glibc, darwin-arm64, ... */
function prebuildTarget() {
  if (process.platform !== 'linux') return `${process.platform}-${process.arch}`;
  const report = process.report.getReport();
  if (report.header?.glibcVersionRuntime) return `linux-${process.arch}-glibc`;
  if (report.sharedObjects?.some((s) => /(^|\/)(ld-musl-|libc\.musl-)/.test(s))) return `linux-${process.arch}-musl`;
  return null;
}

if (args.includes('--print-target')) {
  console.log(prebuildTarget() ?? 'none');
  process.exit(0);
}

function fail(message) {
  const text = `@nbdx/plugin-file: ${message}`;
  if (required) {
    console.error(`${text} (NBDX_FILE_REQUIRE_ADDON=1)`);
    process.exit(1);
  }
  console.warn(`${text}; the plugin still works without extents, punched holes or fast zeroing`);
  process.exit(0);
}

if (process.platform !== 'linux') {
  console.warn('@nbdx/plugin-file: the native helper is Linux-only; serving files without it');
  process.exit(0);
}

/** Why the prebuild for this machine cannot be used, or null when it loads. */
function prebuildProblem(target) {
  if (!target) return 'the C library is neither glibc nor musl';
  const file = join(packageRoot, 'prebuilds', target, 'file_ops.node');
  if (!existsSync(file)) return `no prebuild for ${target}`;
  // In a child: a binary that crashes on load must not take the install down with it.
  const check = "const m = require(process.argv[1]); if (typeof m.map !== 'function') throw new Error('not the file plugin helper')";
  const r = spawnSync(process.execPath, ['-e', check, file], { encoding: 'utf8' });
  if (r.status === 0) return null;
  const line = (r.stderr ?? '').split('\n').find((l) => /Error/.test(l)) ?? `exit ${r.status ?? r.signal}`;
  return `prebuilds/${target}/file_ops.node does not load: ${line.trim()}`;
}

const fromSource =
  args.includes('--from-source') ||
  process.env.NBDX_FILE_BUILD_FROM_SOURCE === '1' ||
  process.env.npm_config_build_from_source === 'true';
const checkout = existsSync(join(packageRoot, 'src', 'native.ts'));

if (!fromSource && !checkout) {
  const target = prebuildTarget();
  const problem = prebuildProblem(target);
  if (!problem) {
    console.log(`@nbdx/plugin-file: using the prebuilt native helper prebuilds/${target}/file_ops.node`);
    process.exit(0);
  }
  console.log(`@nbdx/plugin-file: ${problem}; building the native helper from source`);
}

/** node-gyp: a local devDependency, npm's/pnpm's copy on PATH (their node-gyp-bin), or npm's bundled one. */
function findNodeGyp() {
  try {
    return { cmd: process.execPath, args: [createRequire(import.meta.url).resolve('node-gyp/bin/node-gyp.js')] };
  } catch {
    // not installed locally
  }
  const onPath = spawnSync('node-gyp', ['--version'], { stdio: 'ignore', shell: false });
  if (onPath.status === 0) return { cmd: 'node-gyp', args: [] };
  const prefix = join(dirname(process.execPath), '..');
  for (const p of [
    join(prefix, 'lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js'),
    join(prefix, 'node_modules/npm/node_modules/node-gyp/bin/node-gyp.js'),
  ]) {
    if (existsSync(p)) return { cmd: process.execPath, args: [p] };
  }
  return null;
}

/** Headers that ship with this Node (official tarballs, Debian's libnode-dev): no download needed. */
function localNodedir() {
  if (process.env.npm_config_nodedir) return process.env.npm_config_nodedir;
  const prefix = join(dirname(process.execPath), '..');
  return existsSync(join(prefix, 'include/node/common.gypi')) && existsSync(join(prefix, 'include/node/node_api.h'))
    ? prefix
    : undefined;
}

const gyp = findNodeGyp();
if (!gyp) fail('node-gyp not found, native helper not built');
const nodedir = localNodedir();
const gypArgs = [...gyp.args, 'rebuild', ...(nodedir ? [`--nodedir=${nodedir}`] : [])];
const run = spawnSync(gyp.cmd, gypArgs, { cwd: packageRoot, stdio: 'inherit' });
if (run.status !== 0) fail(`node-gyp rebuild failed (exit ${run.status ?? run.signal})`);
