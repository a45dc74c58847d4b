/**
 * MBR and GPT partition table parsing: pure functions that read the disk through a `read(offset,
 * length)` callback, so they can be tested on hand-built tables without a server.
 *
 * Numbering follows Linux: MBR primary partitions are 1-4, logical partitions inside an extended
 * partition are 5 and up in chain order (an EBR with no data entry takes no number); GPT
 * partition N is entry N of the partition entry array.
 */
import { Errno, NbdError } from '@nbdx/server/api';
import { crc32 } from './crc32.js';

/** Reads `length` bytes at `offset` of the disk; never asked for bytes beyond the disk. */
export type ReadFn = (offset: number, length: number) => Promise<Uint8Array> | Uint8Array;

export type Scheme = 'mbr' | 'gpt';

export interface Partition {
  /** As the user counts: 1-4 primary, 5+ logical (MBR); entry number (GPT). */
  number: number;
  scheme: Scheme;
  sectorSize: number;
  /** First sector and number of sectors, in units of `sectorSize`. */
  start: number;
  sectors: number;
  /** The same in bytes. */
  offset: number;
  length: number;
  /** MBR: the type byte as `0x83`; GPT: the partition type GUID (upper case, as sgdisk prints it). */
  type: string;
  /** GPT only. */
  name?: string;
  uuid?: string;
  logical?: boolean;
  /** Set when the table was read but something was repaired on the way (a damaged primary GPT). */
  warning?: string;
}

export type PartitionErrorReason =
  | 'no-table'
  | 'not-found'
  | 'outside-disk'
  | 'corrupt'
  | 'loop'
  | 'invalid-number';

/** Every error from this module: the reason for tests and callers, the message for people. */
export class PartitionError extends NbdError {
  constructor(
    readonly reason: PartitionErrorReason,
    message: string,
  ) {
    super(reason === 'not-found' || reason === 'invalid-number' ? Errno.EINVAL : Errno.EIO, message);
    this.name = 'PartitionError';
  }
}

/** Sector sizes the filter accepts. */
export const SECTOR_SIZES = [512, 4096] as const;

export interface FindOptions {
  /**
   * Bytes per sector, or 'auto': GPT headers are looked for at 512 then 4096 bytes (LBA 1 of
   * either), MBR disks are read with 512-byte sectors.
   */
  sectorSize?: number | 'auto';
  /** Most logical partitions walked before giving up (a guard on top of loop detection). */
  maxLogical?: number;
}

/** Find partition `n` of the disk. Throws PartitionError with a clear message otherwise. */
export async function findPartition(
  read: ReadFn,
  diskSize: number,
  n: number,
  options: FindOptions = {},
): Promise<Partition> {
  if (!Number.isSafeInteger(n) || n < 1) {
    throw new PartitionError('invalid-number', `partition: '${n}' is not a partition number (they count from 1)`);
  }
  const requested = options.sectorSize ?? 'auto';
  if (diskSize < 512) {
    throw new PartitionError('no-table', `no partition table: the disk is only ${diskSize} bytes`);
  }
  const mbr = parseMbrSector(await read(0, 512));
  if (!mbr) {
    throw new PartitionError(
      'no-table',
      'no partition table: sector 0 has no MBR boot signature (0x55 0xAA at byte 510), and GPT disks need one too',
    );
  }
  if (mbr.some((e) => e.type === 0xee)) {
    return findGptPartition(read, diskSize, n, requested);
  }
  const ss = requested === 'auto' ? 512 : requested;
  return findMbrPartition(read, diskSize, n, ss, mbr, options.maxLogical ?? 4096);
}

// ---- MBR -------------------------------------------------------------------------------------

export interface MbrEntry {
  /** Slot 0-3 in its sector. */
  slot: number;
  bootable: boolean;
  type: number;
  /** Relative start sector (its meaning depends on where the entry is) and sector count. */
  start: number;
  sectors: number;
}

const EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
export function isExtended(type: number): boolean {
  return EXTENDED_TYPES.has(type);
}

