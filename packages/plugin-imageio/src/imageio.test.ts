/**
 * End to end: the test imageio server ← this plugin (served in-process by serve()) ← the real NBD
 * tools (qemu-img, nbdinfo, nbdsh, nbdcopy).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import { createImageioPlugin } from './index.js';
import { TestImageioServer, type TestServerOptions } from './test-server.js';
import { NBDSH_HELPERS, nbdinfoMap, nbdshOk, nbdxBin, needNbdx, needTools, removeDir, run, runOk, tmpDir } from '@nbdx/testkit';
import { makeCerts, type TestCerts } from './test-tools.js';

const have = needTools('nbdsh', 'nbdinfo', 'qemu-img', 'nbdcopy', 'openssl');
const MiB = 1024 * 1024;
const haveCli = needNbdx();

type Nbd = Awaited<ReturnType<typeof serve>>;
const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

let dir: string;
beforeAll(() => {
  dir = tmpDir('nbdx-imageio-');
});
afterAll(() => {
  removeDir(dir);
});

/**
 * Run a Python script in nbdsh connected to `uri`, with testkit's NBDSH_HELPERS: `expect_err(name, f)`
 * checks that f() fails with that errno; `wait_all()` waits for every aio command. Fails unless the
 * script runs to its end.
 */
async function nbdsh(uri: string, body: string): Promise<string> {
  const out = await nbdshOk(uri, `${NBDSH_HELPERS}${body}\nprint("done")\n`);
  if (!out.includes('done')) throw new Error(`nbdsh script did not finish:\n${out}`);
  return out;
}

async function startImageio(options: TestServerOptions): Promise<TestImageioServer> {
  const srv = await TestImageioServer.start(options);
  cleanups.push(() => srv.close());
  return srv;
}

async function startNbd(config: [string, string][]): Promise<Nbd> {
  const nbd = await serve({ plugin: createImageioPlugin(), config });
  cleanups.push(() => nbd.close());
  return nbd;
}

async function setup(options: TestServerOptions, extra: [string, string][] = []): Promise<{ srv: TestImageioServer; nbd: Nbd }> {
  const srv = await startImageio(options);
  const nbd = await startNbd([['url', srv.url], ...extra]);
  return { srv, nbd };
}

/** A raw image with random data in some places and holes elsewhere, also as qcow2. */
function makeSourceImage(size: number): { raw: string; qcow2: Promise<string>; bytes: Buffer; dataRanges: [number, number][] } {
  const raw = path.join(dir, `src-${Date.now()}.raw`);
  const bytes = Buffer.alloc(size);
  const dataRanges: [number, number][] = [];
  // data at 0-1M, 5M-5.5M, 20M-23M, and the last 256K; everything else a hole
  for (const [o, l] of [
    [0, MiB],
    [5 * MiB, MiB / 2],
    [20 * MiB, 3 * MiB],
    [size - 256 * 1024, 256 * 1024],
  ] as [number, number][]) {
    randomBytes(l).copy(bytes, o);
    dataRanges.push([o, l]);
  }
  const fd = fs.openSync(raw, 'w');
  fs.ftruncateSync(fd, size);
  for (const [o, l] of dataRanges) fs.writeSync(fd, bytes, o, l, o);
  fs.closeSync(fd);
  const qcow2 = raw.replace(/\.raw$/, '.qcow2');
  return { raw, bytes, dataRanges, qcow2: runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]).then(() => qcow2) };
}

