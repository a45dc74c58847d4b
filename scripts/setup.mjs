#!/usr/bin/env node
// `npm run setup`: install the workspace with the pnpm version package.json pins and build it,
// on a machine that has nothing but Node.js. pnpm comes through npx from the npm registry, not
// through corepack: corepack is not bundled with Node 25 and later, and older copies carry stale
// registry signing keys ("No compatible signature found in package metadata").
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const pinned = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).packageManager;
if (!/^pnpm@\d+\.\d+\.\d+$/.test(pinned ?? '')) {
  console.error(`setup: package.json's packageManager should be pnpm@X.Y.Z, not ${pinned}`);
  process.exit(1);
}

function step(...args) {
  console.error(`setup: npx ${pinned} ${args.join(' ')}`);
  const r = spawnSync('npx', ['--yes', pinned, ...args], { cwd: root, stdio: 'inherit', env: { ...process.env, npm_config_update_notifier: 'false' } });
  if (r.status !== 0) {
    console.error(`setup: pnpm ${args.join(' ')} failed (${r.error?.message ?? `exit ${r.status ?? r.signal}`})`);
    process.exit(1);
  }
}

step('install', '--frozen-lockfile');
step('build');
console.error('setup: done. `npx nbdx --help` runs the command from this checkout; `npm test` runs every test.');
