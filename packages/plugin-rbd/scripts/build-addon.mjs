#!/usr/bin/env node
// The package's `install` script: makes the librbd addon (native/rbd_ops.c) usable here.
//   1. The prebuilt binary for this machine (prebuilds/linux-<arch>-glibc/rbd_ops.node, shipped in
//      the package, linked against librbd.so.1 and librados.so.2) is loaded in a child Node; if
//      that works nothing is built and no compiler or librbd headers are needed.
//   2. Otherwise node-gyp builds build/Release/rbd_ops.node, which needs librbd's headers
//      (Debian/Ubuntu: librbd-dev; Fedora: librbd-devel).
// A source checkout (src/ is there) always builds, as does NBDX_RBD_BUILD_FROM_SOURCE=1 or
// npm's --build-from-source. Without librbd the plugin cannot serve anything, but installing
// must not fail (the package may be installed on a machine that only runs other plugins): one
// line says what to install, and the plugin says it again when it is used. NBDX_RBD_REQUIRE_ADDON=1
// (for CI) makes a missing addon an error.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const required = process.env.NBDX_RBD_REQUIRE_ADDON === '1';

function done(message, ok) {
  const text = `@nbdx/plugin-rbd: ${message}`;
  if (ok) console.log(text);
  else if (required) {
    console.error(`${text} (NBDX_RBD_REQUIRE_ADDON=1)`);
    process.exit(1);
  } else console.warn(text);
  process.exit(0);
}

if (process.platform !== 'linux') done(`librbd addon not built: Linux only (this is ${process.platform})`, false);

/** Same rule as src/native.ts prebuildTarget. */
function prebuildTarget() {
  return process.report.getReport().header?.glibcVersionRuntime ? `linux-${process.arch}-glibc` : null;
}

/** Why the shipped prebuild cannot be used here, or null when it loads. */
function prebuildProblem(target) {
  if (!target) return 'no prebuild for this C library (glibc only)';
  const file = join(packageRoot, 'prebuilds', target, 'rbd_ops.node');
  if (!existsSync(file)) return `no prebuild for ${target}`;
  // In a child: a binary that fails to load (no librbd.so.1) must not take the install down.
  const check = "const m = require(process.argv[1]); if (typeof m.open !== 'function') throw new Error('not the rbd addon')";
  const r = spawnSync(process.execPath, ['-e', check, file], { encoding: 'utf8' });
  if (r.status === 0) return null;
  const line = (r.stderr ?? '').split('\n').find((l) => /Error/.test(l)) ?? `exit ${r.status ?? r.signal}`;
  return `prebuilds/${target}/rbd_ops.node does not load: ${line.trim()}`;
}

const fromSource =
  args.includes('--from-source') ||
  process.env.NBDX_RBD_BUILD_FROM_SOURCE === '1' ||
  process.env.npm_config_build_from_source === 'true';
const checkout = existsSync(join(packageRoot, 'src', 'native.ts'));

if (!fromSource && !checkout) {
  const target = prebuildTarget();
  const problem = prebuildProblem(target);
  if (!problem) done(`using the prebuilt librbd addon prebuilds/${target}/rbd_ops.node`, true);
  console.log(`@nbdx/plugin-rbd: ${problem}; building the librbd addon from source`);
}

/** librbd's header where the compiler looks by default, or under CPATH/C_INCLUDE_PATH. */
function hasLibrbdHeaders() {
  const dirs = ['/usr/include', '/usr/local/include', ...`${process.env.CPATH ?? ''}:${process.env.C_INCLUDE_PATH ?? ''}`.split(':')];
  return dirs.some((d) => d && existsSync(join(d, 'rbd', 'librbd.h')));
}

if (!hasLibrbdHeaders()) {
  done('librbd headers not found (rbd/librbd.h): install librbd-dev (Debian/Ubuntu) or librbd-devel (Fedora), then npm rebuild @nbdx/plugin-rbd', false);
}

/** node-gyp: a local devDependency, npm's/pnpm's copy on PATH, or npm's bundled one. */
function findNodeGyp() {
  try {
    return { cmd: process.execPath, args: [createRequire(import.meta.url).resolve('node-gyp/bin/node-gyp.js')] };
  } catch {
    // not installed locally
  }
  if (spawnSync('node-gyp', ['--version'], { stdio: 'ignore' }).status === 0) return { cmd: 'node-gyp', args: [] };
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
  return existsSync(join(prefix, 'include/node/common.gypi')) && existsSync(join(prefix, 'include/node/node_api.h')) ? prefix : undefined;
}

const gyp = findNodeGyp();
if (!gyp) done('node-gyp not found: librbd addon not built', false);
const nodedir = localNodedir();
const run = spawnSync(gyp.cmd, [...gyp.args, 'rebuild', ...(nodedir ? [`--nodedir=${nodedir}`] : [])], { cwd: packageRoot, stdio: 'inherit' });
if (run.status !== 0) done(`node-gyp rebuild failed (exit ${run.status ?? run.signal}): librbd addon not built`, false);
