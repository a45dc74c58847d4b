/** Unit tests: parsing, the extents map and cache, the pool, and one HTTP connection against raw servers. */
import { once } from 'node:events';
import * as http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { EXTENT_HOLE, EXTENT_ZERO, Errno, NbdError, setLogSink, type Extent } from '@nbdx/server/api';
import { applyConfig, defaultSettings } from './config.js';
import { statusError } from './errors.js';
import { ExtentCache, ExtentMap, parseExtents } from './extents.js';
import { Connection, ConnectionPool } from './http.js';
import { OLD_SERVER, parseOptions, poolSize } from './options.js';
import { BlockStore } from './test-server.js';

const logged: string[] = [];
beforeAll(() => setLogSink((_level, source, message) => logged.push(`${source}: ${message}`)));

describe('OPTIONS parsing and pool size', () => {
  it('reads features, limits, the socket and the allow header', () => {
    const o = parseOptions(
      '{"unix_socket": "\\u0000/org/ovirt/imageio", "features": ["checksum", "extents", "flush", "zero"], "max_readers": 8, "max_writers": 8}',
      'OPTIONS,GET,PUT,PATCH',
    );
    expect(o).toMatchObject({ zero: true, flush: true, extents: true, writable: true, maxReaders: 8, maxWriters: 8, old: false });
    expect(o.unixSocket).toBe('\0/org/ovirt/imageio');
    expect(poolSize(o, 4)).toBe(4);
    expect(poolSize(o, 16)).toBe(8);
  });

  it('read-only tickets, missing limits, bad JSON', () => {
    const ro = parseOptions('{"features": ["checksum", "extents"], "max_readers": 8, "max_writers": 1}', 'OPTIONS,GET');
    expect(ro).toMatchObject({ zero: false, flush: false, extents: true, writable: false });
    // max_writers does not limit a read-only ticket
    expect(poolSize(ro, 4)).toBe(4);
    const file = parseOptions('{"features": ["zero", "flush"], "max_readers": 8, "max_writers": 1}', undefined);
    expect(poolSize(file, 4)).toBe(1);
    const noMax = parseOptions('{"features": ["zero"]}', undefined);
    expect([noMax.maxReaders, noMax.maxWriters, noMax.writable]).toEqual([1, 1, true]);
    const junk = parseOptions('<html>', undefined);
    expect(junk).toMatchObject({ zero: false, flush: false, extents: false, old: false });
    expect(poolSize(OLD_SERVER, 4)).toBe(1);
  });
});

describe('extents', () => {
  function brute(list: Extent[], offset: number, count: number): Extent[] {
    const out: Extent[] = [];
    for (const e of list) {
      const s = Math.max(e.offset, offset);
      const f = Math.min(e.offset + e.length, offset + count);
      if (s < f) out.push({ offset: s, length: f - s, type: e.type });
    }
    return out;
  }

  it('binary-search lookups agree with a linear scan', () => {
    let seed = 12345;
    const rnd = (n: number) => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return seed % n;
    };
    const list: Extent[] = [];
    let pos = 0;
    for (let i = 0; i < 500; i++) {
      const length = 1 + rnd(100000);
      list.push({ offset: pos, length, type: rnd(4) });
      pos += length;
    }
    const map = new ExtentMap(list);
    expect(map.end).toBe(pos);
    for (let i = 0; i < 2000; i++) {
      const offset = rnd(pos);
      const count = 1 + rnd(Math.min(pos - offset, 3_000_000));
      expect(map.lookup(offset, count)).toEqual(brute(list, offset, count));
      expect(map.lookup(offset, count, true)).toEqual(brute(list, offset, count).slice(0, 1));
    }
    expect(map.lookup(pos, 10)).toEqual([]);
  });

  it('parses imageio JSON: zero → ZERO, hole → HOLE, old servers without hole', () => {
    const map = parseExtents(
      JSON.stringify([
        { start: 0, length: 4096, zero: true, hole: true },
        { start: 4096, length: 4096, zero: false, hole: false },
        { start: 8192, length: 0, zero: false },
        { start: 8192, length: 8192, zero: true },
      ]),
    );
    expect(map.lookup(0, 16384)).toEqual([
      { offset: 0, length: 4096, type: EXTENT_HOLE | EXTENT_ZERO },
      { offset: 4096, length: 4096, type: 0 },
      { offset: 8192, length: 8192, type: EXTENT_ZERO },
    ]);
    expect(map.end).toBe(16384);
    expect(() => parseExtents('nope')).toThrow(/invalid JSON/);
    expect(() => parseExtents('{}')).toThrow(/not send a list/);
    expect(() => parseExtents('[{"start": -1, "length": 1}]')).toThrow(/invalid extent/);
    expect(() => parseExtents('[{"start": 0, "length": 10}, {"start": 5, "length": 10}]')).toThrow(/overlapping/);
  });

  it('the cache fetches once for concurrent callers and never keeps a list that raced with a write', async () => {
    let fetches = 0;
    let release: (() => void) | null = null;
    const cache = new ExtentCache(async () => {
      fetches++;
      await new Promise<void>((r) => (release = r));
      return new ExtentMap([{ offset: 0, length: fetches, type: 0 }]);
    });
    const a = cache.get();
    const b = cache.get();
    release!();
    expect(await a).toBe(await b);
    expect(fetches).toBe(1);
    await cache.get();
    expect(fetches).toBe(1);

    cache.invalidate();
    const c = cache.get();
    cache.invalidate(); // a write happened while the list was being fetched
    release!();
    expect((await c).end).toBe(2); // the caller still gets an answer…
    await Promise.resolve();
    const d = cache.get(); // …but it was not kept
    release!();
    expect((await d).end).toBe(3);
    expect(fetches).toBe(3);
  });
});

