/**
 * Structure-aware mutations: each one breaks a single field of a generated plan (an option's
 * length, a name's length prefix, a request's flags, a payload's size...) and leaves the rest
 * well formed, so the server gets past the first check and meets the broken field where it
 * matters. Every applied mutation is recorded in plan.notes for the report.
 */
import { boundaryLengths, boundaryOffsets, declaredPayload, discRequest, isWriteClass, noiseOption, opt, setNaturalPayload, MAX_SENT_PAYLOAD } from './generate.mjs';
import { CF, CMD, EXTENDED_REQUEST_MAGIC, IHAVEOPT, OPT, REQUEST_MAGIC } from './wire.mjs';

const options = (plan) => plan.msgs.filter((m) => m.t === 'opt');
const requests = (plan) => plan.msgs.filter((m) => m.t === 'req');

/** Mutations: [weight, name, fn(rng, plan, profile) -> boolean (applied)]. */
const MUTATIONS = [
  // ---- options ------------------------------------------------------------------------------
  [6, 'opt-length', (rng, plan) => {
    const o = pickOpt(rng, plan);
    if (!o) return false;
    const r = rng.int(6);
    if (r === 0) o.lenAbs = rng.pick([0, 0xffffffff, 0x80000000, 65536, 65537, 4096 + 16]);
    else o.lenDelta = rng.pick([-1, 1, -2, 2, -8, 8, 4096, -100000]) * (r === 1 ? 1 : 1);
    return true;
  }],
  [3, 'opt-magic', (rng, plan) => {
    const o = pickOpt(rng, plan);
    if (!o) return false;
    o.magic = IHAVEOPT ^ (1n << BigInt(rng.int(64)));
    return true;
  }],
  [4, 'opt-code', (rng, plan) => {
    const o = pickOpt(rng, plan);
    if (!o) return false;
    o.code = rng.pick([0, OPT.PEEK_EXPORT, 12, 0x7fffffff, 0xffffffff, rng.range(1, 11), rng.next32()]);
    return true;
  }],
  [5, 'opt-name-length', (rng, plan) => {
    const o = pickOpt(rng, plan, (m) => m.body.k === 'info' || m.body.k === 'meta');
    if (!o) return false;
    o.body.nameLenDelta = rng.pick([-1, 1, 2, 6, 4096, -0x10000, 0x7fffffff, -(o.body.name.length + 1)]);
    return true;
  }],
  [5, 'opt-count', (rng, plan) => {
    const o = pickOpt(rng, plan, (m) => m.body.k === 'info' || m.body.k === 'meta');
    if (!o) return false;
    o.body.countDelta = rng.pick([-1, 1, 2, 100, 0xffff, 0x7fffffff]);
    return true;
  }],
  [3, 'opt-query-length', (rng, plan) => {
    const o = pickOpt(rng, plan, (m) => m.body.k === 'meta' && m.body.queries.length > 0);
    if (!o) return false;
    o.body.qDelta[rng.int(o.body.queries.length)] = rng.pick([-1, 1, 1000, 0x7fffffff, -1000]);
    return true;
  }],
  [3, 'opt-truncate', (rng, plan) => {
    const o = pickOpt(rng, plan, (m) => m.body.k === 'info' || m.body.k === 'meta');
    if (!o) return false;
    o.body.truncate = rng.range(1, 8);
    return true;
  }],
  [3, 'opt-extra-data', (rng, plan) => {
    const o = pickOpt(rng, plan);
    if (!o) return false;
    if (o.body.k === 'info' || o.body.k === 'meta') o.body.extra = rng.bytes(rng.range(1, 16));
    else o.body = { k: 'raw', bytes: Buffer.concat([optRaw(o.body), rng.bytes(rng.range(1, 16))]) };
    return true;
  }],
  [3, 'opt-repeat', (rng, plan) => {
    const i = pickIndex(rng, plan, (m) => m.t === 'opt' && m.code !== OPT.GO && m.code !== OPT.EXPORT_NAME && m.code !== OPT.ABORT && m.code !== OPT.STARTTLS);
    if (i < 0) return false;
    const times = rng.pick([2, 3, 50, 300]);
    const copies = Array.from({ length: times }, () => ({ ...plan.msgs[i], sync: rng.chance(0.2) }));
    plan.msgs.splice(i + 1, 0, ...copies);
    return true;
  }],
  [4, 'opt-insert', (rng, plan, profile) => {
    const i = firstIndex(plan, (m) => m.t === 'opt' && (m.code === OPT.GO || m.code === OPT.EXPORT_NAME));
    const at = rng.int((i < 0 ? plan.msgs.length : i) + 1);
    plan.msgs.splice(at, 0, rng.chance(0.3) ? opt(rng.pick([OPT.STARTTLS, OPT.EXTENDED_HEADERS, OPT.STRUCTURED_REPLY])) : noiseOption(rng, profile));
    return true;
  }],
  [3, 'opt-pipeline', (rng, plan) => {
    let any = false;
    for (const m of options(plan)) if (m.code !== OPT.STARTTLS || !plan.msgs.some((x) => x.t === 'tls')) (m.sync = false), (any = true);
    return any;
  }],
  [2, 'starttls-inject', (rng, plan) => {
    // plaintext right behind STARTTLS, in the same write (the server must not act on it)
    const i = firstIndex(plan, (m) => m.t === 'opt' && m.code === OPT.STARTTLS);
    if (i < 0) return false;
    plan.msgs[i].sync = false;
    plan.msgs[i].injectAfter = true;
    plan.msgs.splice(i + 1, 0, opt(OPT.STRUCTURED_REPLY, undefined, { sync: false }), opt(OPT.INFO, { k: 'info', name: Buffer.alloc(0), infos: [], nameLenDelta: 0, countDelta: 0, qDelta: [], extra: null, truncate: 0 }, { sync: false }));
    return true;
  }],
  [2, 'client-flags', (rng, plan) => {
    plan.clientFlags = rng.pick([0, 2, 4, 0x80000000, 0xffffffff, (plan.clientFlags | (1 << rng.range(2, 31))) >>> 0]) >>> 0;
    return true;
  }],
  // ---- requests -----------------------------------------------------------------------------
  [7, 'req-flags', (rng, plan) => {
    const r = pickReq(rng, plan);
    if (!r) return false;
    r.flags = rng.weighted([[5, r.flags ^ (1 << rng.int(16))], [2, r.flags | CF.PAYLOAD_LEN], [2, r.flags & ~CF.PAYLOAD_LEN], [1, 0xffff], [2, 1 << rng.int(6)]]);
    fixPayload(rng, r);
    return true;
  }],
  [5, 'req-type', (rng, plan) => {
    const r = pickReq(rng, plan);
    if (!r) return false;
    r.type = rng.pick([CMD.READ, CMD.WRITE, CMD.FLUSH, CMD.TRIM, CMD.CACHE, CMD.WRITE_ZEROES, CMD.BLOCK_STATUS, CMD.RESIZE, 9, 0xffff, rng.int(0x10000)]);
    fixPayload(rng, r);
    return true;
  }],
  [7, 'req-offset', (rng, plan, profile) => {
    const r = pickReq(rng, plan);
    if (!r) return false;
    r.offset = rng.chance(0.85) ? rng.pick(boundaryOffsets(BigInt(profile.size))) : rng.u64();
    return true;
  }],
  [7, 'req-length', (rng, plan, profile) => {
    const r = pickReq(rng, plan);
    if (!r) return false;
    r.length = rng.pick(boundaryLengths(BigInt(profile.size), r.ext));
    if (!r.ext) r.length = BigInt.asUintN(32, r.length);
    fixPayload(rng, r);
    return true;
  }],
  [6, 'payload-mismatch', (rng, plan) => {
    // short or long WRITE payloads: the server must frame by the header, not by our intent
    const r = pickReq(rng, plan, (m) => declaredPayload(m) > 0n && declaredPayload(m) <= BigInt(MAX_SENT_PAYLOAD));
    if (!r) return false;
    r.send = Math.max(0, r.send + rng.pick([-1, 1, -28, 28, -32, 32, -512, 512, 4096]));
    return true;
  }],
  [2, 'req-magic', (rng, plan) => {
    const r = pickReq(rng, plan);
    if (!r) return false;
    r.magic = rng.pick([r.ext ? REQUEST_MAGIC : EXTENDED_REQUEST_MAGIC, r.magic ^ 1, 0, 0x67446698]);
    return true;
  }],
  [2, 'req-wrong-mode', (rng, plan) => {
    // a compact header in extended mode or the other way round
    const r = pickReq(rng, plan);
    if (!r) return false;
    r.ext = !r.ext;
    r.magic = r.ext ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC;
    fixPayload(rng, r);
    return true;
  }],
  [3, 'req-burst', (rng, plan) => {
    // many small requests pipelined at once
    const i = pickIndex(rng, plan, (m) => m.t === 'req' && m.type !== CMD.DISC && BigInt(m.send) === declaredPayload(m) && m.send <= 8192);
    if (i < 0) return false;
    const base = plan.msgs[i];
    // many requests, not many bytes: a burst stays within ~2 MiB
    const n = Math.min(rng.pick([32, 128, 512]), Math.floor((2 << 20) / (base.send + 32)));
    const copies = [];
    for (let k = 0; k < n; k++) {
      const c = { ...base, cookie: plan.cookies.take() };
      if (rng.chance(0.5)) c.offset = base.offset + BigInt(k * 512);
      if (isWriteClass(c.type)) c.offset = base.offset; // never walk a write into the protected region
      copies.push(c);
    }
    plan.msgs.splice(i + 1, 0, ...copies);
    return true;
  }],
  [2, 'req-disc-middle', (rng, plan) => {
    // DISC followed by more requests: nothing after it may be answered
    const i = pickIndex(rng, plan, (m) => m.t === 'req');
    if (i < 0) return false;
    plan.msgs.splice(i, 0, discRequest(rng, { ext: plan.msgs[i].ext, cookies: plan.cookies }));
    return true;
  }],
  // ---- stream -------------------------------------------------------------------------------
  [4, 'cut', (rng, plan) => {
    // hang up (or fall silent) in the middle of a header or payload
    plan.cut = rng.range(1, 40);
    plan.end = rng.pick(['keep', 'close', 'halfclose']);
    return true;
  }],
  [2, 'raw-garbage', (rng, plan) => {
    const at = rng.int(plan.msgs.length + 1);
    plan.msgs.splice(at, 0, { t: 'raw', bytes: rng.chance(0.5) ? rng.bytes(rng.range(1, 64)) : Buffer.alloc(rng.range(1, 64)) });
    return true;
  }],
  [2, 'end', (rng, plan) => {
    plan.end = rng.pick(['keep', 'close', 'halfclose']);
    return true;
  }],
  [2, 'split', (rng, plan) => {
    plan.split = rng.pick(['message', 'whole', 'random', 'bytewise']);
    return true;
  }],
];

