/**
 * Builds one *valid-looking* conversation (a plan) from a seeded generator: a fixed-newstyle
 * handshake, a plausible option sequence, GO or EXPORT_NAME, then bursts of requests. The plan
 * stays structured (fields, not bytes) so that mutate.mjs can break one field at a time and
 * serialize.mjs can still lay out the rest correctly: that is what makes the fuzzer
 * structure-aware rather than a bit flipper.
 *
 * Plan messages:
 *   { t: 'opt', code, body, magic, lenDelta, lenAbs, sync }   an option (sync: wait for its final reply)
 *   { t: 'tls' }                                              client-side TLS handshake (after STARTTLS)
 *   { t: 'req', ext, magic, flags, type, cookie, offset, length, send }   a request; `send` payload bytes follow
 *   { t: 'wait' }                                             wait until every request so far is answered
 *   { t: 'pause', ms }
 *   { t: 'raw', bytes }                                       bytes outside any structure
 */
import { CF, CMD, IHAVEOPT, INFO, OPT, REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC, HS_FIXED_NEWSTYLE, HS_NO_ZEROES, u32, u64 } from './wire.mjs';

/** Payloads above this are never sent whole: the plan ends in the middle of them instead. */
export const MAX_SENT_PAYLOAD = 1 << 20;

const KiB = 1024n;
const MiB = 1024n * KiB;

/** Offsets and lengths where servers tend to get arithmetic wrong. */
export function boundaryOffsets(size) {
  return [
    0n, 1n, 511n, 512n, 4095n, 4096n, size - 1n, size, size + 1n, size + 4096n, size - 512n,
    (1n << 31n) - 1n, 1n << 31n, (1n << 32n) - 1n, 1n << 32n, (1n << 32n) + 512n,
    (1n << 53n) - 1n, 1n << 53n, (1n << 53n) + 1n, (1n << 63n) - 1n, 1n << 63n, (1n << 63n) + 1n,
    (1n << 64n) - 4096n, (1n << 64n) - 512n, (1n << 64n) - 1n,
  ];
}

export function boundaryLengths(size, ext) {
  const compact = [
    0n, 1n, 511n, 512n, 4096n, 65535n, 65536n, 65537n, MiB, 32n * MiB - 1n, 32n * MiB, 32n * MiB + 1n,
    size - 1n, size, size + 1n, 1n << 31n, (1n << 32n) - 1n,
  ];
  if (!ext) return compact;
  return [...compact, 1n << 32n, (1n << 32n) + 1n, 1n << 53n, (1n << 53n) + 1n, 1n << 63n, (1n << 64n) - 1n];
}

/** Option messages with sensible defaults. */
export function opt(code, body = { k: 'empty' }, extra = {}) {
  return { t: 'opt', code, body, magic: IHAVEOPT, lenDelta: 0, lenAbs: null, sync: true, ...extra };
}

const utf8 = (s) => Buffer.from(s, 'utf8');

/** Export names: mostly the default export, sometimes odd ones. */
function exportName(rng) {
  return rng.weighted([
    [70, () => Buffer.alloc(0)],
    [8, () => utf8('foo')],
    [4, () => utf8('é/ünïcode/../name')],
    [3, () => Buffer.alloc(4096, 0x61)],
    [3, () => Buffer.alloc(4097, 0x62)],
    [2, () => Buffer.from([0xff, 0xfe, 0x80])], // not UTF-8
    [2, () => Buffer.from('a\0b')], // NUL inside a string
    [2, () => Buffer.alloc(rng.range(5000, 70000), 0x63)],
  ])();
}

function infoRequests(rng) {
  return rng.weighted([
    [30, () => []],
    [30, () => [INFO.BLOCK_SIZE]],
    [15, () => [INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE]],
    [8, () => [INFO.EXPORT]],
    [5, () => [INFO.BLOCK_SIZE, INFO.BLOCK_SIZE]], // duplicates: the client MUST NOT, the server must survive
    [7, () => [rng.range(4, 0xffff)]],
    [5, () => Array.from({ length: rng.range(1, 300) }, () => rng.int(6))],
  ])();
}