describe('configuration', () => {
  it('accepts every parameter and rejects bad values with one clear line', () => {
    const s = defaultSettings();
    applyConfig(s, 'url', 'https://host.example:54322/images/5f2c');
    applyConfig(s, 'cafile', '/etc/pki/ca.pem');
    applyConfig(s, 'insecure', 'true');
    applyConfig(s, 'size', '10G');
    applyConfig(s, 'connections', '8');
    applyConfig(s, 'unix-socket', '/run/imageio.sock');
    applyConfig(s, 'timeout', '30');
    expect(s).toMatchObject({ insecure: true, size: 10 * 2 ** 30, connections: 8, unixSocket: '/run/imageio.sock', timeoutMs: 30000 });
    expect(s.url!.pathname).toBe('/images/5f2c');
    // a trailing slash (or several) is not part of the ticket
    for (const u of ['https://h:54322/images/5f2c/', 'https://h:54322/images/5f2c//', 'https://h/prefix/images/5f2c/?x#y']) {
      const t = defaultSettings();
      applyConfig(t, 'url', u);
      expect(t.url!.pathname).toMatch(/\/images\/5f2c$/);
    }
    // abstract socket names, written with NUL or with @ as ss(8) shows them
    for (const name of ['\0/org/ovirt/imageio', '@/org/ovirt/imageio']) {
      const t = defaultSettings();
      applyConfig(t, 'unix-socket', name);
      expect(t.unixSocket).toBe('\0/org/ovirt/imageio');
    }
    const bad: [string, string, RegExp][] = [
      ['url', 'ftp://x/images/t', /not supported/],
      ['url', 'https://host:54322/', /does not name an imageio ticket/],
      ['url', 'https://host:54322/images/', /does not name an imageio ticket/],
      ['url', 'https://host:54322/images/T/extents', /does not name an imageio ticket/],
      ['url', 'https://host:54322/info/', /does not name an imageio ticket/],
      ['url', 'https://host:54322/tickets/T', /does not name an imageio ticket/],
      ['url', 'not a url', /not a URL/],
      ['connections', '0', /1 to 64/],
      ['connections', '2.5', /whole number/],
      ['unix-socket', '@', /at least one character/],
      ['unix-socket', 'relative.sock', /absolute path/],
      ['timeout', '-1', /seconds/],
      ['insecure', 'maybe', /boolean/],
      ['size', 'big', /size/],
      ['bogus', '1', /unknown parameter 'bogus'/],
    ];
    for (const [k, v, re] of bad) expect(() => applyConfig(defaultSettings(), k, v)).toThrow(re);
  });

  it('maps HTTP statuses to NBD errors', () => {
    const e = (op: 'read' | 'write', status: number) => statusError(op, 'x', status, '', 'message\n');
    expect(e('read', 403).errno).toBe(Errno.EPERM);
    expect(e('read', 416).errno).toBe(Errno.EINVAL);
    expect(e('write', 416).errno).toBe(Errno.ENOSPC);
    expect(e('write', 400).errno).toBe(Errno.EINVAL);
    expect(e('write', 500).errno).toBe(Errno.EIO);
    expect(e('write', 500).message).toBe('x: imageio server answered 500: message');
    expect(statusError('read', 'x', 502, 'Bad Gateway', 'y'.repeat(1000)).message.length).toBeLessThan(260);
  });
});

