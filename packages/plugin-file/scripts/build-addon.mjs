#!/usr/bin/env node
// Builds native/file_ops.c into build/Release/file_ops.node with node-gyp (the package's
// `install` script). The plugin works without the addon (see README, "Limits"), so a failed build
// warns and exits 0, unless NBDX_FILE_REQUIRE_ADDON=1 (CI sets it) makes it an error.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');
const required = process.env.NBDX_FILE_REQUIRE_ADDON === '1';

if (process.platform !== 'linux') {
  console.warn('@nbdx/plugin-file: the addon is Linux-only; serving files without it');
  process.exit(0);
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

function fail(message) {
  const text = `@nbdx/plugin-file: ${message}`;
  if (required) {
    console.error(`${text} (NBDX_FILE_REQUIRE_ADDON=1)`);
    process.exit(1);
  }
  console.warn(`${text}; the plugin still works without extents, punched holes or fast zeroing`);
  process.exit(0);
}

const gyp = findNodeGyp();
if (!gyp) fail('node-gyp not found, addon not built');
const nodedir = localNodedir();
const args = [...gyp.args, 'rebuild', ...(nodedir ? [`--nodedir=${nodedir}`] : [])];
const run = spawnSync(gyp.cmd, args, { cwd: packageRoot, stdio: 'inherit' });
if (run.status !== 0) fail(`node-gyp rebuild failed (exit ${run.status ?? run.signal})`);