function metaQueries(rng) {
  return rng.weighted([
    [50, () => [utf8('base:allocation')]],
    [10, () => [utf8('base:')]],
    [8, () => []],
    [8, () => [utf8('qemu:dirty-bitmap:x'), utf8('base:allocation')]],
    [6, () => [utf8('nocolon')]],
    [5, () => [utf8('x-unknown:thing')]],
    [4, () => [utf8('base:allocation'), utf8('base:allocation')]],
    [4, () => [Buffer.alloc(rng.range(4097, 9000), 0x71)]],
    [5, () => Array.from({ length: rng.range(2, 200) }, () => utf8(rng.pick(['base:allocation', 'base:', 'a:b', ''])))],
  ])();
}

export const infoBody = (name, infos) => ({ k: 'info', name, infos, nameLenDelta: 0, countDelta: 0, extra: null, truncate: 0 });
export const metaBody = (name, queries) => ({ k: 'meta', name, queries, nameLenDelta: 0, countDelta: 0, qDelta: [], extra: null, truncate: 0 });

/** One option that does not change the negotiation's outcome much: noise before the real work. */
export function noiseOption(rng, profile) {
  return rng.weighted([
    [14, () => opt(OPT.LIST)],
    [14, () => opt(OPT.INFO, infoBody(exportName(rng), infoRequests(rng)))],
    [10, () => opt(OPT.LIST_META_CONTEXT, metaBody(exportName(rng), metaQueries(rng)))],
    [8, () => opt(rng.pick([0, OPT.PEEK_EXPORT, 12, 13, 0x7fffffff, 0x80000000, 0xffffffff, rng.next32()]), { k: 'raw', bytes: rng.bytes(rng.int(32)) })],
    [6, () => opt(OPT.STRUCTURED_REPLY)],
    [5, () => opt(OPT.EXTENDED_HEADERS)],
    [5, () => opt(OPT.SET_META_CONTEXT, metaBody(exportName(rng), metaQueries(rng)))],
    [profile.tls === 'off' ? 6 : 1, () => opt(OPT.STARTTLS)],
  ])();
}

/** Cookies are unique within a conversation so that every reply can be attributed. */
class Cookies {
  constructor(rng) {
    this.rng = rng;
    this.used = new Set();
    this.next = rng.chance(0.5) ? rng.u64() : BigInt(rng.int(1000));
  }
  take(special = null) {
    let c = special ?? this.next;
    if (special === null) this.next = BigInt.asUintN(64, this.next + 1n + BigInt(this.rng.int(3)));
    while (this.used.has(c)) c = BigInt.asUintN(64, c + 0x10001n);
    this.used.add(c);
    return c;
  }
}

const WRITE_CLASS = new Set([CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES]);
export const isWriteClass = (type) => WRITE_CLASS.has(type);

/** Flags that make sense for a command (the export may still not advertise them). */
function plausibleFlags(rng, type, ext) {
  let f = 0;
  switch (type) {
    case CMD.READ:
      if (rng.chance(0.25)) f |= CF.DF;
      break;
    case CMD.WRITE:
      if (ext && rng.chance(0.95)) f |= CF.PAYLOAD_LEN;
      break;
    case CMD.WRITE_ZEROES:
      if (rng.chance(0.3)) f |= CF.NO_HOLE;
      if (rng.chance(0.25)) f |= CF.FAST_ZERO;
      break;
    case CMD.BLOCK_STATUS:
      if (rng.chance(0.4)) f |= CF.REQ_ONE;
      break;
  }
  if (rng.chance(0.2)) f |= CF.FUA; // valid on every command when SEND_FUA is advertised
  return f;
}

/**
 * A range inside the export; write-class requests avoid the protected region, reads like it.
 * Returns [offset, length] as BigInt.
 */
function saneRange(rng, type, profile) {
  const size = BigInt(profile.size);
  const rOff = BigInt(profile.region.offset);
  const rEnd = rOff + BigInt(profile.region.length);
  const len = BigInt(rng.weighted([
    [25, 512], [25, 4096], [20, rng.range(1, 65536)], [10, 65536], [6, rng.range(1, 8192)],
    [type === CMD.WRITE ? 2 : 8, rng.range(65536, 1 << 20)],
    [type === CMD.WRITE ? 0 : 3, rng.range(1 << 20, 40 << 20)],
  ]));
  const align = rng.chance(0.8) ? 512n : 1n;
  const pickIn = (lo, hi) => {
    // offset in [lo, hi - len], aligned when possible
    if (hi - lo < len) return lo;
    const span = (hi - len - lo) / align;
    return lo + (span > 0n ? (BigInt(rng.next32()) * 65536n + BigInt(rng.int(65536))) % (span + 1n) : 0n) * align;
  };
  if (isWriteClass(type)) {
    const below = rng.chance(Number(rOff) / Number(size));
    return below && rOff >= len ? [pickIn(0n, rOff), len] : [pickIn(rEnd, size), len];
  }
  if ((type === CMD.READ || type === CMD.BLOCK_STATUS) && rng.chance(0.3)) {
    // in or across the protected region, so its content is checked on every stack
    const start = rOff - 4096n + BigInt(rng.int(Number(rEnd - rOff) + 4096)) ;
    return [start - (start % align), len];
  }
  return [pickIn(0n, size), len];
}

