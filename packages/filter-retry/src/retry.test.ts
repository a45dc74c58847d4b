/**
 * The retry filter's rules, on the backend chain with a plugin that fails on command: how many
 * times, how long apart, reopening, read-only after a failure, errors that are not retried, and
 * flush after a reopen.
 */
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { Backend, Errno, NbdError, definePlugin } from '@nbdx/server';
import { nbdxBin, needNbdx, run } from '@nbdx/testkit';
import { createRetryFilter } from './index.js';

/** A 1 MiB disk that fails the next `fail` requests (with `errno`) and counts opens and closes. */
function failingPlugin() {
  const state = { fail: 0, errno: Errno.EIO as number, opens: 0, closes: 0, openFailures: 0, readonlyOpens: 0, calls: 0 };
  const disk = Buffer.alloc(1 << 20);
  const plugin = definePlugin({
    apiVersion: 2,
    name: 'failing',
    open: (readonly: boolean) => {
      if (state.openFailures > 0) {
        state.openFailures -= 1;
        throw new NbdError(Errno.EIO, 'cannot connect');
      }
      state.opens += 1;
      if (readonly) state.readonlyOpens += 1;
      return { gen: state.opens };
    },
    close: () => void (state.closes += 1),
    getSize: () => disk.length,
    pread: (_h, buf, offset) => {
      state.calls += 1;
      if (state.fail > 0) {
        state.fail -= 1;
        throw new NbdError(state.errno, 'injected failure');
      }
      disk.copy(buf, 0, offset, offset + buf.length);
    },
    pwrite: (_h, buf, offset) => {
      state.calls += 1;
      if (state.fail > 0) {
        state.fail -= 1;
        throw new NbdError(state.errno, 'injected failure');
      }
      disk.set(buf, offset);
    },
    flush: () => {},
  });
  return { plugin, state, disk };
}

async function chain(config: Record<string, string>, readonly = false) {
  const p = failingPlugin();
  const b = new Backend(p.plugin, [createRetryFilter()]);
  await b.load();
  for (const [k, v] of Object.entries(config)) await b.config(k, v);
  await b.configComplete();
  const ctx = await b.open(readonly, '', false);
  return { ...p, ctx };
}

describe('retry filter', () => {
  it('reopens the layer below and retries until the request succeeds', async () => {
    const { ctx, state, disk } = await chain({ 'retry-delay': '10ms' });
    disk.fill(9, 0, 4096);
    state.fail = 3;
    const buf = Buffer.alloc(4096);
    await ctx.pread(buf, 0);
    expect(buf.every((b) => b === 9)).toBe(true);
    expect(state.calls).toBe(4);
    // one open per failure, each old context closed
    expect(state.opens).toBe(4);
    expect(state.closes).toBe(3);
    await ctx.close();
    expect(state.closes).toBe(4);
  });

  it('gives up after retries=N with the last error, waiting longer each time (exponential)', async () => {
    const { ctx, state } = await chain({ retries: '3', 'retry-delay': '20ms' });
    state.fail = 100;
    const t0 = Date.now();
    await expect(ctx.pread(Buffer.alloc(512), 0)).rejects.toThrow(/injected failure/);
    const took = Date.now() - t0;
    expect(state.calls).toBe(4);
    // 20 + 40 + 80 ms
    expect(took).toBeGreaterThanOrEqual(135);
    await ctx.close();
  });

  it('retry-exponential=no waits the same time before every retry', async () => {
    const { ctx, state } = await chain({ retries: '3', 'retry-delay': '20ms', 'retry-exponential': 'no' });
    state.fail = 100;
    const t0 = Date.now();
    await expect(ctx.pread(Buffer.alloc(512), 0)).rejects.toThrow(/injected failure/);
    const took = Date.now() - t0;
    expect(took).toBeGreaterThanOrEqual(55);
    expect(took).toBeLessThan(135);
    await ctx.close();
  });

  it('does not retry errors another attempt cannot change', async () => {
    for (const errno of [Errno.EPERM, Errno.EINVAL, Errno.ENOSPC, Errno.ENOTSUP]) {
      const { ctx, state } = await chain({ 'retry-delay': '1ms' });
      state.fail = 1;
      state.errno = errno;
      await expect(ctx.pwrite(Buffer.alloc(512), 0)).rejects.toMatchObject({ errno });
      expect(state.calls).toBe(1);
      expect(state.opens).toBe(1);
      await ctx.close();
    }
  });

  it('retry-readonly=yes reopens read-only: the read succeeds, writes then fail with EPERM', async () => {
    const { ctx, state } = await chain({ 'retry-delay': '1ms', 'retry-readonly': 'yes' });
    state.fail = 1;
    await ctx.pread(Buffer.alloc(512), 0);
    expect(state.readonlyOpens).toBe(1);
    await expect(ctx.pwrite(Buffer.alloc(512), 0)).rejects.toMatchObject({ errno: Errno.EPERM });
    await ctx.close();
  });

  it('a flush after a reopen that happened with unflushed writes fails once with EIO', async () => {
    const { ctx, state } = await chain({ 'retry-delay': '1ms' });
    await ctx.pwrite(Buffer.alloc(512, 1), 0);
    state.fail = 1;
    await ctx.pread(Buffer.alloc(512), 0); // reopens below: the write above may be lost
    await expect(ctx.flush()).rejects.toThrow(/may be lost/);
    await ctx.flush();
    // Flushed writes are safe across a reopen.
    state.fail = 1;
    await ctx.pread(Buffer.alloc(512), 0);
    await ctx.flush();
    await ctx.close();
  });

  it('retries a failed open', async () => {
    const p = failingPlugin();
    p.state.openFailures = 2;
    const b = new Backend(p.plugin, [createRetryFilter()]);
    await b.load();
    await b.config('retry-delay', '1ms');
    const ctx = await b.open(false, '', false);
    expect(p.state.opens).toBe(1);
    await ctx.close();
  });

  it('bad parameters are refused with one clear message', async () => {
    const b = new Backend(failingPlugin().plugin, [createRetryFilter()]);
    await b.load();
    await expect(b.config('retries', '-1')).rejects.toThrow(/retries: '-1' is not a whole number/);
    await expect(b.config('retry-delay', 'soon')).rejects.toThrow(/retry-delay/);
    await expect(b.config('retry-readonly', 'maybe')).rejects.toThrow(/retry-readonly/);
  });
});

describe.skipIf(!needNbdx())('retry filter: bad command lines', () => {
  for (const arg of ['retries=lots', 'retry-delay=-1', 'retry-exponential=sometimes']) {
    it(`${arg}: one line, exit 1`, async () => {
      const r = await run(process.execPath, [nbdxBin(), '-f', '-U', '/nonexistent/never.sock', '--filter=retry', 'memory', '1M', arg], {
        cwd: path.resolve(__dirname, '../../..'),
      });
      expect(r.code).toBe(1);
      const lines = r.stderr.trim().split('\n');
      expect(lines).toHaveLength(1);
      expect(lines[0]).toContain(arg.split('=')[0]);
    });
  }
});
