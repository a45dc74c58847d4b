/**
 * End to end: the delay filter over the memory plugin, driven by nbdsh (libnbd), nbdinfo and
 * qemu-io, and by the nbdx CLI for SIGTERM.
 */
import { join, resolve } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import {
  exportSize,
  nbdshOk,
  needNbdx,
  needTools,
  qemuIo,
  removeDir,
  spawnTool,
  startCli,
  tmpDir,
  waitFor,
  type BackgroundTool,
} from '@nbdx/testkit';
import { createDelayFilter } from './index.js';

const tools = needTools('nbdsh', 'nbdinfo', 'qemu-io');

type Server = Awaited<ReturnType<typeof serve>>;

function delayed(config: Array<[string, string]>): Promise<Server> {
  return serve({
    plugin: createMemoryPlugin(),
    filters: [createDelayFilter()],
    config: [['size', '1M'], ...config],
    error: () => {},
  });
}

/** Run a Python snippet in nbdsh against `uri`; returns its stdout. */
function nbdsh(uri: string, script: string): Promise<string> {
  return nbdshOk(uri, script, { baseAllocation: true });
}

/** Start nbdsh in the background; `done` resolves with its output (stdout and stderr) when it exits. */
function nbdshBackground(uri: string, script: string): BackgroundTool {
  return spawnTool('nbdsh', ['--base-allocation', '-u', uri, '-c', script]);
}

/** Time (seconds) of each named libnbd call, measured inside nbdsh. */
const TIMER = `
import time, json
def timed(f, *a):
    t = time.monotonic()
    try:
        f(*a)
        r = 'ok'
    except nbd.Error as e:
        r = 'errno %s' % e.errnum
    return [round(time.monotonic() - t, 3), r]
`;

