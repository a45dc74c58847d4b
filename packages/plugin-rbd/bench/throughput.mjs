#!/usr/bin/env node
/**
 * nbdcopy in and out of a 1 GiB RBD image through nbdx (this plugin) and through qemu-nbd's own
 * rbd driver (`qemu-nbd -f raw rbd:POOL/IMAGE:conf=...`, Debian package qemu-block-extra), on the
 * same throw-away single-node cluster (memstore OSD), alternating rounds. Prints MiB/s per round
 * and the medians, with the load average.
 *
 *   node packages/plugin-rbd/bench/throughput.mjs [--rounds N] [--size MiB]
 *
 * Needs a build (pnpm build), Ceph (ceph-mon ceph-osd), qemu-nbd with the rbd driver, nbdcopy.
 * A benchmark, not a test: run it on purpose, on a quiet machine if the figures matter.
 */
import { spawn, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startCeph } from '@nbdx/testkit/ceph';

const argv = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = argv.indexOf(name);
  return i >= 0 ? Number(argv[i + 1]) : dflt;
};
const ROUNDS = opt('--rounds', 3);
const SIZE_MIB = opt('--size', 1024);
/** nbdcopy --connections (default: nbdcopy's own choice, 4 when the server offers multi-conn). */
const CONNECTIONS = opt('--connections', 0);
const ONLY = argv.includes('--only') ? argv[argv.indexOf('--only') + 1] : undefined;
const here = path.dirname(fileURLToPath(import.meta.url));
const nbdxBin = path.resolve(here, '../../nbdx/bin/nbdx.js');
const ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH ?? ''}` };

function sh(cmd, args) {
  return execFileSync(cmd, args, { env: ENV, encoding: 'utf8', maxBuffer: 1 << 26 });
}

/** Start a server that listens on `sock`; resolves once the socket exists. */
async function server(cmd, args, sock) {
  const child = spawn(cmd, args, { env: ENV, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr.on('data', (d) => (err += d));
  const t0 = Date.now();
  while (!fs.existsSync(sock)) {
    if (child.exitCode !== null) throw new Error(`${cmd} exited: ${err}`);
    if (Date.now() - t0 > 30_000) throw new Error(`${cmd} did not listen: ${err}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    uri: `nbd+unix:///?socket=${sock}`,
    /** CPU seconds (user + system) the server has used so far (/proc/PID/stat), threads included. */
    cpu: () => {
      const f = fs.readFileSync(`/proc/${child.pid}/stat`, 'utf8').split(') ')[1].split(' ');
      return (Number(f[11]) + Number(f[12])) / CLK_TCK;
    },
    stop: () =>
      new Promise((r) => {
        if (child.exitCode !== null) return r();
        child.once('exit', r);
        child.kill('SIGTERM');
      }),
  };
}

function timed(args) {
  const t0 = process.hrtime.bigint();
  sh('nbdcopy', [...(CONNECTIONS ? [`--connections=${CONNECTIONS}`] : []), ...args]);
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

const CLK_TCK = Number(sh('getconf', ['CLK_TCK']).trim()) || 100;
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const shm = fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir();
const work = fs.mkdtempSync(path.join(shm, 'nbdx-rbd-bench-'));
const src = path.join(work, 'src.img');
const fd = fs.openSync(src, 'w');
for (let i = 0; i < SIZE_MIB; i++) fs.writeSync(fd, randomBytes(1 << 20));
fs.closeSync(fd);

const c = await startCeph({ pools: ['rbd'], memstoreBytes: (2 * SIZE_MIB + 512) * 2 ** 20 });
const results = { nbdx: { in: [], out: [], cpu: [] }, 'qemu-nbd': { in: [], out: [], cpu: [] } };
try {
  sh('rbd', ['--conf', c.conf, 'create', '--size', `${SIZE_MIB}M`, 'rbd/a']);
  sh('rbd', ['--conf', c.conf, 'create', '--size', `${SIZE_MIB}M`, 'rbd/b']);
  const servers = {
    nbdx: () => server(process.execPath, [nbdxBin, '-f', '-U', path.join(work, 'nbdx.sock'), 'rbd', 'rbd/a', `conf=${c.conf}`], path.join(work, 'nbdx.sock')),
    'qemu-nbd': () =>
      server('qemu-nbd', ['-f', 'raw', '-k', path.join(work, 'qemu.sock'), '--shared=16', '--persistent', '--cache=writeback', '--aio=threads', `rbd:rbd/b:conf=${c.conf}`], path.join(work, 'qemu.sock')),
  };
  for (let r = 0; r < ROUNDS; r++) {
    for (const name of (r % 2 ? ['qemu-nbd', 'nbdx'] : ['nbdx', 'qemu-nbd']).filter((n) => !ONLY || n === ONLY)) {
      const s = await servers[name]();
      try {
        const cpu0 = s.cpu();
        const tin = timed(['--flush', src, s.uri]);
        const cpu1 = s.cpu();
        const tout = timed([s.uri, 'null:']);
        const cpu2 = s.cpu();
        results[name].in.push(SIZE_MIB / tin);
        results[name].out.push(SIZE_MIB / tout);
        // CPU seconds per GiB the server process spent, in and out: less at the mercy of a busy
        // machine than the rates.
        const gib = SIZE_MIB / 1024;
        results[name].cpu.push([(cpu1 - cpu0) / gib, (cpu2 - cpu1) / gib]);
        console.log(
          `round ${r + 1} ${name.padEnd(8)} in ${(SIZE_MIB / tin).toFixed(0)} MiB/s, out ${(SIZE_MIB / tout).toFixed(0)} MiB/s; ` +
            `server CPU s/GiB in ${((cpu1 - cpu0) / gib).toFixed(2)}, out ${((cpu2 - cpu1) / gib).toFixed(2)} (load ${os.loadavg().map((l) => l.toFixed(2)).join(' ')})`,
        );
      } finally {
        await s.stop();
        fs.rmSync(path.join(work, name === 'nbdx' ? 'nbdx.sock' : 'qemu.sock'), { force: true });
      }
    }
  }
  // Both images must hold the source (a benchmark that copies wrong bytes measures nothing).
  for (const img of ['rbd/a', 'rbd/b']) {
    const out = path.join(work, 'check.img');
    if (ONLY && !img.endsWith(ONLY === 'nbdx' ? 'a' : 'b')) continue;
    sh('rbd', ['--conf', c.conf, 'export', '--no-progress', img, out]);
    sh('cmp', [src, out]);
    fs.rmSync(out);
  }
  console.log(`\nmedians of ${ROUNDS} rounds, ${SIZE_MIB} MiB, nbdcopy defaults (4 connections if multi-conn, 64 requests in flight each):`);
  for (const [name, r] of Object.entries(results).filter(([n]) => !ONLY || n === ONLY)) {
    console.log(
      `  ${name.padEnd(8)} in ${median(r.in).toFixed(0)} MiB/s  out ${median(r.out).toFixed(0)} MiB/s;  ` +
        `server CPU s/GiB in ${median(r.cpu.map((x) => x[0])).toFixed(2)}, out ${median(r.cpu.map((x) => x[1])).toFixed(2)}`,
    );
  }
  if (!ONLY) console.log(`  nbdx/qemu-nbd: in ${(median(results.nbdx.in) / median(results['qemu-nbd'].in)).toFixed(2)}x, out ${(median(results.nbdx.out) / median(results['qemu-nbd'].out)).toFixed(2)}x`);
  console.log(`load average at the end: ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}`);
} finally {
  await c.stop();
  fs.rmSync(work, { recursive: true, force: true });
}