/** The four entries of an MBR or EBR sector, or null when the boot signature is missing. */
export function parseMbrSector(sector: Uint8Array): MbrEntry[] | null {
  if (sector.length < 512 || sector[510] !== 0x55 || sector[511] !== 0xaa) return null;
  const v = new DataView(sector.buffer, sector.byteOffset, 512);
  const out: MbrEntry[] = [];
  for (let slot = 0; slot < 4; slot++) {
    const p = 446 + slot * 16;
    out.push({
      slot,
      bootable: (v.getUint8(p) & 0x80) !== 0,
      type: v.getUint8(p + 4),
      start: v.getUint32(p + 8, true),
      sectors: v.getUint32(p + 12, true),
    });
  }
  return out;
}

function isEmpty(e: MbrEntry): boolean {
  return e.type === 0 || e.sectors === 0;
}

function hexType(t: number): string {
  return '0x' + t.toString(16).padStart(2, '0');
}

function mbrPartition(n: number, ss: number, start: number, sectors: number, type: number, logical: boolean): Partition {
  return {
    number: n,
    scheme: 'mbr',
    sectorSize: ss,
    start,
    sectors,
    offset: start * ss,
    length: sectors * ss,
    type: hexType(type),
    ...(logical ? { logical: true } : {}),
  };
}

function checkInside(p: Partition, diskSize: number): Partition {
  if (p.offset + p.length > diskSize) {
    const diskSectors = Math.floor(diskSize / p.sectorSize);
    throw new PartitionError(
      'outside-disk',
      `partition ${p.number} (sectors ${p.start} to ${p.start + p.sectors - 1}, ${p.sectorSize}-byte sectors) ` +
        `lies outside the disk (${diskSectors} sectors, ${diskSize} bytes)`,
    );
  }
  return p;
}

async function findMbrPartition(
  read: ReadFn,
  diskSize: number,
  n: number,
  ss: number,
  mbr: MbrEntry[],
  maxLogical: number,
): Promise<Partition> {
  if (n <= 4) {
    const e = mbr[n - 1]!;
    if (isEmpty(e)) throw new PartitionError('not-found', `partition ${n} not found: MBR entry ${n} is empty`);
    if (isExtended(e.type)) {
      throw new PartitionError(
        'not-found',
        `partition ${n} is an extended partition (type ${hexType(e.type)}), a container for logical ` +
          `partitions 5 and up, not a partition with data`,
      );
    }
    return checkInside(mbrPartition(n, ss, e.start, e.sectors, e.type, false), diskSize);
  }
  const extended = mbr.filter((e) => !isEmpty(e) && isExtended(e.type));
  if (extended.length === 0) {
    throw new PartitionError(
      'not-found',
      `partition ${n} not found: this MBR disk has no extended partition, so only partitions 1-4 exist`,
    );
  }
  let last = 4;
  for (const ext of extended) {
    for await (const p of walkLogical(read, diskSize, ss, ext, last + 1, maxLogical)) {
      last = p.number;
      if (p.number === n) return checkInside(p, diskSize);
    }
  }
  throw new PartitionError(
    'not-found',
    last === 4
      ? `partition ${n} not found: the extended partition holds no logical partitions`
      : `partition ${n} not found: the logical partitions are 5 to ${last}`,
  );
}

/**
 * The logical partitions of one extended partition, following its chain of EBRs (extended boot
 * records). Each EBR holds one data entry (relative to the EBR) and a link to the next EBR
 * (relative to the start of the extended partition). Loops and EBRs outside the disk are errors.
 */
