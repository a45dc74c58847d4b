#!/usr/bin/env node
/**
 * Speed of two builds of the memory plugin with fio's nbd engine and nbdcopy, job by job in
 * pairs: each job runs against one build and then at once against the other, the order flipping
 * from job to job and round to round, so that load which comes and goes on a shared machine hits
 * both sides alike. Prints each job's median and range per build, and the median of the per-pair
 * ratios (B over A; for nbdcopy, A's time over B's), which is the figure to trust.
 *
 *   node packages/plugin-memory/bench/throughput.mjs A.js B.js [--rounds 5] [--seconds 5]
 *
 * A and B are plugin names or paths (`memory` is the built dist). Each round starts a fresh
 * `nbdx memory 1G` per build: a 1 GiB sequential write into the empty disk (every page allocated
 * by it), a sequential read of it, 4 KiB random reads and overwrites at QD1 and QD32, nbdcopy out
 * and back in; then, per build and job, a fresh `memory 1T` for 4 KiB random writes into empty
 * space: over its first GiB (pages filled a sub-block at a time) and over all of it (nearly every
 * write takes a new page).
 */
import { spawn, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const NBDX = path.resolve(here, '../../nbdx/bin/nbdx.js');
const ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH}` };

const args = process.argv.slice(2);
function option(name, dflt) {
  const i = args.indexOf(`--${name}`);
  if (i < 0) return dflt;
  const v = args[i + 1];
  args.splice(i, 2);
  return v;
}
const ROUNDS = Number(option('rounds', '5'));
const SECONDS = Number(option('seconds', '5'));
if (args.length !== 2) throw new Error('usage: throughput.mjs A B [--rounds N] [--seconds S]');
const builds = args;

async function start(plugin, size, sock) {
  fs.rmSync(sock, { force: true });
  const child = spawn(process.execPath, [NBDX, '-f', '-U', sock, plugin, size], { env: ENV, stdio: ['ignore', 'ignore', 'inherit'] });
  for (let t = 0; !fs.existsSync(sock); t++) {
    if (t > 200 || child.exitCode !== null) throw new Error(`${plugin} did not start`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return child;
}
async function stop(child) {
  if (child.exitCode !== null) return;
  const done = new Promise((r) => child.on('exit', r));
  child.kill('SIGTERM');
  await done;
}

function fio(uri, rw, bs, qd, timed, size = '1g') {
  const out = execFileSync(
    'fio',
    [
      '--name=job', '--ioengine=nbd', `--uri=${uri}`, `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${qd}`, `--size=${size}`,
      ...(timed ? ['--time_based', `--runtime=${SECONDS}`, '--ramp_time=1', '--randrepeat=0', '--norandommap'] : []),
      '--output-format=json',
    ],
    { env: ENV, encoding: 'utf8', maxBuffer: 64 << 20 },
  );
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const side = rw.includes('read') ? job.read : job.write;
  return bs === '4k' ? side.iops : side.bw / 1024;
}

function seconds(fn) {
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

const IMG = path.join('/dev/shm', `nbdx-mem-bench-${process.pid}.img`);

/** Jobs on the 1G disks, in order (the first writes them whole). */
const JOBS = [
  ['seq write 1 GiB 256K QD16 (MiB/s)', (u) => fio(u, 'write', '256k', 16, false)],
  ['seq read 1 GiB 256K QD16 (MiB/s)', (u) => fio(u, 'read', '256k', 16, false)],
  ['rand read 4K QD1 (IOPS)', (u) => fio(u, 'randread', '4k', 1, true)],
  ['rand write 4K QD1 (IOPS)', (u) => fio(u, 'randwrite', '4k', 1, true)],
  ['rand read 4K QD32 (IOPS)', (u) => fio(u, 'randread', '4k', 32, true)],
  ['rand write 4K QD32 (IOPS)', (u) => fio(u, 'randwrite', '4k', 32, true)],
  // Out first, so the copy back in has a source of the right size.
  ['nbdcopy out 1 GiB (s)', (u) => seconds(() => execFileSync('nbdcopy', [u, IMG], { env: ENV }))],
  ['nbdcopy in 1 GiB (s)', (u) => seconds(() => execFileSync('nbdcopy', [IMG, u], { env: ENV }))],
];
/** Jobs that each want a fresh empty disk. */
const FRESH = ['1g', '1t'].map((size) => [
  `rand write 4K QD32, empty 1T disk, over ${size} (IOPS)`,
  (u) => fio(u, 'randwrite', '4k', 32, true, size),
]);

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-mem-tp-'));
const socks = builds.map((_, i) => path.join(dir, `mem${i}.sock`));
const uris = socks.map((s) => `nbd+unix:///?socket=${s}`);
const results = builds.map(() => ({}));
let flip = 0;
const pairOrder = () => (flip++ % 2 ? [1, 0] : [0, 1]);

try {
  for (let r = 0; r < ROUNDS; r++) {
    flip = r;
    const children = [];
    try {
      for (let i = 0; i < 2; i++) children.push(await start(builds[i], '1G', socks[i]));
      execFileSync('truncate', ['-s', '0', IMG]); // nbdcopy's destination must exist
      for (const [name, job] of JOBS) {
        for (const i of pairOrder()) (results[i][name] ??= []).push(job(uris[i]));
      }
    } finally {
      for (const c of children) await stop(c);
      fs.rmSync(IMG, { force: true });
    }
    for (const [name, job] of FRESH) {
      for (const i of pairOrder()) {
        const child = await start(builds[i], '1T', socks[i]);
        try {
          (results[i][name] ??= []).push(job(uris[i]));
        } finally {
          await stop(child);
        }
      }
    }
    process.stderr.write(`round ${r + 1}/${ROUNDS} done\n`);
  }
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
  fs.rmSync(IMG, { force: true });
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const fmt = (x) => (x >= 100 ? x.toFixed(0) : x.toFixed(2));
const label = (b) => (path.isAbsolute(b) ? path.relative(process.cwd(), b) : b);

console.log(`${ROUNDS} rounds, jobs in alternating pairs, ${os.cpus().length} CPUs, node ${process.version}, load now ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}`);
console.log(`A = ${label(builds[0])}, B = ${label(builds[1])}`);
console.log('| job | A: median (min–max) | B: median (min–max) | B vs A, per pair: median (min–max) |');
console.log('|---|---|---|---|');
for (const name of Object.keys(results[0])) {
  const [a, b] = [results[0][name], results[1][name]];
  const cell = (xs) => `${fmt(median(xs))} (${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))})`;
  // Higher is better for rates; for times, A's over B's.
  const ratios = a.map((x, i) => (name.endsWith('(s)') ? x / b[i] : b[i] / x));
  console.log(`| ${name} | ${cell(a)} | ${cell(b)} | ${median(ratios).toFixed(2)} (${Math.min(...ratios).toFixed(2)}–${Math.max(...ratios).toFixed(2)}) |`);
}
console.log('\nraw:', JSON.stringify(results.map((res, i) => ({ build: builds[i], ...res }))));