describe('one pooled HTTP connection against a raw server', () => {
  let server: http.Server | null = null;
  const sockets = new Set<Socket>();
  afterEach(async () => {
    for (const s of sockets) s.destroy();
    sockets.clear();
    await new Promise<void>((r) => (server ? server.close(() => r()) : r()));
    server = null;
  });

  async function listen(handler: http.RequestListener): Promise<string> {
    server = http.createServer(handler);
    server.on('connection', (s) => {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
    });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  }

  it('sends bodies with an explicit Content-Length, never chunked', async () => {
    const seen: http.IncomingHttpHeaders[] = [];
    const origin = await listen((req, res) => {
      seen.push(req.headers);
      req.resume();
      req.on('end', () => res.end());
    });
    const c = new Connection(0, { origin }, 5000);
    await c.request({ method: 'PUT', path: '/images/t', body: new Uint8Array(100000) }, 'put');
    await c.request({ method: 'PATCH', path: '/images/t', body: '{"op":"flush"}' }, 'patch');
    await c.close();
    expect(seen.map((h) => [h['content-length'], h['transfer-encoding']])).toEqual([
      ['100000', undefined],
      ['14', undefined],
    ]);
  });

  it('reads straight into the buffer and insists on the exact length', async () => {
    let mode = 'ok';
    const origin = await listen((req, res) => {
      if (mode === 'ok') {
        res.writeHead(206, { 'content-length': '5' });
        res.end('hello');
      } else if (mode === 'long') {
        res.writeHead(206, { 'content-length': '6' });
        res.end('hello!');
      } else {
        // announce 5, send 3, hang up
        res.writeHead(206, { 'content-length': '5' });
        res.write('hel');
        setTimeout(() => req.socket.destroy(), 20);
      }
    });
    const c = new Connection(0, { origin }, 5000);
    const buf = new Uint8Array(5);
    const r = await c.request({ method: 'GET', path: '/', into: buf, intoStatus: 206 }, 'read');
    expect(r.status).toBe(206);
    expect(Buffer.from(buf).toString()).toBe('hello');
    mode = 'long';
    await expect(c.request({ method: 'GET', path: '/', into: buf, intoStatus: 206 }, 'read')).rejects.toThrow(/expected 5 bytes/);
    expect(logged.at(-1)).toMatch(/imageio: read: expected 5 bytes, the server announced 6/);
    mode = 'short';
    const err = await c.request({ method: 'GET', path: '/', into: buf, intoStatus: 206 }, 'read').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdError);
    expect((err as NbdError).errno).toBe(Errno.EIO);
    await c.destroy();
  });

  it('parses answers split anywhere, chunked bodies, 100 Continue, bodies up to the close', async () => {
    const { createServer } = await import('node:net');
    // A raw server that answers each request with the next canned reply, byte by byte.
    const replies: string[] = [
      'HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\n\r\nhello',
      'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2;ext=1\r\n2]\r\n0\r\nx-trailer: 1\r\n\r\n',
      'HTTP/1.0 500 Oops\r\n\r\nuntil the close',
    ];
    const raw = createServer((sock) => {
      sock.on('data', () => {
        const reply = Buffer.from(replies.shift() ?? '', 'latin1');
        let i = 0;
        const step = () => {
          if (i >= reply.length) {
            if (reply.toString().startsWith('HTTP/1.0')) sock.end();
            return;
          }
          sock.write(reply.subarray(i, i + 3));
          i += 3;
          setImmediate(step);
        };
        step();
      });
    });
    raw.listen(0, '127.0.0.1');
    await once(raw, 'listening');
    try {
      const c = new Connection(0, { origin: `http://127.0.0.1:${(raw.address() as AddressInfo).port}` }, 5000);
      const buf = new Uint8Array(5);
      expect((await c.request({ method: 'GET', path: '/', into: buf, intoStatus: 206 }, 'a')).status).toBe(206);
      expect(Buffer.from(buf).toString()).toBe('hello');
      const r = await c.request({ method: 'GET', path: '/x' }, 'b');
      expect([r.status, r.body.toString()]).toEqual([200, '[1,2]']);
      const r3 = await c.request({ method: 'GET', path: '/y' }, 'c');
      expect([r3.status, r3.statusText, r3.body.toString()]).toEqual([500, 'Oops', 'until the close']);
      await c.destroy();
    } finally {
      raw.close();
    }
  });

  it('hostile answers end the connection with EIO and the next request works on a fresh one', async () => {
    const { createServer } = await import('node:net');
    const good = 'HTTP/1.1 206 Partial Content\r\ncontent-length: 4\r\n\r\ngood';
    const replies: string[] = [
      'SSH-2.0-OpenSSH_9.2\r\n\r\n', // not HTTP
      good,
      `HTTP/1.1 200 OK\r\nx-big: ${'a'.repeat(20000)}\r\n\r\n`, // headers too large
      good,
      'HTTP/1.1 206 Partial Content\r\ncontent-length: 4\r\n\r\ngoodEXTRA', // bytes nobody asked for
      good,
      'HTTP/1.1 206 Partial Content\r\ncontent-length: -4\r\n\r\n',
      good,
      'HTTP/1.1 206 Partial Content\r\ntransfer-encoding: gzip\r\n\r\n',
      good,
    ];
    const conns: number[] = [];
    let n = 0;
    const raw = createServer((sock) => {
      const id = n++;
      sock.on('data', () => {
        conns.push(id);
        sock.write(replies.shift() ?? '');
      });
      sock.on('error', () => {});
    });
    raw.listen(0, '127.0.0.1');
    await once(raw, 'listening');
    try {
      const c = new Connection(0, { origin: `http://127.0.0.1:${(raw.address() as AddressInfo).port}` }, 5000);
      const read = async () => {
        const buf = new Uint8Array(4);
        await c.request({ method: 'GET', path: '/', into: buf, intoStatus: 206 }, 'read');
        return Buffer.from(buf).toString();
      };
      for (const bad of [/not HTTP/, /headers/, null, /content-length/, /transfer-encoding/]) {
        if (bad) {
          const err = await read().catch((e: unknown) => e);
          expect(err).toBeInstanceOf(NbdError);
          expect((err as NbdError).errno).toBe(Errno.EIO);
          expect((err as Error).message).toMatch(bad);
        } else {
          // the answer itself is fine; the extra bytes only cost the connection
          expect(await read()).toBe('good');
          await new Promise((r) => setTimeout(r, 20));
        }
        expect(await read()).toBe('good');
      }
      // every bad answer cost its connection: the first one plus a new one after each of the 5
      expect(new Set(conns).size).toBe(6);
      await c.destroy();
    } finally {
      raw.close();
    }
  });

  it('a server that closes right after each answer (keep-alive race) costs no request', async () => {
    const { createServer } = await import('node:net');
    let served = 0;
    const raw = createServer((sock) => {
      sock.once('data', () => {
        served++;
        // answer as keep-alive, then close at once: the client may already be sending the next one
        sock.end('HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok');
      });
      sock.on('error', () => {});
    });
    raw.listen(0, '127.0.0.1');
    await once(raw, 'listening');
    try {
      const c = new Connection(0, { origin: `http://127.0.0.1:${(raw.address() as AddressInfo).port}` }, 5000);
      for (let i = 0; i < 30; i++) {
        const r = await c.request({ method: 'PUT', path: '/', body: 'xy' }, `put ${i}`);
        expect([r.status, r.body.toString()]).toEqual([200, 'ok']);
      }
      expect(served).toBe(30);
      await c.destroy();
    } finally {
      raw.close();
    }
  });

  it('does not retry a request that was answered, retries once one that was not', async () => {
    let n = 0;
    let hangUp = 0;
    const origin = await listen((req, res) => {
      n++;
      if (hangUp > 0) {
        hangUp--;
        req.socket.destroy();
        return;
      }
      res.writeHead(500, { 'content-length': '4' });
      res.end('boom');
    });
    const c = new Connection(0, { origin }, 5000);
    const r = await c.request({ method: 'GET', path: '/' }, 'get');
    expect([r.status, r.body.toString(), n]).toEqual([500, 'boom', 1]);
    hangUp = 1;
    const r2 = await c.request({ method: 'GET', path: '/' }, 'get');
    expect([r2.status, n]).toEqual([500, 3]);
    await c.destroy();
  });
});