describe.skipIf(!have)('imageio plugin end to end', () => {
  it('qemu-img convert into it, qemu-img compare equal, nbdinfo --map shows the extents', async () => {
    const size = 32 * MiB;
    const { srv, nbd } = await setup({ size, reportHoles: true });
    const src = makeSourceImage(size);
    const qcow2 = await src.qcow2;
    // dirty the target first so that converting must also zero the holes
    srv.store.write(10 * MiB, Buffer.alloc(MiB, 0xaa));

    await runOk('qemu-img', ['convert', '-n', '-f', 'qcow2', '-O', 'raw', qcow2, nbd.uri]);
    const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, nbd.uri]);
    expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
    expect(cmp.code).toBe(0);
    // and the server holds exactly the source bytes
    expect(srv.store.read(0, size).equals(src.bytes)).toBe(true);

    // the writes went out as PUT flush=n with explicit ranges; holes as PATCH zero
    const puts = srv.requests.filter((r) => r.method === 'PUT');
    expect(puts.length).toBeGreaterThan(0);
    expect(puts.every((r) => r.url.endsWith('?flush=n') && r.status === 200)).toBe(true);
    expect(srv.requests.some((r) => r.method === 'PATCH' && (r.json as { op?: string })?.op === 'zero')).toBe(true);
    // qemu-img flushes at the end: nothing is left unflushed on any connection
    expect(srv.dirtyConnections()).toEqual([]);

    const map = await nbdinfoMap(nbd.uri);
    const covered = map.reduce((n, e) => n + e.length, 0);
    expect(covered).toBe(size);
    const typeAt = (off: number) => map.find((e) => e.offset <= off && off < e.offset + e.length)!.type;
    for (const [o, l] of src.dataRanges) {
      expect(typeAt(o)).toBe(0);
      expect(typeAt(o + l - 1)).toBe(0);
    }
    // holes read as zero and are unallocated (imageio "hole": true → NBD HOLE|ZERO)
    expect(typeAt(2 * MiB)).toBe(3);
    expect(typeAt(10 * MiB)).toBe(3);
    expect(typeAt(30 * MiB)).toBe(3);
    expect(map.find((e) => e.type === 3)!.description).toBe('hole,zero');
  });

  it('nbdcopy out of it reproduces the image', async () => {
    const size = 8 * MiB;
    const srv = await startImageio({ size });
    const data = randomBytes(3 * MiB);
    // written before the plugin starts: its extents cache is filled at start-up
    srv.store.write(MiB, data);
    const nbd = await startNbd([['url', srv.url]]);
    const out = path.join(dir, 'copy-out.raw');
    await runOk('nbdcopy', [nbd.uri, out]);
    const got = fs.readFileSync(out);
    expect(got.length).toBe(size);
    expect(got.subarray(MiB, 4 * MiB).equals(data)).toBe(true);
    expect(got.subarray(0, MiB).equals(Buffer.alloc(MiB))).toBe(true);
    // every GET was a Range request answered 206
    const gets = srv.requests.filter((r) => r.method === 'GET' && !r.url.endsWith('/extents'));
    expect(gets.length).toBeGreaterThan(0);
    expect(gets.every((r) => r.status === 206)).toBe(true);
  });
});

describe.skipIf(!have)('imageio plugin: flush, FUA and the connection pool', () => {
  it('FUA writes send flush=y, FUA zeroes "flush": true, other writes flush=n', async () => {
    const { srv, nbd } = await setup({ size: 4 * MiB });
    await nbdsh(
      nbd.uri,
      `
assert h.can_fua() and h.can_flush() and h.can_multi_conn() and h.can_zero()
assert not h.can_trim()
h.pwrite(b"a" * 4096, 0)
h.pwrite(b"b" * 4096, 8192, nbd.CMD_FLAG_FUA)
h.zero(65536, 65536, nbd.CMD_FLAG_FUA)
h.zero(65536, 131072)
`,
    );
    const puts = srv.requests.filter((r) => r.method === 'PUT').map((r) => r.url.split('?')[1]);
    expect(puts).toEqual(['flush=n', 'flush=y']);
    const zeroes = srv.requests.filter((r) => r.method === 'PATCH').map((r) => r.json);
    expect(zeroes).toEqual([
      { op: 'zero', offset: 65536, size: 65536, flush: true },
      { op: 'zero', offset: 131072, size: 65536, flush: false },
    ]);
  });

  it('NBD flush reaches every pooled connection that wrote, after in-flight writes, and only those', async () => {
    const { srv, nbd } = await setup({ size: 16 * MiB, writeDelayMs: 20 }, [['connections', '4']]);
    await nbdsh(
      nbd.uri,
      `
# 16 writes in flight at once spread over the pool's 4 connections, then one flush
for i in range(16):
    h.aio_pwrite(bytes([i]) * 65536, i * 65536)
wait_all()
h.flush()
`,
    );
    const wrote = srv.connections.filter((c) => c.writes > 0);
    expect(wrote.length).toBe(4);
    expect(srv.dirtyConnections()).toEqual([]);
    for (const c of wrote) expect(c.flushes).toBe(1);
    const flushesBefore = srv.requests.filter((r) => r.method === 'PATCH').length;
    expect(flushesBefore).toBe(4);

    // A write on one connection, then flush: only that connection is flushed.
    await nbdsh(nbd.uri, 'h.pwrite(b"x" * 512, 0)\nh.flush()\nh.flush()');
    const flushes = srv.requests.filter((r) => r.method === 'PATCH');
    expect(flushes.length).toBe(flushesBefore + 1);
    expect(srv.dirtyConnections()).toEqual([]);
  });

  it('the pool is min(max_readers, max_writers, connections=), shared by every NBD connection', async () => {
    const { srv, nbd } = await setup({ size: 16 * MiB, maxReaders: 8, maxWriters: 3, writeDelayMs: 20 }, [['connections', '6']]);
    const script = `
for i in range(12):
    h.aio_pwrite(bytes([i]) * 65536, i * 65536)
wait_all()
`;
    // two NBD clients at once
    await Promise.all([nbdsh(nbd.uri, script), nbdsh(nbd.uri, script)]);
    // connection 0 was the start-up OPTIONS probe
    const used = new Set(srv.requests.filter((r) => r.method !== 'OPTIONS').map((r) => r.conn));
    expect(used.size).toBe(3);
    expect(srv.requests.filter((r) => r.method === 'PUT').length).toBe(24);
  });

  it('a read-only ticket gives a read-only export', async () => {
    const srv = await startImageio({ size: 2 * MiB, ops: ['read'] });
    srv.store.write(0, Buffer.alloc(4096, 7));
    const nbd = await startNbd([['url', srv.url]]);
    await nbdsh(
      nbd.uri,
      `
assert h.is_read_only()
assert h.pread(4096, 0) == bytes([7]) * 4096
expect_err("EPERM", lambda: h.pwrite(b"x", 0))
`,
    );
    expect(srv.requests.some((r) => r.method === 'PUT')).toBe(false);
  });
});

