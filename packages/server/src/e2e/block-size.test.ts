/**
 * Block size constraints (issue 14, item 2), against the spec's block size section: "If a
 * server advertises a minimum block size, the server MAY reject requests not aligned to it with
 * EINVAL" and "the server SHOULD report EINVAL for a READ or WRITE larger than the maximum".
 * A layer that declares sizes never sees a request that breaks them; a bad declaration is an
 * error naming the layer at open, never a value sent to a client.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { needTools, run, runOk, tmpDir } from '@nbdx/testkit';
import { definePlugin } from '../api/define.js';
import type { BlockSize } from '../api/common.js';
import { checkBlockSize, advertisedBlockSize } from '../backend/block-size.js';
import { serve } from '../server.js';
import * as C from '../wire/constants.js';
import { encodeInfoRequest, encodeMetaContextRequest } from '../wire/codec.js';
import { GREETING_SIZE, RawSession, clientFlags, go, option, optionReplies, request } from './raw-session.js';

type Srv = Awaited<ReturnType<typeof serve>>;
const KiB = 1024;
const MiB = 1024 * KiB;
const have = needTools('qemu-img');
const pathOf = (s: Srv) => s.addresses[0]!.path!;
const dir = tmpDir();
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** A RAM disk that declares `sizes` and records every request that reaches it. */
function strictPlugin(sizes: BlockSize, size = 4 * MiB) {
  const seen: Array<[string, number, number]> = [];
  const bytes = Buffer.alloc(size);
  const plugin = definePlugin({
    apiVersion: 2,
    name: 'strict',
    open: () => ({}),
    getSize: () => size,
    blockSize: () => sizes,
    canWrite: () => true,
    canTrim: () => true,
    pread: (_h, buf, offset) => {
      seen.push(['read', offset, buf.length]);
      bytes.copy(buf, 0, offset, offset + buf.length);
    },
    pwrite: (_h, buf, offset) => {
      seen.push(['write', offset, buf.length]);
      bytes.set(buf, offset);
    },
    trim: (_h, count, offset) => {
      seen.push(['trim', offset, count]);
    },
  });
  return { plugin, seen };
}

/** Simple replies of a session after GO: [cookie, error] in order. */
function simpleReplies(data: Buffer, dataLength: (cookie: bigint) => number): Array<[bigint, number]> {
  const out: Array<[bigint, number]> = [];
  // After the GO's replies (INFO_EXPORT, INFO_BLOCK_SIZE unasked since the minimum is over 1, ACK).
  let at = GREETING_SIZE + optionReplies(data).reduce((n, r) => n + 20 + r.length, 0);
  while (at + 16 <= data.length) {
    const error = data.readUInt32BE(at + 4);
    const cookie = data.readBigUInt64BE(at + 8);
    out.push([cookie, error]);
    at += 16 + (error === 0 ? dataLength(cookie) : 0);
  }
  return out;
}

