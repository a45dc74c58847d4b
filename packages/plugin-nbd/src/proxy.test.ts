/**
 * The proxy against an in-process nbdx upstream (memory under a recording "probe" filter):
 * capabilities, flags, holes, extents, errors, many requests in flight, and the loss of the
 * upstream connection.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it, afterAll } from 'vitest';
import { NBD, NbdClient, NbdRequestError } from '@nbdx/client';
import {
  Errno,
  FLAG_FAST_ZERO,
  FLAG_FUA,
  FLAG_MAY_TRIM,
  FLAG_REQ_ONE,
  NbdError,
  definePlugin,
  type Filter,
} from '@nbdx/server/api';
import { needTools, runOk, servePlugin, tmpDir, type TestServer } from '@nbdx/testkit';
import { createNbdPlugin } from './index.js';
import { startProbeUpstream, startRelay, type ProbeUpstream } from './fixtures.test-helper.js';

/** This file's temporary files, removed when it is done (as the other e2e tests do). */
const files = tmpDir();
afterAll(() => fs.rmSync(files, { recursive: true, force: true }));

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
});

async function upstream(...args: Parameters<typeof startProbeUpstream>): Promise<ProbeUpstream> {
  const u = await startProbeUpstream(...args);
  cleanups.push(() => u.close());
  return u;
}

async function proxy(uri: string, extra: Array<[string, string]> = [], filters: Filter[] = []): Promise<TestServer> {
  const s = await servePlugin(createNbdPlugin(), { config: [['uri', uri], ...extra], filters });
  cleanups.push(() => s.close());
  return s;
}

/** `p`, or a rejection naming `what` after `ms`. */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

async function failure(p: Promise<unknown>): Promise<Error> {
  const e = await p.then(
    () => null,
    (x: Error) => x,
  );
  expect(e).toBeInstanceOf(Error);
  return e!;
}

async function errnoOf(p: Promise<unknown>): Promise<NbdRequestError> {
  const e = await p.then(
    () => null,
    (x: unknown) => x,
  );
  expect(e).toBeInstanceOf(NbdRequestError);
  return e as NbdRequestError;
}

const RICH = {
  blockSize: { minimum: 512, preferred: 8192, maximum: 1024 * 1024 },
  description: 'probe upstream',
  rotational: true,
  multiConn: true,
  fua: 'native' as const,
  cache: 'native' as const,
  fastZero: true,
};

describe('capabilities', () => {
  it('advertises exactly what a rich upstream advertises', async () => {
    const up = await upstream(RICH, '3M');
    const down = await proxy(up.uri);
    const a = await NbdClient.connect(up.uri);
    const b = await down.connect();
    cleanups.push(() => a.disconnect());
    expect(b.size).toBe(3 * 1024 * 1024);
    expect(b.transmissionFlags).toBe(a.transmissionFlags);
    for (const bit of [NBD.TF_SEND_FUA, NBD.TF_ROTATIONAL, NBD.TF_CAN_MULTI_CONN, NBD.TF_SEND_CACHE, NBD.TF_SEND_FAST_ZERO, NBD.TF_SEND_TRIM]) {
      expect(b.transmissionFlags & bit, `flag 0x${bit.toString(16)}`).toBe(bit);
    }
    expect(b.blockSize).toEqual(RICH.blockSize);
    expect(b.description).toBe('probe upstream');
    expect([...b.metaContexts.keys()]).toEqual(['base:allocation']);
  });

  it('nbdinfo sees the same export through the proxy as upstream', async () => {
    if (!needTools('nbdinfo')) return;
    const up = await upstream(RICH, '3M');
    const down = await proxy(up.uri);
    const info = async (uri: string) => {
      const j = JSON.parse(await runOk('nbdinfo', ['--json', uri]));
      const e = j.exports[0];
      delete e.uri;
      delete e['export-name'];
      return e;
    };
    const [a, b] = [await info(up.uri), await info(down.uri)];
    expect(b).toEqual(a);
    expect(b).toMatchObject({ description: 'probe upstream', is_rotational: true, can_multi_conn: true, block_size_minimum: 512, block_size_preferred: 8192 });
  });

  it('a poorer upstream: no FUA (flush emulates it), no cache, no multi-conn, not rotational', async () => {
    const up = await upstream({ fua: 'none', cache: 'none', multiConn: false, rotational: false, fastZero: false, trim: false });
    const down = await proxy(up.uri);
    const b = await down.connect();
    const f = b.transmissionFlags;
    expect(f & NBD.TF_SEND_FLUSH).toBeTruthy();
    expect(f & NBD.TF_SEND_FUA).toBeTruthy(); // emulated by a flush after the write
    expect(f & (NBD.TF_SEND_CACHE | NBD.TF_CAN_MULTI_CONN | NBD.TF_ROTATIONAL | NBD.TF_SEND_FAST_ZERO | NBD.TF_SEND_TRIM)).toBe(0);
    await b.pwrite(Buffer.alloc(512, 7), 0, NBD.CMD_FLAG_FUA);
    const ops = up.probe.calls.map((c) => `${c.op}:${c.flags}`);
    expect(ops).toEqual(['pwrite:0', 'flush:0']);
  });

  it('a read-only upstream gives a read-only export (EPERM for writes)', async () => {
    const up = await upstream({}, '1M', { readonly: true });
    const down = await proxy(up.uri);
    const b = await down.connect({ strict: false });
    expect(b.readOnly).toBe(true);
    expect((await errnoOf(b.pwrite(Buffer.alloc(512), 0))).errno).toBe(Errno.EPERM);
  });

  it('an upstream without structured replies: reads work, every extent is data', async () => {
    const up = await upstream({}, '1M', { noStructuredReplies: true });
    const down = await proxy(up.uri);
    const b = await down.connect();
    await b.pwrite(Buffer.alloc(4096, 9), 8192);
    expect((await b.pread(4096, 8192)).equals(Buffer.alloc(4096, 9))).toBe(true);
    expect((await b.blockStatus(1024 * 1024, 0)).get('base:allocation')).toEqual([{ length: 1024 * 1024, flags: 0 }]);
  });
});