describe('the connection pool', () => {
  it('a flush-style useAll waits for in-flight requests, and requests behind it wait for it', async () => {
    const pool = new ConnectionPool(3, { origin: 'http://127.0.0.1:9' }, 1000);
    const events: string[] = [];
    const gates: (() => void)[] = [];
    const job = (name: string) =>
      pool.use(async (c) => {
        events.push(`start ${name} on ${c.index}`);
        await new Promise<void>((r) => gates.push(r));
        events.push(`end ${name}`);
      });
    const a = job('a');
    const b = job('b');
    await new Promise((r) => setTimeout(r, 0));
    const all = pool.useAll(async (cs) => {
      events.push(`all ${cs.length}`);
    });
    const c = job('c');
    await new Promise((r) => setTimeout(r, 0));
    expect(events).toEqual(['start a on 0', 'start b on 1']);
    gates.shift()!();
    await a;
    expect(events).not.toContain('all 3');
    gates.shift()!();
    await Promise.all([b, all]);
    await new Promise((r) => setTimeout(r, 0));
    expect(events).toEqual(['start a on 0', 'start b on 1', 'end a', 'end b', 'all 3', 'start c on 0']);
    gates.shift()!();
    await c;
    await pool.close();
    await expect(pool.use(async () => 1)).rejects.toThrow(/closed/);
  });
});