export async function* walkLogical(
  read: ReadFn,
  diskSize: number,
  ss: number,
  ext: MbrEntry,
  firstNumber = 5,
  maxLogical = 4096,
): AsyncGenerator<Partition> {
  const diskSectors = Math.floor(diskSize / ss);
  const seen = new Set<number>();
  let number = firstNumber;
  let ebr = ext.start;
  for (;;) {
    if (seen.has(ebr)) {
      throw new PartitionError(
        'loop',
        `the chain of logical partitions loops: the EBR at sector ${ebr} links back to an EBR already read`,
      );
    }
    seen.add(ebr);
    if (seen.size > maxLogical) {
      throw new PartitionError('corrupt', `more than ${maxLogical} logical partitions: the EBR chain looks corrupt`);
    }
    if (ebr >= diskSectors) {
      throw new PartitionError(
        'outside-disk',
        `the EBR (extended boot record) at sector ${ebr} lies outside the disk (${diskSectors} sectors of ${ss} bytes)`,
      );
    }
    const entries = parseMbrSector(await read(ebr * ss, 512));
    if (!entries) {
      throw new PartitionError('corrupt', `the EBR at sector ${ebr} has no boot signature (0x55 0xAA): the chain of logical partitions is broken`);
    }
    // Data entries first (normally just slot 0); an EBR without one takes no number.
    for (const e of entries.slice(0, 2)) {
      if (isEmpty(e) || isExtended(e.type)) continue;
      yield mbrPartition(number++, ss, ebr + e.start, e.sectors, e.type, true);
    }
    const link = entries.slice(1).find((e) => !isEmpty(e) && isExtended(e.type));
    if (!link) return;
    ebr = ext.start + link.start;
  }
}

/** Every partition of an MBR disk, for listings (logical ones only when the chain is sound). */
export async function listMbrPartitions(read: ReadFn, diskSize: number, ss = 512): Promise<Partition[]> {
  const mbr = parseMbrSector(await read(0, 512));
  if (!mbr) throw new PartitionError('no-table', 'no partition table: no MBR boot signature');
  const out: Partition[] = [];
  mbr.forEach((e, i) => {
    if (!isEmpty(e) && !isExtended(e.type)) out.push(mbrPartition(i + 1, ss, e.start, e.sectors, e.type, false));
  });
  let last = 4;
  for (const ext of mbr.filter((e) => !isEmpty(e) && isExtended(e.type))) {
    for await (const p of walkLogical(read, diskSize, ss, ext, last + 1)) {
      out.push(p);
      last = p.number;
    }
  }
  return out;
}

// ---- GPT -------------------------------------------------------------------------------------

export interface GptHeader {
  sectorSize: number;
  /** Where this header was found (1 for the primary, the last sector for the backup). */
  myLba: number;
  alternateLba: number;
  firstUsableLba: number;
  lastUsableLba: number;
  diskGuid: string;
  entriesLba: number;
  entryCount: number;
  entrySize: number;
  entriesCrc: number;
}

/** Largest entry array we are willing to read (128 entries of 128 bytes is 16 KiB). */
const MAX_ENTRY_ARRAY = 4 * 1024 * 1024;
const SIGNATURE = 'EFI PART';

function u64(v: DataView, at: number, what: string): number {
  const x = v.getBigUint64(at, true);
  if (x > BigInt(Number.MAX_SAFE_INTEGER)) throw new PartitionError('corrupt', `GPT ${what} ${x} is too large`);
  return Number(x);
}

/** Format a GUID stored in the GPT's mixed-endian layout, as sgdisk and sfdisk print it. */
export function formatGuid(b: Uint8Array): string {
  const h = (i: number) => b[i]!.toString(16).padStart(2, '0');
  const le = (idx: number[]) => idx.map(h).join('');
  return [
    le([3, 2, 1, 0]),
    le([5, 4]),
    le([7, 6]),
    le([8, 9]),
    le([10, 11, 12, 13, 14, 15]),
  ]
    .join('-')
    .toUpperCase();
}

/**
 * Parse and check the GPT header at `lba`. Returns the header, or a string saying what is wrong
 * with it (so the caller can try the backup and report both).
 */
