/**
 * Encoders and decoders for every NBD message, used by both the server and the client so the
 * protocol is written once.
 */
import * as C from './constants.js';
import { readU64, writeU64 } from './bytes.js';

// ---------------------------------------------------------------------------------------------
// Handshake

export function encodeGreeting(flags: number): Buffer {
  const b = Buffer.allocUnsafe(C.GREETING_SIZE);
  b.writeBigUInt64BE(C.NBDMAGIC, 0);
  b.writeBigUInt64BE(C.IHAVEOPT, 8);
  b.writeUInt16BE(flags, 16);
  return b;
}

export interface OptionHeader {
  option: number;
  length: number;
}

/** Client option: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(C.OPTION_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(C.IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  b.set(data, 16);
  return b;
}

/** Returns null when the magic is wrong. */
export function decodeOptionHeader(b: Buffer): OptionHeader | null {
  if (b.readBigUInt64BE(0) !== C.IHAVEOPT) return null;
  return { option: b.readUInt32BE(8), length: b.readUInt32BE(12) };
}

export function encodeOptionReply(option: number, type: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(C.OPTION_REPLY_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(C.OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  b.set(data, 20);
  return b;
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function decodeOptionReplyHeader(b: Buffer): OptionReplyHeader | null {
  if (b.readBigUInt64BE(0) !== C.OPTION_REPLY_MAGIC) return null;
  return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

/** u32 length + string, as in LIST replies, INFO/GO and meta-context requests. */
export function encodeLengthString(s: string): Buffer {
  const bytes = Buffer.from(s, 'utf8');
  const b = Buffer.allocUnsafe(4 + bytes.length);
  b.writeUInt32BE(bytes.length, 0);
  bytes.copy(b, 4);
  return b;
}

/** REP_SERVER payload: u32 name length, name, description. */
export function encodeServerReply(name: string, description = ''): Buffer {
  return Buffer.concat([encodeLengthString(name), Buffer.from(description, 'utf8')]);
}

export function decodeServerReply(b: Buffer): { name: string; description: string } {
  const n = b.readUInt32BE(0);
  if (4 + n > b.length) throw new Error('REP_SERVER name runs past the reply');
  return { name: b.toString('utf8', 4, 4 + n), description: b.toString('utf8', 4 + n) };
}

/** INFO/GO request: u32 name length, name, u16 count, u16 requests. */
export function encodeInfoRequest(name: string, infos: readonly number[]): Buffer {
  const nameBytes = encodeLengthString(name);
  const b = Buffer.allocUnsafe(nameBytes.length + 2 + 2 * infos.length);
  nameBytes.copy(b, 0);
  b.writeUInt16BE(infos.length, nameBytes.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, nameBytes.length + 2 + 2 * i));
  return b;
}

/** Returns null when the lengths are inconsistent (ERR_INVALID). */
export function decodeInfoRequest(b: Buffer): { name: string; infos: number[] } | null {
  if (b.length < 6) return null;
  const n = b.readUInt32BE(0);
  if (n > C.MAX_STRING || 4 + n + 2 > b.length) return null;
  const count = b.readUInt16BE(4 + n);
  if (4 + n + 2 + 2 * count !== b.length) return null;
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(b.readUInt16BE(4 + n + 2 + 2 * i));
  return { name: b.toString('utf8', 4, 4 + n), infos };
}

export function encodeInfoExport(size: number, flags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(C.INFO_EXPORT, 0);
  writeU64(b, size, 2);
  b.writeUInt16BE(flags, 10);
  return b;
}

export function encodeInfoString(type: number, text: string): Buffer {
  const bytes = Buffer.from(text, 'utf8');
  const b = Buffer.allocUnsafe(2 + bytes.length);
  b.writeUInt16BE(type, 0);
  bytes.copy(b, 2);
  return b;
}

export function encodeInfoBlockSize(min: number, preferred: number, max: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(C.INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(min, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(max >>> 0, 10);
  return b;
}

export type InfoReply =
  | { type: typeof C.INFO_EXPORT; size: number; flags: number }
  | { type: typeof C.INFO_NAME; name: string }
  | { type: typeof C.INFO_DESCRIPTION; description: string }
  | { type: typeof C.INFO_BLOCK_SIZE; minimum: number; preferred: number; maximum: number }
  | { type: number };

export function decodeInfoReply(b: Buffer): InfoReply {
  const type = b.readUInt16BE(0);
  switch (type) {
    case C.INFO_EXPORT:
      if (b.length !== 12) throw new Error('NBD_INFO_EXPORT has the wrong length');
      return { type, size: readU64(b, 2), flags: b.readUInt16BE(10) };
    case C.INFO_NAME:
      return { type, name: b.toString('utf8', 2) };
    case C.INFO_DESCRIPTION:
      return { type, description: b.toString('utf8', 2) };
    case C.INFO_BLOCK_SIZE:
      if (b.length !== 14) throw new Error('NBD_INFO_BLOCK_SIZE has the wrong length');
      return { type, minimum: b.readUInt32BE(2), preferred: b.readUInt32BE(6), maximum: b.readUInt32BE(10) };
    default:
      return { type };
  }
}

/** LIST_/SET_META_CONTEXT request: export name, u32 query count, (u32 length, query)... */
export function encodeMetaContextRequest(exportName: string, queries: readonly string[]): Buffer {
  const parts = [encodeLengthString(exportName), Buffer.alloc(4)];
  parts[1]!.writeUInt32BE(queries.length, 0);
  for (const q of queries) parts.push(encodeLengthString(q));
  return Buffer.concat(parts);
}

export function decodeMetaContextRequest(b: Buffer): { exportName: string; queries: string[] } | null {
  let at = 0;
  const str = (): string | null => {
    if (at + 4 > b.length) return null;
    const n = b.readUInt32BE(at);
    if (n > C.MAX_STRING || at + 4 + n > b.length) return null;
    const s = b.toString('utf8', at + 4, at + 4 + n);
    at += 4 + n;
    return s;
  };
  const exportName = str();
  if (exportName === null || at + 4 > b.length) return null;
  const count = b.readUInt32BE(at);
  at += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    const q = str();
    if (q === null) return null;
    queries.push(q);
  }
  if (at !== b.length) return null;
  return { exportName, queries };
}

export function encodeMetaContextReply(id: number, name: string): Buffer {
  const bytes = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + bytes.length);
  b.writeUInt32BE(id, 0);
  bytes.copy(b, 4);
  return b;
}

export function decodeMetaContextReply(b: Buffer): { id: number; name: string } {
  return { id: b.readUInt32BE(0), name: b.toString('utf8', 4) };
}

/** Old-style EXPORT_NAME success: size, flags, and 124 zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  writeU64(b, size, 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

// ---------------------------------------------------------------------------------------------
// Transmission

export interface Request {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  /**
   * The offset's exact 64 bits, only when it is 2^53 or more (`offset` is then inexact): such a
   * request always fails, and its extended reply must still echo the offset it came with.
   */
  offsetExact?: bigint;
  /** Effect length (for WRITE, also the payload length unless PAYLOAD_LEN says otherwise). */
  length: number;
}

/** Size of a request header in the chosen mode. */
export function requestSize(extended: boolean): number {
  return extended ? C.EXTENDED_REQUEST_SIZE : C.REQUEST_SIZE;
}

export function encodeRequest(
  out: Buffer,
  at: number,
  extended: boolean,
  flags: number,
  type: number,
  cookie: bigint,
  offset: number,
  length: number,
): number {
  if (extended) {
    out.writeUInt32BE(C.EXTENDED_REQUEST_MAGIC, at);
    out.writeUInt16BE(flags, at + 4);
    out.writeUInt16BE(type, at + 6);
    out.writeBigUInt64BE(cookie, at + 8);
    writeU64(out, offset, at + 16);
    writeU64(out, length, at + 24);
    return at + C.EXTENDED_REQUEST_SIZE;
  }
  out.writeUInt32BE(C.REQUEST_MAGIC, at);
  out.writeUInt16BE(flags, at + 4);
  out.writeUInt16BE(type, at + 6);
  out.writeBigUInt64BE(cookie, at + 8);
  writeU64(out, offset, at + 16);
  out.writeUInt32BE(length, at + 24);
  return at + C.REQUEST_SIZE;
}

/** Returns null when the magic is wrong for the mode (broken framing). */
export function decodeRequest(b: Buffer, extended: boolean): Request | null {
  const magic = b.readUInt32BE(0);
  if (magic !== (extended ? C.EXTENDED_REQUEST_MAGIC : C.REQUEST_MAGIC)) return null;
  const req: Request = {
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    cookie: b.readBigUInt64BE(8),
    offset: readU64(b, 16),
    length: extended ? readU64(b, 24) : b.readUInt32BE(24),
  };
  if (req.offset >= Number.MAX_SAFE_INTEGER) req.offsetExact = b.readBigUInt64BE(16);
  return req;
}

export function writeSimpleReplyHeader(out: Uint8Array, at: number, error: number, cookie: bigint): void {
  const b = out as Buffer;
  b.writeUInt32BE(C.SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  b.writeBigUInt64BE(cookie, at + 8);
}

/** Size of a structured/extended chunk header. */
export function chunkHeaderSize(extended: boolean): number {
  return extended ? C.EXTENDED_REPLY_SIZE : C.STRUCTURED_REPLY_SIZE;
}

/**
 * Write a chunk header for `payloadLength` bytes of payload. For extended headers, `offset` is
 * the request's offset (the spec's "offset" field; informational for most chunk types).
 */
export function writeChunkHeader(
  out: Uint8Array,
  at: number,
  extended: boolean,
  flags: number,
  type: number,
  cookie: bigint,
  offset: number | bigint,
  payloadLength: number,
): void {
  const b = out as Buffer;
  if (extended) {
    b.writeUInt32BE(C.EXTENDED_REPLY_MAGIC, at);
    b.writeUInt16BE(flags, at + 4);
    b.writeUInt16BE(type, at + 6);
    b.writeBigUInt64BE(cookie, at + 8);
    if (typeof offset === 'bigint') b.writeBigUInt64BE(offset, at + 16);
    else writeU64(b, offset, at + 16);
    writeU64(b, payloadLength, at + 24);
  } else {
    b.writeUInt32BE(C.STRUCTURED_REPLY_MAGIC, at);
    b.writeUInt16BE(flags, at + 4);
    b.writeUInt16BE(type, at + 6);
    b.writeBigUInt64BE(cookie, at + 8);
    b.writeUInt32BE(payloadLength, at + 16);
  }
}

export type ReplyHeader =
  | { kind: 'simple'; error: number; cookie: bigint; headerSize: number }
  | {
      kind: 'chunk';
      flags: number;
      type: number;
      cookie: bigint;
      offset: number;
      length: number;
      headerSize: number;
    };

/**
 * Decode the reply header at the front of `b` (needs at least 4 bytes to know the kind; returns
 * 'short' when more bytes are needed, null for an unknown magic).
 */
export function decodeReplyHeader(b: Buffer): ReplyHeader | 'short' | null {
  if (b.length < 4) return 'short';
  const magic = b.readUInt32BE(0);
  if (magic === C.SIMPLE_REPLY_MAGIC) {
    if (b.length < C.SIMPLE_REPLY_SIZE) return 'short';
    return { kind: 'simple', error: b.readUInt32BE(4), cookie: b.readBigUInt64BE(8), headerSize: 16 };
  }
  if (magic === C.STRUCTURED_REPLY_MAGIC) {
    if (b.length < C.STRUCTURED_REPLY_SIZE) return 'short';
    return {
      kind: 'chunk',
      flags: b.readUInt16BE(4),
      type: b.readUInt16BE(6),
      cookie: b.readBigUInt64BE(8),
      offset: 0,
      length: b.readUInt32BE(16),
      headerSize: 20,
    };
  }
  if (magic === C.EXTENDED_REPLY_MAGIC) {
    if (b.length < C.EXTENDED_REPLY_SIZE) return 'short';
    return {
      kind: 'chunk',
      flags: b.readUInt16BE(4),
      type: b.readUInt16BE(6),
      cookie: b.readBigUInt64BE(8),
      offset: readU64(b, 16),
      length: readU64(b, 24),
      headerSize: 32,
    };
  }
  return null;
}

/** ERROR / ERROR_OFFSET chunk payload. */
/** The spec's limit on strings the server sends (error messages, export names and descriptions). */
export const MAX_STRING = 4096;

/** `text` as UTF-8, cut to at most `max` bytes without splitting a character. */
export function utf8Within(text: string, max = MAX_STRING): Buffer {
  const b = Buffer.from(text, 'utf8');
  if (b.length <= max) return b;
  let end = max;
  // Back up over continuation bytes (10xxxxxx) to the start of the character that did not fit.
  while (end > 0 && (b[end]! & 0xc0) === 0x80) end--;
  return b.subarray(0, end);
}

export function encodeErrorPayload(errno: number, message: string, offset?: number): Buffer {
  const msg = utf8Within(message);
  const b = Buffer.allocUnsafe(6 + msg.length + (offset === undefined ? 0 : 8));
  b.writeUInt32BE(errno, 0);
  b.writeUInt16BE(msg.length, 4);
  msg.copy(b, 6);
  if (offset !== undefined) writeU64(b, offset, 6 + msg.length);
  return b;
}

export function decodeErrorPayload(b: Buffer): { errno: number; message: string; offset?: number } {
  const errno = b.readUInt32BE(0);
  const n = b.readUInt16BE(4);
  const message = b.toString('utf8', 6, 6 + n);
  const offset = b.length >= 6 + n + 8 ? readU64(b, 6 + n) : undefined;
  return offset === undefined ? { errno, message } : { errno, message, offset };
}

export interface StatusDescriptor {
  length: number;
  flags: number;
}

/** BLOCK_STATUS (compact) or BLOCK_STATUS_EXT payload. */
export function encodeBlockStatus(contextId: number, extents: readonly StatusDescriptor[], extended: boolean): Buffer {
  if (extended) {
    const b = Buffer.allocUnsafe(8 + 16 * extents.length);
    b.writeUInt32BE(contextId, 0);
    b.writeUInt32BE(extents.length, 4);
    extents.forEach((e, i) => {
      writeU64(b, e.length, 8 + 16 * i);
      writeU64(b, e.flags, 16 + 16 * i);
    });
    return b;
  }
  const b = Buffer.allocUnsafe(4 + 8 * extents.length);
  b.writeUInt32BE(contextId, 0);
  extents.forEach((e, i) => {
    b.writeUInt32BE(e.length, 4 + 8 * i);
    b.writeUInt32BE(e.flags, 8 + 8 * i);
  });
  return b;
}

export function decodeBlockStatus(b: Buffer, extended: boolean): { contextId: number; extents: StatusDescriptor[] } {
  const contextId = b.readUInt32BE(0);
  const extents: StatusDescriptor[] = [];
  if (extended) {
    if (b.length < 8 || (b.length - 8) % 16 !== 0) throw new Error('BLOCK_STATUS_EXT payload length is not 8 + 16n');
    // A descriptor count of 0 means "count from the length" (the spec allows either form).
    const count = b.readUInt32BE(4) || (b.length - 8) / 16;
    if (8 + 16 * count !== b.length) throw new Error('BLOCK_STATUS_EXT count does not match its length');
    for (let i = 0; i < count; i++) extents.push({ length: readU64(b, 8 + 16 * i), flags: readU64(b, 16 + 16 * i) });
  } else {
    if (b.length < 4 || (b.length - 4) % 8 !== 0) throw new Error('BLOCK_STATUS payload length is not 4 + 8n');
    for (let at = 4; at < b.length; at += 8) extents.push({ length: b.readUInt32BE(at), flags: b.readUInt32BE(at + 4) });
  }
  return { contextId, extents };
}

// ---------------------------------------------------------------------------------------------
// Client-side decoders (used by @nbdx/client)

/** `cliserv_magic`: bytes 8..15 of an oldstyle greeting (instead of IHAVEOPT). */
export const OLDSTYLE_MAGIC = 0x00420281861253n;
/** Oldstyle greeting: NBDMAGIC, cliserv magic, size u64, flags u32, 124 zero bytes. */
export const OLDSTYLE_GREETING_SIZE = 152;

export type GreetingStyle = { style: 'newstyle'; flags: number } | { style: 'oldstyle' };

/**
 * Decode the first 18 bytes a server sends. Returns null for a wrong NBDMAGIC or an unknown
 * second magic. For oldstyle, the rest of the greeting is decoded by decodeOldstyleGreeting.
 */
export function decodeGreeting(b: Buffer): GreetingStyle | null {
  if (b.length < C.GREETING_SIZE || b.readBigUInt64BE(0) !== C.NBDMAGIC) return null;
  const second = b.readBigUInt64BE(8);
  if (second === C.IHAVEOPT) return { style: 'newstyle', flags: b.readUInt16BE(16) };
  if (second === OLDSTYLE_MAGIC) return { style: 'oldstyle' };
  return null;
}

/** The whole 152-byte oldstyle greeting: size and the low 16 bits of the flags (transmission flags). */
export function decodeOldstyleGreeting(b: Buffer): { size: number; flags: number } {
  return { size: readU64(b, 16), flags: b.readUInt32BE(24) & 0xffff };
}

/** The 4-byte client flags sent after a newstyle greeting. */
export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

/** EXPORT_NAME success: size u64 and transmission flags u16 (the 124 zero bytes are not looked at). */
export function decodeExportNameReply(b: Buffer): { size: number; flags: number } {
  return { size: readU64(b, 0), flags: b.readUInt16BE(8) };
}

/** OFFSET_HOLE payload (exactly 12 bytes): offset u64, hole length u32. Null when the length is wrong. */
export function decodeOffsetHole(b: Buffer): { offset: number; length: number } | null {
  if (b.length !== 12) return null;
  return { offset: readU64(b, 0), length: b.readUInt32BE(8) };
}