describe.skipIf(!tools)('delay filter', () => {
  it('8 parallel reads with rdelay=200ms finish in about one delay, not eight', async () => {
    const s = await delayed([['rdelay', '200ms']]);
    try {
      const out = await nbdsh(
        s.uri,
        `
import time
bufs = [nbd.Buffer(4096) for _ in range(8)]
t = time.monotonic()
for i in range(8):
    h.aio_pread(bufs[i], i * 4096)
while h.aio_in_flight() > 0:
    h.poll(-1)
par = time.monotonic() - t
t = time.monotonic()
h.pread(4096, 0)
one = time.monotonic() - t
print(par, one)
`,
      );
      const [par, one] = out.trim().split(/\s+/).map(Number) as [number, number];
      expect(one).toBeGreaterThanOrEqual(0.19);
      expect(par).toBeGreaterThanOrEqual(0.19);
      expect(par).toBeLessThan(0.6); // eight in a row would take 1.6 s
    } finally {
      await s.close();
    }
  });

  it('wdelay delays writes, zeroes and trims; reads and flushes are not delayed', async () => {
    const s = await delayed([['wdelay', '0.2']]);
    try {
      const out = await nbdsh(
        s.uri,
        TIMER +
          `print(json.dumps({
  'write': timed(h.pwrite, b'x' * 4096, 0),
  'zero': timed(h.zero, 4096, 0),
  'trim': timed(h.trim, 4096, 0),
  'read': timed(h.pread, 4096, 0),
  'flush': timed(h.flush),
}))`,
      );
      const t = JSON.parse(out) as Record<string, [number, string]>;
      for (const k of ['write', 'zero', 'trim']) {
        expect(t[k]![1]).toBe('ok');
        expect(t[k]![0]).toBeGreaterThanOrEqual(0.19);
      }
      expect(t.read![0]).toBeLessThan(0.15);
      expect(t.flush![0]).toBeLessThan(0.15);
    } finally {
      await s.close();
    }
  });

  it('each delay-* key delays only its own request type', async () => {
    const s = await delayed([
      ['delay-read', '0'],
      ['delay-write', '150ms'],
      ['delay-zero', '0'],
      ['delay-trim', '0'],
      ['delay-extents', '150ms'],
      ['delay-cache', '150ms'],
    ]);
    try {
      const out = await nbdsh(
        s.uri,
        TIMER +
          `print(json.dumps({
  'write': timed(h.pwrite, b'x' * 4096, 0),
  'extents': timed(h.block_status, 4096, 0, lambda *a: 0),
  'cache': timed(h.cache, 4096, 0),
  'zero': timed(h.zero, 4096, 0),
  'trim': timed(h.trim, 4096, 0),
  'read': timed(h.pread, 4096, 0),
}))`,
      );
      const t = JSON.parse(out) as Record<string, [number, string]>;
      for (const k of ['write', 'extents', 'cache']) expect(t[k]![0]).toBeGreaterThanOrEqual(0.14);
      for (const k of ['zero', 'trim', 'read']) expect(t[k]![0]).toBeLessThan(0.12);
      for (const k of Object.keys(t)) expect(t[k]![1]).toBe('ok');
    } finally {
      await s.close();
    }
  });

  it('delay-fast-zero: true (default) delays fast zeroes; false fails them at once with ENOTSUP', async () => {
    const script =
      TIMER +
      `print(json.dumps({
  'can': h.can_fast_zero(),
  'fast': timed(h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO),
  'slow': timed(h.zero, 4096, 0),
}))`;
    const a = await delayed([['delay-zero', '200ms']]);
    try {
      const t = JSON.parse(await nbdsh(a.uri, script));
      expect(t.can).toBe(true);
      expect(t.fast[1]).toBe('ok');
      expect(t.fast[0]).toBeGreaterThanOrEqual(0.19);
    } finally {
      await a.close();
    }
    const b = await delayed([['delay-zero', '200ms'], ['delay-fast-zero', 'false']]);
    try {
      const t = JSON.parse(await nbdsh(b.uri, script));
      expect(t.can).toBe(true);
      expect(t.fast[1]).toBe('errno 95'); // ENOTSUP
      expect(t.fast[0]).toBeLessThan(0.1);
      expect(t.slow[1]).toBe('ok');
      expect(t.slow[0]).toBeGreaterThanOrEqual(0.19);
    } finally {
      await b.close();
    }
  });

  it('a delayed request blocks neither other requests on its connection nor other connections', async () => {
    const s = await delayed([['delay-extents', '30']]);
    try {
      const bg = nbdshBackground(
        s.uri,
        `
import time
h.aio_block_status(4096, 0, lambda *a: 0)
t = time.monotonic()
h.pwrite(b'y' * 4096, 8192)
h.pread(4096, 0)
print('same-connection', round(time.monotonic() - t, 3), flush=True)
time.sleep(30)
`,
      );
      // Another connection reads and writes while the first still waits.
      await waitFor(() => s.connectionCount === 1, 5000, 'the first client');
      const t = Date.now();
      await qemuIo(s.uri, 'write -P 0x42 0 64k', 'read -P 0x42 0 64k');
      expect(Date.now() - t).toBeLessThan(2000);
      bg.child.kill('SIGKILL');
      const { output: out } = await bg.done;
      const m = /same-connection ([\d.]+)/.exec(out);
      expect(m, out).not.toBeNull();
      expect(Number(m![1])).toBeLessThan(0.5);
    } finally {
      await s.close();
    }
  });

  it('a client that disconnects mid-delay does not hold the server', async () => {
    const s = await delayed([['rdelay', '30']]);
    try {
      const bg = nbdshBackground(
        s.uri,
        `
import os, time
for i in range(4):
    h.aio_pread(nbd.Buffer(4096), i * 4096)
time.sleep(0.3)
os._exit(0)
`,
      );
      await waitFor(() => s.connectionCount === 1, 5000, 'the client to connect');
      await bg.done;
      // The four reads were cut short: the connection is gone long before 30 s.
      const gone = await waitFor(() => s.connectionCount === 0, 3000, 'the connection to close');
      expect(gone).toBeLessThan(1000);
      const t = Date.now();
      await s.close();
      expect(Date.now() - t).toBeLessThan(1000);
    } finally {
      await s.close();
    }
  });

  it('close() during a long delay shuts down promptly; the waiting request fails with ESHUTDOWN', async () => {
    const log: string[] = [];
    const s = await serve({
      plugin: createMemoryPlugin(),
      filters: [createDelayFilter()],
      config: [['size', '1M'], ['rdelay', '30']],
      debug: (m) => log.push(m),
      error: (m) => log.push(m),
    });
    const bg = nbdshBackground(
      s.uri,
      `
try:
    h.pread(4096, 0)
    print('read finished')
except nbd.Error as e:
    print('read failed errno', e.errnum, e.string)
`,
    );
    await waitFor(() => s.connectionCount === 1, 5000, 'the client to connect');
    await new Promise((r) => setTimeout(r, 300));
    const t = Date.now();
    await s.close();
    expect(Date.now() - t).toBeLessThan(2000);
    const { output: out } = await bg.done;
    expect(out).toMatch(/read failed errno 108/); // ESHUTDOWN
    expect(log.join('\n')).toMatch(/delay cut short: the server is shutting down \(ESHUTDOWN\)/);
  });

  it('delay-open delays the handshake; shutdown during it is prompt', async () => {
    const s = await delayed([['delay-open', '300ms']]);
    try {
      const t = Date.now();
      expect(await exportSize(s.uri)).toBe(1024 * 1024);
      expect(Date.now() - t).toBeGreaterThanOrEqual(290);
    } finally {
      await s.close();
    }
    const slow = await delayed([['delay-open', '30']]);
    const bg = spawnTool('nbdinfo', ['--size', slow.uri]);
    await waitFor(() => slow.connectionCount === 1, 5000, 'the client to connect');
    await new Promise((r) => setTimeout(r, 200));
    const t = Date.now();
    await slow.close();
    expect(Date.now() - t).toBeLessThan(2000);
    expect((await bg.done).code).not.toBe(0);
  });

  it('delay-close applies to clients that disconnect cleanly, not to ones that vanish', async () => {
    const s = await delayed([['delay-close', '600ms']]);
    try {
      // Clean: NBD_CMD_DISC, then libnbd waits for the server to close. The close delay runs
      // before the server closes the socket, so the client sees it (as with nbdkit).
      const t0 = Date.now();
      const clean = nbdshBackground(s.uri, 'h.pread(512, 0)\nh.shutdown()');
      expect((await clean.done).code).toBe(0);
      expect(Date.now() - t0).toBeGreaterThanOrEqual(600);
      const cleanGone = await waitFor(() => s.connectionCount === 0, 5000, 'the clean connection to close');
      expect(cleanGone).toBeLessThan(300);

      const abrupt = nbdshBackground(s.uri, 'import os\nh.pread(512, 0)\nos._exit(0)');
      expect((await abrupt.done).code).toBe(0);
      const abruptGone = await waitFor(() => s.connectionCount === 0, 5000, 'the abrupt connection to close');
      expect(abruptGone).toBeLessThan(300);
    } finally {
      await s.close();
    }
  });

  it('close() while a clean client\'s delay-close runs is prompt too', async () => {
    const s = await delayed([['delay-close', '30']]);
    const clean = nbdshBackground(s.uri, 'h.pread(512, 0)\nh.shutdown()');
    await waitFor(() => s.connectionCount === 1, 5000, 'the client to connect');
    await new Promise((r) => setTimeout(r, 500)); // it has sent DISC; the close delay runs
    expect(s.connectionCount).toBe(1);
    const t = Date.now();
    await s.close();
    expect(Date.now() - t).toBeLessThan(1000);
    expect((await clean.done).code).toBe(0);
  });

  it('refuses bad values at configuration time', async () => {
    await expect(delayed([['rdelay', 'soon']])).rejects.toThrow(/rdelay: could not parse 'soon' as a duration/);
  });
});

// The CLI, as a service manager would run it: SIGTERM during a long delay exits promptly.
describe.skipIf(!tools || !needNbdx())('delay filter under the nbdx CLI', () => {
  let dir: string;
  beforeAll(() => {
    dir = tmpDir('nbdx-delay-');
  });
  afterAll(() => removeDir(dir));

  it('SIGTERM during a long read delay shuts the server down promptly', async () => {
    const sock = join(dir, 'nbd.sock');
    const server = await startCli(['-U', sock, '--filter=delay', 'memory', '1M', 'rdelay=30'], { cwd: resolve(__dirname, '../../..') });
    try {
      const bg = nbdshBackground(server.uri, `
try:
    h.pread(4096, 0)
except nbd.Error as e:
    print('read failed errno', e.errnum)
`);
      await new Promise((r) => setTimeout(r, 500));
      const t = Date.now();
      await server.stop('SIGTERM');
      expect(Date.now() - t).toBeLessThan(3000);
      const { output: out } = await bg.done;
      expect(out).toMatch(/read failed errno 108|read failed errno/);
    } finally {
      server.child.kill('SIGKILL');
    }
  });
});
