#!/usr/bin/env node
/**
 * pnpm bench [SCENARIO...] [--rounds N] [--seconds N] [--jobs a,b] [--out FILE] — nbdx against
 * its reference (nbdkit, or nbdx without a feature) in the same run: every job of jobs.mjs, on
 * both servers alternately, for several rounds; medians, spreads and ratios printed as markdown
 * and written as JSON. See bench/README.md.
 */
import { spawn, execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { JOBS, NBDCOPY_4X64, metricOf, selectJobs } from './jobs.mjs';
import { fmtValue, ratioOf, ratioTable, scenarioTable, summarize } from './report.mjs';
import { scenarios } from './scenarios.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const NBDX = path.resolve(here, '../packages/nbdx/bin/nbdx.js');
const ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH}` };
const GiB = 2 ** 30;
const MiB = 2 ** 20;

const HELP = `Usage: pnpm bench [SCENARIO...] [options]     (or: node bench/run.mjs ...)

Runs every job (nbdcopy in/out/fresh, fio 1 and 4 connections, QD1/QD16/QD32) against nbdx and
its reference, alternating, for several rounds; prints medians, spread and ratios as markdown
and writes the raw samples as JSON. Scenarios: ${Object.keys(scenarios).join(', ')} (default: memory).

Options (environment variable in brackets):
  --rounds N      alternating rounds; each job runs once per side per round [BENCH_ROUNDS, default 4]
  --seconds N     length of each fio job, after the ramp [BENCH_SECONDS, default 3]
  --ramp N        fio ramp time, not measured [BENCH_RAMP, default 1]
  --size SIZE     disk size, e.g. 1G, 256M (multiple of 1M, at least 16M) [BENCH_SIZE, default 1G]
  --jobs A,B      only the jobs whose id or label contains one of these substrings [BENCH_JOBS]
  --out FILE      where the JSON goes [BENCH_OUT, default bench/results/<date>-<scenarios>.json]
  --list          list scenarios and jobs and exit
  --help          this text