describe('requests and flags', () => {
  it('maps FUA, MAY_TRIM (no NO_HOLE), FAST_ZERO and REQ_ONE to the upstream', async () => {
    const up = await upstream(RICH);
    const down = await proxy(up.uri);
    const b = await down.connect();
    const calls = up.probe.calls;
    const last = () => {
      const c = calls[calls.length - 1]!;
      return { op: c.op, flags: c.flags, offset: c.offset, count: c.count };
    };
    await b.pwrite(Buffer.alloc(4096, 1), 4096, NBD.CMD_FLAG_FUA);
    expect(last()).toEqual({ op: 'pwrite', flags: FLAG_FUA, offset: 4096, count: 4096 });
    await b.pwrite(Buffer.alloc(4096, 1), 4096);
    expect(last().flags).toBe(0);
    await b.zero(8192, 0);
    expect(last()).toEqual({ op: 'zero', flags: FLAG_MAY_TRIM, offset: 0, count: 8192 });
    await b.zero(8192, 0, NBD.CMD_FLAG_NO_HOLE);
    expect(last().flags).toBe(0);
    await b.zero(8192, 0, NBD.CMD_FLAG_NO_HOLE | NBD.CMD_FLAG_FUA);
    expect(last().flags).toBe(FLAG_FUA);
    await b.zero(8192, 0, NBD.CMD_FLAG_FAST_ZERO);
    expect(last().flags).toBe(FLAG_MAY_TRIM | FLAG_FAST_ZERO);
    await b.trim(4096, 4096, NBD.CMD_FLAG_FUA);
    expect(last()).toEqual({ op: 'trim', flags: FLAG_FUA, offset: 4096, count: 4096 });
    await b.flush();
    expect(last().op).toBe('flush');
    await b.cache(65536, 0);
    expect(last()).toEqual({ op: 'cache', flags: 0, offset: 0, count: 65536 });
    const one = await b.blockStatus(1024 * 1024, 0, NBD.CMD_FLAG_REQ_ONE);
    expect(last()).toMatchObject({ op: 'extents', flags: FLAG_REQ_ONE, offset: 0 });
    expect(one.get('base:allocation')!.length).toBe(1);
  });

  it('keeps many requests in flight on one upstream connection, data intact', async () => {
    const up = await upstream({ readDelayMs: 20 }, '8M');
    const down = await proxy(up.uri);
    const b = await down.connect();
    const data = randomBytes(8 * 1024 * 1024);
    await Promise.all(Array.from({ length: 64 }, (_, i) => b.pwrite(data.subarray(i * 131072, (i + 1) * 131072), i * 131072)));
    const before = up.probe.connections;
    const parts = await Promise.all(Array.from({ length: 64 }, (_, i) => b.pread(131072, i * 131072)));
    expect(Buffer.concat(parts).equals(data)).toBe(true);
    expect(up.probe.connections).toBe(before); // no new upstream connections for the reads
    expect(up.probe.maxReadsInFlight).toBeGreaterThanOrEqual(16);
    // And the data really is upstream.
    const direct = await NbdClient.connect(up.uri);
    cleanups.push(() => direct.disconnect());
    expect((await direct.pread(8 * 1024 * 1024, 0)).equals(data)).toBe(true);
  });

  it('over TCP: nbd://HOST:PORT/EXPORT and hostname=/port=/export=', async () => {
    const up = await upstream({}, '2M', { listen: { kind: 'tcp', port: 0, host: '127.0.0.1' } });
    const port = up.server.addresses[0]!.port!;
    for (const config of [
      [['uri', `nbd://127.0.0.1:${port}/some%20export`]],
      [['hostname', '127.0.0.1'], ['port', String(port)], ['export', 'some export']],
    ] as Array<Array<[string, string]>>) {
      const s = await servePlugin(createNbdPlugin(), { config });
      cleanups.push(() => s.close());
      const c = await s.connect();
      expect(c.size).toBe(2 * 1024 * 1024);
      await c.pwrite(Buffer.alloc(4096, 0x42), 4096);
      expect((await c.pread(4096, 4096)).equals(Buffer.alloc(4096, 0x42))).toBe(true);
    }
    expect(up.probe.exportNames).toEqual(['some export', 'some export']);
  });

  it('one upstream connection per client connection, closed with it', async () => {
    const up = await upstream({});
    const down = await proxy(up.uri);
    expect(up.probe.connections).toBe(0); // nothing connects before a client does
    const clients = await Promise.all([1, 2, 3].map(() => down.connect()));
    expect(up.probe.connections).toBe(3);
    await Promise.all(clients.map((c) => c.disconnect()));
    await new Promise((r) => setTimeout(r, 50));
    expect(up.server.connectionCount).toBe(0);
  });

  it('passes block status through (extents match the upstream)', async () => {
    const up = await upstream({}, '4M');
    const down = await proxy(up.uri);
    const b = await down.connect();
    await b.pwrite(Buffer.alloc(65536, 1), 65536);
    await b.pwrite(Buffer.alloc(65536, 0), 1024 * 1024); // allocated, but zero
    await b.pwrite(Buffer.alloc(32768, 2), 3 * 1024 * 1024);
    const direct = await NbdClient.connect(up.uri);
    cleanups.push(() => direct.disconnect());
    const want = (await direct.blockStatus(4 * 1024 * 1024, 0)).get('base:allocation');
    const got = (await b.blockStatus(4 * 1024 * 1024, 0)).get('base:allocation');
    expect(got).toEqual(want);
    expect(got!.some((e) => e.flags === NBD.STATE_ZERO)).toBe(true); // the ZERO bit survives
    // From an offset inside an extent.
    const mid = (await b.blockStatus(100_000, 70_000)).get('base:allocation')!;
    expect(mid[0]).toEqual({ length: 131072 - 70_000, flags: 0 });
  });
});

