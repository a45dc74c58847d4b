/**
 * Meta context negotiation (issue 14, item 3), byte for byte, with the spec's sentences:
 * - LIST/SET "query ... 'base:' ... namespace only": a bare namespace lists every context in it;
 *   a SET selects only contexts named in full, so `base:` selects nothing.
 * - "Issuing this command replaces all previously-set metadata contexts (including when this
 *   command fails)".
 * - A request whose lengths or counts do not add up to the option's length is syntactically
 *   invalid: NBD_REP_ERR_INVALID, and the connection goes on.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import { serve } from '../server.js';
import * as C from '../wire/constants.js';
import { encodeMetaContextRequest } from '../wire/codec.js';
import { RawSession, clientFlags, go, option, optionReplies, request } from './raw-session.js';

type Srv = Awaited<ReturnType<typeof serve>>;

let s: Srv;
beforeAll(async () => {
  s = await serve({ plugin: createMemoryPlugin(), config: { size: '1M' } });
});
afterAll(() => s.close());

/** Send `opts` after the client flags and STRUCTURED_REPLY; resolve with the replies to them. */
async function exchange(...opts: Buffer[]) {
  const r = await RawSession.open(s.addresses[0]!.path!);
  r.send(clientFlags(), option(C.OPT_STRUCTURED_REPLY), ...opts);
  const finals = () => optionReplies(r.received).filter((x) => x.type !== C.REP_META_CONTEXT).length;
  await r.waitUntil(() => finals() >= 1 + opts.length, 3000);
  const all = optionReplies(r.received);
  let at = 18;
  const named = all.map((x) => {
    const body = r.received.subarray(at + 20, at + 20 + x.length);
    at += 20 + x.length;
    return { ...x, name: x.type === C.REP_META_CONTEXT ? body.subarray(4).toString() : undefined };
  });
  return { r, replies: named.slice(1) };
}

describe('meta contexts', () => {
  it("LIST 'base:' lists base:allocation", async () => {
    const { r, replies } = await exchange(option(C.OPT_LIST_META_CONTEXT, encodeMetaContextRequest('', ['base:'])));
    expect(replies.map((x) => [x.type, x.name])).toEqual([
      [C.REP_META_CONTEXT, 'base:allocation'],
      [C.REP_ACK, undefined],
    ]);
    r.destroy();
  });

  it("SET 'base:' selects nothing: only the ACK, and BLOCK_STATUS then gets EINVAL", async () => {
    const { r, replies } = await exchange(option(C.OPT_SET_META_CONTEXT, encodeMetaContextRequest('', ['base:'])), go());
    expect(replies.filter((x) => x.option === C.OPT_SET_META_CONTEXT).map((x) => x.type)).toEqual([C.REP_ACK]);
    const before = r.receivedLength;
    r.send(request(C.CMD_BLOCK_STATUS, 0, 4096, { cookie: 5n }));
    await r.waitUntil(() => r.receivedLength > before, 3000);
    // A structured error chunk: magic, flags DONE, type ERROR, cookie, length, errno.
    const reply = r.received.subarray(before);
    expect(reply.readUInt32BE(0)).toBe(C.STRUCTURED_REPLY_MAGIC);
    expect(reply.readUInt16BE(6)).toBe(C.REPLY_TYPE_ERROR);
    expect(reply.readUInt32BE(20)).toBe(22);
    r.destroy();
  });

  it("SET 'base:allocation' selects it (the control case)", async () => {
    const { r, replies } = await exchange(option(C.OPT_SET_META_CONTEXT, encodeMetaContextRequest('', ['base:', 'base:allocation'])));
    expect(replies.map((x) => [x.type, x.name])).toEqual([
      [C.REP_META_CONTEXT, 'base:allocation'],
      [C.REP_ACK, undefined],
    ]);
    r.destroy();
  });

  const valid = encodeMetaContextRequest('', ['base:allocation']);
  const malformed: Array<[string, Buffer]> = [
    ['a query count larger than the queries sent', (() => { const b = Buffer.from(valid); b.writeUInt32BE(2, 4); return b; })()],
    ['a query count smaller than the queries sent', (() => { const b = Buffer.from(valid); b.writeUInt32BE(0, 4); return b; })()],
    ['a query length past the end', (() => { const b = Buffer.from(valid); b.writeUInt32BE(100, 8); return b; })()],
    ['an export name length past the end', (() => { const b = Buffer.from(valid); b.writeUInt32BE(1000, 0); return b; })()],
    ['trailing bytes', Buffer.concat([valid, Buffer.from([0])])],
    ['a truncated count', valid.subarray(0, 6)],
    ['no data at all', Buffer.alloc(0)],
  ];
  for (const opt of [C.OPT_LIST_META_CONTEXT, C.OPT_SET_META_CONTEXT]) {
    for (const [what, data] of malformed) {
      it(`${opt === C.OPT_LIST_META_CONTEXT ? 'LIST' : 'SET'} with ${what}: ERR_INVALID, then the next option is answered`, async () => {
        const { r, replies } = await exchange(option(opt, data), option(C.OPT_LIST_META_CONTEXT, encodeMetaContextRequest('', [])));
        expect(replies[0]!.type).toBe(C.REP_ERR_INVALID);
        expect(replies.slice(1).map((x) => x.type)).toEqual([C.REP_META_CONTEXT, C.REP_ACK]);
        r.destroy();
      });
    }
  }
});