Duration, default settings: 10 fio jobs × (3 + 1) s × 2 sides × 4 rounds = 320 s, plus the
nbdcopy jobs (5 × 2 × 4 copies of 1 GiB, about 1 s each) and start-up: about 6-7 min per scenario.
Figures are only worth keeping from a quiet machine.`;

// ---------------------------------------------------------------------------------------------
// Settings

function parseSize(s) {
  const m = /^(\d+)([kmgt]?)i?b?$/i.exec(String(s).trim());
  if (!m) throw new Error(`bad size ${s}`);
  return Number(m[1]) * 1024 ** ' kmgt'.indexOf((m[2] || ' ').toLowerCase());
}

function positive(name, v, { integer = true, zero = false } = {}) {
  const n = Number(v);
  if (!Number.isFinite(n) || (integer && !Number.isInteger(n)) || n < 0 || (!zero && n === 0)) {
    throw new Error(`${name} must be a ${integer ? 'whole ' : ''}number${zero ? '' : ' above 0'}, not ${v}`);
  }
  return n;
}

function settingsFrom(argv) {
  const { values: o, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      rounds: { type: 'string' },
      seconds: { type: 'string' },
      ramp: { type: 'string' },
      size: { type: 'string' },
      jobs: { type: 'string' },
      out: { type: 'string' },
      list: { type: 'boolean' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  const env = process.env;
  let rounds = o.rounds ?? env.BENCH_ROUNDS;
  if (rounds === undefined && env.BENCH_REPEAT !== undefined) {
    console.error('BENCH_REPEAT is now BENCH_ROUNDS (medians of the rounds, no longer the best of them)');
    rounds = env.BENCH_REPEAT;
  }
  const names = positionals.length ? positionals : ['memory'];
  for (const n of names) {
    if (!scenarios[n]) throw new Error(`unknown scenario ${n}; known: ${Object.keys(scenarios).join(', ')}`);
  }
  const size = parseSize(o.size ?? env.BENCH_SIZE ?? '1G');
  if (size % MiB || size < 16 * MiB) throw new Error('--size must be a multiple of 1M and at least 16M');
  const jobFilter = (o.jobs ?? env.BENCH_JOBS ?? '').split(',').map((s) => s.trim()).filter(Boolean);
  const jobs = selectJobs(jobFilter);
  if (!jobs.length) throw new Error(`no job matches ${jobFilter.join(',')}; see --list`);
  return {
    help: o.help,
    list: o.list,
    scenarios: names,
    rounds: positive('--rounds', rounds ?? 4),
    seconds: positive('--seconds', o.seconds ?? env.BENCH_SECONDS ?? 3, { integer: false }),
    ramp: positive('--ramp', o.ramp ?? env.BENCH_RAMP ?? 1, { integer: false, zero: true }),
    size,
    jobFilter,
    jobs,
    out: o.out ?? env.BENCH_OUT ?? null,
  };
}

// ---------------------------------------------------------------------------------------------
// Processes and temporary files: everything started or made is listed here, so that an error,
// Ctrl-C or SIGTERM still stops the servers and removes the files.

const live = new Set();
const tempPaths = new Set();

function cleanupNow() {
  for (const child of live) {
    try {
      child.kill('SIGKILL');
    } catch {}
  }
  for (const p of tempPaths) fs.rmSync(p, { recursive: true, force: true });
}

/** Set by main: writes what has been measured so far. */
let onSignal = null;

for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => {
    console.error(`\n${sig}: stopping servers, removing temporary files`);
    try {
      onSignal?.(sig);
    } catch (err) {
      console.error(`could not write the results: ${err.message}`);
    }
    cleanupNow();
    process.exit(128 + os.constants.signals[sig]);
  });
}

/**
 * Start a command; `done` resolves with its exit and output (stdout kept if asked, the last 4 KiB
 * of stderr always). Past `timeoutMs` it is killed and `timedOut` is set.
 */
function start(cmd, args, { env = ENV, keepStdout = false, timeoutMs = 0, onStderr } = {}) {
  const child = spawn(cmd, args, { env, stdio: ['ignore', keepStdout ? 'pipe' : 'ignore', 'pipe'] });
  live.add(child);
  let stdout = '';
  let stderr = '';
  let timedOut = false;
  if (keepStdout) child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => {
    stderr = (stderr + d).slice(-4096);
    onStderr?.(d);
  });
  const timer = timeoutMs
    ? setTimeout(() => {
        timedOut = true;
        child.kill('SIGKILL');
      }, timeoutMs)
    : null;
  const done = new Promise((resolve) => {
    child.on('error', (err) => (stderr += `\n${err.message}`));
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      live.delete(child);
      resolve({ code, signal, stdout, stderr, timedOut });
    });
  });
  return { child, done };
}

function failure(what, r) {
  const why = r.timedOut ? 'timed out' : r.signal ? `killed by ${r.signal}` : `exit status ${r.code}`;
  const tail = r.stderr.trim().split('\n').slice(-3).join(' / ');
  return new Error(`${what}: ${why}${tail ? `: ${tail}` : ''}`);
}

async function check(cmd, args, opts) {
  const r = await start(cmd, args, opts).done;
  if (r.code !== 0) throw failure(cmd, r);
  return r;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------------------------
// Server CPU time: utime + stime of the whole process (all its threads) from /proc/PID/stat.

let CLK_TCK = 100;
try {
  CLK_TCK = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
} catch {}

function cpuSeconds(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command name, which is in parentheses and may hold spaces: state is
    // field 3, utime 14, stime 15.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch {
    return null;
  }
}

/** CPU seconds between two readings, in whole clock ticks (no float dust in the JSON). */
const cpuDelta = (a, b) => (a === null || b === null ? null : Math.round((b - a) * CLK_TCK) / CLK_TCK);

// ---------------------------------------------------------------------------------------------
// Servers

class Server {
  constructor(name, label, spec, sock) {
    this.name = name; // 'nbdx' or 'reference'
    this.label = label;
    this.spec = spec;
    this.sock = sock;
    this.uri = `nbd+unix:///?socket=${sock}`;
    this.child = null;
    this.multiConn = null;
    const [cmd, ...args] =
      spec.kind === 'nbdx'
        ? [process.execPath, NBDX, '-f', '-U', sock, ...spec.args]
        : ['nbdkit', '-f', '-U', sock, ...spec.args];
    this.cmd = cmd;
    this.args = args;
  }

  get alive() {
    return this.child !== null && this.child.exitCode === null && this.child.signalCode === null;
  }

  get commandLine() {
    const env = Object.entries(this.spec.env ?? {}).map(([k, v]) => `${k}=${v} `);
    return `${env.join('')}${this.spec.kind === 'nbdx' ? 'nbdx' : 'nbdkit'} -f -U SOCKET ${this.spec.args.join(' ')}`;
  }

  async start() {
    fs.rmSync(this.sock, { force: true });
    const prefix = `[${this.label}] `;
    this.proc = start(this.cmd, this.args, {
      env: { ...ENV, ...this.spec.env },
      onStderr: (d) => process.stderr.write(prefix + String(d).replace(/\n(?=.)/g, `\n${prefix}`)),
    });
    this.child = this.proc.child;
    const t0 = Date.now();
    for (;;) {
      if (!this.alive) throw failure(`${this.label} did not start`, await this.proc.done);
      if (fs.existsSync(this.sock)) {
        // Listening, not only bound: a connection succeeds.
        const r = await start('nbdinfo', ['--can', 'connect', this.uri]).done;
        if (r.code === 0) break;
      }
      if (Date.now() - t0 > 30000) {
        await this.stop();
        throw new Error(`${this.label} did not start listening within 30 s`);
      }
      await sleep(25);
    }
    const mc = await start('nbdinfo', ['--can', 'multi-conn', this.uri]).done;
    this.multiConn = mc.code === 0;
  }

  async stop() {
    const child = this.child;
    if (!child) return;
    this.child = null;
    if (child.exitCode === null && child.signalCode === null) {
      child.kill('SIGTERM');
      const killer = setTimeout(() => child.kill('SIGKILL'), 10000);
      await this.proc.done;
      clearTimeout(killer);
    }
    fs.rmSync(this.sock, { force: true });
  }
}

