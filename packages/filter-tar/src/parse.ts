/**
 * A tar archive reader that only looks at headers. It knows nothing of NBD: it reads through a
 * `read(offset, length)` callback and returns where each member's data lies inside the archive,
 * so the filter can serve a member by shifting offsets.
 *
 * Understood: v7, ustar (name prefix), GNU (long names `L`, long link names `K`, base-256
 * numbers, old sparse `S` headers and their extension blocks), pax (`x` extended headers and
 * `g` global headers: path, linkpath, size, GNU.sparse.*), star's 131-byte prefix.
 */

export const BLOCK_SIZE = 512;

/** Reads `length` bytes at `offset` of the archive. Must return exactly `length` bytes. */
export type ReadFn = (offset: number, length: number) => Promise<Uint8Array> | Uint8Array;

export type MemberKind =
  | 'file'
  | 'hardlink'
  | 'symlink'
  | 'character device'
  | 'block device'
  | 'directory'
  | 'fifo'
  | 'sparse file'
  | 'volume label'
  | 'multi-volume continuation'
  | 'other';

export type HeaderFormat = 'v7' | 'ustar' | 'gnu' | 'star';

export interface TarMember {
  /** Full path as stored (after long-name, prefix and pax records are applied). */
  name: string;
  kind: MemberKind;
  /** The header's type flag character ('0', '5', 'S', …; '\0' shows as '0'). */
  typeflag: string;
  /** Where this member's first header block starts (including L/K/x headers before it). */
  headerOffset: number;
  /** Where its data starts in the archive. */
  offset: number;
  /** Bytes of data stored in the archive. */
  size: number;
  /** For sparse files: the size of the file once expanded. */
  realSize?: number;
  /** Target of a hard or symbolic link. */
  linkName?: string;
  /** What the member's main header looked like; `pax` is set when x/g records applied. */
  format: HeaderFormat;
  pax: boolean;
}

export type ScanEnd = 'end-marker' | 'eof' | 'limit' | 'stopped';

export interface ScanResult {
  members: TarMember[];
  /** Why the scan stopped. */
  reason: ScanEnd;
  /** Offset of the block where the scan stopped. */
  end: number;
  /** Header blocks read (every 512-byte header, including L/K/x/g and sparse extensions). */
  headerReads: number;
}

export interface ScanOptions {
  /** Bytes in the archive (the size of the layer holding it). */
  size: number;
  /** Read nothing at or past this offset; the scan stops with reason 'limit'. */
  limit?: number;
  /** Called for each member as it is found; return true to stop the scan there. */
  stop?: (member: TarMember) => boolean;
  /** Largest L, K, x or g payload accepted (default 16 MiB). */
  maxMetadata?: number;
}

/** Anything wrong with the archive itself: the message says what and where. */
export class TarFormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TarFormatError';
  }
}

const DEFAULT_MAX_METADATA = 16 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Small decoders

const utf8 = new TextDecoder('utf-8', { fatal: true });
const latin1 = new TextDecoder('latin1');

/** Names are bytes; almost always UTF-8. Anything else is shown byte for byte (latin1). */
export function decodeName(bytes: Uint8Array): string {
  try {
    return utf8.decode(bytes);
  } catch {
    return latin1.decode(bytes);
  }
}

/** The bytes of a NUL-terminated (or field-filling) string field. */
function cString(block: Uint8Array, start: number, length: number): Uint8Array {
  const field = block.subarray(start, start + length);
  const nul = field.indexOf(0);
  return nul < 0 ? field : field.subarray(0, nul);
}

function ascii(bytes: Uint8Array): string {
  return latin1.decode(bytes);
}

/**
 * A numeric header field: octal ASCII (optionally padded with spaces or NULs), or GNU base-256
 * when the first byte has its top bit set. Values past 2^53 and negative values are refused.
 */
