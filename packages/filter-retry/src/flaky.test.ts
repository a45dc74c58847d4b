/**
 * End to end with real servers: `nbdx --filter=retry http …` in front of an https server that
 * cuts connections mid-body and answers 503 at random, and `nbdx --filter=retry nbd …` in front
 * of an upstream NBD server that is killed and restarted during the copy. qemu-img convert must
 * finish with no error and qemu-img compare must find the copy identical.
 *
 * NBDX_HTTP_BIG=1 runs the same with a 1 GiB image and prints the figures (not run routinely).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  makeTestCerts,
  needNbdx,
  needTools,
  removeDir,
  run,
  runOk,
  startCli,
  startRangeServer,
  tmpDir,
  waitForSocket,
  type CliServer,
  type RangeServer,
  type TestCerts,
} from '@nbdx/testkit';

const have = needTools('qemu-img', 'openssl') && needNbdx();
const MiB = 1024 * 1024;
const BIG = process.env.NBDX_HTTP_BIG === '1';
const SIZE = BIG ? 1024 * MiB : 32 * MiB;
const ROOT = path.resolve(__dirname, '../../..');

const cleanups: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

let dir: string;
let certs: TestCerts;
let image: string;
beforeAll(async () => {
  dir = tmpDir('nbdx-retry-');
  if (!have) return;
  certs = await makeTestCerts(dir);
  image = path.join(dir, 'disk.img');
  // Random data in 4 MiB blocks with every fourth block a hole.
  const fd = fs.openSync(image, 'w');
  fs.ftruncateSync(fd, SIZE);
  for (let off = 0; off < SIZE; off += 4 * MiB) {
    if ((off / (4 * MiB)) % 4 !== 3) fs.writeSync(fd, randomBytes(4 * MiB), 0, 4 * MiB, off);
  }
  fs.closeSync(fd);
}, 300_000);
afterAll(() => {
  removeDir(dir);
});

async function https(options: { dropRate?: number; errorRate?: number } = {}): Promise<RangeServer> {
  const srv = await startRangeServer({ file: image, tls: { key: certs.key, cert: certs.cert }, ...options });
  cleanups.push(() => srv.close());
  return srv;
}

async function nbdx(args: string[]): Promise<CliServer> {
  const sock = path.join(dir, `nbdx-${Date.now()}-${Math.random().toString(36).slice(2)}.sock`);
  const cli = await startCli(['-U', sock, ...args], { cwd: ROOT });
  cleanups.push(() => cli.stop());
  return cli;
}

/** qemu-img convert from `uri`, then compare; returns seconds taken by the convert. */
async function copyAndCompare(uri: string, extra: string[] = []): Promise<{ seconds: number; code: number; stderr: string }> {
  const out = path.join(dir, 'out.raw');
  try {
    const t0 = process.hrtime.bigint();
    const r = await run('qemu-img', ['convert', ...extra, '-f', 'raw', '-O', 'raw', uri, out], { timeout: 600_000 });
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    if (r.code === 0) await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, out], { timeout: 600_000 });
    return { seconds, code: r.code, stderr: r.stderr };
  } finally {
    fs.rmSync(out, { force: true });
  }
}

function figures(label: string, seconds: number, srv?: RangeServer): void {
  if (!BIG) return;
  const mbs = SIZE / MiB / seconds;
  const load = fs.readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  const extra = srv ? `, ${srv.stats.ranged} ranged GETs answered, ${srv.stats.drops} connections cut, ${srv.stats.errors} 503s` : '';
  process.stdout.write(`FIGURES ${label}: ${SIZE / MiB} MiB in ${seconds.toFixed(2)} s = ${mbs.toFixed(1)} MiB/s${extra}; load ${load}\n`);
}

const TIMEOUT = BIG ? 900_000 : 60_000;

describe.skipIf(!have)('retry filter over http, against a flaky https server', () => {
  it(
    'the baseline: nbdx http over https copies the image identically',
    async () => {
      const srv = await https();
      const cli = await nbdx(['http', srv.url, `cafile=${certs.caFile}`]);
      const r = await copyAndCompare(cli.uri);
      expect(r.code, r.stderr).toBe(0);
      figures('https, no faults, nbdx http', r.seconds, srv);
    },
    TIMEOUT,
  );

  it(
    'without the filter the flaky server makes the copy fail (the faults are real)',
    async () => {
      const srv = await https({ dropRate: 0.05, errorRate: 0.05 });
      srv.failNext(1, 'drop');
      const cli = await nbdx(['http', srv.url, `cafile=${certs.caFile}`]);
      const r = await copyAndCompare(cli.uri);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/Input\/output error/);
    },
    TIMEOUT,
  );

  it(
    'with --filter=retry the copy through cut connections and 503s completes with no error',
    async () => {
      const srv = await https({ dropRate: 0.05, errorRate: 0.05 });
      // Besides the random faults, the first reads surely meet some of each.
      srv.failNext(2, 'drop');
      srv.failNext(2, 'status');
      const cli = await nbdx(['--filter=retry', 'http', srv.url, `cafile=${certs.caFile}`, 'retry-delay=20ms', 'retries=8']);
      const r = await copyAndCompare(cli.uri);
      expect(r.code, r.stderr).toBe(0);
      expect(srv.stats.drops).toBeGreaterThan(0);
      expect(srv.stats.errors).toBeGreaterThan(0);
      // Each failure was logged by the filter, naming the layer that failed.
      expect(cli.stderr()).toMatch(/retry: warning: read \d+ bytes at \d+ failed \(.*(503|connection lost|other side closed|socket)/i);
      figures('https, 5% cut + 5% 503, nbdx --filter=retry http', r.seconds, srv);
    },
    TIMEOUT,
  );
});

describe.skipIf(!have)('retry filter over nbd, with the upstream server killed and restarted', () => {
  it(
    'qemu-img convert completes: requests that failed are retried on a fresh upstream connection',
    async () => {
      const up = path.join(dir, 'upstream.sock');
      const upstreamArgs = ['-U', up, '-r', '--filter=delay', 'file', image, 'rdelay=100ms'];
      const first = await startCli(upstreamArgs, { cwd: ROOT });
      let second: CliServer | null = null;
      cleanups.push(async () => {
        await first.stop('SIGKILL');
        await second?.stop();
      });
      const cli = await nbdx(['--filter=retry', 'nbd', `socket=${up}`, 'retry-delay=200ms', 'retries=6']);
      // One request at a time, 100 ms each: the copy takes over a second, and the kill lands in it.
      const copying = copyAndCompare(cli.uri, ['-m', '1']);
      // Mid-copy: the upstream dies without a word, then comes back on the same socket.
      await new Promise((r) => setTimeout(r, 300));
      await first.stop('SIGKILL');
      fs.rmSync(up, { force: true });
      await new Promise((r) => setTimeout(r, 400));
      second = await startCli(upstreamArgs, { cwd: ROOT });
      await waitForSocket(up);
      const r = await copying;
      expect(r.code, r.stderr).toBe(0);
      expect(cli.stderr()).toMatch(/retry: warning: .*failed/);
    },
    TIMEOUT,
  );
});
