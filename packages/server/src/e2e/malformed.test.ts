/**
 * Hostile and broken clients: whatever they send, the server keeps serving the next client.
 */
import { randomBytes } from 'node:crypto';
import * as net from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import { serve } from '../server.js';
import * as C from '../wire/constants.js';
import { encodeInfoRequest, encodeOption } from '../wire/codec.js';

type Srv = Awaited<ReturnType<typeof serve>>;

function socketPath(s: Srv): string {
  return s.addresses[0]!.path!;
}

/** Connect, send bytes, collect what comes back until the server closes or a timeout. */
function exchange(path: string, chunks: Buffer[], waitMs = 300): Promise<{ data: Buffer; closed: boolean }> {
  return new Promise((resolve) => {
    const sock = net.connect(path);
    const got: Buffer[] = [];
    let closed = false;
    sock.on('data', (d) => got.push(d));
    sock.on('error', () => {});
    sock.on('close', () => {
      closed = true;
      finish();
    });
    sock.on('connect', async () => {
      for (const c of chunks) {
        sock.write(c);
        await new Promise((r) => setTimeout(r, 5));
      }
    });
    const timer = setTimeout(finish, waitMs);
    let done = false;
    function finish() {
      if (done) return;
      done = true;
      clearTimeout(timer);
      sock.destroy();
      resolve({ data: Buffer.concat(got), closed });
    }
  });
}

/** A well-behaved handshake up to transmission (GO on the default export), then `after`. */
function handshake(extra: Buffer[] = []): Buffer[] {
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES);
  return [flags, encodeOption(C.OPT_GO, encodeInfoRequest('', [])), ...extra];
}

async function stillServes(path: string): Promise<void> {
  const req = Buffer.alloc(28);
  req.writeUInt32BE(C.REQUEST_MAGIC, 0);
  req.writeUInt16BE(C.CMD_READ, 6);
  req.writeBigUInt64BE(42n, 8);
  req.writeUInt32BE(512, 24);
  const { data } = await exchange(path, handshake([req]));
  // greeting 18 + INFO(export) 20+12 + ACK 20 + simple reply 16 + 512 bytes
  const tail = data.subarray(data.length - 16 - 512);
  expect(tail.readUInt32BE(0)).toBe(C.SIMPLE_REPLY_MAGIC);
  expect(tail.readUInt32BE(4)).toBe(0);
  expect(tail.readBigUInt64BE(8)).toBe(42n);
}