describe("the test server's image store", () => {
  it('reads back what was written across slabs, zeroes and deallocates only whole blocks, reports merged extents', () => {
    const MiB = 1024 * 1024;
    const block = 64 * 1024;
    // 40 MiB + half a block: three slabs (16 MiB each), a short last block.
    const size = 40 * MiB + block / 2;
    const st = new BlockStore(size, block);
    expect(st.read(0, 4096).equals(Buffer.alloc(4096))).toBe(true);
    expect(st.extents(true)).toEqual([{ start: 0, length: size, zero: true, hole: true }]);

    // A write across the first slab boundary, not block aligned.
    const data = Buffer.alloc(3 * block, 0);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 1) & 0xff;
    const at = 16 * MiB - block - 100;
    st.write(at, data);
    expect(st.read(at, data.length).equals(data)).toBe(true);
    expect(st.read(at - 10, 10).equals(Buffer.alloc(10))).toBe(true);
    const first = Math.floor(at / block);
    const last = Math.floor((at + data.length - 1) / block);
    for (let b = first - 1; b <= last + 1; b++) expect(st.allocated(b)).toBe(b >= first && b <= last);
    // view: no copy inside one slab, a copy across slabs; same bytes either way.
    expect(st.view(at, 1000).equals(data.subarray(0, 1000))).toBe(true);
    expect(st.view(at, data.length).equals(data)).toBe(true);

    // Zero with deallocation: the partly covered blocks stay allocated but read as zero.
    st.zero(at + 10, 2 * block, true);
    expect(st.read(at + 10, 2 * block).equals(Buffer.alloc(2 * block))).toBe(true);
    expect(st.read(at, 10).equals(data.subarray(0, 10))).toBe(true);
    expect(st.allocated(first)).toBe(true);
    expect(st.allocated(first + 1)).toBe(false);
    expect(st.allocated(last)).toBe(true);
    // Zero without deallocation allocates.
    st.zero(0, 100, false);
    expect(st.allocated(0)).toBe(true);
    // The short last block is never deallocated (a punched hole covers whole blocks).
    st.write(size - 10, Buffer.alloc(10, 5));
    st.zero(40 * MiB, block / 2, true);
    expect(st.allocated(Math.floor(size / block))).toBe(true);
    expect(st.read(size - 10, 10).equals(Buffer.alloc(10))).toBe(true);

    const ext = st.extents(false);
    expect(ext[0]).toEqual({ start: 0, length: block, zero: false, hole: false });
    expect(ext.reduce((n, e) => n + e.length, 0)).toBe(size);
    for (let i = 1; i < ext.length; i++) {
      expect(ext[i]!.start).toBe(ext[i - 1]!.start + ext[i - 1]!.length);
      expect(ext[i]!.zero).not.toBe(ext[i - 1]!.zero);
    }
  });
});
