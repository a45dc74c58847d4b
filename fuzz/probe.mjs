/**
 * A deliberately plain NBD client (fixed newstyle, GO, simple replies, one request at a time)
 * used to put the protected region in place and to probe a server between fuzzing rounds. It
 * shares nothing with the code under test, and nothing with the oracle's framing either: if the
 * server cannot serve this client, something is badly wrong.
 */
import * as net from 'node:net';
import { CMD, IHAVEOPT, OPT, OPTION_REPLY_MAGIC, REP, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, encodeOption, encodeRequest, errnoName, u16, u32 } from './wire.mjs';

class Reader {
  constructor(sock) {
    this.buf = Buffer.alloc(0);
    this.waiter = null;
    this.error = null;
    sock.on('data', (d) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake();
    });
    const end = () => {
      this.error ??= new Error('connection closed');
      this.wake();
    };
    sock.on('end', end);
    sock.on('close', end);
    sock.on('error', (e) => {
      this.error ??= e;
      this.wake();
    });
  }
  wake() {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }
  async read(n) {
    while (this.buf.length < n) {
      if (this.error) throw this.error;
      await new Promise((r) => (this.waiter = r));
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }
}

/**
 * Connect, negotiate with GO and return { size, flags, read, write, flush, close }.
 * @param {string} socket Unix socket path
 * @param {{ timeoutMs?: number }} [opts]
 */
export async function connect(socket, { timeoutMs = 10000 } = {}) {
  const sock = net.createConnection(socket);
  const timer = setTimeout(() => sock.destroy(new Error(`probe: no answer within ${timeoutMs} ms`)), timeoutMs);
  const r = new Reader(sock);
  const greet = await r.read(18);
  if (greet.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('probe: not a newstyle server');
  sock.write(u32(3)); // fixed newstyle, no zeroes
  sock.write(encodeOption(OPT.GO, Buffer.concat([u32(0), u16(0)])));
  let size = 0n;
  let flags = 0;
  for (;;) {
    const h = await r.read(20);
    if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new Error('probe: bad option reply magic');
    const type = h.readUInt32BE(12);
    const p = await r.read(h.readUInt32BE(16));
    if (type === REP.INFO && p.readUInt16BE(0) === 0) {
      size = p.readBigUInt64BE(2);
      flags = p.readUInt16BE(10);
    } else if (type === REP.ACK) break;
    else if (type >= 0x80000000) throw new Error(`probe: GO refused (${type.toString(16)}): ${p.toString()}`);
  }
  let cookie = 1n;
  const request = async (type, offset, length, payload = null) => {
    const c = cookie++;
    const head = encodeRequest({ ext: false, magic: REQUEST_MAGIC, flags: 0, type, cookie: c, offset: BigInt(offset), length: BigInt(length) });
    sock.write(payload ? Buffer.concat([head, payload]) : head);
    if (type === CMD.DISC) return null;
    const rep = await r.read(16);
    if (rep.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC || rep.readBigUInt64BE(8) !== c) throw new Error('probe: bad reply');
    const err = rep.readUInt32BE(4);
    if (err) throw new Error(`probe: ${type} at ${offset}+${length} failed: ${errnoName(err)}`);
    return type === CMD.READ ? Buffer.from(await r.read(length)) : null;
  };
  return {
    size,
    flags,
    read: (offset, length) => request(CMD.READ, offset, length),
    write: (offset, data) => request(CMD.WRITE, offset, data.length, data),
    flush: () => request(CMD.FLUSH, 0, 0),
    close: async () => {
      clearTimeout(timer);
      await request(CMD.DISC, 0, 0).catch(() => {});
      sock.end();
      sock.destroy();
    },
  };
}

/** Write `bytes` at `offset` in 256 KiB pieces, then flush. */
export async function writeRegion(socket, offset, bytes) {
  const c = await connect(socket);
  try {
    for (let at = 0; at < bytes.length; at += 256 * 1024) await c.write(offset + at, bytes.subarray(at, at + 256 * 1024));
    await c.flush().catch(() => {}); // not every stack advertises FLUSH
  } finally {
    await c.close();
  }
}

/** Read `length` bytes at `offset`. */
export async function readRegion(socket, offset, length) {
  const c = await connect(socket);
  try {
    const parts = [];
    for (let at = 0; at < length; at += 256 * 1024) parts.push(await c.read(offset + at, Math.min(256 * 1024, length - at)));
    return Buffer.concat(parts);
  } finally {
    await c.close();
  }
}
