#!/usr/bin/env node
/**
 * Copy SIZE (default 1G) of non-zero data (nbdkit pattern) with nbdcopy through `nbdx imageio` into the test imageio
 * server (a separate process), and the same copy into `nbdx memory` for reference.
 *
 *   node packages/plugin-imageio/bench/run.mjs [SIZE] [extra imageio params, e.g. connections=8]
 *
 * Needs: the built CLI (packages/nbdx/dist), this package built (dist), nbdcopy and nbdkit.
 */
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const pkg = path.resolve(here, '..');
const root = path.resolve(pkg, '../..');
const NBDX = path.join(root, 'packages/nbdx/bin/nbdx.js');
const ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH}` };
const size = process.argv[2] ?? '1G';
const extra = process.argv.slice(3);

// Bundle the TypeScript test server (not part of dist) into bench/.build.
execFileSync(
  'npx',
  ['tsup', 'bench/test-server-main.ts', '--no-config', '--format', 'esm', '--target', 'node20', '-d', 'bench/.build', '--silent'],
  { cwd: pkg, stdio: 'inherit', env: { ...ENV, COREPACK_INTEGRITY_KEYS: '0' } },
);

const server = spawn(process.execPath, [path.join(here, '.build/test-server-main.js'), '--size', size], {
  env: ENV,
  stdio: ['ignore', 'pipe', 'inherit'],
});
const [line] = await once(server.stdout, 'data');
const url = String(line).trim();

function timed(label, args) {
  const t0 = process.hrtime.bigint();
  execFileSync(process.execPath, args, { env: ENV, stdio: 'inherit', cwd: root });
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  const bytes = parseBytes(size);
  console.log(`${label}: ${s.toFixed(2)} s, ${(bytes / 2 ** 20 / s).toFixed(0)} MiB/s`);
}
function parseBytes(s) {
  const m = /^(\d+)([KMGT]?)/i.exec(s);
  return Number(m[1]) * 1024 ** ' KMGT'.indexOf((m[2] || ' ').toUpperCase());
}

const copy = `nbdcopy --flush -- [ nbdkit -r pattern ${size} ] "$uri"`;
try {
  timed(`nbdcopy → nbdx imageio (${url.replace(/\/images\/.*/, '')}) ${extra.join(' ')}`, [
    NBDX, '-U', '-', 'imageio', `url=${url}`, ...extra, '--run', copy,
  ]);
  timed('nbdcopy → nbdx memory (reference)', [NBDX, '-U', '-', 'memory', size, '--run', copy]);
} finally {
  server.kill('SIGTERM');
  await once(server, 'exit');
}
