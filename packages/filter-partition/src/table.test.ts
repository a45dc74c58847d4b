import * as zlib from 'node:zlib';
import { describe, expect, it } from 'vitest';
import { crc32 } from './crc32.js';
import { findPartition, formatGuid, listMbrPartitions, PartitionError, type ReadFn } from './table.js';

// ---- builders for hand-made disks -------------------------------------------------------------

/** A disk in memory and a read callback that refuses reads beyond its end (as the core does). */
function disk(size: number) {
  const bytes = Buffer.alloc(size);
  const reads: Array<[number, number]> = [];
  const read: ReadFn = (offset, length) => {
    reads.push([offset, length]);
    if (offset < 0 || offset + length > size) throw new Error(`read beyond the disk: ${offset}+${length} > ${size}`);
    return bytes.subarray(offset, offset + length);
  };
  return { bytes, read, reads, size };
}

interface E {
  type: number;
  start: number;
  sectors: number;
}

/** Write a boot signature and up to four entries at `lba` (an MBR or an EBR). */
function writeMbr(bytes: Buffer, lba: number, entries: E[], ss = 512): void {
  const base = lba * ss;
  entries.forEach((e, i) => {
    const p = base + 446 + i * 16;
    bytes[p + 4] = e.type;
    bytes.writeUInt32LE(e.start, p + 8);
    bytes.writeUInt32LE(e.sectors, p + 12);
  });
  bytes[base + 510] = 0x55;
  bytes[base + 511] = 0xaa;
}

const EMPTY: E = { type: 0, start: 0, sectors: 0 };

function guidBytes(text: string): Buffer {
  const hex = text.replace(/-/g, '');
  const b = Buffer.from(hex, 'hex');
  // First three fields are little-endian on disk.
  return Buffer.concat([
    Buffer.from(b.subarray(0, 4)).reverse(),
    Buffer.from(b.subarray(4, 6)).reverse(),
    Buffer.from(b.subarray(6, 8)).reverse(),
    b.subarray(8),
  ]);
}

const LINUX = '0FC63DAF-8483-4772-8E79-3D69D8477DE4';
const ESP = 'C12A7328-F81F-11D2-BA4B-00A0C93EC93B';

interface GptPart {
  type?: string;
  first: number;
  last: number;
  name?: string;
}

interface GptOptions {
  ss?: number;
  entriesLba?: number;
  entryCount?: number;
  entrySize?: number;
  headerSize?: number;
  /** Write the backup header and array too (at the end of the disk). */
  backup?: boolean;
  /** Damage after writing. */
  corruptHeaderCrc?: boolean;
  corruptEntries?: boolean;
}

function writeGptCopy(
  bytes: Buffer,
  ss: number,
  myLba: number,
  altLba: number,
  entriesLba: number,
  array: Buffer,
  o: GptOptions,
): void {
  array.copy(bytes, entriesLba * ss);
  const h = Buffer.alloc(ss);
  h.write('EFI PART', 0, 'latin1');
  h.writeUInt32LE(0x00010000, 8);
  const headerSize = o.headerSize ?? 92;
  h.writeUInt32LE(headerSize, 12);
  h.writeBigUInt64LE(BigInt(myLba), 24);
  h.writeBigUInt64LE(BigInt(altLba), 32);
  const sectors = bytes.length / ss;
  h.writeBigUInt64LE(34n, 40);
  h.writeBigUInt64LE(BigInt(sectors - 34), 48);
  guidBytes('11111111-2222-3333-4444-555555555555').copy(h, 56);
  h.writeBigUInt64LE(BigInt(entriesLba), 72);
  h.writeUInt32LE(o.entryCount ?? 128, 80);
  h.writeUInt32LE(o.entrySize ?? 128, 84);
  h.writeUInt32LE(crc32(array), 88);
  h.writeUInt32LE(crc32(h.subarray(0, Math.min(headerSize, ss))), 16);
  h.copy(bytes, myLba * ss);
}

