/**
 * Tests against the scriptable in-process server: exact wire behaviour that real servers on this
 * machine cannot produce on demand (extended headers, interleaved chunks, broken replies).
 */
import net from 'node:net';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { NBD, NbdClient, NbdConnectionError, NbdOptionError, NbdProtocolError, NbdRequestError, type ConnectOptions } from './index.js';
import { FakeServer, type FakeServerOptions } from './test-utils/fake-server.js';
import { makeTempDir, sockPath } from './test-utils/peers.js';

let tmp: { dir: string; cleanup: () => Promise<void> };
const servers: FakeServer[] = [];
const clients: NbdClient[] = [];

beforeAll(async () => {
  tmp = await makeTempDir();
});
afterEach(async () => {
  for (const c of clients.splice(0)) c.close();
  for (const s of servers.splice(0)) await s.close();
});
afterAll(async () => {
  await tmp.cleanup();
});

async function setup(opts: FakeServerOptions = {}, copts: ConnectOptions = {}): Promise<{ s: FakeServer; c: NbdClient }> {
  const s = await FakeServer.start(sockPath(tmp.dir, 'fake'), opts);
  servers.push(s);
  const c = await NbdClient.connect({ path: s.path }, copts);
  clients.push(c);
  return { s, c };
}

describe('handshake', () => {
  it('negotiates extended headers when offered, and uses them', async () => {
    const { s, c } = await setup({ extended: true });
    expect(c.extendedHeaders).toBe(true);
    expect(c.structuredReplies).toBe(true);
    expect(s.options_seen).toEqual([NBD.OPT_EXTENDED_HEADERS, NBD.OPT_SET_META_CONTEXT, NBD.OPT_GO]);
    expect(s.clientFlags[0]).toBe(NBD.FLAG_C_FIXED_NEWSTYLE | NBD.FLAG_C_NO_ZEROES);
    expect(c.exportName).toBe('fake');
    expect(c.description).toBe('a fake disk');
    expect(c.metaContexts).toEqual(new Map([['base:allocation', 10]]));
    const data = Buffer.alloc(10000, 0x5a);
    await c.pwrite(data, 100);
    // Writes carry PAYLOAD_LEN with extended headers.
    expect(s.last.requests.at(-1)!.flags & NBD.CMD_FLAG_PAYLOAD_LEN).toBe(NBD.CMD_FLAG_PAYLOAD_LEN);
    expect((await c.pread(10000, 100)).equals(data)).toBe(true);
    const st = await c.blockStatus(4096, 0);
    expect(st.get('base:allocation')).toEqual([{ length: 4096, flags: 0 }]);
  });

  it('falls back to structured replies when extended headers are refused', async () => {
    const { s, c } = await setup({ extended: false });
    expect(c.extendedHeaders).toBe(false);
    expect(c.structuredReplies).toBe(true);
    expect(s.options_seen.slice(0, 2)).toEqual([NBD.OPT_EXTENDED_HEADERS, NBD.OPT_STRUCTURED_REPLY]);
  });

  it('uses simple replies when structured replies are refused or not wanted', async () => {
    const refused = await setup({ structured: false });
    expect(refused.c.structuredReplies).toBe(false);
    expect(refused.c.metaContexts.size).toBe(0);
    expect(refused.s.options_seen).not.toContain(NBD.OPT_SET_META_CONTEXT);

    const off = await setup({ extended: true }, { structuredReplies: false });
    expect(off.c.structuredReplies).toBe(false);
    expect(off.c.extendedHeaders).toBe(false);
    expect(off.s.options_seen).toEqual([NBD.OPT_GO]);
    await off.c.pwrite(Buffer.from('hello'), 0);
    expect((await off.c.pread(5, 0)).toString()).toBe('hello');
    // No contexts: block status is refused locally.
    await expect(off.c.blockStatus(512, 0)).rejects.toMatchObject({ errno: 22, local: true });
  });

  it('falls back to NBD_OPT_EXPORT_NAME when GO is unsupported', async () => {
    const { s, c } = await setup({ go: false });
    expect(s.options_seen.at(-2)).toBe(NBD.OPT_GO);
    expect(s.options_seen.at(-1)).toBe(NBD.OPT_EXPORT_NAME);
    expect(c.size).toBe(1024 * 1024);
    expect(c.blockSize).toBeUndefined();
    await c.pwrite(Buffer.from('x'), 0);
  });

  it('handles a server without NO_ZEROES (134-byte EXPORT_NAME reply)', async () => {
    const { s, c } = await setup({ go: false, handshakeFlags: NBD.FLAG_FIXED_NEWSTYLE });
    expect(s.clientFlags[0]).toBe(NBD.FLAG_C_FIXED_NEWSTYLE);
    expect(c.size).toBe(1024 * 1024);
    expect((await c.pread(4, 0)).length).toBe(4);
  });

  it('talks to a plain (non-fixed) newstyle server only through EXPORT_NAME, unless refused', async () => {
    const { s, c } = await setup({ handshakeFlags: NBD.FLAG_NO_ZEROES });
    expect(s.options_seen).toEqual([NBD.OPT_EXPORT_NAME]);
    expect(s.clientFlags[0]).toBe(NBD.FLAG_C_NO_ZEROES);
    expect(c.structuredReplies).toBe(false);
    const s2 = await FakeServer.start(sockPath(tmp.dir, 'fake'), { handshakeFlags: 0 });
    servers.push(s2);
    await expect(NbdClient.connect({ path: s2.path }, { fixedNewstyleOnly: true })).rejects.toThrow(/fixed newstyle/);
  });

  it('reports option errors as NbdOptionError with the server message', async () => {
    const s = await FakeServer.start(sockPath(tmp.dir, 'fake'));
    servers.push(s);
    const err = await NbdClient.connect({ path: s.path }, { exportName: 'missing' }).catch((e) => e);
    expect(err).toBeInstanceOf(NbdOptionError);
    expect(err.replyType).toBe(NBD.REP_ERR_UNKNOWN);
    expect(err.replyTypeName).toBe('ERR_UNKNOWN');
    expect(err.serverMessage).toBe('no export named missing');
    // The client said goodbye properly.
    expect(s.options_seen.at(-1)).toBe(NBD.OPT_ABORT);
  });

  it('times out a silent server', async () => {
    const s = await FakeServer.start(sockPath(tmp.dir, 'fake'), { silent: true });
    servers.push(s);
    const t0 = Date.now();
    const err = await NbdClient.connect({ path: s.path }, { timeout: 200 }).catch((e) => e);
    expect(err).toBeInstanceOf(NbdConnectionError);
    expect(err.code).toBe('ETIMEDOUT');
    expect(Date.now() - t0).toBeLessThan(2000);
  });

  it('rejects a connect to a missing socket with the socket error', async () => {
    await expect(NbdClient.connect({ path: sockPath(tmp.dir, 'none') })).rejects.toMatchObject({ code: 'ENOENT' });
  });

  it('connects over TCP with an nbd:// URI and with {host, port}', async () => {
    const s = await FakeServer.start('tcp', { extended: true });
    servers.push(s);
    const c = await NbdClient.connect(`nbd://127.0.0.1:${s.port}/fake`);
    clients.push(c);
    expect(c.exportName).toBe('fake');
    await c.pwrite(Buffer.alloc(300000, 4), 1000);
    expect((await c.pread(300000, 1000)).every((x) => x === 4)).toBe(true);
    const c2 = await NbdClient.connect({ host: '127.0.0.1', port: s.port }, { extendedHeaders: false });
    clients.push(c2);
    expect(c2.extendedHeaders).toBe(false);
    expect((await c2.pread(10, 1000)).every((x) => x === 4)).toBe(true);
  });

  it('works over an already connected socket', async () => {
    const s = await FakeServer.start(sockPath(tmp.dir, 'fake'));
    servers.push(s);
    const sock = net.connect(s.path);
    await new Promise((r) => sock.once('connect', r));
    const c = await NbdClient.connect({ socket: sock }, { exportName: 'fake' });
    clients.push(c);
    await c.pwrite(Buffer.alloc(100000, 1), 0);
    expect((await c.pread(100000, 0)).every((b) => b === 1)).toBe(true);
    await c.disconnect();
    expect(sock.destroyed).toBe(true);
  });

  it('lists exports and reads export info without entering transmission', async () => {
    const s = await FakeServer.start(sockPath(tmp.dir, 'fake'), { blockSize: { minimum: 512, preferred: 4096, maximum: 65536 } });
    servers.push(s);
    expect(await NbdClient.list({ path: s.path })).toEqual([
      { name: 'one', description: 'first export' },
      { name: 'two', description: '' },
    ]);
    const info = await NbdClient.info(`nbd+unix:///fake?socket=${s.path}`);
    expect(info).toEqual({
      exportName: 'fake',
      name: 'fake',
      size: 1024 * 1024,
      transmissionFlags: expect.any(Number),
      description: 'a fake disk',
      blockSize: { minimum: 512, preferred: 4096, maximum: 65536 },
    });
    expect(s.conns.every((c) => c.requests.length === 0)).toBe(true);
    expect(s.options_seen.filter((o) => o === NBD.OPT_ABORT).length).toBe(2);
    await expect(NbdClient.info({ path: s.path }, 'nope')).rejects.toBeInstanceOf(NbdOptionError);
  });
});

