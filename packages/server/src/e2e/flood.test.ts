/**
 * Clients that send without ever reading a reply, of every kind of request and option, alone
 * and eight at a time: the server's memory stays bounded (per connection and in total), a normal
 * client is still served promptly during the flood, and the memory goes back once they leave.
 *
 * FLOOD_SECONDS sets how long each flood lasts (default 20).
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '@nbdx/client';
import { needNbdx, startCli, tmpDir, type CliServer } from '@nbdx/testkit';
import * as C from '../wire/constants.js';
import { encodeMetaContextRequest } from '../wire/codec.js';
import { clientFlags, go, option, request } from './raw-session.js';

const SECONDS = Number(process.env.FLOOD_SECONDS ?? 20);
const MiB = 1024 * 1024;
// The connection budget is 24 MiB; the rest is the runtime's own churn. Node 22's V8 lets its
// young generation grow larger than Node 20's before collecting: a 1-byte-WRITE flood on one
// connection peaked at +66.8 MiB there (+44-54 MiB on Node 20), hence 80 MiB.
const PER_CONNECTION = 80 * MiB;
/** Threads serving the flood server's connections; each keeps its own allocator slack. */
const THREADS = 2;
const TOTAL = 256 * MiB;
const have = needNbdx();
const dir = tmpDir();
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** One flood: what a client sends once, then what it sends again and again. */
interface Flood {
  name: string;
  opening: Buffer;
  /** A block of requests (or options), repeated as fast as the server takes them. */
  block: Buffer;
  /** Option floods end in the handshake (the option limit closes them): reconnect and go on. */
  reconnects?: boolean;
}

/** Handshake with structured replies and base:allocation, then transmission. */
const structuredGo = Buffer.concat([
  clientFlags(),
  option(C.OPT_STRUCTURED_REPLY),
  option(C.OPT_SET_META_CONTEXT, encodeMetaContextRequest('', [C.CONTEXT_BASE_ALLOCATION])),
  go(),
]);

function repeat(one: () => Buffer, bytes = 256 * 1024): Buffer {
  const parts: Buffer[] = [];
  let n = 0;
  while (n < bytes) {
    const b = one();
    parts.push(b);
    n += b.length;
  }
  return Buffer.concat(parts);
}

const FRAGMENTED = 64 * MiB; // the first 64 MiB hold one written byte per 64 KiB (see beforeAll)
let cookie = 0n;
const floods: Flood[] = [
  {
    name: '1-byte WRITEs',
    opening: structuredGo,
    block: repeat(() => Buffer.concat([request(C.CMD_WRITE, 128 * MiB + Number(cookie % 1000n), 1, { cookie: cookie++ }), Buffer.from([1])])),
  },
  { name: 'FLUSHes', opening: structuredGo, block: repeat(() => request(C.CMD_FLUSH, 0, 0, { cookie: cookie++ })) },
  {
    name: 'failing requests (READ beyond the end)',
    opening: structuredGo,
    block: repeat(() => request(C.CMD_READ, 2 ** 40, 4096, { cookie: cookie++ })),
  },
  {
    name: 'BLOCK_STATUS over a fragmented range',
    opening: structuredGo,
    block: repeat(() => request(C.CMD_BLOCK_STATUS, 0, FRAGMENTED, { cookie: cookie++ })),
  },
  {
    name: '1 MiB READs',
    opening: structuredGo,
    block: repeat(() => request(C.CMD_READ, 256 * MiB, MiB, { cookie: cookie++ })),
  },
  { name: 'NBD_OPT_LIST', opening: clientFlags(), block: repeat(() => option(C.OPT_LIST)), reconnects: true },
  { name: 'unknown options', opening: clientFlags(), block: repeat(() => option(4242, Buffer.alloc(64))), reconnects: true },
];

/** Restart the kernel's peak-RSS counter (VmHWM) of a process. */
function resetPeak(pid: number): void {
  fs.writeFileSync(`/proc/${pid}/clear_refs`, '5');
}

function peakOf(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m![1]) * 1024;
}

function rssOf(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m![1]) * 1024;
}