describe.skipIf(!have)('imageio plugin: old servers', () => {
  for (const mode of ['old-405', 'old-204'] as const) {
    it(`${mode}: one connection, zero emulated by writes, reads back as zeroes`, async () => {
      const srv = await startImageio({ size: 4 * MiB, mode, hideSize: true, writeDelayMs: 5 });
      // the size cannot be learnt from such a server
      await expect(serve({ plugin: createImageioPlugin(), config: [['url', srv.url]] })).rejects.toThrow(/give size=SIZE/);
      const first = srv.requests.length;
      const nbd = await startNbd([
        ['url', srv.url],
        ['size', '4M'],
      ]);
      await nbdsh(
        nbd.uri,
        `
assert h.get_size() == 4 * 1024 * 1024
assert h.can_zero() and h.can_flush() and h.can_fua()
h.pwrite(b"\\xff" * (1024 * 1024), 0)
for i in range(8):
    h.aio_pread(nbd.Buffer(65536), i * 65536)
wait_all()
h.zero(300000, 1000)
buf = h.pread(1024 * 1024, 0)
assert buf[:1000] == b"\\xff" * 1000
assert buf[1000:301000] == bytes(300000)
assert buf[301000:] == b"\\xff" * (1024 * 1024 - 301000)
expect_err("ENOTSUP", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO))
h.flush()
`,
      );
      expect(srv.requests.some((r) => r.method === 'PATCH')).toBe(false);
      expect(srv.requests.some((r) => r.url.endsWith('/extents'))).toBe(false);
      // PUTs carry no flush= (the server flushes each one anyway)
      const puts = srv.requests.filter((r) => r.method === 'PUT');
      expect(puts.length).toBeGreaterThan(1);
      expect(puts.every((r) => !r.url.includes('?'))).toBe(true);
      expect(srv.store.read(1000, 300000).equals(Buffer.alloc(300000))).toBe(true);
      // max one connection at a time (the failed start-up above used its own)
      const used = new Set(srv.requests.slice(first).filter((r) => r.method !== 'OPTIONS').map((r) => r.conn));
      expect(used.size).toBe(1);
    });
  }

  it('a server without max_readers/max_writers gets one connection; without extents the size comes from Content-Range', async () => {
    const { srv, nbd } = await setup({ size: 3 * MiB, omitMax: true, features: ['zero', 'flush'], writeDelayMs: 10 });
    await nbdsh(
      nbd.uri,
      `
assert h.get_size() == 3 * 1024 * 1024
for i in range(8):
    h.aio_pwrite(b"z" * 4096, i * 4096)
wait_all()
`,
    );
    expect(new Set(srv.requests.filter((r) => r.method === 'PUT').map((r) => r.conn)).size).toBe(1);
    expect(srv.requests.some((r) => r.url.endsWith('/extents'))).toBe(false);
  });
});

