#!/usr/bin/env node
/**
 * CPU time per call of SparseArray read/write for two builds of the plugin, in-process (no
 * sockets, no server): what the plugin itself costs a request. Every measurement runs in a fresh
 * process (so one build's garbage and freed memory do not land on the other's account), the
 * builds alternating, and counts process CPU time (user + system: first touches of memory are
 * page faults), which a busy machine disturbs less than wall time.
 *
 *   node packages/plugin-memory/bench/ops.mjs OLD/index.js NEW/index.js [--rounds 7] [CASE...]
 *
 * Prints the median and range of nanoseconds per call for each case and build.
 */
import { execFileSync } from 'node:child_process';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const GiB = 2 ** 30;

function rng(s) {
  let x = s >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

/** Each case: set-up (not timed), then `n` calls (timed). */
const CASES = {
  'write 256K sequential, 1 GiB into empty space': { n: GiB / 2 ** 18, setup: () => {}, run: (a, i) => a.write(B256, i * 2 ** 18) },
  'write 256K sequential, 1 GiB over data': { n: GiB / 2 ** 18, setup: fill, run: (a, i) => a.write(B256, i * 2 ** 18) },
  'read 256K sequential, 1 GiB of data': { n: GiB / 2 ** 18, setup: fill, run: (a, i) => a.read(OUT256, i * 2 ** 18) },
  'write 4K random, over data': { n: 200_000, setup: fill, run: (a, _i, r) => a.write(B4, in1G(r)) },
  'read 4K random, data': { n: 200_000, setup: fill, run: (a, _i, r) => a.read(OUT4, in1G(r)) },
  'write 4K sequential, 1 GiB into empty space': { n: GiB / 4096, setup: () => {}, run: (a, i) => a.write(B4, i * 4096) },
  'write 4K random, 1M into an empty GiB': { n: 1_000_000, setup: () => {}, run: (a, _i, r) => a.write(B4, in1G(r)) },
  'write 4K random, 64Ki scattered over 1 TiB': {
    n: 65_536,
    setup: () => {},
    run: (a, _i, r) => a.write(B4, (((r() & 0xff) * 2 ** 32 + r()) % 2 ** 28) * 4096),
  },
};
const B4 = Buffer.alloc(4096, 0x3c);
const B256 = Buffer.alloc(2 ** 18, 0xa5);
const OUT4 = Buffer.alloc(4096);
const OUT256 = Buffer.alloc(2 ** 18);
const in1G = (r) => (r() % (GiB / 4096)) * 4096;
/** The first GiB written whole with 256 KiB writes (every page dense). */
function fill(a) {
  for (let off = 0; off < GiB; off += B256.length) a.write(B256, off);
}

const args = process.argv.slice(2);
if (args[0] === '--child') {
  // One measurement: --child BUILD CASE SEED
  const [, build, name, seed] = args;
  const { SparseArray } = await import(pathToFileURL(path.resolve(build)).href);
  const c = CASES[name];
  const a = new SparseArray(2 ** 40);
  c.setup(a);
  const r = rng(Number(seed));
  const t0 = process.cpuUsage();
  for (let i = 0; i < c.n; i++) c.run(a, i, r);
  const used = process.cpuUsage(t0);
  console.log(((used.user + used.system) * 1000) / c.n);
} else {
  const ri = args.indexOf('--rounds');
  const ROUNDS = ri >= 0 ? Number(args.splice(ri, 2)[1]) : 7;
  const builds = args.slice(0, 2);
  const names = args.length > 2 ? args.slice(2) : Object.keys(CASES);
  const self = fileURLToPath(import.meta.url);
  const results = builds.map(() => ({}));
  for (let round = 0; round < ROUNDS; round++) {
    for (const name of names) {
      for (const b of round % 2 ? [1, 0] : [0, 1]) {
        const out = execFileSync(process.execPath, [self, '--child', builds[b], name, String(round + 1)], { encoding: 'utf8' });
        (results[b][name] ??= []).push(Number(out));
      }
    }
    process.stderr.write(`round ${round + 1}/${ROUNDS}\n`);
  }
  const median = (xs) => [...xs].sort((x, y) => x - y)[xs.length >> 1];
  const cell = (xs) => `${median(xs).toFixed(0)} (${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)})`;
  console.log(`${ROUNDS} rounds, a fresh process per measurement, node ${process.version}; CPU ns per call: median (min–max)`);
  console.log(`| case | ${builds.map((b) => path.relative(process.cwd(), path.resolve(b))).join(' | ')} | ratio of medians |`);
  console.log('|---|---|---|---|');
  for (const name of names) {
    const [x, y] = results.map((res) => res[name]);
    console.log(`| ${name} | ${cell(x)} | ${cell(y)} | ${(median(y) / median(x)).toFixed(2)} |`);
  }
}