/** A client that writes `flood` for ever and never reads. */
function flooder(sock: string, flood: Flood): { stop: () => void } {
  let stopped = false;
  let current: net.Socket | null = null;
  const connect = () => {
    if (stopped) return;
    const s = net.connect({ path: sock });
    current = s;
    s.pause(); // never read
    s.on('error', () => {});
    s.on('close', () => {
      if (flood.reconnects) setTimeout(connect, 5);
    });
    s.on('connect', () => {
      s.write(flood.opening);
      const pump = () => {
        while (!stopped && !s.destroyed && s.write(flood.block));
      };
      s.on('drain', pump);
      pump();
    });
  };
  connect();
  return {
    stop() {
      stopped = true;
      current?.destroy();
    },
  };
}

/** A well-behaved client reads a checksummed region; how long it took. */
async function normalClient(uri: string, expected: string): Promise<number> {
  const t0 = Date.now();
  const c = await NbdClient.connect(uri, { timeout: 10_000, requestTimeout: 10_000 });
  const data = await c.pread(4 * MiB, 512 * MiB);
  await c.disconnect();
  expect(createHash('sha256').update(data).digest('hex')).toBe(expected);
  return Date.now() - t0;
}

describe.skipIf(!have)('floods: clients that never read', () => {
  let srv: CliServer;
  let idle = 0;
  let checksum = '';

  beforeAll(async () => {
    // Two threads whatever the machine (the default is one per core, up to 4): the memory disk
    // is served on every one, and each has its own heap (THREADS).
    srv = await startCli(['-U', path.join(dir, 'flood.sock'), `--workers=${THREADS}`, 'memory', '1G']);
    const c = await NbdClient.connect(srv.uri);
    // The normal client's region, and a fragmented range for block status.
    const region = Buffer.alloc(4 * MiB);
    for (let i = 0; i < region.length; i += 4) region.writeUInt32LE((i * 2654435761) >>> 0, i);
    await c.pwrite(region, 512 * MiB);
    checksum = createHash('sha256').update(region).digest('hex');
    for (let off = 0; off < FRAGMENTED; off += 64 * 1024) await c.pwrite(Buffer.from([1]), off);
    // Some ordinary traffic first (reads, block status as qemu-img map asks it), so that the
    // baseline is a server that has served clients: V8 grows its young generation (up to 32 MiB)
    // once, to the allocation rate it sees, whichever client causes it; that is not what a
    // flooding connection costs. Two clients at once, because the memory disk is served on a
    // thread per core (--workers=auto): the second goes to a worker, whose heap grows the same.
    const other = await NbdClient.connect(srv.uri);
    for (let round = 0; round < 20; round++) {
      for (const k of [c, other]) {
        await Promise.all(Array.from({ length: 1000 }, (_, i) => k.pread(4096, i * 4096)));
        await Promise.all(Array.from({ length: 16 }, () => k.blockStatus(FRAGMENTED, 0)));
      }
    }
    await c.disconnect();
    await other.disconnect();
    await new Promise((r) => setTimeout(r, 500));
    idle = rssOf(srv.child.pid!);
  }, 60_000);
  afterAll(() => srv?.stop());

  // Found by the fuzzer: maximum-size READs were each a fresh 32 MiB buffer (too big for the
  // buffer pool), and the garbage outran the collector (3.7 GiB with a client that hung up,
  // 5.5 GiB with one that read everything).
  // Also found by the fuzzer: once the socket failed, every write failed at once and its callback
  // freed budget for the next queued READ, so the connection served its whole backlog into the
  // dead socket without the event loop ever turning (4.3 GiB with simple replies, which zero-fill
  // each fresh buffer). The peak is the kernel's high-water mark: nothing between samples is missed.
  const cases = [
    { ending: 'reads everything', replies: 'extended DF' },
    { ending: 'hangs up at once', replies: 'extended DF' },
    { ending: 'hangs up at once', replies: 'simple' },
  ] as const;
  for (const { ending, replies } of cases) {
    it(`512 ${replies} READs of 32 MiB from a client that ${ending}`, async () => {
      const pid = srv.child.pid!;
      const before = rssOf(pid);
      resetPeak(pid);
      const s = net.connect({ path: srv.uri.replace(/^.*socket=/, '') });
      s.on('error', () => {});
      s.on('data', () => {});
      await new Promise((r) => s.once('connect', r));
      const extended = replies === 'extended DF';
      const reqs = Array.from({ length: 512 }, (_, i) =>
        // Lengths vary, as the fuzzer's did, so the buffer pool cannot hand the same buffer back.
        request(C.CMD_READ, (i % 16) * 32 * MiB, 32 * MiB - (i % 64) * 4096, extended ? { extended, flags: C.CMD_FLAG_DF, cookie: BigInt(i) } : { cookie: BigInt(i) }),
      );
      s.write(Buffer.concat([clientFlags(), ...(extended ? [option(C.OPT_EXTENDED_HEADERS)] : []), go(), ...reqs]));
      if (ending === 'hangs up at once') setTimeout(() => s.destroy(), 50);
      for (let i = 0; i < 40; i++) await new Promise((r) => setTimeout(r, 100));
      s.destroy();
      const peak = peakOf(pid);
      console.log(`32 MiB ${replies} READs, client ${ending}: +${((peak - before) / MiB).toFixed(1)} MiB at peak`);
      expect(peak - before).toBeLessThanOrEqual(PER_CONNECTION + 64 * MiB);
    }, 30_000);
  }

  for (const flood of floods) {
    for (const conns of [1, 8]) {
      it(`${flood.name}, ${conns} connection${conns > 1 ? 's' : ''}`, async () => {
        const pid = srv.child.pid!;
        const before = rssOf(pid);
        const clients = Array.from({ length: conns }, () => flooder(srv.uri.replace(/^.*socket=/, ''), flood));
        let peak = before;
        const sampler = setInterval(() => (peak = Math.max(peak, rssOf(pid))), 100);
        const served: number[] = [];
        try {
          const end = Date.now() + SECONDS * 1000;
          await new Promise((r) => setTimeout(r, 1000));
          while (Date.now() < end) {
            served.push(await normalClient(srv.uri, checksum));
            await new Promise((r) => setTimeout(r, Math.min(2000, Math.max(0, end - Date.now()))));
          }
        } finally {
          clearInterval(sampler);
          for (const c of clients) c.stop();
        }
        const growth = peak - before;
        // After they leave, the memory goes back: to where it was before this flood, or at least
        // to within the server-wide budget (128 MiB) of idle. Freed memory is not always returned
        // to the system at once (the C allocator and V8 keep some for reuse), but the next flood
        // reuses it: RSS does not ratchet up flood after flood.
        // Node 22 keeps more than Node 20 did for reuse after the 8-connection floods: up to 154 MiB
        // over idle was measured (it goes down again after later floods: no ratchet). Hence the
        // server budget plus 64 MiB of allocator slack per thread (the 8 connections are spread
        // over the threads, and each thread's heap grows and is kept on its own: 190 MiB over
        // idle was seen with two); the hard bound is the peak check below.
        // V8 gives a grown heap back when its memory reducer runs, after several seconds of a
        // low allocation rate: a 10 s wait once saw none of an 8-connection BLOCK_STATUS flood's
        // +56 MiB come back (325 MiB after, 269 before), and the next flood began at 242 MiB.
        // So wait up to 30 s before calling it a ratchet.
        const settled = Math.max(before + 48 * MiB, idle + 128 * MiB + THREADS * 64 * MiB);
        let after = rssOf(pid);
        for (let i = 0; i < 150 && after > settled; i++) {
          await new Promise((r) => setTimeout(r, 200));
          after = rssOf(pid);
        }
        console.log(
          `${flood.name} x${conns}: RSS idle ${(idle / MiB).toFixed(0)} MiB, +${(growth / MiB).toFixed(1)} MiB at peak, ` +
            `${(after / MiB).toFixed(0)} MiB after (${(before / MiB).toFixed(0)} before); normal client ${Math.max(...served)} ms at worst (${served.length} runs)`,
        );
        expect(growth).toBeLessThanOrEqual(Math.min(conns * PER_CONNECTION, TOTAL));
        expect(Math.max(...served)).toBeLessThan(2000);
        expect(after).toBeLessThanOrEqual(settled);
      }, (SECONDS + 60) * 1000);
    }
  }
});
