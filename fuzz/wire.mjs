/**
 * NBD wire format for the fuzzer: constants, encoders for what a client sends and small readers
 * for what a server sends. Written independently of packages/server/src/wire on purpose: the
 * oracle must not share a decoding bug with the code under test. 64-bit fields are BigInt
 * everywhere, because the interesting offsets (2^53 + 1, 2^63, 2^64 - 1) are not exact as numbers.
 */

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const EXTENDED_REPLY_MAGIC = 0x6e8a278c;

export const HS_FIXED_NEWSTYLE = 1;
export const HS_NO_ZEROES = 2;

export const TF = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
  BLOCK_STATUS_PAYLOAD: 1 << 12,
};

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
};
export const OPT_NAME = Object.fromEntries(Object.entries(OPT).map(([k, v]) => [v, k]));

export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: 0x80000001,
  ERR_POLICY: 0x80000002,
  ERR_INVALID: 0x80000003,
  ERR_PLATFORM: 0x80000004,
  ERR_TLS_REQD: 0x80000005,
  ERR_UNKNOWN: 0x80000006,
  ERR_SHUTDOWN: 0x80000007,
  ERR_BLOCK_SIZE_REQD: 0x80000008,
  ERR_TOO_BIG: 0x80000009,
  ERR_EXT_HEADER_REQD: 0x8000000a,
};
export const REP_NAME = Object.fromEntries(Object.entries(REP).map(([k, v]) => [v, k]));
export const isRepError = (type) => type >= 0x80000000;
/** Error reply types the specification defines (anything else with bit 31 is unknown). */
export const KNOWN_REP_ERRORS = new Set(Object.values(REP).filter(isRepError));

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 };

export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
};
export const CMD_NAME = Object.fromEntries(Object.entries(CMD).map(([k, v]) => [v, k]));
export const cmdName = (t) => CMD_NAME[t] ?? `CMD_${t}`;

export const CF = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
  PAYLOAD_LEN: 1 << 5,
};
/** Command flag bits the specification defines at all; the rest are unknown by construction. */
export const CF_KNOWN = 0x3f;

export const CHUNK = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  BLOCK_STATUS_EXT: 6,
  ERROR: 0x8001,
  ERROR_OFFSET: 0x8002,
};
export const CHUNK_NAME = Object.fromEntries(Object.entries(CHUNK).map(([k, v]) => [v, k]));
export const REPLY_FLAG_DONE = 1;

/** The only error values a server may put on the wire. */
export const ERRNO = { EPERM: 1, EIO: 5, ENOMEM: 12, EINVAL: 22, ENOSPC: 28, EOVERFLOW: 75, ENOTSUP: 95, ESHUTDOWN: 108 };
export const ERRNO_NAME = Object.fromEntries(Object.entries(ERRNO).map(([k, v]) => [v, k]));
export const SPEC_ERRNOS = new Set(Object.values(ERRNO));
export const errnoName = (e) => ERRNO_NAME[e] ?? `errno ${e}`;

export const GREETING_SIZE = 18;
export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;
export const MAX_STRING = 4096;
/** What a client may assume without NBD_INFO_BLOCK_SIZE (and the DoS threshold of the spec). */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
export const U64_MAX = (1n << 64n) - 1n;

// ---- encoders -------------------------------------------------------------------------------

export function u16(v) {
  const b = Buffer.allocUnsafe(2);
  b.writeUInt16BE(v & 0xffff, 0);
  return b;
}

export function u32(v) {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(Number(BigInt.asUintN(32, BigInt(v))), 0);
  return b;
}

export function u64(v) {
  const b = Buffer.allocUnsafe(8);
  b.writeBigUInt64BE(BigInt.asUintN(64, BigInt(v)), 0);
  return b;
}

/** An option as a client sends it; `lengthField` may lie about the data that follows. */
export function encodeOption(code, data, { magic = IHAVEOPT, lengthField = data.length } = {}) {
  return Buffer.concat([u64(magic), u32(code), u32(lengthField), data]);
}

/** u32 length + bytes (INFO/GO names, meta-context names and queries). */
export function lengthString(bytes, lengthDelta = 0) {
  return Buffer.concat([u32(bytes.length + lengthDelta), bytes]);
}

/**
 * A request header, compact (28 bytes) or extended (32 bytes). Every field is taken as given:
 * the fuzzer wants to send lengths that are wrong for the mode, too.
 */