describe('declared block sizes are enforced', () => {
  let s: Srv;
  let seen: Array<[string, number, number]>;
  beforeAll(async () => {
    const p = strictPlugin({ minimum: 512, preferred: 4096, maximum: MiB }, 4 * MiB + 512);
    seen = p.seen;
    s = await serve({ plugin: p.plugin });
  });
  afterAll(() => s.close());

  it('advertises them when asked (NBD_INFO_BLOCK_SIZE)', async () => {
    const r = await RawSession.open(pathOf(s));
    r.send(clientFlags(), option(C.OPT_INFO, encodeInfoRequest('', [C.INFO_BLOCK_SIZE])));
    await r.waitUntil(() => optionReplies(r.received).some((x) => x.type === C.REP_ACK), 3000);
    const data = r.received;
    let at = GREETING_SIZE;
    let found: number[] | null = null;
    while (at + 20 <= data.length) {
      const len = data.readUInt32BE(at + 16);
      if (data.readUInt32BE(at + 12) === C.REP_INFO && data.readUInt16BE(at + 20) === C.INFO_BLOCK_SIZE) {
        found = [data.readUInt32BE(at + 22), data.readUInt32BE(at + 26), data.readUInt32BE(at + 30)];
      }
      at += 20 + len;
    }
    expect(found).toEqual([512, 4096, MiB]);
    r.destroy();
  });

  it('unaligned and oversize requests get EINVAL and never reach the plugin; aligned ones do', async () => {
    const r = await RawSession.open(pathOf(s));
    const payload = (n: number) => Buffer.alloc(n, 7);
    const lengths = new Map<bigint, number>();
    const read = (cookie: bigint, offset: number, length: number) => {
      lengths.set(cookie, length);
      return request(C.CMD_READ, offset, length, { cookie });
    };
    r.send(
      clientFlags(),
      go(),
      read(1n, 100, 512), // offset not aligned
      read(2n, 0, 1000), // length not aligned
      read(3n, 0, 2 * MiB), // over the maximum
      request(C.CMD_WRITE, 512, 100, { cookie: 4n }), // length not aligned: payload read and dropped
      payload(100),
      request(C.CMD_TRIM, 4096, 513, { cookie: 5n }),
      read(6n, 4 * MiB, 512), // the unaligned tail of the export: ends at the export's end
      read(7n, 1024, 4096), // aligned
      request(C.CMD_WRITE, 4096, 512, { cookie: 8n }),
      payload(512),
      read(9n, 0, MiB), // exactly the maximum
    );
    await r.waitUntil(() => simpleReplies(r.received, (c) => lengths.get(c) ?? 0).length === 9, 5000);
    const replies = new Map(simpleReplies(r.received, (c) => lengths.get(c) ?? 0));
    expect([1n, 2n, 3n, 4n, 5n].map((c) => replies.get(c))).toEqual([22, 22, 22, 22, 22]); // EINVAL
    expect([6n, 7n, 8n, 9n].map((c) => replies.get(c))).toEqual([0, 0, 0, 0]);
    expect(seen).toEqual([
      ['read', 4 * MiB, 512],
      ['read', 1024, 4096],
      ['write', 4096, 512],
      ['read', 0, MiB],
    ]);
    r.destroy();
  });

  it.skipIf(!have)('qemu-img accepts what is advertised and reads through it', async () => {
    const out = await runOk('qemu-img', ['info', '--output=json', s.uri]);
    expect(JSON.parse(out)['virtual-size']).toBe(4 * MiB + 512);
    const out2 = path.join(dir, 'copy.img');
    const conv = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', s.uri, out2]);
    expect(conv.code, conv.stderr).toBe(0);
    expect(fs.statSync(out2).size).toBe(4 * MiB + 512);
  });
});

describe('declarations are checked', () => {
  it('the rules, each with a message naming the layer', () => {
    const ok = (min: number, pref: number, max: number) => checkBlockSize("plugin 'p'", { minimum: min, preferred: pref, maximum: max });
    expect(ok(1, 4096, 0xffffffff)).toEqual({ minimum: 1, preferred: 4096, maximum: 0xffffffff });
    expect(ok(512, 512, 512 * 3)).toBeTruthy();
    expect(() => ok(3, 100, 50)).toThrow(/plugin 'p' declares block sizes minimum 3, preferred 100, maximum 50, which are not valid: the minimum must be a power of two/);
    expect(() => ok(128 * KiB, 128 * KiB, MiB)).toThrow(/minimum must be a power of two up to 64 KiB/);
    expect(() => ok(512, 1000, MiB)).toThrow(/preferred size must be a power of two/);
    expect(() => ok(4096, 2048, MiB)).toThrow(/preferred size must be at least the minimum/);
    expect(() => ok(512, 4096, 2048)).toThrow(/maximum must be at least the preferred/);
    expect(() => ok(4096, 4096, 4096 * 3 + 512)).toThrow(/multiple of the minimum/);
    expect(() => ok(0, 4096, MiB)).toThrow(/whole number/);
  });

  it('the advertised triple is always valid: the payload limit caps the maximum, the preferred follows', () => {
    expect(advertisedBlockSize(undefined, 32 * MiB)).toEqual({ minimum: 1, preferred: 4096, maximum: 32 * MiB });
    expect(advertisedBlockSize({ minimum: 64 * KiB, preferred: 16 * MiB, maximum: 0xffffffff }, 100 * KiB)).toEqual({
      minimum: 64 * KiB,
      preferred: 64 * KiB,
      maximum: 64 * KiB,
    });
    for (const maxPayload of [64 * KiB, 100 * KiB, MiB + 1, 32 * MiB]) {
      for (const b of [undefined, { minimum: 512, preferred: 4096, maximum: 0xffffffff }, { minimum: 64 * KiB, preferred: 32 * MiB, maximum: 0xffffffff }]) {
        const a = advertisedBlockSize(b, maxPayload);
        expect(() => checkBlockSize('advertised', a)).not.toThrow();
      }
    }
  });

  it('a plugin declaring 3/100/50 cannot be opened: the client gets the message, nothing is served', async () => {
    const errors: string[] = [];
    const s = await serve({ plugin: strictPlugin({ minimum: 3, preferred: 100, maximum: 50 }).plugin, error: (m) => errors.push(m) });
    try {
      const r = await RawSession.open(pathOf(s));
      r.send(clientFlags(), go());
      await r.waitUntil(() => optionReplies(r.received).length > 0, 3000);
      const [rep] = optionReplies(r.received);
      expect(rep!.type).toBe(C.REP_ERR_UNKNOWN);
      const text = r.received.subarray(GREETING_SIZE + 20, GREETING_SIZE + 20 + rep!.length).toString();
      expect(text).toMatch(/strict declares block sizes minimum 3, preferred 100, maximum 50, which are not valid/);
      expect(errors.join('\n')).toMatch(/strict declares block sizes/);
      r.destroy();
      if (have) {
        const info = await run('qemu-img', ['info', s.uri]);
        expect(info.code).not.toBe(0);
        expect(info.stderr).toMatch(/block sizes minimum 3/);
      }
    } finally {
      await s.close();
    }
  });

  it('maxPayload must keep the triple valid', async () => {
    await expect(serve({ plugin: strictPlugin({ minimum: 512, preferred: 4096, maximum: MiB }).plugin, maxPayload: 1000 })).rejects.toThrow(
      /maxPayload: 1000 is not between 64K and 1G/,
    );
  });
});

