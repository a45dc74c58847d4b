#!/usr/bin/env node
/**
 * Speed of two builds of the memory plugin, in alternating rounds (the order flips every round),
 * with fio's nbd engine and nbdcopy; prints each job's median and range per build.
 *
 *   node packages/plugin-memory/bench/throughput.mjs A.js B.js [--rounds 5] [--seconds 5]
 *
 * A and B are plugin names or paths (`memory` is the built dist). Each round starts a fresh
 * `nbdx memory 1G` per build: a 1 GiB sequential write into the empty disk (every page allocated
 * by it), a sequential read of it, 4 KiB random reads and overwrites at QD1 and QD32, nbdcopy out
 * and back in; then a fresh 1T disk for 4 KiB random writes into empty space (the sparse path).
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
const builds = args.length ? args : ['memory'];

async function start(plugin, size, sock) {
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

function fio(uri, rw, bs, qd, timed) {
  const out = execFileSync(
    'fio',
    [
      '--name=job', '--ioengine=nbd', `--uri=${uri}`, `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${qd}`, '--size=1g',
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

const JOBS = [
  ['seq write 1 GiB 256K QD16 (MiB/s)', (u) => fio(u, 'write', '256k', 16, false)],
  ['seq read 1 GiB 256K QD16 (MiB/s)', (u) => fio(u, 'read', '256k', 16, false)],
  ['rand read 4K QD1 (IOPS)', (u) => fio(u, 'randread', '4k', 1, true)],
  ['rand write 4K QD1 (IOPS)', (u) => fio(u, 'randwrite', '4k', 1, true)],
  ['rand read 4K QD32 (IOPS)', (u) => fio(u, 'randread', '4k', 32, true)],
  ['rand write 4K QD32 (IOPS)', (u) => fio(u, 'randwrite', '4k', 32, true)],
];

async function round(plugin, dir, results) {
  const sock = path.join(dir, 'mem.sock');
  const uri = `nbd+unix:///?socket=${sock}`;
  let child = await start(plugin, '1G', sock);
  try {
    for (const [name, job] of JOBS) (results[name] ??= []).push(job(uri));
    const img = path.join('/dev/shm', `nbdx-mem-bench-${process.pid}.img`);
    execFileSync('truncate', ['-s', '0', img]);
    try {
      (results['nbdcopy out 1 GiB (s)'] ??= []).push(seconds(() => execFileSync('nbdcopy', [uri, img], { env: ENV })));
      (results['nbdcopy in 1 GiB (s)'] ??= []).push(seconds(() => execFileSync('nbdcopy', [img, uri], { env: ENV })));
    } finally {
      fs.rmSync(img, { force: true });
    }
  } finally {
    await stop(child);
  }
  child = await start(plugin, '1T', sock);
  try {
    (results['rand write 4K QD32 into an empty 1T disk (IOPS)'] ??= []).push(fio(uri, 'randwrite', '4k', 32, true));
  } finally {
    await stop(child);
  }
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const fmt = (x) => (x >= 100 ? x.toFixed(0) : x.toFixed(2));

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-mem-tp-'));
const results = builds.map(() => ({}));
try {
  for (let r = 0; r < ROUNDS; r++) {
    const order = r % 2 ? [...builds.keys()].reverse() : [...builds.keys()];
    for (const i of order) await round(builds[i], dir, results[i]);
    process.stderr.write(`round ${r + 1}/${ROUNDS} done\n`);
  }
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
console.log(`${ROUNDS} alternating rounds, ${os.cpus().length} CPUs, node ${process.version}, load ${os.loadavg().map((x) => x.toFixed(1)).join(' ')}`);
console.log(`| job | ${builds.map((b) => `${path.isAbsolute(b) ? path.relative(process.cwd(), b) : b}: median (min–max)`).join(' | ')} |`);
console.log(`|---|${builds.map(() => '---').join('|')}|`);
for (const name of Object.keys(results[0])) {
  const cells = results.map((res) => {
    const xs = res[name];
    return `${fmt(median(xs))} (${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))})`;
  });
  console.log(`| ${name} | ${cells.join(' | ')} |`);
}
console.log('\nraw:', JSON.stringify(results.map((res, i) => ({ build: builds[i], ...res }))));