/** Protective MBR + GPT header at LBA 1 + entry array (at LBA 2 unless told otherwise). */
function writeGpt(d: ReturnType<typeof disk>, parts: GptPart[], o: GptOptions = {}): void {
  const ss = o.ss ?? 512;
  const sectors = d.size / ss;
  writeMbr(d.bytes, 0, [{ type: 0xee, start: 1, sectors: Math.min(sectors - 1, 0xffffffff) }]);
  const count = o.entryCount ?? 128;
  const esize = o.entrySize ?? 128;
  const array = Buffer.alloc(count * esize);
  parts.forEach((p, i) => {
    if (!p) return;
    const at = i * esize;
    guidBytes(p.type ?? LINUX).copy(array, at);
    guidBytes(`AAAAAAAA-0000-0000-0000-00000000000${i % 10}`).copy(array, at + 16);
    array.writeBigUInt64LE(BigInt(p.first), at + 32);
    array.writeBigUInt64LE(BigInt(p.last), at + 40);
    if (p.name) array.write(p.name, at + 56, 'utf16le');
  });
  const lastLba = sectors - 1;
  const arraySectors = Math.ceil(array.length / ss);
  writeGptCopy(d.bytes, ss, 1, lastLba, o.entriesLba ?? 2, array, o);
  if (o.backup) writeGptCopy(d.bytes, ss, lastLba, 1, lastLba - arraySectors, array, o);
  if (o.corruptHeaderCrc) d.bytes[ss + 40] ^= 0xff; // first usable LBA, covered by the CRC
  if (o.corruptEntries) d.bytes[(o.entriesLba ?? 2) * ss + 40] ^= 0x01;
}

async function reason(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    if (err instanceof PartitionError) return `${err.reason}: ${err.message}`;
    throw err;
  }
  throw new Error('expected a PartitionError');
}

const MiB = 1024 * 1024;

// ---- CRC32 --------------------------------------------------------------------------------------

describe('crc32', () => {
  it('matches the standard check value', () => {
    expect(crc32(Buffer.from('123456789'))).toBe(0xcbf43926);
    expect(crc32(Buffer.alloc(0))).toBe(0);
  });
  it('agrees with zlib where Node has zlib.crc32, and continues across pieces', () => {
    const data = Buffer.from(Array.from({ length: 10000 }, (_, i) => (i * 7919) & 0xff));
    const z = (zlib as { crc32?: (d: Uint8Array) => number }).crc32;
    if (z) expect(crc32(data)).toBe(z(data));
    expect(crc32(data.subarray(5000), crc32(data.subarray(0, 5000)))).toBe(crc32(data));
  });
});

// ---- MBR ----------------------------------------------------------------------------------------