/** One request. `ctx` = { ext, profile, cookies }. */
export function genRequest(rng, ctx) {
  const { ext, profile, cookies } = ctx;
  const size = BigInt(profile.size);
  const type = rng.weighted([
    [28, CMD.READ], [20, CMD.WRITE], [10, CMD.BLOCK_STATUS], [9, CMD.WRITE_ZEROES], [8, CMD.TRIM],
    [5, CMD.FLUSH], [6, CMD.CACHE], [4, 'unknown'],
  ]);
  const t = type === 'unknown' ? rng.pick([CMD.RESIZE, 9, 0x7f, 0x100, 0xffff, rng.int(0x10000)]) : type;
  let flags = plausibleFlags(rng, t, ext);
  if (rng.chance(0.12)) flags |= 1 << rng.int(6);
  if (rng.chance(0.04)) flags = rng.int(0x10000);
  let offset, length;
  if (t === CMD.FLUSH) {
    [offset, length] = rng.chance(0.9) ? [0n, 0n] : [rng.pick(boundaryOffsets(size)), rng.pick(boundaryLengths(size, ext))];
  } else if (rng.chance(0.72)) {
    [offset, length] = saneRange(rng, t, profile);
  } else {
    offset = rng.chance(0.7) ? rng.pick(boundaryOffsets(size)) : rng.u64();
    length = rng.pick(boundaryLengths(size, ext));
    if (rng.chance(0.3)) offset = size - length; // ends exactly at the end (negative: wraps)
    offset = BigInt.asUintN(64, offset);
  }
  if (!ext) length = BigInt.asUintN(32, length);
  const req = {
    t: 'req', ext, magic: ext ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC, flags, type: t,
    cookie: cookies.take(rng.chance(0.03) ? rng.pick([0n, (1n << 64n) - 1n]) : null), offset, length, send: 0,
  };
  setNaturalPayload(rng, req);
  return req;
}

/** How many payload bytes a server expects after this header (ignoring the max-payload rule). */
export function declaredPayload(req) {
  if (req.ext) return req.flags & CF.PAYLOAD_LEN ? req.length : 0n;
  return req.type === CMD.WRITE ? req.length : 0n;
}

/** Send the whole payload when it is small enough; otherwise part of it (the plan must end there). */
export function setNaturalPayload(rng, req) {
  const want = declaredPayload(req);
  if (req.ext && req.type === CMD.BLOCK_STATUS && req.flags & CF.PAYLOAD_LEN && rng.chance(0.7)) {
    // the BLOCK_STATUS payload form: effect length + context ids; length says how big it is
    const n = rng.int(4);
    req.length = BigInt(8 + 4 * n);
    req.send = 8 + 4 * n;
    req.payloadBytes = Buffer.concat([u64(rng.pick([0n, 4096n, 1n << 40n])), ...Array.from({ length: n }, () => u32(rng.pick([0, 1, 2])))]);
    return;
  }
  req.send = want <= BigInt(MAX_SENT_PAYLOAD) ? Number(want) : rng.int(65536);
}

/** Requests in bursts; returns plan messages. */
function transmission(rng, ctx, { disc }) {
  const msgs = [];
  const n = rng.small(48);
  let stopped = false;
  for (let i = 0; i < n && !stopped; i++) {
    const r = genRequest(rng, ctx);
    msgs.push(r);
    if (BigInt(r.send) < declaredPayload(r)) stopped = true; // the rest of the stream would be payload
    else if (rng.chance(0.08)) msgs.push({ t: 'wait' });
    else if (rng.chance(0.01)) msgs.push({ t: 'pause', ms: rng.range(1, 30) });
  }
  if (!stopped && disc) msgs.push(discRequest(rng, ctx));
  return { msgs, stopped };
}