describe('transmission', () => {
  it('matches out-of-order replies with interleaved chunks to their requests', async () => {
    const held: Array<() => void> = [];
    const { c } = await setup(
      {
        extended: true,
        onRequest(req, conn) {
          if (req.type !== NBD.CMD_READ) return false;
          // Each read answered by three chunks: data, hole, data; all held back, then sent
          // round-robin across requests in reverse order.
          const third = Math.floor(req.length / 3);
          const pat = (off: number, n: number): Buffer => Buffer.alloc(n, off / 512);
          held.push(() => conn.data(req, req.offset + 2 * third, pat(req.offset, req.length - 2 * third), false));
          held.push(() => conn.hole(req, req.offset + third, third, false));
          held.push(() => conn.data(req, req.offset, pat(req.offset, third), false));
          held.push(() => conn.done(req));
          return true;
        },
      },
      {},
    );
    const N = 64;
    const order: number[] = [];
    const reads = Array.from({ length: N }, (_, i) =>
      c.pread(1536, i * 512 * 4).then((b) => {
        order.push(i);
        return b;
      }),
    );
    while (held.length < N * 4) await new Promise((r) => setTimeout(r, 5));
    // Interleave: step k of every request, from the last request to the first.
    for (let step = 0; step < 4; step++) for (let i = N - 1; i >= 0; i--) held[i * 4 + step]!();
    const bufs = await Promise.all(reads);
    bufs.forEach((b, i) => {
      const v = (i * 512 * 4) / 512;
      expect(b.subarray(0, 512).every((x) => x === v)).toBe(true);
      expect(b.subarray(512, 1024).every((x) => x === 0)).toBe(true);
      expect(b.subarray(1024).every((x) => x === v)).toBe(true);
    });
    expect(order).toEqual(Array.from({ length: N }, (_, i) => N - 1 - i));
  });

  it('preadInto leaves holes untouched and reports them relative to the buffer', async () => {
    const { c } = await setup({
      onRequest(req, conn) {
        if (req.type !== NBD.CMD_READ) return false;
        conn.hole(req, req.offset + 4096, 4096, false);
        conn.data(req, req.offset, Buffer.alloc(4096, 1), false);
        conn.hole(req, req.offset + 8192, 4096, false);
        conn.data(req, req.offset + 12288, Buffer.alloc(4096, 2), true);
        return true;
      },
    });
    const buf = Buffer.alloc(16384, 0xee);
    const spans = await c.preadInto(buf, 65536);
    expect(spans).toEqual([{ start: 4096, length: 8192 }]);
    expect(buf.subarray(0, 4096).every((x) => x === 1)).toBe(true);
    expect(buf.subarray(4096, 12288).every((x) => x === 0xee)).toBe(true);
    expect(buf.subarray(12288).every((x) => x === 2)).toBe(true);
    // pread zero-fills the same holes.
    const b = await c.pread(16384, 65536);
    expect(b.subarray(4096, 12288).every((x) => x === 0)).toBe(true);
  });

  it('splits reads and writes larger than the maximum block size', async () => {
    const { s, c } = await setup({ blockSize: { minimum: 512, preferred: 4096, maximum: 65536 } });
    const data = Buffer.alloc(300 * 1024);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7) & 0xff;
    await c.pwrite(data, 4096);
    const writes = s.last.requests.filter((r) => r.type === NBD.CMD_WRITE);
    expect(writes.length).toBe(5);
    expect(Math.max(...writes.map((w) => w.length))).toBe(65536);
    expect((await c.pread(data.length, 4096)).equals(data)).toBe(true);
    const holes = await c.preadInto(Buffer.alloc(data.length), 4096);
    expect(holes).toEqual([]);
    // Strict mode: unaligned requests are refused before sending.
    await expect(c.pread(100, 0)).rejects.toMatchObject({ errno: 22, local: true });
  });

  it('batches many requests into few socket writes', async () => {
    const { s, c } = await setup();
    const before = s.last.dataEvents;
    await Promise.all(Array.from({ length: 200 }, (_, i) => c.pwrite(Buffer.alloc(512, i), i * 512)));
    // 200 requests of 540 bytes went out in one batch; the server sees far fewer reads.
    expect(s.last.dataEvents - before).toBeLessThan(20);
    expect((await c.pread(512, 199 * 512))[0]).toBe(199);
  });

  it('sends an error chunk message as the NbdRequestError message', async () => {
    const { c } = await setup({
      onRequest(req, conn) {
        if (req.type === NBD.CMD_FLUSH) {
          conn.error(req, 5, 'disk on fire');
          return true;
        }
        return false;
      },
    });
    const err = await c.flush().catch((e) => e);
    expect(err).toBeInstanceOf(NbdRequestError);
    expect(err.errno).toBe(5);
    expect(err.errnoName).toBe('EIO');
    expect(err.message).toBe('disk on fire');
    expect(err.serverMessage).toBe('disk on fire');
    expect(err.commandName).toBe('FLUSH');
    // The connection stays usable.
    await c.pwrite(Buffer.from('ok'), 0);
  });

  it('decodes compact and extended block status, and checks contexts', async () => {
    const { c } = await setup({
      extended: true,
      contexts: ['base:allocation', 'x-test:thing'],
      onRequest(req, conn) {
        if (req.type !== NBD.CMD_BLOCK_STATUS) return false;
        conn.blockStatus(req, 11, [{ length: 2 ** 33, flags: 7 }], false, true);
        conn.blockStatus(req, 10, [{ length: 512, flags: 3 }, { length: 1024, flags: 0 }], true, false);
        return true;
      },
    }, { metaContexts: ['base:allocation', 'x-test:thing', 'x-test:missing'] });
    expect([...c.metaContexts.keys()]).toEqual(['base:allocation', 'x-test:thing']);
    const st = await c.blockStatus(1536, 0);
    expect(st.get('base:allocation')).toEqual([{ length: 512, flags: 3 }, { length: 1024, flags: 0 }]);
    expect(st.get('x-test:thing')).toEqual([{ length: 2 ** 33, flags: 7 }]);
    // REQ_ONE replies must have exactly one extent.
    await expect(c.blockStatus(1536, 0, NBD.CMD_FLAG_REQ_ONE)).rejects.toBeInstanceOf(NbdProtocolError);
  });

  it('treats content-chunk violations as protocol errors of that request only', async () => {
    let mode = '';
    const { c } = await setup({
      onRequest(req, conn) {
        if (req.type !== NBD.CMD_READ) return false;
        if (mode === 'overlap') {
          conn.data(req, req.offset, Buffer.alloc(1024), false);
          conn.hole(req, req.offset + 512, 1024, true);
        } else if (mode === 'outside') {
          conn.data(req, req.offset + 1024, Buffer.alloc(1024), true);
        } else if (mode === 'short') {
          conn.data(req, req.offset, Buffer.alloc(1024), true);
        } else if (mode === 'none') {
          conn.done(req);
        } else return false;
        return true;
      },
    });
    for (const m of ['overlap', 'outside', 'short', 'none']) {
      mode = m;
      const err = await c.pread(1024 + (m === 'short' ? 512 : 0), 0).catch((e) => e);
      expect(err, m).toBeInstanceOf(NbdProtocolError);
      expect(err.errno).toBe(5);
      // request() reports instead of rejecting.
      const raw = await c.request({ type: NBD.CMD_READ, offset: 0, length: m === 'short' ? 1536 : 1024 });
      expect(raw.violation, m).toBeTruthy();
    }
    mode = '';
    expect((await c.pread(10, 0)).length).toBe(10);
  });

  it('closes the connection on broken framing (unknown cookie) and fails everything with EIO', async () => {
    const { c } = await setup({
      onRequest(req, conn) {
        if (req.type === NBD.CMD_READ && req.offset === 0) {
          conn.simple({ ...req, cookie: 999999n }, 0);
          return true;
        }
        if (req.type === NBD.CMD_READ) return true; // never answered
        return false;
      },
    });
    const closed = new Promise<Error | undefined>((r) => c.once('close', r));
    const pending = c.pread(512, 4096);
    const err = await c.pread(512, 0).catch((e) => e);
    expect(err).toBeInstanceOf(NbdConnectionError);
    expect(err.errno).toBe(5);
    expect(err.message).toMatch(/unknown cookie/);
    await expect(pending).rejects.toMatchObject({ errno: 5 });
    expect(await closed).toBeInstanceOf(NbdConnectionError);
    await expect(c.pread(512, 0)).rejects.toMatchObject({ errno: 5 });
    await expect(c.request({ type: NBD.CMD_FLUSH })).rejects.toMatchObject({ errno: 5 });
  });

  it('raw request() sends exactly what it is told', async () => {
    const { s, c } = await setup();
    const r = await c.request({ type: 42, flags: 0x8000, offset: 2 ** 40, length: 0 });
    expect(r.error).toBe(22);
    expect(r.message).toBe('unknown command');
    expect(r.chunks).toEqual([{ type: NBD.REPLY_TYPE_ERROR, flags: 1, payloadLength: 6 + 15, errno: 22, message: 'unknown command' }]);
    const req = s.last.requests.at(-1)!;
    expect(req).toMatchObject({ type: 42, flags: 0x8000, offset: 2 ** 40, length: 0 });
    const w = await c.request({ type: NBD.CMD_WRITE, offset: 8, length: 3, payload: Buffer.from('abc') });
    expect(w).toEqual({ error: 0, chunks: [{ type: NBD.REPLY_TYPE_NONE, flags: 1, payloadLength: 0 }], simple: false });
    const rd = await c.request({ type: NBD.CMD_READ, offset: 8, length: 3 });
    expect(rd.data?.toString()).toBe('abc');
    expect(rd.chunks[0]).toMatchObject({ type: NBD.REPLY_TYPE_OFFSET_DATA, offset: 8, length: 3 });
    // Unadvertised things go out anyway through request(), but not through the friendly API.
    await expect(c.pread(1, s.disk.length)).rejects.toMatchObject({ errno: 22, local: true });
    expect((await c.request({ type: NBD.CMD_READ, offset: s.disk.length, length: 1 })).error).toBe(22);
  });

  it('disconnect() waits for requests in flight, sends DISC and closes cleanly', async () => {
    const { s, c } = await setup({
      onRequest(req, conn) {
        if (req.type !== NBD.CMD_READ) return false;
        setTimeout(() => conn.serveDefault(req), 100);
        return true;
      },
    });
    let closeArg: unknown = 'not emitted';
    c.on('close', (e) => {
      closeArg = e;
    });
    const reads = [c.pread(512, 0), c.pread(512, 512)];
    const d = c.disconnect();
    await expect(c.pread(512, 0)).rejects.toBeInstanceOf(NbdConnectionError);
    await Promise.all(reads);
    await d;
    expect(closeArg).toBeUndefined();
    expect(s.last.requests.at(-1)!.type).toBe(NBD.CMD_DISC);
  });

  it('close() rejects requests in flight with EIO at once', async () => {
    const { c } = await setup({ onRequest: (req) => req.type === NBD.CMD_READ });
    const p = c.pread(512, 0);
    c.close();
    await expect(p).rejects.toMatchObject({ errno: 5, name: 'NbdConnectionError' });
  });
});