// "the server MUST NOT send a reply with a payload larger than the maximum payload it advertised"
// and at most 2^20 descriptors per chunk: a fragmented disk gives a short, truncated answer.
describe('block status replies fit the advertised maximum', () => {
  it('64 KiB maximum, 512-byte fragments over 4 MiB: at most (64K-4)/8 descriptors, covering a prefix', async () => {
    const plugin = definePlugin({
      apiVersion: 2,
      name: 'fragments',
      open: () => ({}),
      getSize: () => 4 * MiB,
      blockSize: () => ({ minimum: 512, preferred: 4096, maximum: 64 * KiB }),
      pread: (_h, buf) => void buf.fill(0),
      canExtents: () => true,
      extents: (_h, count, offset) =>
        Array.from({ length: count / 512 }, (_, i) => ({ offset: offset + i * 512, length: 512, type: i % 2 ? 3 : 0 })),
    });
    const s = await serve({ plugin });
    try {
      const r = await RawSession.open(pathOf(s));
      r.send(
        clientFlags(),
        option(C.OPT_STRUCTURED_REPLY),
        option(C.OPT_SET_META_CONTEXT, encodeMetaContextRequest('', [C.CONTEXT_BASE_ALLOCATION])),
        go(),
      );
      const start = () => GREETING_SIZE + optionReplies(r.received).reduce((n, x) => n + 20 + x.length, 0);
      await r.waitUntil(() => optionReplies(r.received).some((x) => x.option === C.OPT_GO && x.type === C.REP_ACK), 3000);
      const at = start();
      r.send(request(C.CMD_BLOCK_STATUS, 0, 4 * MiB, { cookie: 1n }));
      await r.waitUntil(() => r.receivedLength >= at + 20 && r.receivedLength >= at + 20 + r.received.readUInt32BE(at + 16), 3000);
      const payload = r.received.readUInt32BE(at + 16);
      expect(r.received.readUInt16BE(at + 6)).toBe(C.REPLY_TYPE_BLOCK_STATUS);
      expect(payload).toBeLessThanOrEqual(64 * KiB);
      const descriptors = (payload - 4) / 8;
      expect(descriptors).toBe(Math.floor((64 * KiB - 8) / 8));
      // In order from the request's offset, each a real 512-byte extent.
      expect(r.received.readUInt32BE(at + 20 + 4)).toBe(512);
      r.destroy();
    } finally {
      await s.close();
    }
  });
});