// ---------------------------------------------------------------------------------------------
// The source of every copy in: non-zero data throughout (nbdcopy would skip zeros), in /dev/shm.

const sources = new Map();

function sourceImage(size) {
  if (sources.has(size)) return sources.get(size);
  const file = path.join('/dev/shm', `nbdx-bench-${process.pid}-src-${size}.img`);
  tempPaths.add(file);
  const block = randomBytes(MiB);
  const fd = fs.openSync(file, 'w');
  try {
    for (let off = 0; off < size; off += MiB) {
      block.writeUInt32LE(off / MiB, 0); // no two MiB alike
      fs.writeSync(fd, block, 0, MiB, off);
    }
  } finally {
    fs.closeSync(fd);
  }
  sources.set(size, file);
  return file;
}

const copyTimeout = (size) => 120000 + (size / GiB) * 120000;

/** Write the whole disk once, so reads see data and later writes overwrite it. */
async function prefill(server, size) {
  await check('nbdcopy', [sourceImage(size), server.uri], { timeoutMs: copyTimeout(size) });
}

/**
 * What nbdcopy really uses with these flags against this server (it lowers connections to its
 * thread count, and to 1 without multi-conn): its --verbose summary line.
 */
async function nbdcopyEffective(server, flags, size) {
  let carry = '';
  let found = null;
  const p = start('nbdcopy', ['--verbose', ...flags, server.uri, 'null:'], {
    timeoutMs: copyTimeout(size),
    onStderr: (d) => {
      if (found) return;
      carry = (carry + d).slice(-8192);
      const m = /nbdcopy: connections=(\d+) requests=(\d+) threads=(\d+)/.exec(carry);
      if (m) found = { connections: Number(m[1]), requests: Number(m[2]), threads: Number(m[3]) };
    },
  });
  const r = await p.done;
  if (r.code !== 0) throw failure('nbdcopy --verbose', r);
  return found;
}

