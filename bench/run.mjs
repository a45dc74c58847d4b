#!/usr/bin/env node
/**
 * pnpm bench [SCENARIO...] — nbdx against its reference (nbdkit, or nbdx without a filter) in the
 * same run, with fio's nbd engine and nbdcopy, printed as a table of ratios (nbdx / reference).
 *
 * Scenarios are listed in scenarios.mjs; the default is `memory`. BENCH_SECONDS sets the length
 * of each fio job (default 5), BENCH_REPEAT how many alternating rounds to keep the best of (1).
 */
import { spawn, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { scenarios } from './scenarios.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const NBDX = path.resolve(here, '../packages/nbdx/bin/nbdx.js');
const SECONDS = Number(process.env.BENCH_SECONDS ?? 5);
const REPEAT = Number(process.env.BENCH_REPEAT ?? 1);
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

/**
 * Both servers run at once and every job alternates between them, BENCH_REPEAT times (default 1),
 * keeping each side's best: on a busy 2-core machine that cancels most of the drift between runs.
 */
async function runScenario(scenario, ctx, dir, name) {
  const sides = [scenario.nbdx(ctx), scenario.reference(ctx)];
  const uris = [];
  const children = [];
  const results = [{}, {}];
  try {
    for (let i = 0; i < 2; i++) {
      const sock = path.join(dir, `${name}-${i}.sock`);
      children.push(await startServer(sides[i], sock));
      uris.push(`nbd+unix:///?socket=${sock}`);
      if (scenario.prepare) await scenario.prepare(uris[i], ENV);
      else prefill(uris[i]);
    }
    const better = (x, y) => (!x ? y : 'secs' in y ? (y.secs < x.secs ? y : x) : y.iops > x.iops ? y : x);
    for (let r = 0; r < REPEAT; r++) {
      for (const [job, rw, bs, qd] of FIO_JOBS) {
        for (let i = 0; i < 2; i++) results[i][job] = better(results[i][job], fio(uris[i], rw, bs, qd, scenario.size));
      }
      for (let i = 0; i < 2; i++) {
        const img = path.join('/dev/shm', `nbdx-bench-${process.pid}.img`);
        execFileSync('truncate', ['-s', '0', img]);
        // Copy out first, so the copy back in has a source of the right size.
        results[i]['nbdcopy out (1 GiB, s)'] = better(results[i]['nbdcopy out (1 GiB, s)'], { secs: nbdcopyTime(uris[i], img) });
        results[i]['nbdcopy in (1 GiB, s)'] = better(results[i]['nbdcopy in (1 GiB, s)'], { secs: nbdcopyTime(img, uris[i]) });
        fs.rmSync(img, { force: true });
      }
    }
  } finally {
    for (const c of children) await stop(c);
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
  console.log(`nbdx bench: ${SECONDS} s per fio job, best of ${REPEAT}, ${os.cpus().length} CPUs, node ${process.version}`);
  console.log('ratio = nbdx / reference (higher is better for nbdx; for nbdcopy times, reference time / nbdx time)\n');
  try {
    for (const name of wanted) {
      const s = scenarios[name];
      const ctx = s.setup ? await s.setup(dir, ENV) : {};
      try {
        const [a, b] = await runScenario(s, ctx, dir, name);
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