export function parseNumeric(field: Uint8Array, what = 'number'): number {
  if (field.length === 0) return 0;
  const first = field[0]!;
  if (first & 0x80) {
    if (first === 0xff) throw new TarFormatError(`${what} is negative (base-256 field)`);
    let value = first & 0x7f;
    for (let i = 1; i < field.length; i++) {
      value = value * 256 + field[i]!;
      if (value > Number.MAX_SAFE_INTEGER) {
        throw new TarFormatError(`${what} is larger than 2^53 (base-256 field)`);
      }
    }
    return value;
  }
  let i = 0;
  while (i < field.length && field[i] === 0x20) i++;
  let value = 0;
  let digits = 0;
  for (; i < field.length; i++) {
    const c = field[i]!;
    if (c >= 0x30 && c <= 0x37) {
      value = value * 8 + (c - 0x30);
      digits++;
    } else if (c === 0x20 || c === 0) {
      break;
    } else {
      throw new TarFormatError(`${what} is not an octal number: '${printable(field)}'`);
    }
  }
  // Only spaces and NULs may follow the digits.
  for (; i < field.length; i++) {
    const c = field[i]!;
    if (c !== 0x20 && c !== 0) throw new TarFormatError(`${what} is not an octal number: '${printable(field)}'`);
  }
  if (digits === 0) return 0;
  if (value > Number.MAX_SAFE_INTEGER) throw new TarFormatError(`${what} is larger than 2^53`);
  return value;
}

function printable(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : `\\x${b.toString(16).padStart(2, '0')}`)).join('');
}

/** Sum of the header's bytes with the checksum field counted as spaces: unsigned and signed. */
export function headerChecksums(block: Uint8Array): { unsigned: number; signed: number } {
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK_SIZE; i++) {
    const b = i >= 148 && i < 156 ? 0x20 : block[i]!;
    unsigned += b;
    signed += b >= 0x80 ? b - 256 : b;
  }
  return { unsigned, signed };
}

function isZeroBlock(block: Uint8Array): boolean {
  for (let i = 0; i < block.length; i++) if (block[i] !== 0) return false;
  return true;
}

/** Compression formats recognised by their first bytes, so a compressed archive gets a clear error. */
const MAGICS: { name: string; bytes: number[]; hint: string }[] = [
  { name: 'gzip', bytes: [0x1f, 0x8b], hint: 'gunzip' },
  { name: 'xz', bytes: [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], hint: 'unxz' },
  { name: 'bzip2', bytes: [0x42, 0x5a, 0x68], hint: 'bunzip2' },
  { name: 'zstd', bytes: [0x28, 0xb5, 0x2f, 0xfd], hint: 'unzstd' },
  { name: 'lzip', bytes: [0x4c, 0x5a, 0x49, 0x50], hint: 'lzip -d' },
  { name: 'lz4', bytes: [0x04, 0x22, 0x4d, 0x18], hint: 'unlz4' },
  { name: 'compress (.Z)', bytes: [0x1f, 0x9d], hint: 'uncompress' },
  { name: 'lzma', bytes: [0x5d, 0x00, 0x00], hint: 'unlzma' },
  { name: 'zip', bytes: [0x50, 0x4b, 0x03, 0x04], hint: 'unzip' },
];

/** The compression format whose magic number `bytes` starts with, if any. */
export function detectCompression(bytes: Uint8Array): { name: string; hint: string } | undefined {
  for (const m of MAGICS) {
    if (bytes.length >= m.bytes.length && m.bytes.every((b, i) => bytes[i] === b)) return m;
  }
  return undefined;
}

function compressedError(kind: { name: string; hint: string }): TarFormatError {
  const what = kind.name === 'zip' ? 'a zip archive, not a tar archive' : `${kind.name}-compressed`;
  return new TarFormatError(
    `the archive is ${what}; the tar filter reads uncompressed tar archives only ` +
      `(decompress it first, e.g. with ${kind.hint})`,
  );
}

// ---------------------------------------------------------------------------------------------
// pax extended headers

/**
 * Parse pax records, `"<length> <key>=<value>\n"`, where length counts the whole record.
 * Later records for the same key win. Values are returned as raw bytes.
 */
export function parsePaxRecords(data: Uint8Array, where = 'pax header'): Map<string, Uint8Array> {
  const out = new Map<string, Uint8Array>();
  let pos = 0;
  while (pos < data.length) {
    // Some writers pad the payload with NULs.
    if (data[pos] === 0) break;
    let len = 0;
    let i = pos;
    while (i < data.length && data[i]! >= 0x30 && data[i]! <= 0x39) {
      len = len * 10 + (data[i]! - 0x30);
      i++;
      if (len > data.length) break;
    }
    if (i === pos || data[i] !== 0x20 || len <= i - pos + 1 || pos + len > data.length) {
      throw new TarFormatError(`${where}: malformed record at byte ${pos}`);
    }
    const record = data.subarray(i + 1, pos + len);
    if (record[record.length - 1] !== 0x0a) {
      throw new TarFormatError(`${where}: record at byte ${pos} does not end with a newline`);
    }
    const eq = record.indexOf(0x3d);
    if (eq <= 0) throw new TarFormatError(`${where}: record at byte ${pos} has no key=value`);
    const key = decodeName(record.subarray(0, eq));
    out.set(key, record.subarray(eq + 1, record.length - 1));
    pos += len;
  }
  return out;
}