describe.skipIf(!have)('imageio plugin: server behaviour a user meets', () => {
  it('an idle connection closed by the server does not fail the next request; its pending flush still happens', async () => {
    const { srv, nbd } = await setup({ size: 4 * MiB, inactivityTimeoutMs: 200 });
    await nbdsh(nbd.uri, 'h.pwrite(b"q" * 65536, 0)');
    await new Promise((r) => setTimeout(r, 500));
    expect(srv.connections.filter((c) => c.closedIdle).length).toBeGreaterThan(0);
    await nbdsh(nbd.uri, 'assert h.pread(65536, 0) == b"q" * 65536\nh.flush()');
    // the write's connection is gone; the flush went out on its replacement all the same
    const flushes = srv.requests.filter((r) => r.method === 'PATCH' && (r.json as { op?: string }).op === 'flush');
    expect(flushes.length).toBe(1);
    expect(srv.requests.every((r) => r.status === 200 || r.status === 206)).toBe(true);
  });

  it('a request whose connection is closed before any answer is retried once on a fresh connection', async () => {
    const { srv, nbd } = await setup({ size: 4 * MiB });
    srv.dropNext(1);
    await nbdsh(nbd.uri, 'h.pwrite(b"r" * 4096, 0)\nassert h.pread(4096, 0) == b"r" * 4096');
    expect(srv.requests.filter((r) => r.dropped).length).toBe(1);
    expect(srv.requests.filter((r) => r.method === 'PUT' && r.status === 200).length).toBe(1);
    // twice in a row: the error comes back (EIO), no hang, and the next request works again
    srv.dropNext(2);
    await nbdsh(nbd.uri, 'expect_err("EIO", lambda: h.pread(4096, 0))\nassert h.pread(4096, 0) == b"r" * 4096');
  });

  it('an expired ticket gives EPERM with the server message, not a hang', async () => {
    const errors: string[] = [];
    const srv = await startImageio({ size: 32 * MiB });
    const nbd = await serve({ plugin: createImageioPlugin(), config: [['url', srv.url]], error: (m) => errors.push(m) });
    cleanups.push(() => nbd.close());
    srv.expire();
    const t0 = Date.now();
    await nbdsh(
      nbd.uri,
      `
expect_err("EPERM", lambda: h.pread(4096, 0))
expect_err("EPERM", lambda: h.pwrite(b"x" * 4096, 0))
# a big write: the server answers 403 and closes without reading the body
expect_err("EPERM", lambda: h.pwrite(b"x" * (16 * 1024 * 1024), 0))
expect_err("EPERM", lambda: h.zero(4096, 0))
`,
    );
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(errors.join('\n')).toMatch(/expired/);
  });

  it('a server that never answers times out (timeout=) with EIO, and the pool recovers', async () => {
    const { srv, nbd } = await setup({ size: 4 * MiB }, [['timeout', '1']]);
    srv.stallNext(1);
    const t0 = Date.now();
    await nbdsh(nbd.uri, 'expect_err("EIO", lambda: h.pread(4096, 0))\nassert h.pread(4096, 0) == bytes(4096)');
    const took = Date.now() - t0;
    expect(took).toBeGreaterThan(900);
    expect(took).toBeLessThan(6000);
  });

  it('5xx → EIO with the status and body; 416 → ENOSPC for writes, EINVAL for reads', async () => {
    const errors: string[] = [];
    const srv = await startImageio({ size: 4 * MiB });
    // claim a bigger disk than the ticket allows, so the server answers 416 past 4M
    const nbd = await serve({
      plugin: createImageioPlugin(),
      config: [
        ['url', srv.url],
        ['size', '5M'],
      ],
      error: (m) => errors.push(m),
    });
    cleanups.push(() => nbd.close());
    srv.failNext(500, 'Server failed to perform the request, check logs');
    await nbdsh(
      nbd.uri,
      `
expect_err("EIO", lambda: h.pwrite(b"x" * 4096, 0))
h.pwrite(b"x" * 4096, 0)
expect_err("ENOSPC", lambda: h.pwrite(b"x" * 4096, 4 * 1024 * 1024 + 4096))
expect_err("ENOSPC", lambda: h.zero(4096, 4 * 1024 * 1024))
expect_err("EINVAL", lambda: h.pread(4096, 4 * 1024 * 1024))
assert h.pread(4096, 0) == b"x" * 4096
`,
    );
    const log = errors.join('\n');
    expect(log).toMatch(/500.*Server failed to perform the request/);
    expect(log).toMatch(/416/);
  });

  it('refuses to start with a clear error for a wrong ticket', async () => {
    const srv = await startImageio({ size: MiB });
    const bad = srv.url.replace(/[^/]+$/, 'nope');
    await expect(serve({ plugin: createImageioPlugin(), config: [['url', bad]] })).rejects.toThrow(/No such ticket nope/);
  });

  it('extents are fetched once, on a connection of their own, looked up from the cache, and refetched after a write or zero', async () => {
    const srv = await startImageio({ size: 8 * MiB });
    srv.store.write(MiB, Buffer.alloc(MiB, 1));
    const nbd = await startNbd([['url', srv.url]]);
    const fetches = () => srv.requests.filter((r) => r.url.endsWith('/extents'));
    expect(fetches().length).toBe(0); // the size comes from Content-Range, not the extents
    let map = await nbdinfoMap(nbd.uri);
    map = await nbdinfoMap(nbd.uri);
    expect(fetches().length).toBe(1);
    expect(map.map((e) => [e.offset, e.length, e.type])).toEqual([
      [0, MiB, 2],
      [MiB, MiB, 0],
      [2 * MiB, 6 * MiB, 2],
    ]);
    await nbdsh(nbd.uri, 'h.pwrite(b"d" * 65536, 4 * 1024 * 1024)');
    map = await nbdinfoMap(nbd.uri);
    expect(fetches().length).toBe(2);
    expect(map.find((e) => e.offset === 4 * MiB)).toMatchObject({ length: 65536, type: 0 });
    await nbdsh(nbd.uri, 'h.zero(1024 * 1024, 1024 * 1024)');
    map = await nbdinfoMap(nbd.uri);
    expect(fetches().length).toBe(3);
    expect(map[0]).toEqual({ offset: 0, length: 4 * MiB, type: 2, description: 'zero' });
    // each fetch had a connection to itself, used for nothing else
    const conns = fetches().map((r) => r.conn);
    expect(new Set(conns).size).toBe(3);
    for (const c of conns) expect(srv.requests.filter((r) => r.conn === c).length).toBe(1);
  });
});