export function encodeRequest({ ext, magic, flags, type, cookie, offset, length }) {
  const b = Buffer.alloc(ext ? 32 : 28);
  b.writeUInt32BE(magic >>> 0, 0);
  b.writeUInt16BE(flags & 0xffff, 4);
  b.writeUInt16BE(type & 0xffff, 6);
  b.writeBigUInt64BE(BigInt.asUintN(64, cookie), 8);
  b.writeBigUInt64BE(BigInt.asUintN(64, offset), 16);
  if (ext) b.writeBigUInt64BE(BigInt.asUintN(64, length), 24);
  else b.writeUInt32BE(Number(BigInt.asUintN(32, length)), 24);
  return b;
}

// ---- server-view framing (shared by the oracle and the region guard) --------------------------

/**
 * Decode a request header the way a server in `ext` mode frames it. Returns null when fewer than
 * a header's bytes are available; `magicOk` false means broken framing.
 */
export function decodeRequestAt(buf, at, ext) {
  const size = ext ? 32 : 28;
  if (buf.length - at < size) return null;
  const magic = buf.readUInt32BE(at);
  return {
    at,
    size,
    magicOk: magic === (ext ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC),
    flags: buf.readUInt16BE(at + 4),
    type: buf.readUInt16BE(at + 6),
    cookie: buf.readBigUInt64BE(at + 8),
    offset: buf.readBigUInt64BE(at + 16),
    length: ext ? buf.readBigUInt64BE(at + 24) : BigInt(buf.readUInt32BE(at + 24)),
  };
}

/**
 * How many payload bytes follow a request header, as the specification frames it.
 * `ambiguous` marks headers after which a server may legitimately frame differently (or hang
 * up): a client broke a MUST, so the rest of the stream cannot be predicted.
 */
export function payloadOf(req, ext, maxPayload = DEFAULT_MAX_PAYLOAD) {
  const max = BigInt(maxPayload);
  if (ext) {
    if (req.flags & CF.PAYLOAD_LEN) return { bytes: req.length, ambiguous: req.length > max ? 'extended payload over the maximum' : null };
    if (req.type === CMD.WRITE) return { bytes: 0n, ambiguous: 'extended WRITE without PAYLOAD_LEN' };
    return { bytes: 0n, ambiguous: null };
  }
  if (req.type === CMD.WRITE) return { bytes: req.length, ambiguous: req.length > max ? 'WRITE payload over the maximum' : null };
  return { bytes: 0n, ambiguous: null };
}

/** Option header at `at` (server view); null when incomplete. */
export function decodeOptionAt(buf, at) {
  if (buf.length - at < OPTION_HEADER_SIZE) return null;
  return {
    at,
    magicOk: buf.readBigUInt64BE(at) === IHAVEOPT,
    code: buf.readUInt32BE(at + 8),
    length: buf.readUInt32BE(at + 12),
  };
}

/** Parse INFO/GO option data; null when the lengths are inconsistent. */
export function parseInfoRequest(data) {
  if (data.length < 6) return null;
  const n = data.readUInt32BE(0);
  if (n > data.length - 6) return null;
  const count = data.readUInt16BE(4 + n);
  if (4 + n + 2 + 2 * count > data.length) return null;
  const infos = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + n + 2 * i));
  // trailing bytes: not forbidden outright, a server may refuse them or ignore them
  return { name: data.subarray(4, 4 + n), infos, trailing: data.length - (6 + n + 2 * count) };
}

/** Parse LIST_/SET_META_CONTEXT option data; null when syntactically invalid. */
export function parseMetaRequest(data) {
  let at = 0;
  const str = () => {
    if (data.length - at < 4) return null;
    const n = data.readUInt32BE(at);
    if (n > data.length - at - 4) return null;
    const s = data.subarray(at + 4, at + 4 + n);
    at += 4 + n;
    return s;
  };
  const name = str();
  if (name === null || data.length - at < 4) return null;
  const count = data.readUInt32BE(at);
  at += 4;
  const queries = [];
  for (let i = 0; i < count; i++) {
    const q = str();
    if (q === null) return null;
    queries.push(q);
  }
  // Trailing bytes are not "reading beyond the length": a server may refuse or ignore them.
  return { name, queries, trailing: data.length - at };
}

export const hex = (v) => `0x${BigInt(v).toString(16)}`;