describe('holes', () => {
  it('upstream hole chunks come out as hole chunks, not zero bytes', async () => {
    const up = await upstream({}, '1M');
    const down = await proxy(up.uri);
    const b = await down.connect();
    await b.pwrite(Buffer.alloc(65536, 0xab), 262144);
    const r = await b.request({ type: NBD.CMD_READ, offset: 0, length: 1024 * 1024 });
    expect(r.error).toBe(0);
    const shape = r.chunks.map((c) => [c.type === NBD.REPLY_TYPE_OFFSET_HOLE ? 'hole' : 'data', c.offset, c.length]);
    expect(shape).toEqual([
      ['hole', 0, 262144],
      ['data', 262144, 65536],
      ['hole', 327680, 1024 * 1024 - 327680],
    ]);
    expect(r.data!.subarray(262144, 327680).equals(Buffer.alloc(65536, 0xab))).toBe(true);
  });

  it('pread returns the holes as ZeroSpans and leaves those bytes alone', async () => {
    const up = await upstream({}, '1M');
    const direct = await NbdClient.connect(up.uri);
    cleanups.push(() => direct.disconnect());
    await direct.pwrite(Buffer.alloc(65536, 0x11), 65536);
    const p = createNbdPlugin();
    await p.load?.();
    await p.config!('uri', up.uri);
    await p.configComplete!();
    const h = await p.open!(false, '', false);
    cleanups.push(async () => p.close!(h));
    const buf = Buffer.alloc(262144, 0xee);
    const spans = await p.pread(h, buf, 0, 0);
    expect(spans).toEqual([
      { start: 0, length: 65536 },
      { start: 131072, length: 131072 },
    ]);
    expect(buf.subarray(0, 65536).every((x) => x === 0xee)).toBe(true); // not zero-filled by the proxy
    expect(buf.subarray(65536, 131072).every((x) => x === 0x11)).toBe(true);
    // A fully written range: no spans at all.
    expect(await p.pread(h, Buffer.alloc(4096), 65536, 0)).toBeUndefined();
  });
});