describe.skipIf(!have)('imageio plugin: what the real daemon does (issue 17)', () => {
  it('proxy mode: after writes, nbdinfo --map and an nbdcopy read-back with block status see the data', async () => {
    const size = 16 * MiB;
    const { srv, nbd } = await setup({ size, proxy: true }, [['connections', '1']]);
    // The first map fills the cache of whichever proxy connection answers it: all zero.
    let map = await nbdinfoMap(nbd.uri);
    expect(map).toEqual([{ offset: 0, length: size, type: 2, description: 'zero' }]);
    const data = randomBytes(3 * MiB);
    const dataFile = path.join(dir, 'proxy-data.bin');
    fs.writeFileSync(dataFile, data);
    await nbdsh(nbd.uri, `h.pwrite(open(${JSON.stringify(dataFile)}, "rb").read(), 2 * 1024 * 1024)\nh.flush()`);
    fs.rmSync(dataFile);
    map = await nbdinfoMap(nbd.uri);
    const typeAt = (off: number) => map.find((e) => e.offset <= off && off < e.offset + e.length)!.type;
    expect(typeAt(2 * MiB)).toBe(0);
    expect(typeAt(5 * MiB - 1)).toBe(0);
    expect(typeAt(0)).toBe(2);
    expect(typeAt(8 * MiB)).toBe(2);
    // nbdcopy reads only what block status calls data: the written bytes must come back
    const out = path.join(dir, 'proxy-readback.raw');
    await runOk('nbdcopy', ['--destination-is-zero', nbd.uri, out]);
    const got = fs.readFileSync(out);
    expect(got.length).toBe(size);
    expect(got.subarray(2 * MiB, 5 * MiB).equals(data)).toBe(true);
    expect(got.subarray(0, 2 * MiB).equals(Buffer.alloc(2 * MiB))).toBe(true);
    fs.rmSync(out);
    // The test server really is stale per connection: a second extents request on one of its
    // connections would have returned the old list (the plugin never makes one).
    expect(srv.connections.every((c) => !c.staleExtents)).toBe(true);
    expect(srv.requests.filter((r) => r.url.endsWith('/extents')).length).toBe(2);
  });

  it('proxy mode test server: a kept-alive connection gets the stale list (what bit the old plugin)', async () => {
    const srv = await startImageio({ size: MiB, proxy: true });
    const get = async (agent: import('node:http').Agent) =>
      new Promise<string>((resolve, reject) => {
        const u = new URL(`${srv.url}/extents`);
        import('node:http').then(({ request }) => {
          const req = request(u, { agent }, (res) => {
            let body = '';
            res.on('data', (d) => (body += d));
            res.on('end', () => resolve(body));
          });
          req.on('error', reject);
          req.end();
        }, reject);
      });
    const { Agent } = await import('node:http');
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    try {
      const before = await get(agent);
      srv.store.write(0, Buffer.alloc(4096, 1));
      expect(await get(agent)).toBe(before); // same connection: stale
      const fresh = new Agent({ keepAlive: false });
      expect(await get(fresh)).not.toBe(before); // new connection: fresh
      fresh.destroy();
    } finally {
      agent.destroy();
    }
  });

  it('a 32 MiB ticket over a 64 MiB backend is served as 32 MiB', async () => {
    const { srv, nbd } = await setup({ size: 32 * MiB, backendSize: 64 * MiB });
    srv.store.write(40 * MiB, Buffer.alloc(MiB, 9)); // data past the ticket's end, in the backend
    await nbdsh(
      nbd.uri,
      `
assert h.get_size() == 32 * 1024 * 1024, h.get_size()
h.pwrite(b"e" * 4096, 32 * 1024 * 1024 - 4096)
assert h.pread(4096, 32 * 1024 * 1024 - 4096) == b"e" * 4096
`,
    );
    const map = await nbdinfoMap(nbd.uri);
    expect(map.reduce((n, e) => n + e.length, 0)).toBe(32 * MiB);
    expect(map[map.length - 1]).toMatchObject({ offset: 32 * MiB - 64 * 1024, length: 64 * 1024, type: 0 });
    const out = path.join(dir, 'small-ticket.raw');
    await runOk('nbdcopy', [nbd.uri, out]);
    expect(fs.statSync(out).size).toBe(32 * MiB);
    fs.rmSync(out);
    // nothing ever went past the ticket (no 416s)
    expect(srv.requests.every((r) => r.status !== 416)).toBe(true);
  });

  it('a trailing slash works; a wrong path says the URL does not name a ticket', async () => {
    const srv = await startImageio({ size: 2 * MiB });
    const nbd = await startNbd([['url', `${srv.url}/`]]);
    await nbdsh(nbd.uri, 'h.pwrite(b"s" * 4096, 0)\nassert h.pread(4096, 0) == b"s" * 4096\nassert h.get_size() == 2 * 1024 * 1024');
    expect(srv.requests.every((r) => r.status === 200 || r.status === 206)).toBe(true);
    const origin = srv.url.replace(/\/images\/.*/, '');
    // caught before any request
    for (const bad of [`${origin}/`, `${srv.url}/extents`, `${origin}/info/`]) {
      await expect(serve({ plugin: createImageioPlugin(), config: [['url', bad]] })).rejects.toThrow(/does not name an imageio ticket/);
    }
    // a path the server has no handler for (404) also says so, not "give size=SIZE"
    await expect(
      serve({ plugin: createImageioPlugin(), config: [['url', `${origin}/v1/images/${srv.ticket}`]] }),
    ).rejects.toThrow(/does not name an imageio ticket.*404/);
  });
});