describe('request timeout', () => {
  it('a server that never answers: requests fail with ETIMEDOUT and the connection is closed', async () => {
    const { c } = await setup({ onRequest: (req) => req.type === NBD.CMD_READ }, { requestTimeout: 200 });
    const closed = new Promise<Error | undefined>((r) => c.once('close', r));
    const t0 = Date.now();
    const p = c.pread(512, 0).then(
      () => null,
      (e: NbdConnectionError) => e,
    );
    const w = c.pwrite(Buffer.alloc(512), 0); // answered, before the timeout
    await w;
    const err = await p;
    const waited = Date.now() - t0;
    expect(err).toBeInstanceOf(NbdConnectionError);
    expect(err).toMatchObject({ errno: 5, code: 'ETIMEDOUT' });
    expect(err!.message).toMatch(/no reply from the server for \d+ ms \(NBD_CMD_READ; request timeout 200 ms\)/);
    expect(waited).toBeGreaterThanOrEqual(190);
    expect(waited).toBeLessThan(1000);
    expect(await closed).toBe(err);
    expect(c.isOpen).toBe(false);
    await expect(c.pread(512, 0)).rejects.toBeInstanceOf(NbdConnectionError);
  });

  it('counts per request: slow answers within the limit and idle time are fine', async () => {
    const { c } = await setup(
      {
        onRequest(req, conn) {
          if (req.type !== NBD.CMD_READ) return false;
          setTimeout(() => conn.data(req, req.offset, Buffer.alloc(req.length, 1), true), 60);
          return true;
        },
      },
      { requestTimeout: 150 },
    );
    // Longer in total than the timeout, each request well within it.
    for (let i = 0; i < 5; i++) expect((await c.pread(512, 0)).equals(Buffer.alloc(512, 1))).toBe(true);
    await new Promise((r) => setTimeout(r, 300)); // idle
    expect(c.isOpen).toBe(true);
    expect((await c.pread(512, 0)).length).toBe(512);
  });

  it('refuses a nonsense timeout', async () => {
    await expect(NbdClient.connect({ path: '/nonexistent' }, { requestTimeout: -1 })).rejects.toThrow(RangeError);
  });
});