describe('malformed input never takes the server down', () => {
  let s: Srv;
  beforeAll(async () => {
    s = await serve({ plugin: createMemoryPlugin(), config: { size: '1M' }, maxPayload: 1 << 20 });
  });
  afterAll(() => s.close());

  it('random bytes instead of a handshake', async () => {
    for (let i = 0; i < 20; i++) {
      const r = await exchange(socketPath(s), [randomBytes(1 + Math.floor(Math.random() * 300))], 100);
      expect(r.data.subarray(0, 8).readBigUInt64BE(0)).toBe(C.NBDMAGIC);
    }
    await stillServes(socketPath(s));
  });

  it('truncated handshakes and unknown client flags', async () => {
    await exchange(socketPath(s), [Buffer.from([0, 0])], 50);
    const badFlags = Buffer.alloc(4);
    badFlags.writeUInt32BE(0x80);
    const r = await exchange(socketPath(s), [badFlags]);
    expect(r.closed).toBe(true);
    await exchange(socketPath(s), [Buffer.from([0, 0, 0, 3]), encodeOption(C.OPT_GO).subarray(0, 10)], 50);
    await stillServes(socketPath(s));
  });

  it('unknown options get ERR_UNSUP and negotiation goes on', async () => {
    const flags = Buffer.from([0, 0, 0, 3]);
    const r = await exchange(socketPath(s), [flags, encodeOption(99, Buffer.from('hello')), encodeOption(C.OPT_LIST)]);
    const replies = r.data.subarray(18);
    expect(replies.readUInt32BE(12)).toBe(C.REP_ERR_UNSUP);
    const msgLen = replies.readUInt32BE(16);
    expect(replies.toString('utf8', 20, 20 + msgLen)).toMatch(/not supported/);
    // then LIST answers with SERVER + ACK
    const next = replies.subarray(20 + msgLen);
    expect(next.readUInt32BE(12)).toBe(C.REP_SERVER);
  });

  it('an oversized option is refused and the connection closed', async () => {
    const head = Buffer.alloc(16);
    head.writeBigUInt64BE(C.IHAVEOPT, 0);
    head.writeUInt32BE(C.OPT_GO, 8);
    head.writeUInt32BE(0xfffffff0, 12);
    const r = await exchange(socketPath(s), [Buffer.from([0, 0, 0, 3]), head]);
    expect(r.closed).toBe(true);
    expect(r.data.subarray(18).readUInt32BE(12)).toBe(C.REP_ERR_TOO_BIG);
    await stillServes(socketPath(s));
  });

  it('bad request magic closes that connection only', async () => {
    const junk = randomBytes(28);
    const r = await exchange(socketPath(s), handshake([junk]));
    expect(r.closed).toBe(true);
    await stillServes(socketPath(s));
  });

  it('an oversize read gets EINVAL; an oversize write payload is read, dropped and refused', async () => {
    const big = Buffer.alloc(28);
    big.writeUInt32BE(C.REQUEST_MAGIC, 0);
    big.writeUInt16BE(C.CMD_READ, 6);
    big.writeBigUInt64BE(1n, 8);
    big.writeUInt32BE(64 << 20, 24);
    const w = Buffer.alloc(28);
    w.writeUInt32BE(C.REQUEST_MAGIC, 0);
    w.writeUInt16BE(C.CMD_WRITE, 6);
    w.writeBigUInt64BE(2n, 8);
    w.writeUInt32BE(2 << 20, 24); // larger than maxPayload (1 MiB) and than the disk
    const ok = Buffer.alloc(28);
    ok.writeUInt32BE(C.REQUEST_MAGIC, 0);
    ok.writeUInt16BE(C.CMD_FLUSH, 6);
    ok.writeBigUInt64BE(3n, 8);
    const r = await exchange(socketPath(s), handshake([big, w, Buffer.alloc(2 << 20, 0xaa), ok]), 800);
    const replies = r.data.subarray(r.data.length - 48);
    const byCookie = new Map<bigint, number>();
    for (let i = 0; i < 3; i++) byCookie.set(replies.readBigUInt64BE(16 * i + 8), replies.readUInt32BE(16 * i + 4));
    expect(byCookie.get(1n)).toBe(22);
    expect(byCookie.get(2n)).toBe(22);
    expect(byCookie.get(3n)).toBe(0);
    expect(r.closed).toBe(false);
  });

  it('a client that vanishes mid-request does not disturb the others', async () => {
    const w = Buffer.alloc(28);
    w.writeUInt32BE(C.REQUEST_MAGIC, 0);
    w.writeUInt16BE(C.CMD_WRITE, 6);
    w.writeUInt32BE(65536, 24);
    await Promise.all([
      exchange(socketPath(s), handshake([w, Buffer.alloc(1000)]), 50),
      stillServes(socketPath(s)),
    ]);
    await stillServes(socketPath(s));
  });
});

describe('a client that asks for more than it reads back', () => {
  let s: Srv;
  const LIMIT = 4 << 20;
  beforeAll(async () => {
    s = await serve({ plugin: createMemoryPlugin(), config: { size: '16M' }, maxInFlightBytes: LIMIT });
  });
  afterAll(() => s.close());

  it('is held off: unsent READ replies count as in flight, and none is lost once it reads', async () => {
    const COUNT = 400;
    const SIZE = 1 << 20;
    const requests = Buffer.alloc(28 * COUNT);
    for (let i = 0; i < COUNT; i++) {
      requests.writeUInt32BE(C.REQUEST_MAGIC, 28 * i);
      requests.writeUInt16BE(C.CMD_READ, 28 * i + 6);
      requests.writeBigUInt64BE(BigInt(i), 28 * i + 8);
      requests.writeUInt32BE((i % 15) * SIZE, 28 * i + 20);
      requests.writeUInt32BE(SIZE, 28 * i + 24);
    }
    const sock = net.connect(socketPath(s));
    await new Promise((r) => sock.once('connect', r));
    const before = process.memoryUsage().arrayBuffers;
    for (const b of handshake([requests])) sock.write(b);
    // Read nothing for a while: the server may hold about its limit in replies, not 400 MiB.
    sock.pause();
    await new Promise((r) => setTimeout(r, 500));
    const held = process.memoryUsage().arrayBuffers - before;
    expect(held).toBeLessThan(8 * LIMIT);
    // Then take everything: every reply arrives, in full.
    let got = 0;
    const expected = 18 + 20 + 12 + 20 + COUNT * (16 + SIZE);
    await new Promise<void>((resolve) => {
      sock.on('data', (d: Buffer) => {
        got += d.length;
        if (got >= expected) resolve();
      });
      sock.resume();
    });
    expect(got).toBe(expected);
    sock.destroy();
    await stillServes(socketPath(s));
  });
});