// ---------------------------------------------------------------------------------------------
// Jobs

async function runFio(job, server, settings) {
  const perJob = job.numjobs > 1 && !job.rw.startsWith('rand') ? settings.size / job.numjobs : settings.size;
  const args = [
    '--name=job', '--ioengine=nbd', `--uri=${server.uri}`, `--rw=${job.rw}`, `--bs=${job.bs}`,
    `--iodepth=${job.qd}`, `--numjobs=${job.numjobs}`, '--group_reporting', `--size=${perJob}`,
    // Sequential jobs on several connections each take their own part of the disk.
    ...(perJob !== settings.size ? [`--offset_increment=${perJob}`] : []),
    '--time_based', `--runtime=${Math.round(settings.seconds * 1000)}ms`, `--ramp_time=${Math.round(settings.ramp * 1000)}ms`,
    '--output-format=json', '--randrepeat=0', '--norandommap',
  ];
  const pid = server.child.pid;
  // CPU is counted from the end of the ramp (when fio starts measuring) until fio has exited.
  let cpu0 = settings.ramp ? null : cpuSeconds(pid);
  const p = start('fio', args, { keepStdout: true, timeoutMs: (settings.seconds + settings.ramp) * 1000 + 60000 });
  const timer = settings.ramp ? setTimeout(() => (cpu0 = cpuSeconds(pid)), settings.ramp * 1000) : null;
  const r = await p.done;
  clearTimeout(timer);
  const cpu1 = cpuSeconds(pid);
  if (r.code !== 0) throw failure('fio', r);
  const out = JSON.parse(r.stdout.slice(r.stdout.indexOf('{')));
  const j = out.jobs[0];
  const side = job.rw.includes('read') ? j.read : j.write;
  if (!side.io_bytes) throw new Error('fio moved no data');
  const mibs = (side.bw_bytes ?? side.bw * 1024) / MiB;
  const { unit } = metricOf(job);
  const cpu = cpuDelta(cpu0, cpu1);
  return {
    value: unit === 'IOPS' ? side.iops : mibs,
    iops: side.iops,
    mibs,
    bytes: side.io_bytes,
    secs: side.runtime / 1000,
    latUsMean: side.clat_ns ? side.clat_ns.mean / 1000 : null,
    cpuSecs: cpu,
    cpuPerGiB: cpu === null ? null : cpu / (side.io_bytes / GiB),
  };
}

async function runNbdcopy(job, server, settings) {
  const src = job.dir === 'in' ? sourceImage(settings.size) : server.uri;
  const dst = job.dir === 'in' ? server.uri : 'null:';
  const pid = server.child.pid;
  const cpu0 = cpuSeconds(pid);
  const t0 = process.hrtime.bigint();
  const r = await start('nbdcopy', [...job.flags, src, dst], { timeoutMs: copyTimeout(settings.size) }).done;
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu1 = cpuSeconds(pid);
  if (r.code !== 0) throw failure('nbdcopy', r);
  const cpu = cpuDelta(cpu0, cpu1);
  return {
    value: secs,
    secs,
    mibs: settings.size / MiB / secs,
    bytes: settings.size,
    cpuSecs: cpu,
    cpuPerGiB: cpu === null ? null : cpu / (settings.size / GiB),
  };
}

const fmtSample = (job, s) =>
  `${fmtValue(s.value, metricOf(job).unit)}${s.cpuPerGiB == null ? '' : `, CPU ${s.cpuPerGiB.toFixed(2)} s/GiB`}`;

