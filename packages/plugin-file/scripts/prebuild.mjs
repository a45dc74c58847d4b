#!/usr/bin/env node
// The file plugin's prebuilds (native/file_ops.c → prebuilds/<target>/file_ops.node), made by the
// repository's shared script; the arguments (--all, --target, --out) pass through. Not published:
// prepack runs it in the source checkout.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..');
const script = join(packageRoot, '../../scripts/prebuild-addon.mjs');
const r = spawnSync(process.execPath, [script, '--package', packageRoot, ...process.argv.slice(2)], { stdio: 'inherit' });
process.exit(r.status ?? 1);