export async function readGptHeader(
  read: ReadFn,
  diskSize: number,
  ss: number,
  lba: number,
): Promise<GptHeader | string> {
  const diskSectors = Math.floor(diskSize / ss);
  if (lba < 1 || lba >= diskSectors) return `sector ${lba} is outside the disk`;
  const sector = await read(lba * ss, ss);
  const v = new DataView(sector.buffer, sector.byteOffset, ss);
  const sig = String.fromCharCode(...sector.subarray(0, 8));
  if (sig !== SIGNATURE) return `no GPT signature ('EFI PART') at sector ${lba}`;
  const revision = v.getUint32(8, true);
  if (revision >>> 16 !== 1) return `unsupported GPT revision 0x${revision.toString(16).padStart(8, '0')}`;
  const headerSize = v.getUint32(12, true);
  if (headerSize < 92 || headerSize > ss) return `GPT header size ${headerSize} is not between 92 and ${ss}`;
  const storedCrc = v.getUint32(16, true);
  const copy = Uint8Array.from(sector.subarray(0, headerSize));
  copy.fill(0, 16, 20);
  const crc = crc32(copy);
  if (crc !== storedCrc) {
    return `GPT header CRC32 mismatch (stored 0x${storedCrc.toString(16).padStart(8, '0')}, computed 0x${crc.toString(16).padStart(8, '0')})`;
  }
  try {
    const h: GptHeader = {
      sectorSize: ss,
      myLba: u64(v, 24, 'current LBA'),
      alternateLba: u64(v, 32, 'backup LBA'),
      firstUsableLba: u64(v, 40, 'first usable LBA'),
      lastUsableLba: u64(v, 48, 'last usable LBA'),
      diskGuid: formatGuid(sector.subarray(56, 72)),
      entriesLba: u64(v, 72, 'partition entry LBA'),
      entryCount: v.getUint32(80, true),
      entrySize: v.getUint32(84, true),
      entriesCrc: v.getUint32(88, true),
    };
    if (h.myLba !== lba) return `GPT header at sector ${lba} says it is at sector ${h.myLba}`;
    if (h.firstUsableLba > h.lastUsableLba + 1) {
      return `GPT first usable sector ${h.firstUsableLba} is after the last usable sector ${h.lastUsableLba}`;
    }
    if (h.lastUsableLba >= diskSectors) {
      return `GPT last usable sector ${h.lastUsableLba} is beyond the end of the disk (${diskSectors} sectors): was the image truncated?`;
    }
    if (h.entrySize < 128 || (h.entrySize & (h.entrySize - 1)) !== 0) {
      return `GPT partition entry size ${h.entrySize} is not 128 times a power of two`;
    }
    if (h.entryCount === 0) return 'GPT has no partition entries';
    const arrayBytes = h.entryCount * h.entrySize;
    if (arrayBytes > MAX_ENTRY_ARRAY) {
      return `GPT partition entry array of ${h.entryCount} entries of ${h.entrySize} bytes is larger than ${MAX_ENTRY_ARRAY} bytes`;
    }
    const arrayStart = h.entriesLba * ss;
    const arrayEnd = arrayStart + arrayBytes;
    if (h.entriesLba < 2 || arrayEnd > diskSize) {
      return `GPT partition entry array (sector ${h.entriesLba}, ${arrayBytes} bytes) is outside the disk`;
    }
    if (arrayStart < (lba + 1) * ss && arrayEnd > lba * ss) {
      return `GPT partition entry array (sector ${h.entriesLba}) overlaps its header`;
    }
    return h;
  } catch (err) {
    if (err instanceof PartitionError) return err.message;
    throw err;
  }
}

/** The entry array of a checked header, with its CRC32 checked too. */
export async function readGptEntries(read: ReadFn, h: GptHeader): Promise<Uint8Array | string> {
  const bytes = await read(h.entriesLba * h.sectorSize, h.entryCount * h.entrySize);
  const crc = crc32(bytes);
  if (crc !== h.entriesCrc) {
    return `GPT partition entry array CRC32 mismatch (stored 0x${h.entriesCrc.toString(16).padStart(8, '0')}, computed 0x${crc.toString(16).padStart(8, '0')})`;
  }
  return bytes;
}

export interface Gpt {
  header: GptHeader;
  entries: Uint8Array;
  /** Set when the primary header or its array was damaged and the backup was used. */
  usedBackup?: string;
}

/**
 * The GPT of a disk with `ss`-byte sectors: the primary header at LBA 1 and the array it points
 * to, or, when either is damaged, the backup header (at the primary's alternate LBA, else the
 * last sector) and its array. Returns a string describing the damage when neither is usable.
 */
