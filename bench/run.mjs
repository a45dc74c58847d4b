#!/usr/bin/env node
/**
 * pnpm bench [SCENARIO...] — nbdx against its reference (nbdkit, or nbdx without a filter) in the
 * same run, with fio's nbd engine and nbdcopy, printed as a table of ratios (nbdx / reference).
 *
 * Scenarios are listed in scenarios.mjs; the default is `memory`. Set BENCH_SECONDS to change the
 * length of each fio job (default 5).
 */
import { spawn, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { scenarios } from './scenarios.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const NBDX = path.resolve(here, '../packages/nbdx/dist/bin.js');
const SECONDS = Number(process.env.BENCH_SECONDS ?? 5);
const ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH}` };

/** The fio jobs every scenario runs: [label, rw, block size, queue depth]. */
export const FIO_JOBS = [
  ['seq write 256K QD16', 'write', '256k', 16],
  ['seq read 256K QD16', 'read', '256k', 16],
  ['rand read 4K QD1', 'randread', '4k', 1],
  ['rand write 4K QD1', 'randwrite', '4k', 1],
  ['rand read 4K QD32', 'randread', '4k', 32],
  ['rand write 4K QD32', 'randwrite', '4k', 32],
];

function startServer(side, sock) {
  const [cmd, ...args] =
    side.kind === 'nbdx'
      ? [process.execPath, NBDX, '-f', '-U', sock, ...side.args]
      : ['nbdkit', '-f', '-U', sock, ...side.args];
  const child = spawn(cmd, args, { env: { ...ENV, ...side.env }, stdio: ['ignore', 'ignore', 'inherit'] });
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const poll = setInterval(() => {
      if (fs.existsSync(sock)) {
        clearInterval(poll);
        resolve(child);
      } else if (Date.now() - t0 > 10000 || child.exitCode !== null) {
        clearInterval(poll);
        child.kill();
        reject(new Error(`${cmd} ${args.join(' ')} did not start`));
      }
    }, 20);
  });
}

async function stop(child) {
  if (child.exitCode !== null) return;
  const done = new Promise((r) => child.on('exit', r));
  child.kill('SIGTERM');
  await done;
}

function fio(uri, rw, bs, qd, size) {
  const out = execFileSync(
    'fio',
    [
      '--name=job', '--ioengine=nbd', `--uri=${uri}`, `--rw=${rw}`, `--bs=${bs}`, `--iodepth=${qd}`,
      `--size=${size}`, '--time_based', `--runtime=${SECONDS}`, '--ramp_time=1', '--output-format=json',
      '--randrepeat=0', '--norandommap',
    ],
    { env: ENV, encoding: 'utf8', maxBuffer: 64 << 20 },
  );
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const side = rw.includes('read') ? job.read : job.write;
  return { mibs: side.bw / 1024, iops: side.iops };
}

/** Write the whole disk once so that reads see data, not holes, on both sides. */
function prefill(uri) {
  execFileSync('fio', ['--name=fill', '--ioengine=nbd', `--uri=${uri}`, '--rw=write', '--bs=1m', '--iodepth=8', '--size=1g'], {
    env: ENV,
    stdio: 'ignore',
  });
}

function nbdcopyTime(src, dst) {
  const t0 = process.hrtime.bigint();
  execFileSync('nbdcopy', [src, dst], { env: ENV, stdio: 'inherit' });
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

async function runSide(side, scenario, dir, label) {
  const sock = path.join(dir, `${label}.sock`);
  const child = await startServer(side, sock);
  const uri = `nbd+unix:///?socket=${sock}`;
  const results = {};
  try {
    if (scenario.prepare) await scenario.prepare(uri, ENV);
    else if (side.prefill !== false) prefill(uri);
    for (const [name, rw, bs, qd] of FIO_JOBS) results[name] = fio(uri, rw, bs, qd, scenario.size);
    const img = path.join('/dev/shm', `nbdx-bench-${process.pid}.img`);
    execFileSync('truncate', ['-s', '0', img]);
    // nbdcopy into the export needs a source of the same size: copy out first, then back in.
    results['nbdcopy out (1 GiB, s)'] = { secs: nbdcopyTime(uri, img) };
    results['nbdcopy in (1 GiB, s)'] = { secs: nbdcopyTime(img, uri) };
    fs.rmSync(img, { force: true });
  } finally {
    await stop(child);
  }
  return results;
}

function table(name, a, b, labels) {
  const rows = [[`${name}`, labels[0], labels[1], 'ratio']];
  for (const k of Object.keys(a)) {
    const x = a[k];
    const y = b[k];
    if ('secs' in x) {
      rows.push([k, `${x.secs.toFixed(2)} s`, `${y.secs.toFixed(2)} s`, (y.secs / x.secs).toFixed(2)]);
    } else {
      // Small-block jobs are counted in IOPS, big ones in MiB/s.
      const fmt = (r) => (k.includes('4K') ? `${(r.iops / 1000).toFixed(1)}k IOPS` : `${r.mibs.toFixed(0)} MiB/s`);
      rows.push([k, fmt(x), fmt(y), (x.iops / y.iops).toFixed(2)]);
    }
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => '| ' + r.map((c, i) => c.padEnd(widths[i])).join(' | ') + ' |').join('\n');
}

async function main() {
  const wanted = process.argv.slice(2).length ? process.argv.slice(2) : ['memory'];
  for (const w of wanted) if (!scenarios[w]) throw new Error(`unknown scenario ${w}; known: ${Object.keys(scenarios).join(', ')}`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-bench-'));
  console.log(`nbdx bench: ${SECONDS} s per fio job, ${os.cpus().length} CPUs, node ${process.version}`);
  console.log('ratio = nbdx / reference (higher is better for nbdx; for nbdcopy times, reference time / nbdx time)\n');
  try {
    for (const name of wanted) {
      const s = scenarios[name];
      const ctx = s.setup ? await s.setup(dir, ENV) : {};
      try {
        const a = await runSide(s.nbdx(ctx), s, dir, `${name}-a`);
        const b = await runSide(s.reference(ctx), s, dir, `${name}-b`);
        console.log(table(name, a, b, [s.labels[0], s.labels[1]]));
        console.log();
      } finally {
        await s.teardown?.(ctx);
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err.message);
  process.exit(1);
});