// ---------------------------------------------------------------------------------------------
// A scenario: both servers side by side; each round runs every job on one then the other, nbdx
// first in rounds 1, 3, ... and the reference first in rounds 2, 4, ..., so drift falls on both.

async function runScenario(name, settings, dir, log, publish) {
  const scenario = scenarios[name];
  const base = { size: settings.size, dir, env: ENV };
  const ctx = { ...base, ...(scenario.setup ? await scenario.setup(base) : {}) };
  for (const p of ctx.tempPaths ?? []) tempPaths.add(p);
  for (const h of ctx.helpers ?? []) live.add(h);
  const result = {
    scenario: name,
    labels: scenario.labels,
    sides: {},
    nbdcopy: {},
    events: [],
    jobs: settings.jobs.map((job) => ({
      id: job.id,
      label: job.label,
      kind: job.kind,
      params: job.kind === 'fio'
        ? { rw: job.rw, bs: job.bs, iodepth: job.qd, numjobs: job.numjobs, connections: job.numjobs }
        : { direction: job.dir, flags: job.flags, fresh: job.fresh },
      ...metricOf(job),
      samples: { nbdx: [], reference: [] },
      summary: null,
    })),
  };
  publish(result); // in the JSON from now on, even if the run is interrupted
  const servers = [scenario.nbdx(ctx), scenario.reference(ctx)].map(
    (spec, i) => new Server(i ? 'reference' : 'nbdx', scenario.labels[i], spec, path.join(dir, `${name}-${i}.sock`)),
  );
  const event = (server, what) => {
    result.events.push({ side: server.name, what, pid: server.child?.pid ?? null, at: new Date().toISOString() });
    log(`  ${server.label}: ${what} (pid ${server.child?.pid})`);
  };
  /** Start (or restart after a crash) and write the disk once. */
  const bringUp = async (server, why) => {
    await server.stop();
    await server.start();
    await prefill(server, settings.size);
    event(server, why);
  };
  try {
    for (const s of servers) {
      await bringUp(s, 'started and written once');
      result.sides[s.name] = { label: s.label, command: s.commandLine, multiConn: s.multiConn };
    }
    // What nbdcopy made of its flags, against each server (also a first warm-up read).
    if (settings.jobs.some((j) => j.kind === 'nbdcopy')) {
      const probe = (s, flags) => nbdcopyEffective(s, flags, settings.size).catch((err) => ({ error: err.message }));
      for (const s of servers) {
        result.nbdcopy[s.name] = {
          '4x64': { flags: NBDCOPY_4X64, effective: await probe(s, NBDCOPY_4X64) },
          defaults: { flags: [], effective: await probe(s, []) },
        };
      }
    }
    for (let round = 0; round < settings.rounds; round++) {
      const order = round % 2 ? [1, 0] : [0, 1];
      log(`${name}: round ${round + 1}/${settings.rounds} (${servers[order[0]].label} first)`);
      for (const [ji, job] of settings.jobs.entries()) {
        for (const i of order) {
          const server = servers[i];
          const sample = { round: round + 1, ok: false };
          try {
            if (!server.alive) {
              await bringUp(server, 'was not running; restarted and written again');
              sample.afterRestart = true;
            }
            if (job.fresh) {
              await server.stop();
              await scenario.reset?.(ctx, i);
              await server.start();
            }
            const run = job.kind === 'fio' ? runFio : runNbdcopy;
            Object.assign(sample, await run(job, server, settings));
            sample.ok = true;
            log(`  ${job.label} — ${server.label}: ${fmtSample(job, sample)}`);
          } catch (err) {
            sample.error = err.message;
            const gone = server.proc?.child;
            if (gone && (gone.exitCode !== null || gone.signalCode !== null)) {
              sample.error += ` (the server had exited: ${gone.signalCode ?? `status ${gone.exitCode}`})`;
            }
            log(`  ${job.label} — ${server.label}: FAILED: ${sample.error}`);
          }
          result.jobs[ji].samples[server.name].push(sample);
        }
      }
    }
  } finally {
    for (const s of servers) await s.stop();
    try {
      await scenario.teardown?.(ctx);
    } finally {
      for (const h of ctx.helpers ?? []) {
        h.kill();
        live.delete(h);
      }
      for (const p of ctx.tempPaths ?? []) {
        fs.rmSync(p, { force: true });
        tempPaths.delete(p);
      }
    }
  }
}