export async function readGpt(read: ReadFn, diskSize: number, ss: number): Promise<Gpt | string> {
  const primary = await readGptHeader(read, diskSize, ss, 1);
  let primaryProblem: string;
  if (typeof primary !== 'string') {
    const entries = await readGptEntries(read, primary);
    if (typeof entries !== 'string') return { header: primary, entries };
    primaryProblem = entries;
  } else primaryProblem = primary;

  const lastLba = Math.floor(diskSize / ss) - 1;
  const candidates = new Set<number>();
  if (typeof primary !== 'string' && primary.alternateLba > 1) candidates.add(primary.alternateLba);
  candidates.add(lastLba);
  const backupProblems: string[] = [];
  for (const lba of candidates) {
    if (lba <= 1) continue;
    const backup = await readGptHeader(read, diskSize, ss, lba);
    if (typeof backup === 'string') {
      backupProblems.push(backup);
      continue;
    }
    const entries = await readGptEntries(read, backup);
    if (typeof entries === 'string') {
      backupProblems.push(entries);
      continue;
    }
    return { header: backup, entries, usedBackup: primaryProblem };
  }
  return `primary GPT: ${primaryProblem}; backup GPT: ${backupProblems.join('; ') || 'none'}`;
}

/** Decode entry `n` (1-based) of a GPT; null when the entry is unused. */
export function gptEntry(gpt: Gpt, n: number): Partition | null {
  const { header: h, entries } = gpt;
  const at = (n - 1) * h.entrySize;
  const e = entries.subarray(at, at + h.entrySize);
  if (e.subarray(0, 16).every((b) => b === 0)) return null;
  const v = new DataView(e.buffer, e.byteOffset, e.length);
  const first = u64(v, 32, `partition ${n} first LBA`);
  const last = u64(v, 40, `partition ${n} last LBA`);
  if (last < first) {
    throw new PartitionError('corrupt', `GPT partition ${n} ends (sector ${last}) before it starts (sector ${first})`);
  }
  const sectors = last - first + 1;
  if (!Number.isSafeInteger(last * h.sectorSize + h.sectorSize)) {
    throw new PartitionError('outside-disk', `GPT partition ${n} ends beyond 2^53 bytes`);
  }
  let name = '';
  for (let i = 56; i + 1 < Math.min(e.length, 128); i += 2) {
    const c = v.getUint16(i, true);
    if (c === 0) break;
    name += String.fromCharCode(c);
  }
  return {
    number: n,
    scheme: 'gpt',
    sectorSize: h.sectorSize,
    start: first,
    sectors,
    offset: first * h.sectorSize,
    length: sectors * h.sectorSize,
    type: formatGuid(e.subarray(0, 16)),
    uuid: formatGuid(e.subarray(16, 32)),
    name,
  };
}

async function findGptPartition(
  read: ReadFn,
  diskSize: number,
  n: number,
  requested: number | 'auto',
): Promise<Partition> {
  const sizes = requested === 'auto' ? SECTOR_SIZES.filter((s) => 2 * s <= diskSize) : [requested];
  const problems: string[] = [];
  for (const ss of sizes) {
    if (2 * ss > diskSize) {
      problems.push(`${ss}-byte sectors: the disk is too small`);
      continue;
    }
    const gpt = await readGpt(read, diskSize, ss);
    if (typeof gpt === 'string') {
      problems.push(requested === 'auto' ? `${ss}-byte sectors: ${gpt}` : gpt);
      continue;
    }
    if (n > gpt.header.entryCount) {
      throw new PartitionError(
        'not-found',
        `partition ${n} not found: the GPT has ${gpt.header.entryCount} partition entries`,
      );
    }
    const p = gptEntry(gpt, n);
    if (!p) throw new PartitionError('not-found', `partition ${n} not found: GPT entry ${n} is unused`);
    if (gpt.usedBackup) p.warning = `the primary GPT is damaged (${gpt.usedBackup}); using the backup GPT`;
    return checkInside(p, diskSize);
  }
  throw new PartitionError(
    'corrupt',
    `the disk has a protective MBR (type 0xee) but no usable GPT: ${problems.join('; ')}`,
  );
}