/** A pax decimal value (size, GNU.sparse.realsize): digits only, at most 2^53. */
export function parsePaxNumber(value: Uint8Array, what: string): number {
  const text = ascii(value);
  if (!/^\d+$/.test(text)) throw new TarFormatError(`${what}: '${printable(value)}' is not a decimal number`);
  const n = Number(text);
  if (!Number.isSafeInteger(n)) throw new TarFormatError(`${what}: ${text} is larger than 2^53`);
  return n;
}

// ---------------------------------------------------------------------------------------------
// Headers

interface RawHeader {
  name: Uint8Array;
  linkName: Uint8Array;
  size: number;
  typeflag: string;
  format: HeaderFormat;
  realSize?: number;
  /** GNU old sparse: more sparse-map blocks follow this header. */
  extended: boolean;
}

/** Decode one header block (its checksum already verified). */
export function decodeHeader(block: Uint8Array, at: number): RawHeader {
  const magic = ascii(block.subarray(257, 263));
  const version = ascii(block.subarray(263, 265));
  let format: HeaderFormat = 'v7';
  if (magic === 'ustar ' && version === ' \0') format = 'gnu';
  else if (magic === 'ustar\0') format = ascii(block.subarray(508, 512)) === 'tar\0' ? 'star' : 'ustar';

  const flagByte = block[156]!;
  const typeflag = flagByte === 0 ? '0' : String.fromCharCode(flagByte);
  let name = cString(block, 0, 100);
  if (format === 'ustar' || format === 'star') {
    const prefix = cString(block, 345, format === 'star' ? 131 : 155);
    if (prefix.length > 0) {
      const joined = new Uint8Array(prefix.length + 1 + name.length);
      joined.set(prefix, 0);
      joined[prefix.length] = 0x2f;
      joined.set(name, prefix.length + 1);
      name = joined;
    }
  }
  const where = `tar header at offset ${at}`;
  const size = parseNumeric(block.subarray(124, 136), `${where}: size`);
  const header: RawHeader = {
    name,
    linkName: cString(block, 157, 100),
    size,
    typeflag,
    format,
    extended: false,
  };
  if (typeflag === 'S' && format === 'gnu') {
    header.realSize = parseNumeric(block.subarray(483, 495), `${where}: sparse real size`);
    header.extended = block[482] !== 0;
  }
  return header;
}

function kindOf(typeflag: string, name: string): MemberKind {
  switch (typeflag) {
    case '0':
    case '7':
      // v7 archives mark directories only by a trailing slash.
      return name.endsWith('/') ? 'directory' : 'file';
    case '1':
      return 'hardlink';
    case '2':
      return 'symlink';
    case '3':
      return 'character device';
    case '4':
      return 'block device';
    case '5':
    case 'D':
      return 'directory';
    case '6':
      return 'fifo';
    case 'S':
      return 'sparse file';
    case 'V':
      return 'volume label';
    case 'M':
      return 'multi-volume continuation';
    default:
      return 'other';
  }
}

// ---------------------------------------------------------------------------------------------
// The scan

/**
 * Walk the archive's headers from the start, collecting members until the end-of-archive block,
 * the end of the data, the limit, or `stop` says so. Only header blocks and L/K/x/g payloads are
 * read, never member data.
 */
