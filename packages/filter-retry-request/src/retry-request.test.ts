/**
 * The retry-request filter: single requests are tried again on the same context (never a
 * reopen), on the backend chain with a plugin that fails on command, and end to end in front of
 * a real https server that cuts connections and answers 503 at random.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Backend, Errno, NbdError, definePlugin } from '@nbdx/server';
import {
  makeTestCerts,
  nbdxBin,
  needNbdx,
  needTools,
  removeDir,
  run,
  runOk,
  startCli,
  startRangeServer,
  tmpDir,
  type TestCerts,
} from '@nbdx/testkit';
import { createRetryRequestFilter } from './index.js';

function failingPlugin() {
  const state = { fail: 0, errno: Errno.EIO as number, opens: 0, openFailures: 0, calls: 0 };
  const plugin = definePlugin({
    apiVersion: 2,
    name: 'failing',
    open: () => {
      if (state.openFailures > 0) {
        state.openFailures -= 1;
        throw new NbdError(Errno.EIO, 'cannot connect');
      }
      state.opens += 1;
      return {};
    },
    getSize: () => 1 << 20,
    pread: (_h, buf) => {
      state.calls += 1;
      if (state.fail > 0) {
        state.fail -= 1;
        throw new NbdError(state.errno, 'injected failure');
      }
      buf.fill(5);
    },
  });
  return { plugin, state };
}

async function backend(config: Record<string, string>) {
  const p = failingPlugin();
  const b = new Backend(p.plugin, [createRetryRequestFilter()]);
  await b.load();
  for (const [k, v] of Object.entries(config)) await b.config(k, v);
  await b.configComplete();
  return { ...p, b };
}

describe('retry-request filter', () => {
  it('retries a failed request on the same context, never reopening it', async () => {
    const { b, state } = await backend({ 'retry-request-delay': '5ms' });
    const ctx = await b.open(false, '', false);
    state.fail = 2;
    const buf = Buffer.alloc(512);
    await ctx.pread(buf, 0);
    expect(buf[0]).toBe(5);
    expect(state.calls).toBe(3);
    expect(state.opens).toBe(1);
    await ctx.close();
  });

  it('gives up after retry-request-retries=N with the last error; final errors are not retried', async () => {
    const { b, state } = await backend({ 'retry-request-delay': '5ms', 'retry-request-retries': '4' });
    const ctx = await b.open(false, '', false);
    state.fail = 100;
    await expect(ctx.pread(Buffer.alloc(512), 0)).rejects.toThrow(/injected failure/);
    expect(state.calls).toBe(5);
    state.fail = 1;
    state.errno = Errno.EPERM;
    state.calls = 0;
    await expect(ctx.pread(Buffer.alloc(512), 0)).rejects.toMatchObject({ errno: Errno.EPERM });
    expect(state.calls).toBe(1);
    await ctx.close();
  });

  it('retries opening, unless retry-request-open=false', async () => {
    const a = await backend({ 'retry-request-delay': '5ms' });
    a.state.openFailures = 2;
    await (await a.b.open(false, '', false)).close();
    expect(a.state.opens).toBe(1);
    const n = await backend({ 'retry-request-delay': '5ms', 'retry-request-open': 'false' });
    n.state.openFailures = 1;
    await expect(n.b.open(false, '', false)).rejects.toThrow(/cannot connect/);
  });

  it('bad parameters are refused with one clear message', async () => {
    const { b } = await backend({});
    await expect(b.config('retry-request-retries', 'many')).rejects.toThrow(/retry-request-retries: 'many'/);
    await expect(b.config('retry-request-open', 'perhaps')).rejects.toThrow(/retry-request-open/);
  });
});

const have = needTools('qemu-img', 'openssl') && needNbdx();
const MiB = 1024 * 1024;
const ROOT = path.resolve(__dirname, '../../..');

describe.skipIf(!have)('retry-request filter over http, against a flaky https server', () => {
  let dir: string;
  let certs: TestCerts;
  let image: string;
  const cleanups: (() => Promise<unknown>)[] = [];
  beforeAll(async () => {
    dir = tmpDir('nbdx-retry-request-');
    certs = await makeTestCerts(dir);
    image = path.join(dir, 'disk.img');
    fs.writeFileSync(image, randomBytes(16 * MiB));
  }, 60_000);
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });
  afterAll(() => removeDir(dir));

  it('qemu-img convert through cut connections and 503s completes, identical, on one context', async () => {
    const srv = await startRangeServer({ file: image, tls: { key: certs.key, cert: certs.cert }, dropRate: 0.1, errorRate: 0.1 });
    cleanups.push(() => srv.close());
    // Besides the random faults, the first reads surely meet one of each.
    srv.failNext(1, 'drop');
    srv.failNext(1, 'status');
    const cli = await startCli(
      ['-U', path.join(dir, 'rr.sock'), '--filter=retry-request', 'http', srv.url, `cafile=${certs.caFile}`, 'retry-request-delay=20ms', 'retry-request-retries=8'],
      { cwd: ROOT },
    );
    cleanups.push(() => cli.stop());
    const out = path.join(dir, 'out.raw');
    const r = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', cli.uri, out]);
    expect(r.code, r.stderr).toBe(0);
    await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, out]);
    expect(srv.stats.drops).toBeGreaterThan(0);
    expect(srv.stats.errors).toBeGreaterThan(0);
    expect(cli.stderr()).toMatch(/retry-request: warning: read \d+ bytes at \d+ failed/);
  }, 60_000);
});

describe.skipIf(!needNbdx())('retry-request filter: bad command lines', () => {
  for (const arg of ['retry-request-retries=-2', 'retry-request-delay=soon', 'retry-request-open=maybe']) {
    it(`${arg}: one line, exit 1`, async () => {
      const r = await run(process.execPath, [nbdxBin(), '-f', '-U', '/nonexistent/never.sock', '--filter=retry-request', 'memory', '1M', arg], {
        cwd: ROOT,
      });
      expect(r.code).toBe(1);
      const lines = r.stderr.trim().split('\n');
      expect(lines).toHaveLength(1);
      expect(lines[0]).toContain(arg.split('=')[0]);
    });
  }
});