describe.skipIf(!have)('imageio plugin: TLS and the Unix socket', () => {
  let certs: TestCerts;
  let certDir: string;
  beforeAll(async () => {
    certDir = tmpDir('nbdx-imageio-tls-');
    certs = await makeCerts(certDir);
  });
  // The directory holds a test CA's private key: never leave it behind.
  afterAll(() => fs.rmSync(certDir, { recursive: true, force: true }));

  it('https with cafile= works; without it the start-up error says what to do; insecure=true works', async () => {
    const srv = await startImageio({ size: 2 * MiB, tls: { key: certs.key, cert: certs.cert } });
    expect(srv.url).toMatch(/^https:/);
    const nbd = await startNbd([
      ['url', srv.url],
      ['cafile', certs.caFile],
    ]);
    await nbdsh(nbd.uri, 'h.pwrite(b"t" * 4096, 0)\nassert h.pread(4096, 0) == b"t" * 4096');

    await expect(serve({ plugin: createImageioPlugin(), config: [['url', srv.url]] })).rejects.toThrow(/cafile=FILE/);

    const nbd2 = await startNbd([
      ['url', srv.url],
      ['insecure', 'true'],
    ]);
    await nbdsh(nbd2.uri, 'assert h.pread(4096, 0) == b"t" * 4096');
  });

  it('unix-socket=auto uses an advertised socket path on this host, never keeps TCP', async () => {
    const sock = path.join(dir, 'imageio.sock');
    const srv = await startImageio({ size: 2 * MiB, unixSocket: sock });
    const nbd = await startNbd([['url', srv.url]]);
    await nbdsh(nbd.uri, 'h.pwrite(b"u" * 4096, 0)\nassert h.pread(4096, 0) == b"u" * 4096');
    const data = srv.requests.filter((r) => r.method !== 'OPTIONS');
    expect(data.length).toBeGreaterThan(0);
    expect(data.every((r) => r.transport === 'unix')).toBe(true);

    const first = srv.requests.length;
    const tcp = await startNbd([
      ['url', srv.url],
      ['unix-socket', 'never'],
    ]);
    await nbdsh(tcp.uri, 'assert h.pread(4096, 0) == b"u" * 4096');
    expect(srv.requests.slice(first).every((r) => r.transport === 'tcp')).toBe(true);
  });

  it('an advertised abstract socket is used for all data (OPTIONS, size, reads, writes, zero, flush, extents)', async () => {
    // Abstract names are shared by the whole host: a unique one per test.
    const name = `\0/nbdx-test/imageio-${process.pid}-${Date.now()}`;
    const srv = await startImageio({ size: 8 * MiB, unixSocket: name, tls: { key: certs.key, cert: certs.cert } });
    const debugLines: string[] = [];
    const nbd = await serve({
      plugin: createImageioPlugin(),
      config: [
        ['url', srv.url],
        ['cafile', certs.caFile],
      ],
      debug: (m: string) => debugLines.push(m),
    });
    cleanups.push(() => nbd.close());
    await nbdsh(
      nbd.uri,
      `
h.pwrite(b"a" * 65536, 0)
h.zero(65536, 65536)
assert h.pread(65536, 0) == b"a" * 65536
h.flush()
`,
    );
    await nbdinfoMap(nbd.uri);
    const out = path.join(dir, 'abstract-copy.raw');
    await runOk('nbdcopy', [nbd.uri, out]);
    fs.rmSync(out);
    // The listener has the name the daemon's (Python's) bind gives: exactly these bytes, shown
    // by the kernel as "@name" (a NUL-padded name, as Node 20 binds, would show trailing "@"s).
    const bound = fs.readFileSync('/proc/net/unix', 'utf8').split('\n').map((l) => l.trim().split(/\s+/).pop());
    expect(bound).toContain(`@${name.slice(1)}`);
    // one request over TLS: the OPTIONS that told us the socket; everything else on the socket
    expect(srv.requestsOn('tcp')).toBe(1);
    expect(srv.requests[0]).toMatchObject({ transport: 'tcp', method: 'OPTIONS' });
    expect(srv.requestsOn('unix')).toBeGreaterThan(5);
    const unix = srv.requests.filter((r) => r.transport === 'unix');
    for (const m of ['GET', 'PUT', 'PATCH', 'OPTIONS']) expect(unix.some((r) => r.method === m)).toBe(true);
    expect(unix.some((r) => r.url.endsWith('/extents'))).toBe(true);
    expect(debugLines.join('\n')).toMatch(/data goes over the local Unix socket @\/nbdx-test\/imageio-.* \(abstract socket/);
  });

  it('32 MiB of random data in and out with nbdcopy, over TLS and over the abstract socket, byte for byte', async () => {
    const size = 32 * MiB;
    const src = path.join(dir, 'roundtrip-src.raw');
    fs.writeFileSync(src, randomBytes(size));
    try {
      for (const socket of ['never', 'auto']) {
        const name = `\0/nbdx-test/roundtrip-${process.pid}-${Date.now()}`;
        const srv = await startImageio({ size, unixSocket: name, tls: { key: certs.key, cert: certs.cert } });
        const nbd = await startNbd([
          ['url', srv.url],
          ['cafile', certs.caFile],
          ['unix-socket', socket],
        ]);
        await runOk('nbdcopy', ['--flush', src, nbd.uri]);
        expect(srv.store.read(0, size).equals(fs.readFileSync(src))).toBe(true);
        const out = path.join(dir, 'roundtrip-out.raw');
        // --request-size 1M --requests 4 and the default (256K x 64) exercise other read sizes
        await runOk('nbdcopy', ['--request-size=1048576', nbd.uri, out]);
        expect(fs.readFileSync(out).equals(fs.readFileSync(src))).toBe(true);
        await runOk('nbdcopy', [nbd.uri, out]);
        expect(fs.readFileSync(out).equals(fs.readFileSync(src))).toBe(true);
        fs.rmSync(out);
        const transports = new Set(srv.requests.slice(1).map((r) => r.transport));
        expect([...transports]).toEqual([socket === 'auto' ? 'unix' : 'tcp']);
      }
    } finally {
      fs.rmSync(src, { force: true });
    }
  });

  it('falls back to TLS, with a debug line, when the advertised socket does not answer or is not on this host', async () => {
    for (const advertised of [`\0/nbdx-test/nobody-${process.pid}-${Date.now()}`, path.join(dir, 'not-here.sock')]) {
      const srv = await startImageio({ size: MiB, advertiseUnixSocket: advertised, tls: { key: certs.key, cert: certs.cert } });
      const debugLines: string[] = [];
      const nbd = await serve({
        plugin: createImageioPlugin(),
        config: [
          ['url', srv.url],
          ['insecure', 'true'],
        ],
        debug: (m: string) => debugLines.push(m),
      });
      cleanups.push(() => nbd.close());
      await nbdsh(nbd.uri, 'h.pread(4096, 0)');
      expect(srv.requests.every((r) => r.transport === 'tcp')).toBe(true);
      const log = debugLines.join('\n');
      expect(log).toMatch(/not using the advertised Unix socket/);
      expect(log).toMatch(/data goes over https:\/\/127\.0\.0\.1:\d+ \(TLS\)/);
    }
  });

  it('a socket that does not know the ticket (another daemon on this host) is not used', async () => {
    const name = `\0/nbdx-test/other-${process.pid}-${Date.now()}`;
    const other = await startImageio({ size: MiB, unixSocket: name });
    const srv = await startImageio({ size: MiB, advertiseUnixSocket: name });
    const nbd = await startNbd([['url', srv.url]]);
    await nbdsh(nbd.uri, 'h.pread(4096, 0)');
    expect(other.requests.map((r) => [r.method, r.status])).toEqual([['OPTIONS', 403]]);
    expect(srv.requests.every((r) => r.transport === 'tcp')).toBe(true);
  });

  it('unix-socket=PATH and unix-socket=@NAME force a socket; a missing one fails start-up', async () => {
    const sock = path.join(dir, 'forced.sock');
    const srv = await startImageio({ size: MiB, unixSocket: sock, advertiseUnixSocket: null });
    const nbd = await startNbd([
      ['url', srv.url],
      ['unix-socket', sock],
    ]);
    await nbdsh(nbd.uri, 'h.pread(4096, 0)');
    expect(srv.requests.filter((r) => r.method !== 'OPTIONS').every((r) => r.transport === 'unix')).toBe(true);
    const name = `/nbdx-test/forced-${process.pid}-${Date.now()}`;
    const srv2 = await startImageio({ size: MiB, unixSocket: `\0${name}`, advertiseUnixSocket: null });
    const nbd2 = await startNbd([
      ['url', srv2.url],
      ['unix-socket', `@${name}`],
    ]);
    await nbdsh(nbd2.uri, 'h.pread(4096, 0)');
    expect(srv2.requestsOn('tcp')).toBe(1);
    expect(srv2.requestsOn('unix')).toBeGreaterThan(1);
    for (const missing of [path.join(dir, 'missing.sock'), '@/nbdx-test/missing']) {
      await expect(
        serve({
          plugin: createImageioPlugin(),
          config: [
            ['url', srv.url],
            ['unix-socket', missing],
          ],
        }),
      ).rejects.toThrow(/missing/);
    }
  });
});

describe.skipIf(!have || !haveCli)('imageio plugin: the nbdx command', () => {
  it('nbdx imageio url=... --run \'qemu-img convert -n disk.qcow2 "$uri"\'', async () => {
    const size = 32 * MiB;
    const srv = await startImageio({ size });
    const src = makeSourceImage(size);
    const qcow2 = await src.qcow2;
    const r = await run(process.execPath, [
      nbdxBin(),
      '-U',
      '-',
      'imageio',
      srv.url,
      'connections=2',
      '--run',
      `qemu-img convert -n -f qcow2 -O raw ${qcow2} "$uri" && qemu-img compare -f qcow2 -F raw ${qcow2} "$uri"`,
    ]);
    expect(r.stderr).toBe('');
    expect(r.stdout).toContain('Images are identical');
    expect(r.code).toBe(0);
    expect(srv.store.read(0, size).equals(src.bytes)).toBe(true);
  });
});