export async function scanTar(read: ReadFn, options: ScanOptions): Promise<ScanResult> {
  const size = options.size;
  const limit = Math.min(options.limit ?? Infinity, size);
  const maxMeta = options.maxMetadata ?? DEFAULT_MAX_METADATA;
  const members: TarMember[] = [];
  let headerReads = 0;

  // Per-member metadata from L, K and x headers; global defaults from g headers.
  let longName: Uint8Array | undefined;
  let longLink: Uint8Array | undefined;
  let pax: Map<string, Uint8Array> | undefined;
  const globals = new Map<string, Uint8Array>();
  let memberStart: number | undefined;

  const readExact = async (offset: number, length: number): Promise<Uint8Array> => {
    const bytes = await read(offset, length);
    if (bytes.length !== length) {
      throw new Error(`short read from the archive: ${bytes.length} of ${length} bytes at offset ${offset}`);
    }
    return bytes;
  };

  /** Round up to whole blocks, checking the data lies inside the archive. */
  const skipData = (dataOffset: number, length: number, what: string): number => {
    const end = dataOffset + length;
    if (end > size) {
      throw new TarFormatError(
        `the archive is truncated: ${what} at offset ${dataOffset} needs ${length} bytes but the archive ends at ${size}`,
      );
    }
    const next = dataOffset + Math.ceil(length / BLOCK_SIZE) * BLOCK_SIZE;
    if (!Number.isSafeInteger(next)) throw new TarFormatError(`${what}: offsets past 2^53 are not supported`);
    return next;
  };

  let pos = 0;
  for (;;) {
    if (pos >= size) {
      if (memberStart !== undefined) {
        throw new TarFormatError(`the archive is truncated: extended headers at offset ${memberStart} are not followed by a member`);
      }
      return { members, reason: 'eof', end: pos, headerReads };
    }
    if (pos + BLOCK_SIZE > limit) {
      if (pos + BLOCK_SIZE > size && limit === size) {
        // A partial block at the end: maybe a compressed file shorter than a block.
        const tail = await readExact(pos, size - pos);
        if (pos === 0) {
          const kind = detectCompression(tail);
          if (kind) throw compressedError(kind);
          throw new TarFormatError(`this is not a tar archive: it is only ${size} bytes long (a tar header is 512)`);
        }
        if (isZeroBlock(tail)) return { members, reason: 'eof', end: pos, headerReads };
        throw new TarFormatError(`the archive is truncated: a partial ${size - pos}-byte block at offset ${pos}`);
      }
      return { members, reason: 'limit', end: pos, headerReads };
    }

    const block = await readExact(pos, BLOCK_SIZE);
    headerReads++;
    if (isZeroBlock(block)) {
      if (memberStart !== undefined) {
        throw new TarFormatError(`extended headers at offset ${memberStart} are followed by the end of the archive`);
      }
      return { members, reason: 'end-marker', end: pos, headerReads };
    }

    const stored = (() => {
      try {
        return parseNumeric(block.subarray(148, 156), 'checksum');
      } catch {
        return NaN;
      }
    })();
    const sums = headerChecksums(block);
    if (stored !== sums.unsigned && stored !== sums.signed) {
      if (pos === 0) {
        const kind = detectCompression(block);
        if (kind) throw compressedError(kind);
        throw new TarFormatError(
          `this is not a tar archive: the first header's checksum does not match ` +
            `(stored ${Number.isNaN(stored) ? 'unreadable' : stored}, computed ${sums.unsigned})`,
        );
      }
      throw new TarFormatError(
        `corrupted tar header at offset ${pos}: checksum mismatch ` +
          `(stored ${Number.isNaN(stored) ? `'${printable(block.subarray(148, 156))}'` : stored}, computed ${sums.unsigned})`,
      );
    }

    const headerAt = pos;
    const h = decodeHeader(block, pos);
    memberStart ??= headerAt;
    pos += BLOCK_SIZE;

    // Metadata headers: their payload applies to the next member.
    if (h.typeflag === 'L' || h.typeflag === 'K' || h.typeflag === 'x' || h.typeflag === 'g') {
      const what = { L: 'GNU long name', K: 'GNU long link name', x: 'pax extended header', g: 'pax global header' }[h.typeflag];
      if (h.size > maxMeta) {
        throw new TarFormatError(`${what} at offset ${headerAt} is ${h.size} bytes, more than the ${maxMeta} accepted`);
      }
      const next = skipData(pos, h.size, what);
      if (next > limit) return { members, reason: 'limit', end: headerAt, headerReads };
      const data = h.size > 0 ? await readExact(pos, h.size) : new Uint8Array(0);
      if (h.typeflag === 'L') longName = cString(data, 0, data.length);
      else if (h.typeflag === 'K') longLink = cString(data, 0, data.length);
      else {
        const records = parsePaxRecords(data, `${what} at offset ${headerAt}`);
        if (h.typeflag === 'g') {
          for (const [k, v] of records) globals.set(k, v);
          // A global header is not part of any member.
          memberStart = undefined;
        } else {
          pax ??= new Map();
          for (const [k, v] of records) pax.set(k, v);
        }
      }
      pos = next;
      continue;
    }

    // GNU old sparse headers may be followed by more blocks of sparse map.
    let extended = h.extended;
    while (extended) {
      if (pos + BLOCK_SIZE > limit) {
        if (pos + BLOCK_SIZE > size) throw new TarFormatError(`the archive is truncated: sparse map at offset ${pos}`);
        return { members, reason: 'limit', end: memberStart, headerReads };
      }
      const ext = await readExact(pos, BLOCK_SIZE);
      headerReads++;
      extended = ext[504] !== 0;
      pos += BLOCK_SIZE;
    }

    // Effective attributes: x records, then g records, then the header (and L/K for GNU).
    const attr = (key: string): Uint8Array | undefined => pax?.get(key) ?? globals.get(key);
    const where = `member at offset ${headerAt}`;
    const paxPath = attr('path');
    const nameBytes = paxPath ?? longName ?? h.name;
    const linkBytes = attr('linkpath') ?? longLink ?? h.linkName;
    let name = decodeName(nameBytes);
    const paxSize = attr('size');
    let dataSize = paxSize !== undefined ? parsePaxNumber(paxSize, `${where}: pax size`) : h.size;
    // GNU tar: a hard link has no data on tape whatever its size field says.
    if (h.typeflag === '1') dataSize = 0;

    let kind = kindOf(h.typeflag, name);
    let realSize = h.realSize;
    // pax-format GNU sparse files (0.0, 0.1, 1.0) are plain members carrying GNU.sparse.* keys.
    const sparseKeys = [...(pax?.keys() ?? []), ...globals.keys()].filter((k) => k.startsWith('GNU.sparse.'));
    if (sparseKeys.length > 0 && (kind === 'file' || kind === 'other')) {
      kind = 'sparse file';
      const sparseName = attr('GNU.sparse.name');
      if (sparseName) name = decodeName(sparseName);
      const real = attr('GNU.sparse.realsize') ?? attr('GNU.sparse.size');
      if (real) realSize = parsePaxNumber(real, `${where}: GNU.sparse.realsize`);
    }

    const member: TarMember = {
      name,
      kind,
      typeflag: h.typeflag,
      headerOffset: memberStart,
      offset: pos,
      size: dataSize,
      format: h.format,
      pax: pax !== undefined || globals.size > 0,
    };
    if (realSize !== undefined) member.realSize = realSize;
    if (kind === 'hardlink' || kind === 'symlink') member.linkName = decodeName(linkBytes);

    pos = skipData(pos, dataSize, `member '${name}'`);
    members.push(member);
    longName = undefined;
    longLink = undefined;
    pax = undefined;
    memberStart = undefined;
    if (options.stop?.(member)) return { members, reason: 'stopped', end: pos, headerReads };
  }
}