export function discRequest(rng, ctx) {
  const weird = rng.chance(0.05);
  return {
    t: 'req', ext: ctx.ext, magic: ctx.ext ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC,
    flags: weird ? rng.pick([CF.FUA, 0x40, 0xffff]) : 0, type: CMD.DISC, cookie: ctx.cookies.take(),
    offset: weird && rng.chance(0.5) ? rng.u64() : 0n, length: weird && rng.chance(0.5) ? 4096n : 0n, send: 0,
  };
}

/** The negotiation a client does before GO: returns { msgs, ext } (ext: extended headers expected). */
function negotiation(rng, profile) {
  const msgs = [];
  const mode = rng.weighted([[30, 'simple'], [35, 'structured'], [35, 'extended']]);
  for (let i = rng.weighted([[55, 0], [25, 1], [12, 2], [8, rng.range(3, 12)]]); i > 0; i--) msgs.push(noiseOption(rng, profile));
  if (mode === 'structured' || (mode === 'extended' && rng.chance(0.2))) msgs.push(opt(OPT.STRUCTURED_REPLY));
  if (mode === 'extended') msgs.push(opt(OPT.EXTENDED_HEADERS));
  if (mode !== 'simple' && rng.chance(0.7)) {
    const name = rng.chance(0.9) ? Buffer.alloc(0) : exportName(rng);
    msgs.push(opt(OPT.SET_META_CONTEXT, metaBody(name, rng.chance(0.85) ? [utf8('base:allocation')] : metaQueries(rng))));
  }
  return { msgs, ext: mode === 'extended' };
}

/** GO (usually) or EXPORT_NAME. */
function enter(rng, ext) {
  if (!ext && rng.chance(0.15)) return opt(OPT.EXPORT_NAME, { k: 'raw', bytes: rng.chance(0.9) ? Buffer.alloc(0) : exportName(rng) });
  if (ext && rng.chance(0.01)) return opt(OPT.EXPORT_NAME, { k: 'raw', bytes: Buffer.alloc(0) }); // MUST NOT after extended headers
  const name = rng.chance(0.9) ? Buffer.alloc(0) : exportName(rng);
  return opt(OPT.GO, infoBody(name, rng.chance(0.7) ? [INFO.BLOCK_SIZE] : infoRequests(rng)));
}

function ending(rng) {
  return rng.weighted([[55, 'disc'], [25, 'keep'], [10, 'close'], [10, 'halfclose']]);
}

/** A whole session: negotiation, GO, requests, disconnect. */
function sessionTemplate(rng, profile, plan, cookies) {
  const neg = negotiation(rng, profile);
  plan.msgs.push(...neg.msgs, enter(rng, neg.ext));
  const end = ending(rng);
  const tx = transmission(rng, { ext: neg.ext, profile, cookies }, { disc: end === 'disc' });
  plan.msgs.push(...tx.msgs);
  plan.end = end === 'disc' || tx.stopped ? rng.pick(['keep', 'keep', 'close']) : end;
  plan.ext = neg.ext;
}

/** Negotiation only: many options, no transmission (or just a GO at the end). */
function optionsTemplate(rng, profile, plan) {
  for (let i = rng.small(24); i > 0; i--) plan.msgs.push(noiseOption(rng, profile));
  const last = rng.weighted([[40, 'abort'], [30, 'none'], [30, 'go']]);
  if (last === 'abort') plan.msgs.push(opt(OPT.ABORT, rng.chance(0.85) ? { k: 'empty' } : { k: 'raw', bytes: rng.bytes(rng.range(1, 64)) }));
  if (last === 'go') plan.msgs.push(enter(rng, false));
  plan.end = rng.pick(['keep', 'close', 'halfclose']);
}

/** One option over and over, pipelined: a server must answer each, in order. */
function repeatTemplate(rng, profile, plan, cookies) {
  const o = noiseOption(rng, profile);
  const times = rng.pick([16, 100, 500, rng.range(2, 2000)]);
  for (let i = 0; i < times; i++) plan.msgs.push({ ...o, sync: false });
  plan.msgs[plan.msgs.length - 1].sync = true;
  plan.msgs.push(enter(rng, false));
  const tx = transmission(rng, { ext: false, profile, cookies }, { disc: true });
  plan.msgs.push(...tx.msgs);
  plan.end = 'keep';
}

/**
 * STARTTLS: a real TLS handshake followed by a session inside it (TLS stacks), plaintext bytes
 * injected right behind STARTTLS (with or without a handshake afterwards), or state negotiated in
 * clear that TLS must forget.
 */