describe('errors', () => {
  it('upstream errors reach the client with the same errno and message; the connection goes on', async () => {
    const up = await upstream(RICH);
    const down = await proxy(up.uri);
    const b = await down.connect();
    up.probe.failNext.set('pwrite', new NbdError(Errno.ENOSPC, 'probe: out of space'));
    let e = await errnoOf(b.pwrite(Buffer.alloc(512), 0));
    expect(e.errno).toBe(Errno.ENOSPC);
    expect(e.message).toContain('probe: out of space');
    up.probe.failNext.set('pread', new NbdError(Errno.EIO, 'probe: bad sector'));
    e = await errnoOf(b.pread(512, 0));
    expect(e.errno).toBe(Errno.EIO);
    expect(e.message).toContain('probe: bad sector');
    up.probe.failNext.set('zero', new NbdError(Errno.ENOTSUP, 'probe: no fast zero today'));
    e = await errnoOf(b.zero(4096, 0, NBD.CMD_FLAG_FAST_ZERO));
    expect(e.errno).toBe(Errno.ENOTSUP);
    up.probe.failNext.set('trim', new NbdError(Errno.EPERM, 'probe: no'));
    expect((await errnoOf(b.trim(4096, 0))).errno).toBe(Errno.EPERM);
    up.probe.failNext.set('extents', new NbdError(Errno.EINVAL, 'probe: odd'));
    expect((await errnoOf(b.blockStatus(4096, 0))).errno).toBe(Errno.EINVAL);
    // Still fine afterwards.
    await b.pwrite(Buffer.alloc(512, 3), 0);
    expect((await b.pread(512, 0)).equals(Buffer.alloc(512, 3))).toBe(true);
  });

  it('an unreachable upstream fails the client handshake with a clear message; the server stays up', async () => {
    const dir = fs.mkdtempSync(path.join(files, 'dir-'));
    const sock = path.join(dir, 'later.sock');
    const down = await proxy(`nbd+unix:///?socket=${sock}`);
    const err = await failure(NbdClient.connect(down.uri));
    expect(err.message).toMatch(/cannot connect to the upstream server: .*ENOENT/);
    // The upstream comes up: the next client gets through.
    const up = await upstream({}, '1M', { listen: { kind: 'unix', path: sock } });
    const b = await down.connect();
    expect(b.size).toBe(1024 * 1024);
    expect(up.probe.connections).toBe(1);
  });

  it('retry=1 tries a second time a second later, then gives up with a clear error', async () => {
    const down = await proxy('nbd+unix:///?socket=/nonexistent/dir/x.sock', [['retry', '1']]);
    const t0 = Date.now();
    const err = await failure(NbdClient.connect(down.uri));
    expect(Date.now() - t0).toBeGreaterThanOrEqual(900);
    expect(err.message).toMatch(/cannot connect to the upstream server \(tried 2 times, 1 s apart\): .*ENOENT/);
  });

  it('losing the upstream: requests in flight get EIO, the client connection is closed, a new one reconnects', async () => {
    const up = await upstream({ readDelayMs: 300 }, '1M');
    const sock = path.join(fs.mkdtempSync(path.join(files, 'relay-')), 'relay.sock');
    const relay = await startRelay(sock, up.server.addresses[0]!.path!);
    cleanups.push(() => relay.close());
    const down = await proxy(`nbd+unix:///?socket=${sock}`);
    const b = await down.connect();
    await b.pwrite(Buffer.alloc(4096, 5), 0);
    const closed = new Promise<number>((resolve) => b.once('close', () => resolve(Date.now())));
    const reads = Array.from({ length: 8 }, (_, i) => b.pread(4096, i * 4096).then(() => 0, (e: NbdRequestError) => e.errno));
    await new Promise((r) => setTimeout(r, 50));
    const t0 = Date.now();
    relay.cut();
    expect(await within(Promise.all(reads), 1000, 'errors for the reads in flight')).toEqual(Array(8).fill(Errno.EIO));
    expect(Date.now() - t0).toBeLessThan(250); // not waiting for the slow upstream reads
    expect((await within(closed, 1000, 'client connection closed')) - t0).toBeLessThan(1000);
    // A new client connection gets a new upstream connection.
    const c = await down.connect();
    expect(c.size).toBe(1024 * 1024);
    await c.pwrite(Buffer.alloc(512, 1), 0);
    expect((await c.pread(4096, 0)).subarray(0, 512).equals(Buffer.alloc(512, 1))).toBe(true);
    expect(relay.accepted).toBe(2);
  });

  it('request-timeout: an upstream that stops answering is taken for gone (EIO, connection closed)', async () => {
    const up = await upstream({ readDelayMs: 1500 }, '1M'); // far beyond the timeout
    const down = await proxy(up.uri, [['request-timeout', '300ms']]);
    const b = await down.connect();
    await b.pwrite(Buffer.alloc(512, 1), 0); // answered at once
    const closed = new Promise<void>((r) => b.once('close', () => r()));
    const t0 = Date.now();
    const e = await within(errnoOf(b.pread(512, 0)), 2000, 'EIO for the unanswered read');
    expect(e.errno).toBe(Errno.EIO);
    expect(e.message).toMatch(/upstream connection lost: no reply from the server for \d+ ms \(NBD_CMD_READ; request timeout 300 ms\)/);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(290);
    await within(closed, 1000, 'client connection closed');
  });

  it('requests after the loss fail at once with EIO (raw client that does not hang up)', async () => {
    const up = await upstream({}, '1M');
    const sock = path.join(fs.mkdtempSync(path.join(files, 'relay-')), 'relay.sock');
    const relay = await startRelay(sock, up.server.addresses[0]!.path!);
    cleanups.push(() => relay.close());
    const down = await proxy(`nbd+unix:///?socket=${sock}`);
    const b = await down.connect();
    relay.cut();
    await new Promise((r) => setTimeout(r, 50));
    const e = await errnoOf(b.pread(512, 0));
    expect(e.errno).toBe(Errno.EIO);
  });
});