/** `./a/b`, `/a/b`, `a//b/` → `a/b`: how names are compared when no exact match exists. */
export function normalizeName(name: string): string {
  const parts = name.split('/').filter((p) => p !== '' && p !== '.');
  return parts.join('/');
}

/**
 * The first member called `name`, comparing names as stored and normalised (so `disk.img` finds
 * `./disk.img`). The first occurrence wins, as the archive is read front to back.
 */
export function findMember(members: readonly TarMember[], name: string): TarMember | undefined {
  const n = normalizeName(name);
  return members.find((m) => m.name === name || (n !== '' && normalizeName(m.name) === n));
}

/** Why a member cannot be served, or undefined when it can (a regular file). */
export function whyNotServable(m: TarMember): string | undefined {
  switch (m.kind) {
    case 'file':
      return undefined;
    case 'hardlink':
      return `'${m.name}' is a hard link to '${m.linkName}' in the archive; links are not served (ask for '${m.linkName}')`;
    case 'symlink':
      return `'${m.name}' is a symbolic link to '${m.linkName}' in the archive; links are not served`;
    case 'directory':
      return `'${m.name}' is a directory in the archive; only regular files can be served`;
    case 'sparse file':
      return (
        `'${m.name}' is a GNU sparse file in the archive (stored with tar --sparse); sparse members are not served ` +
        `(re-create the archive without --sparse)`
      );
    case 'character device':
    case 'block device':
    case 'fifo':
      return `'${m.name}' is a ${m.kind} in the archive; only regular files can be served`;
    case 'volume label':
      return `'${m.name}' is a volume label, not a file`;
    case 'multi-volume continuation':
      return `'${m.name}' continues a file from a previous volume of a multi-volume archive; it cannot be served`;
    default:
      return `'${m.name}' has tar type '${m.typeflag}', which is not a regular file; only regular files can be served`;
  }
}