function tlsTemplate(rng, profile, plan, cookies) {
  const kind = rng.weighted([[35, 'handshake'], [25, 'inject'], [20, 'inject-handshake'], [20, 'forget']]);
  plan.tlsKind = kind;
  if (kind === 'forget') {
    plan.msgs.push(opt(OPT.STRUCTURED_REPLY), opt(OPT.SET_META_CONTEXT, metaBody(Buffer.alloc(0), [utf8('base:allocation')])));
    if (rng.chance(0.5)) plan.msgs.push(opt(OPT.EXTENDED_HEADERS));
  }
  const starttls = opt(OPT.STARTTLS);
  plan.msgs.push(starttls);
  if (kind === 'inject' || kind === 'inject-handshake') {
    // Everything up to the next 'tls' goes out in the same write as STARTTLS.
    starttls.sync = false;
    starttls.injectAfter = true;
    const injected = [opt(OPT.STRUCTURED_REPLY, undefined, { sync: false }), opt(OPT.LIST, undefined, { sync: false })];
    if (rng.chance(0.5)) {
      injected.push(opt(OPT.GO, infoBody(Buffer.alloc(0), []), { sync: false }));
      injected.push({ t: 'req', ext: false, magic: REQUEST_MAGIC, flags: 0, type: CMD.WRITE, cookie: cookies.take(), offset: BigInt(profile.region.offset), length: 512n, send: 512 });
    }
    plan.msgs.push(...injected);
  }
  if (kind !== 'inject') plan.msgs.push({ t: 'tls' });
  if (kind === 'inject') {
    plan.end = 'keep';
    return;
  }
  // inside TLS (or after a refused STARTTLS): a normal session
  sessionTemplate(rng, profile, plan, cookies);
}

/** Client flags with bits a server does not know: it MUST hang up. */
function clientFlagsTemplate(rng, profile, plan, cookies) {
  plan.clientFlags = rng.pick([0, 1 << rng.range(2, 31), 0xffffffff, HS_FIXED_NEWSTYLE | 4, rng.next32()]) >>> 0;
  if (rng.chance(0.5)) sessionTemplate(rng, profile, plan, cookies);
  else plan.end = 'keep';
}

/** Few options, many requests: the transmission phase gets most of the attention. */
function transmissionTemplate(rng, profile, plan, cookies) {
  const ext = rng.chance(0.5);
  plan.msgs.push(opt(ext ? OPT.EXTENDED_HEADERS : OPT.STRUCTURED_REPLY));
  plan.msgs.push(opt(OPT.SET_META_CONTEXT, metaBody(Buffer.alloc(0), [utf8('base:allocation')])));
  plan.msgs.push(opt(OPT.GO, infoBody(Buffer.alloc(0), [INFO.BLOCK_SIZE])));
  const ctx = { ext, profile, cookies };
  const n = rng.range(20, 200);
  let stopped = false;
  for (let i = 0; i < n && !stopped; i++) {
    const r = genRequest(rng, ctx);
    plan.msgs.push(r);
    stopped = BigInt(r.send) < declaredPayload(r);
  }
  if (!stopped && rng.chance(0.6)) plan.msgs.push(discRequest(rng, ctx));
  plan.end = 'keep';
  plan.ext = ext;
}

/**
 * @param {import('./rng.mjs').Rng} rng the input's own generator
 * @param {{ size: number, region: { offset: number, length: number }, tls: string }} profile
 */
export function generate(rng, profile) {
  const plan = {
    clientFlags: rng.chance(0.9) ? HS_FIXED_NEWSTYLE | HS_NO_ZEROES : HS_FIXED_NEWSTYLE,
    msgs: [],
    end: 'keep',
    cut: 0,
    split: rng.weighted([[50, 'message'], [35, 'whole'], [10, 'random'], [5, 'bytewise']]),
    ext: false,
    notes: [],
  };
  const cookies = new Cookies(rng);
  plan.cookies = cookies;
  const template = rng.weighted([
    [50, 'session'], [14, 'options'], [profile.tls === 'off' ? 4 : 14, 'tls'], [5, 'repeat'], [4, 'clientflags'], [14, 'transmission'],
  ]);
  plan.notes.push(template);
  ({ session: sessionTemplate, options: optionsTemplate, tls: tlsTemplate, repeat: repeatTemplate, clientflags: clientFlagsTemplate, transmission: transmissionTemplate })[template](
    rng, profile, plan, cookies,
  );
  if (plan.tlsKind) plan.notes.push(`tls:${plan.tlsKind}`);
  return plan;
}