/** Medians, spreads and ratio of every job, from the samples so far. */
function summarizeJobs(result) {
  for (const job of result.jobs) {
    const nbdx = summarize(job.samples.nbdx);
    const reference = summarize(job.samples.reference);
    job.summary = { nbdx, reference, ratio: ratioOf(nbdx, reference, job.higherIsBetter) };
    job.failed = nbdx.failed + reference.failed > 0;
  }
}

// ---------------------------------------------------------------------------------------------

function version(cmd, args = ['--version']) {
  try {
    return execFileSync(cmd, args, { env: ENV, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).split('\n')[0].trim();
  } catch {
    return null;
  }
}

function machine() {
  const cpus = os.cpus();
  let git = null;
  try {
    const head = execFileSync('git', ['rev-parse', 'HEAD'], { cwd: here, encoding: 'utf8' }).trim();
    const status = execFileSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: here, encoding: 'utf8' });
    const dirty = status.trim() !== '';
    git = { head, dirty };
  } catch {}
  return {
    hostname: os.hostname(),
    cpus: cpus.length,
    cpuModel: cpus[0]?.model ?? null,
    memoryBytes: os.totalmem(),
    kernel: `${os.type()} ${os.release()}`,
    arch: os.arch(),
    node: process.version,
    nbdkit: version('nbdkit'),
    nbdcopy: version('nbdcopy'),
    fio: version('fio'),
    git,
    loadavgStart: os.loadavg(),
  };
}

const loadavg = () => os.loadavg().map((l) => l.toFixed(1)).join(' ');

function defaultOut(names, date) {
  const stamp = date.toISOString().replace(/\.\d+Z$/, '').replace(/:/g, '-');
  return path.join(here, 'results', `${stamp}-${names.join('+')}.json`);
}