describe('core: fatal errors end the client connection (the hook this plugin relies on)', () => {
  /** Reads at offset 0 fail fatally after 20 ms; other reads succeed after 60 ms. */
  function fragile() {
    return definePlugin({
      apiVersion: 2,
      name: 'fragile',
      getSize: () => 1024 * 1024,
      async pread(_h, buf, offset) {
        if (offset === 0) {
          await new Promise((r) => setTimeout(r, 20));
          throw new NbdError(Errno.EIO, 'backend gone', { fatal: true });
        }
        await new Promise((r) => setTimeout(r, 60));
        buf.fill(7);
      },
    });
  }

  for (const structuredReplies of [true, false]) {
    it(`replies, lets requests in flight finish, then closes (${structuredReplies ? 'structured' : 'simple'} replies)`, async () => {
      const s = await servePlugin(fragile());
      cleanups.push(() => s.close());
      const a = await s.connect({ structuredReplies });
      const other = await s.connect({ structuredReplies });
      const closed = new Promise<void>((r) => a.once('close', () => r()));
      const slow = a.pread(512, 4096); // in flight when the fatal error happens
      const bad = await errnoOf(a.pread(512, 0));
      expect(bad.errno).toBe(Errno.EIO);
      if (structuredReplies) expect(bad.message).toBe('backend gone');
      expect((await slow).equals(Buffer.alloc(512, 7))).toBe(true);
      await within(closed, 1000, 'connection closed after the fatal error');
      expect(a.isOpen).toBe(false);
      // Other connections and new ones are not affected.
      expect((await other.pread(512, 8192)).equals(Buffer.alloc(512, 7))).toBe(true);
      const b = await s.connect();
      expect((await b.pread(512, 4096)).length).toBe(512);
    });
  }

  it('an ordinary error leaves the connection open', async () => {
    const p = fragile();
    p.pread = async () => {
      throw new NbdError(Errno.EIO, 'just this once');
    };
    const s = await servePlugin(p);
    cleanups.push(() => s.close());
    const a = await s.connect();
    expect((await errnoOf(a.pread(512, 0))).errno).toBe(Errno.EIO);
    await new Promise((r) => setTimeout(r, 50));
    expect(a.isOpen).toBe(true);
  });
});