describe('MBR', () => {
  it('no boot signature: no partition table', async () => {
    const d = disk(MiB);
    expect(await reason(findPartition(d.read, d.size, 1))).toMatch(/^no-table: no partition table: sector 0 has no MBR boot signature/);
    expect(await reason(findPartition(d.read, 100, 1))).toMatch(/^no-table: .*only 100 bytes/);
  });

  it('primary partitions 1-4, empty entries not found, the extended one refused', async () => {
    const d = disk(16 * MiB);
    writeMbr(d.bytes, 0, [
      { type: 0x83, start: 2048, sectors: 4096 },
      EMPTY,
      { type: 0x0c, start: 8192, sectors: 2048 },
      { type: 0x05, start: 16384, sectors: 8192 },
    ]);
    writeMbr(d.bytes, 16384, [EMPTY]); // extended partition without logical partitions
    const p1 = await findPartition(d.read, d.size, 1);
    expect(p1).toMatchObject({ number: 1, scheme: 'mbr', offset: 2048 * 512, length: 4096 * 512, type: '0x83' });
    expect((await findPartition(d.read, d.size, 3)).offset).toBe(8192 * 512);
    expect(await reason(findPartition(d.read, d.size, 2))).toMatch(/^not-found: partition 2 not found: MBR entry 2 is empty/);
    expect(await reason(findPartition(d.read, d.size, 4))).toMatch(/^not-found: partition 4 is an extended partition/);
    expect(await reason(findPartition(d.read, d.size, 5))).toMatch(/^not-found: .*holds no logical partitions/);
    expect(await reason(findPartition(d.read, d.size, 0))).toMatch(/^invalid-number/);
  });

  it('logical partitions follow the EBR chain (relative starts, links relative to the extended partition)', async () => {
    const d = disk(32 * MiB);
    const ext = 4096;
    writeMbr(d.bytes, 0, [
      { type: 0x83, start: 2048, sectors: 2048 },
      { type: 0x0f, start: ext, sectors: 40960 },
    ]);
    // EBR 1 at ext: data at +2048; link to the EBR at ext+10240.
    writeMbr(d.bytes, ext, [{ type: 0x83, start: 2048, sectors: 4096 }, { type: 0x05, start: 10240, sectors: 8192 }]);
    // EBR 2: no data entry (a deleted logical partition): takes no number.
    writeMbr(d.bytes, ext + 10240, [EMPTY, { type: 0x05, start: 20480, sectors: 8192 }]);
    // EBR 3: data at +63, end of chain.
    writeMbr(d.bytes, ext + 20480, [{ type: 0x82, start: 63, sectors: 1000 }, { type: 0x05, start: 30720, sectors: 8192 }]);
    // EBR 4: last.
    writeMbr(d.bytes, ext + 30720, [{ type: 0x83, start: 2048, sectors: 2048 }]);
    const p5 = await findPartition(d.read, d.size, 5);
    expect(p5).toMatchObject({ number: 5, logical: true, start: ext + 2048, sectors: 4096, type: '0x83' });
    const p6 = await findPartition(d.read, d.size, 6);
    expect(p6).toMatchObject({ start: ext + 20480 + 63, sectors: 1000, type: '0x82' });
    const p7 = await findPartition(d.read, d.size, 7);
    expect(p7).toMatchObject({ start: ext + 30720 + 2048, sectors: 2048 });
    expect(await reason(findPartition(d.read, d.size, 8))).toMatch(/^not-found: partition 8 not found: the logical partitions are 5 to 7/);
    const all = await listMbrPartitions(d.read, d.size);
    expect(all.map((p) => p.number)).toEqual([1, 5, 6, 7]);
  });

  it('a loop in the EBR chain is an error, not a hang', async () => {
    const d = disk(32 * MiB);
    const ext = 4096;
    writeMbr(d.bytes, 0, [{ type: 0x05, start: ext, sectors: 40960 }]);
    writeMbr(d.bytes, ext, [{ type: 0x83, start: 2048, sectors: 2048 }, { type: 0x05, start: 8192, sectors: 4096 }]);
    // The second EBR links back to the first (relative start 0 = the extended partition's start).
    writeMbr(d.bytes, ext + 8192, [{ type: 0x83, start: 2048, sectors: 2048 }, { type: 0x05, start: 0, sectors: 4096 }]);
    expect((await findPartition(d.read, d.size, 6)).start).toBe(ext + 8192 + 2048);
    expect(await reason(findPartition(d.read, d.size, 7))).toMatch(
      /^loop: the chain of logical partitions loops: the EBR at sector 4096 links back/,
    );
    // A self-link too.
    writeMbr(d.bytes, ext, [{ type: 0x83, start: 2048, sectors: 2048 }, { type: 0x05, start: 0, sectors: 4096 }]);
    expect(await reason(findPartition(d.read, d.size, 6))).toMatch(/^loop:/);
  });

  it('an EBR outside the disk, or one without a signature, is rejected', async () => {
    const d = disk(8 * MiB);
    writeMbr(d.bytes, 0, [{ type: 0x05, start: 2048, sectors: 10000 }]);
    writeMbr(d.bytes, 2048, [{ type: 0x83, start: 63, sectors: 100 }, { type: 0x05, start: 1_000_000, sectors: 100 }]);
    expect((await findPartition(d.read, d.size, 5)).start).toBe(2048 + 63);
    expect(await reason(findPartition(d.read, d.size, 6))).toMatch(
      /^outside-disk: the EBR \(extended boot record\) at sector 1002048 lies outside the disk \(16384 sectors/,
    );
    writeMbr(d.bytes, 2048, [{ type: 0x83, start: 63, sectors: 100 }, { type: 0x05, start: 4000, sectors: 100 }]);
    expect(await reason(findPartition(d.read, d.size, 6))).toMatch(/^corrupt: the EBR at sector 6048 has no boot signature/);
    // Nothing was ever read beyond the disk (the read callback would have thrown).
    expect(d.reads.every(([o, l]) => o + l <= d.size)).toBe(true);
  });

  it('partitions that reach beyond the disk are refused', async () => {
    const d = disk(8 * MiB); // 16384 sectors
    writeMbr(d.bytes, 0, [
      { type: 0x83, start: 2048, sectors: 16384 },
      { type: 0x05, start: 8192, sectors: 8192 },
    ]);
    writeMbr(d.bytes, 8192, [{ type: 0x83, start: 2048, sectors: 8192 }]);
    expect(await reason(findPartition(d.read, d.size, 1))).toMatch(
      /^outside-disk: partition 1 \(sectors 2048 to 18431, 512-byte sectors\) lies outside the disk \(16384 sectors, 8388608 bytes\)/,
    );
    expect(await reason(findPartition(d.read, d.size, 5))).toMatch(/^outside-disk: partition 5 \(sectors 10240 to 18431/);
  });

  it('4096-byte sectors scale every position (the MBR itself stays in the first 512 bytes)', async () => {
    const d = disk(64 * MiB);
    writeMbr(d.bytes, 0, [{ type: 0x83, start: 256, sectors: 1024 }, { type: 0x05, start: 2048, sectors: 4096 }]);
    writeMbr(d.bytes, 2048, [{ type: 0x83, start: 256, sectors: 512 }], 4096);
    expect(await findPartition(d.read, d.size, 1, { sectorSize: 4096 })).toMatchObject({ offset: 256 * 4096, length: 1024 * 4096 });
    expect(await findPartition(d.read, d.size, 5, { sectorSize: 4096 })).toMatchObject({ offset: (2048 + 256) * 4096, length: 512 * 4096 });
  });
});

// ---- GPT ----------------------------------------------------------------------------------------

describe('GPT', () => {
  const parts: GptPart[] = [
    { type: ESP, first: 2048, last: 4095, name: 'EFI system' },
    { first: 4096, last: 8191, name: 'data' },
  ];

  it('finds entries by number, with name, type and unique GUID', async () => {
    const d = disk(8 * MiB);
    writeGpt(d, parts, { backup: true });
    const p1 = await findPartition(d.read, d.size, 1);
    expect(p1).toMatchObject({ number: 1, scheme: 'gpt', offset: 2048 * 512, length: 2048 * 512, type: ESP, name: 'EFI system' });
    expect(p1.uuid).toBe('AAAAAAAA-0000-0000-0000-000000000000');
    expect(p1.warning).toBeUndefined();
    expect(await findPartition(d.read, d.size, 2)).toMatchObject({ start: 4096, sectors: 4096, type: LINUX, name: 'data' });
    expect(await reason(findPartition(d.read, d.size, 3))).toMatch(/^not-found: partition 3 not found: GPT entry 3 is unused/);
    expect(await reason(findPartition(d.read, d.size, 129))).toMatch(/^not-found: partition 129 not found: the GPT has 128 partition entries/);
  });

  it('formats GUIDs in their mixed-endian layout', () => {
    expect(formatGuid(guidBytes(ESP))).toBe(ESP);
  });

  it('reads the entry array where the header says, not at LBA 2', async () => {
    const d = disk(8 * MiB);
    writeGpt(d, parts, { entriesLba: 1024 });
    // Garbage where a naive parser would look.
    d.bytes.fill(0x5a, 2 * 512, 34 * 512);
    expect((await findPartition(d.read, d.size, 2)).start).toBe(4096);
    expect(d.reads.some(([o]) => o === 1024 * 512)).toBe(true);
  });

  it('bad header CRC: error naming both CRCs (no backup)', async () => {
    const d = disk(8 * MiB);
    writeGpt(d, parts, { corruptHeaderCrc: true });
    const r = await reason(findPartition(d.read, d.size, 1, { sectorSize: 512 }));
    expect(r).toMatch(/^corrupt: the disk has a protective MBR \(type 0xee\) but no usable GPT: primary GPT: GPT header CRC32 mismatch \(stored 0x[0-9a-f]{8}, computed 0x[0-9a-f]{8}\); backup GPT: no GPT signature/);
  });

  it('bad entry array CRC is an error', async () => {
    const d = disk(8 * MiB);
    writeGpt(d, parts, { corruptEntries: true });
    expect(await reason(findPartition(d.read, d.size, 1, { sectorSize: 512 }))).toMatch(/primary GPT: GPT partition entry array CRC32 mismatch/);
  });

  it('a damaged primary falls back to a good backup, with a warning', async () => {
    const d = disk(8 * MiB);
    writeGpt(d, parts, { backup: true, corruptHeaderCrc: true });
    const p = await findPartition(d.read, d.size, 2);
    expect(p.start).toBe(4096);
    expect(p.warning).toMatch(/primary GPT is damaged \(GPT header CRC32 mismatch.*using the backup/);
  });

  it('checks header size, entry size, entry count and the array position', async () => {
    const cases: Array<[GptOptions, RegExp]> = [
      [{ headerSize: 50 }, /GPT header size 50 is not between 92 and 512/],
      [{ headerSize: 600 }, /GPT header size 600 is not between 92 and 512/],
      [{ entrySize: 100 }, /entry size 100 is not 128 times a power of two/],
      [{ entrySize: 64 }, /entry size 64 is not 128 times a power of two/],
      [{ entryCount: 0 }, /GPT has no partition entries/],
      [{ entryCount: 40_000 }, /40000 entries of 128 bytes is larger than/],
      [{ entriesLba: 16380 }, /entry array \(sector 16380, 16384 bytes\) is outside the disk/],
      [{ entriesLba: 1, entryCount: 4 }, /entry array \(sector 1, 512 bytes\) is outside the disk|overlaps its header/],
    ];
    for (const [o, re] of cases) {
      const d = disk(8 * MiB);
      writeGpt(d, parts.slice(0, Math.min(2, o.entryCount ?? 2)), o);
      expect(await reason(findPartition(d.read, d.size, 1, { sectorSize: 512 }))).toMatch(re);
    }
  });

  it('bigger entries (256 bytes) are read with their stride', async () => {
    const d = disk(8 * MiB);
    writeGpt(d, parts, { entrySize: 256, entryCount: 64 });
    expect(await findPartition(d.read, d.size, 2)).toMatchObject({ start: 4096, name: 'data' });
  });

  it('a partition beyond the disk, or ending before it starts, is refused', async () => {
    const d = disk(8 * MiB);
    writeGpt(d, [parts[0]!, { first: 8192, last: 20000 }, { first: 9000, last: 8999 }]);
    expect(await reason(findPartition(d.read, d.size, 2))).toMatch(
      /^outside-disk: partition 2 \(sectors 8192 to 20000, 512-byte sectors\) lies outside the disk \(16384 sectors/,
    );
    expect(await reason(findPartition(d.read, d.size, 3))).toMatch(/^corrupt: GPT partition 3 ends \(sector 8999\) before it starts/);
  });

  it('4096-byte sectors: given, or found by probing', async () => {
    const d = disk(16 * MiB); // 4096 sectors of 4 KiB
    writeGpt(d, [{ first: 256, last: 1279, name: 'four-k' }], { ss: 4096 });
    const want = { offset: 256 * 4096, length: 1024 * 4096, sectorSize: 4096, name: 'four-k' };
    expect(await findPartition(d.read, d.size, 1, { sectorSize: 4096 })).toMatchObject(want);
    expect(await findPartition(d.read, d.size, 1)).toMatchObject(want);
    expect(await reason(findPartition(d.read, d.size, 1, { sectorSize: 512 }))).toMatch(/no GPT signature \('EFI PART'\) at sector 1/);
  });
});