async function main() {
  let settings;
  try {
    settings = settingsFrom(process.argv.slice(2));
  } catch (err) {
    console.error(`${err.message}\n\nTry: pnpm bench --help`);
    return 2;
  }
  if (settings.help) {
    console.log(HELP);
    return 0;
  }
  if (settings.list) {
    console.log('Scenarios:');
    for (const [n, s] of Object.entries(scenarios)) console.log(`  ${n.padEnd(22)} ${s.labels[0]} vs ${s.labels[1]}`);
    console.log('Jobs:');
    for (const j of JOBS) console.log(`  ${j.id.padEnd(22)} ${j.label}`);
    return 0;
  }
  for (const tool of ['fio', 'nbdcopy', 'nbdinfo', 'nbdkit']) {
    if (!version(tool)) {
      console.error(`${tool} not found; it is needed (see bench/README.md)`);
      return 1;
    }
  }

  const startedAt = new Date();
  const out = path.resolve(settings.out ?? defaultOut(settings.scenarios, startedAt));
  const fioJobs = settings.jobs.filter((j) => j.kind === 'fio').length;
  const copies = settings.jobs.length - fioJobs;
  const fioSecs = fioJobs * (settings.seconds + settings.ramp) * 2 * settings.rounds;
  const doc = {
    schema: 'nbdx-bench/1',
    startedAt: startedAt.toISOString(),
    finishedAt: null,
    complete: false,
    interrupted: null,
    argv: process.argv.slice(2),
    machine: machine(),
    settings: {
      scenarios: settings.scenarios,
      rounds: settings.rounds,
      seconds: settings.seconds,
      ramp: settings.ramp,
      sizeBytes: settings.size,
      jobFilter: settings.jobFilter,
      order: 'every job on both servers back to back; nbdx first in odd rounds (1, 3, ...), the reference first in even ones',
      transport: 'Unix socket',
      cpu:
        `server process utime+stime from /proc/PID/stat (all threads), in ticks of 1/${CLK_TCK} s, per GiB moved; ` +
        'fio: from the end of the ramp to fio exit',
      spreadPct: 'half of (max - min) over the median, in %',
      ratio: 'nbdx median / reference median; for times (nbdcopy), reference / nbdx: higher is better for nbdx',
    },
    results: [],
  };
  const log = (s) => console.log(s);
  log(
    `nbdx bench: ${settings.scenarios.join(', ')}; ${settings.jobs.length} jobs × ${settings.rounds} rounds × 2 sides; ` +
      `fio ${settings.seconds} s + ${settings.ramp} s ramp; disk ${settings.size / MiB} MiB; ` +
      `${doc.machine.cpus} CPUs, node ${process.version}, ${doc.machine.nbdkit}, load ${loadavg()}`,
  );
  log(`fio alone takes ${fioSecs} s per scenario, plus ${copies * 2 * settings.rounds} copies of the disk by nbdcopy`);
  log(`results: ${out}\n`);

  const write = () => {
    for (const r of doc.results) summarizeJobs(r);
    fs.mkdirSync(path.dirname(out), { recursive: true });
    fs.writeFileSync(out + '.tmp', JSON.stringify(doc, null, 2) + '\n');
    fs.renameSync(out + '.tmp', out);
  };

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-bench-'));
  tempPaths.add(dir);
  onSignal = (sig) => {
    doc.interrupted = sig;
    doc.machine.loadavgEnd = os.loadavg();
    write();
    console.error(`partial results written to ${out}`);
  };
  let status = 0;
  let current = null;
  try {
    for (const name of settings.scenarios) {
      try {
        current = null;
        await runScenario(name, settings, dir, log, (r) => doc.results.push((current = r)));
      } catch (err) {
        // The scenario could not start (setup, a server, the first write): say so, go on.
        log(`${name}: FAILED: ${err.message}`);
        if (current) current.error = err.message;
        else doc.results.push({ scenario: name, labels: scenarios[name].labels, error: err.message, jobs: [] });
        status = 1;
      }
      write();
    }
  } finally {
    cleanupNow();
  }
  doc.finishedAt = new Date().toISOString();
  doc.complete = true;
  doc.machine.loadavgEnd = os.loadavg();
  write();

  log(`\nload average now ${loadavg()} (on ${doc.machine.cpus} CPUs); figures are only worth keeping from a quiet machine`);
  log('ratio = nbdx / reference (higher is better for nbdx; for nbdcopy times, reference / nbdx)');
  log('± = half the range over the median\n');
  for (const r of doc.results) {
    if (r.error) log(`${r.scenario}: failed: ${r.error}\n`);
    if (r.jobs.some((j) => j.summary.nbdx.n + j.summary.reference.n)) log(scenarioTable(r) + '\n');
  }
  const done = doc.results.filter((r) => !r.error);
  if (done.length > 1) log(ratioTable(done) + '\n');
  const failedJobs = done.flatMap((r) => r.jobs.filter((j) => j.failed).map((j) => `${r.scenario}/${j.id}`));
  if (failedJobs.length) {
    log(`failed samples in: ${failedJobs.join(', ')} (see "error" in the JSON)`);
    status = 1;
  }
  const rel = path.relative(process.cwd(), out);
  log(`results written to ${rel.startsWith('..') ? out : rel}`);
  return status;
}

main().then(
  (status) => process.exit(status),
  (err) => {
    console.error(err.stack ?? err.message);
    cleanupNow();
    process.exit(1);
  },
);