function optRaw(body) {
  return body.k === 'raw' ? body.bytes : body.k === 'empty' ? body.junk ?? Buffer.alloc(0) : Buffer.alloc(0);
}

function firstIndex(plan, pred) {
  return plan.msgs.findIndex(pred);
}

function pickIndex(rng, plan, pred) {
  const idx = [];
  plan.msgs.forEach((m, i) => pred(m) && idx.push(i));
  return idx.length ? rng.pick(idx) : -1;
}

function pickOpt(rng, plan, pred = () => true) {
  const list = options(plan).filter(pred);
  return list.length ? rng.pick(list) : null;
}

function pickReq(rng, plan, pred = (m) => m.type !== CMD.DISC) {
  const list = requests(plan).filter(pred);
  return list.length ? rng.pick(list) : null;
}

/** After a field changed, send the payload the new header asks for (or part of it). */
function fixPayload(rng, r) {
  delete r.payloadBytes;
  setNaturalPayload(rng, r);
}

/** Apply 0..n mutations, chosen by weight. */
export function mutate(rng, plan, profile) {
  const n = rng.weighted([[28, 0], [36, 1], [20, 2], [10, 3], [6, rng.range(4, 8)]]);
  for (let i = 0; i < n; i++) {
    const [, name, fn] = rng.weighted(MUTATIONS.map((m) => [m[0], m]));
    if (fn(rng, plan, profile)) plan.notes.push(name);
  }
  // Keep every input small enough to run in well under a second: cut what goes past 8 MiB.
  let bytes = 0;
  for (let i = 0; i < plan.msgs.length; i++) {
    const m = plan.msgs[i];
    bytes += m.t === 'req' ? 32 + m.send : m.t === 'opt' ? 16 + (m.body.name?.length ?? 0) + (m.body.bytes?.length ?? 0) + 64 : m.t === 'raw' ? m.bytes.length : 0;
    if (bytes > 8 << 20) {
      plan.msgs.length = i;
      plan.notes.push('size-capped');
      break;
    }
  }
  // A payload we do not send whole ends the conversation: whatever follows would be payload.
  const cutAt = plan.msgs.findIndex((m) => m.t === 'req' && BigInt(m.send) < declaredPayload(m) && m.send < Number(declaredPayload(m)) - 4096);
  if (cutAt >= 0 && cutAt < plan.msgs.length - 1 && rng.chance(0.8)) plan.msgs.length = cutAt + 1;
  return plan;
}
