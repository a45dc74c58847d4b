import { gzipSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import {
  TarFormatError,
  detectCompression,
  findMember,
  parseNumeric,
  parsePaxRecords,
  scanTar,
  whyNotServable,
  type ReadFn,
} from './parse.js';
import { END_OF_ARCHIVE, bufferReader, padded, paxRecords, tarHeader, tarMember } from './test-support.js';

const scan = (buf: Buffer, opts: { limit?: number } = {}) => scanTar(bufferReader(buf), { size: buf.length, ...opts });

/** A virtual archive: a few blocks of real bytes, zeros everywhere else (for > 8 GiB members). */
function sparseArchive(pieces: [number, Uint8Array][], size: number): { read: ReadFn; size: number; reads: number[] } {
  const reads: number[] = [];
  return {
    size,
    reads,
    read(offset, length) {
      reads.push(offset);
      const out = new Uint8Array(length);
      for (const [at, bytes] of pieces) {
        const s = Math.max(at, offset);
        const e = Math.min(at + bytes.length, offset + length);
        if (s < e) out.set(bytes.subarray(s - at, e - at), s - offset);
      }
      return out;
    },
  };
}

describe('numeric fields', () => {
  it('parses octal with spaces and NULs', () => {
    expect(parseNumeric(Buffer.from('00000001750\0'))).toBe(0o1750);
    expect(parseNumeric(Buffer.from('   1750 \0\0\0\0'))).toBe(0o1750);
    expect(parseNumeric(Buffer.alloc(12))).toBe(0);
    expect(parseNumeric(Buffer.from('77777777777\0'))).toBe(8 ** 11 - 1);
  });

  it('parses base-256', () => {
    const f = Buffer.alloc(12);
    f[0] = 0x80;
    f.writeUIntBE(9 * 2 ** 30 + 123, 6, 6);
    expect(parseNumeric(f)).toBe(9 * 2 ** 30 + 123);
  });

  it('refuses negative and too large base-256 values, and junk', () => {
    const neg = Buffer.alloc(12, 0xff);
    expect(() => parseNumeric(neg, 'size')).toThrow(/size is negative/);
    const big = Buffer.alloc(12);
    big[0] = 0x80;
    big[4] = 0x01; // 2^56
    expect(() => parseNumeric(big, 'size')).toThrow(/larger than 2\^53/);
    expect(() => parseNumeric(Buffer.from('0000008\0'), 'size')).toThrow(/not an octal number/);
    expect(() => parseNumeric(Buffer.from('12 34\0'), 'size')).toThrow(/not an octal number/);
  });
});

describe('pax records', () => {
  it('parses records, UTF-8 values and lengths counting themselves', () => {
    const data = paxRecords([
      ['path', 'dir/données-日本.img'],
      ['size', '12345678901'],
      ['mtime', '1.5'],
    ]);
    const r = parsePaxRecords(data);
    expect(Buffer.from(r.get('path')!).toString()).toBe('dir/données-日本.img');
    expect(Buffer.from(r.get('size')!).toString()).toBe('12345678901');
  });

  it('refuses malformed records', () => {
    expect(() => parsePaxRecords(Buffer.from('12 path=a\n'))).toThrow(/malformed record|newline/);
    expect(() => parsePaxRecords(Buffer.from('x path=a\n'))).toThrow(/malformed record/);
    expect(() => parsePaxRecords(Buffer.from('8 patha\n'))).toThrow(/no key=value/);
  });
});

describe('scanTar', () => {
  it('lists ustar members with data offsets, prefix names and link targets', async () => {
    const a = Buffer.from('hello, world\n');
    const b = Buffer.alloc(1000, 7);
    const archive = Buffer.concat([
      tarMember({ name: 'dir/', typeflag: '5', format: 'ustar' }),
      tarMember({ name: 'a.txt', prefix: 'dir', format: 'ustar' }, a),
      tarMember({ name: 'b.bin', format: 'ustar' }, b),
      tarMember({ name: 'ln', typeflag: '2', linkName: 'dir/a.txt', format: 'ustar' }),
      END_OF_ARCHIVE,
    ]);
    const r = await scan(archive);
    expect(r.reason).toBe('end-marker');
    expect(r.members.map((m) => [m.name, m.kind, m.offset, m.size])).toEqual([
      ['dir/', 'directory', 512, 0],
      ['dir/a.txt', 'file', 1024, a.length],
      ['b.bin', 'file', 2048, 1000],
      ['ln', 'symlink', 3584, 0],
    ]);
    expect(r.members[3]!.linkName).toBe('dir/a.txt');
    expect(archive.subarray(1024, 1024 + a.length)).toEqual(a);
    expect(r.headerReads).toBe(5);
  });

  it('applies pax path and size, and x overrides g', async () => {
    const data = Buffer.alloc(700, 0x41);
    const longName = `${'long-directory-name/'.repeat(8)}fïlé.img`;
    const g = paxRecords([['comment', 'git commit id'], ['path', 'global-name']]);
    const archive = Buffer.concat([
      tarHeader({ name: 'pax_global_header', typeflag: 'g', size: g.length, format: 'ustar' }),
      padded(g),
      // Header size says 100; the pax record says 700, and wins.
      tarMember({ name: 'short', size: 100, format: 'ustar' }, Buffer.alloc(0), [
        ['path', longName],
        ['size', '700'],
      ]).subarray(0, 1536),
      padded(data),
      // No x header: the global path applies.
      tarMember({ name: 'plain', format: 'ustar' }, Buffer.from('x')),
      END_OF_ARCHIVE,
    ]);
    const r = await scan(archive);
    expect(r.members.map((m) => m.name)).toEqual([longName, 'global-name']);
    const m = r.members[0]!;
    expect(m.size).toBe(700);
    expect(m.pax).toBe(true);
    expect(m.headerOffset).toBe(1024);
    expect(archive.subarray(m.offset, m.offset + m.size)).toEqual(data);
    expect(r.members[1]!.offset).toBe(m.offset + 1024 + 512);
  });

  it('does not list a git-archive style global header as a member', async () => {
    const g = paxRecords([['comment', '0123456789abcdef']]);
    const archive = Buffer.concat([
      tarHeader({ name: 'pax_global_header', typeflag: 'g', size: g.length, format: 'ustar' }),
      padded(g),
      tarMember({ name: 'README', format: 'ustar' }, Buffer.from('read me\n')),
      END_OF_ARCHIVE,
    ]);
    const r = await scan(archive);
    expect(r.members.map((m) => [m.name, m.headerOffset])).toEqual([['README', 1024]]);
  });

  it('applies GNU long names and long link names', async () => {
    const name = `${'x'.repeat(150)}/ünïcode-${'y'.repeat(60)}`;
    const link = `${'t'.repeat(120)}`;
    const nameBytes = Buffer.from(`${name}\0`);
    const linkBytes = Buffer.from(`${link}\0`);
    const archive = Buffer.concat([
      tarHeader({ name: '././@LongLink', typeflag: 'L', size: nameBytes.length }),
      padded(nameBytes),
      tarMember({ name: name.slice(0, 99) }, Buffer.from('data')),
      tarHeader({ name: '././@LongLink', typeflag: 'K', size: linkBytes.length }),
      padded(linkBytes),
      tarMember({ name: 'sym', typeflag: '2', linkName: link.slice(0, 99) }),
      END_OF_ARCHIVE,
    ]);
    const r = await scan(archive);
    expect(r.members[0]!.name).toBe(name);
    expect(r.members[0]!.offset).toBe(1536);
    expect(r.members[1]!.name).toBe('sym');
    expect(r.members[1]!.linkName).toBe(link);
  });

  it('handles a base-256 size over 8 GiB without reading the data', async () => {
    const big = 9 * 2 ** 30 + 100;
    const next = 512 + Math.ceil(big / 512) * 512;
    const a = sparseArchive(
      [
        [0, tarHeader({ name: 'big.img', size: big })],
        [next, tarMember({ name: 'after.txt' }, Buffer.from('after'))],
      ],
      next + 1024 + 1024,
    );
    const r = await scanTar(a.read, { size: a.size });
    expect(r.members.map((m) => [m.name, m.offset, m.size])).toEqual([
      ['big.img', 512, big],
      ['after.txt', next + 512, 5],
    ]);
    // Only header blocks were read: 0, the second header, the end block.
    expect(a.reads).toEqual([0, next, next + 1024]);
  });

  it('handles a pax size over 8 GiB', async () => {
    const big = 12 * 2 ** 30 + 1;
    const pax = paxRecords([['size', String(big)]]);
    const head = Buffer.concat([
      tarHeader({ name: 'PaxHeaders/huge', typeflag: 'x', size: pax.length, format: 'ustar' }),
      padded(pax),
      tarHeader({ name: 'huge.raw', size: 0, format: 'ustar' }),
    ]);
    const next = 1536 + Math.ceil(big / 512) * 512;
    const a = sparseArchive([[0, head], [next, tarMember({ name: 'tail', format: 'ustar' }, Buffer.from('t'))]], next + 2048);
    const r = await scanTar(a.read, { size: a.size });
    expect(r.members.map((m) => [m.name, m.offset, m.size])).toEqual([
      ['huge.raw', 1536, big],
      ['tail', next + 512, 1],
    ]);
  });

  it('refuses a pax size that is not a number', async () => {
    const archive = Buffer.concat([tarMember({ name: 'f', format: 'ustar' }, Buffer.from('a'), [['size', '12x']]), END_OF_ARCHIVE]);
    await expect(scan(archive)).rejects.toThrow(/pax size: '12x' is not a decimal number/);
  });

  it('reports a corrupted header checksum with its offset', async () => {
    const archive = Buffer.concat([
      tarMember({ name: 'one' }, Buffer.from('1')),
      tarMember({ name: 'two' }, Buffer.from('2')),
      END_OF_ARCHIVE,
    ]);
    archive[1024 + 10] ^= 0x55; // a byte of the second header's name
    const err = await scan(archive).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TarFormatError);
    expect((err as Error).message).toMatch(/corrupted tar header at offset 1024: checksum mismatch \(stored \d+, computed \d+\)/);
  });

  it('says a file is not tar when the first header is wrong, and names compression', async () => {
    const notTar = Buffer.alloc(2048, 0x61);
    await expect(scan(notTar)).rejects.toThrow(/this is not a tar archive: the first header's checksum does not match/);
    const tarball = Buffer.concat([tarMember({ name: 'x' }, Buffer.alloc(5000, 1)), END_OF_ARCHIVE]);
    await expect(scan(gzipSync(tarball))).rejects.toThrow(/gzip-compressed.*uncompressed tar archives only/);
    const magics: [string, number[]][] = [
      ['xz', [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]],
      ['bzip2', [0x42, 0x5a, 0x68, 0x39]],
      ['zstd', [0x28, 0xb5, 0x2f, 0xfd]],
    ];
    for (const [name, bytes] of magics) {
      const file = Buffer.alloc(4096, 0x33);
      file.set(bytes);
      await expect(scan(file)).rejects.toThrow(new RegExp(`${name}-compressed`));
      // Also when the file is shorter than a block.
      await expect(scan(file.subarray(0, 40))).rejects.toThrow(new RegExp(`${name}-compressed`));
    }
    expect(detectCompression(Buffer.from('hello'))).toBeUndefined();
  });

  it('accepts an empty file and a missing end marker, refuses truncation', async () => {
    expect((await scan(Buffer.alloc(0))).members).toEqual([]);
    const noEnd = tarMember({ name: 'a' }, Buffer.from('abc'));
    const r = await scan(noEnd);
    expect(r.reason).toBe('eof');
    expect(r.members).toHaveLength(1);
    const truncated = noEnd.subarray(0, 512 + 1); // data needs 3 bytes
    await expect(scan(truncated.subarray(0, 513))).rejects.toThrow(/truncated: member 'a'.*needs 3 bytes but the archive ends at 513/);
    await expect(scan(Buffer.concat([noEnd, Buffer.alloc(100, 1)]))).rejects.toThrow(/partial 100-byte block/);
  });

  it('stops at tar-limit without reading past it', async () => {
    const archive = Buffer.concat([
      tarMember({ name: 'a' }, Buffer.alloc(2000)),
      tarMember({ name: 'b' }, Buffer.alloc(10)),
      END_OF_ARCHIVE,
    ]);
    const reads: number[] = [];
    const read: ReadFn = (o, l) => {
      reads.push(o + l);
      return archive.subarray(o, o + l);
    };
    const r = await scanTar(read, { size: archive.length, limit: 2560 });
    expect(r.reason).toBe('limit');
    expect(r.members.map((m) => m.name)).toEqual(['a']);
    expect(Math.max(...reads)).toBeLessThanOrEqual(2560);
    const all = await scanTar(read, { size: archive.length, limit: 3072 });
    expect(all.members.map((m) => m.name)).toEqual(['a', 'b']);
  });

  it('stops early when asked', async () => {
    const archive = Buffer.concat([
      tarMember({ name: 'a' }, Buffer.alloc(10)),
      tarMember({ name: 'b' }, Buffer.alloc(10)),
      tarMember({ name: 'c' }, Buffer.alloc(10)),
      END_OF_ARCHIVE,
    ]);
    const r = await scanTar(bufferReader(archive), { size: archive.length, stop: (m) => m.name === 'b' });
    expect(r.reason).toBe('stopped');
    expect(r.members.map((m) => m.name)).toEqual(['a', 'b']);
    expect(r.headerReads).toBe(2);
  });

  it('skips GNU sparse maps and hard link sizes, and classifies members', async () => {
    const archive = Buffer.concat([
      // Old GNU sparse header with one extension block, 1024 bytes stored.
      tarHeader({ name: 'sparse.img', typeflag: 'S', size: 1024, realSize: 1 << 20, isExtended: true }),
      Buffer.alloc(512), // extension block, isextended = 0
      Buffer.alloc(1024, 9),
      // GNU tar: a hard link has no data on tape, whatever the size field says.
      tarHeader({ name: 'hard', typeflag: '1', linkName: 'sparse.img', size: 4096 }),
      tarMember({ name: 'dev', typeflag: '3' }),
      tarMember({ name: 'olddir/', typeflag: '0', format: 'v7' }),
      tarMember({ name: 'file', format: 'v7' }, Buffer.from('v7 data')),
      END_OF_ARCHIVE,
    ]);
    const r = await scan(archive);
    expect(r.members.map((m) => [m.name, m.kind, m.offset])).toEqual([
      ['sparse.img', 'sparse file', 1024],
      ['hard', 'hardlink', 2560],
      ['dev', 'character device', 3072],
      ['olddir/', 'directory', 3584],
      ['file', 'file', 4096],
    ]);
    expect(r.members[0]!.realSize).toBe(1 << 20);
    expect(whyNotServable(r.members[0]!)).toMatch(/GNU sparse file/);
    expect(whyNotServable(r.members[1]!)).toMatch(/hard link to 'sparse.img'.*ask for 'sparse.img'/);
    expect(whyNotServable(r.members[3]!)).toMatch(/is a directory/);
    expect(whyNotServable(r.members[4]!)).toBeUndefined();
  });

  it('marks pax-format GNU sparse members as sparse under their real name', async () => {
    const archive = Buffer.concat([
      tarMember({ name: './GNUSparseFile.1/disk.img', format: 'ustar' }, Buffer.alloc(600), [
        ['GNU.sparse.major', '1'],
        ['GNU.sparse.minor', '0'],
        ['GNU.sparse.name', 'disk.img'],
        ['GNU.sparse.realsize', '1048576'],
      ]),
      END_OF_ARCHIVE,
    ]);
    const r = await scan(archive);
    expect(r.members[0]).toMatchObject({ name: 'disk.img', kind: 'sparse file', realSize: 1048576 });
  });

  it('finds members by exact or normalised name', async () => {
    const archive = Buffer.concat([
      tarMember({ name: './a/b.img' }, Buffer.from('1')),
      tarMember({ name: 'c.img' }, Buffer.from('2')),
      END_OF_ARCHIVE,
    ]);
    const { members } = await scan(archive);
    expect(findMember(members, './a/b.img')?.offset).toBe(512);
    expect(findMember(members, 'a/b.img')?.offset).toBe(512);
    expect(findMember(members, '/c.img')?.offset).toBe(1536);
    expect(findMember(members, 'nope')).toBeUndefined();
  });

  it('decodes names that are not UTF-8 byte for byte', async () => {
    const archive = Buffer.concat([tarMember({ name: Buffer.from([0x63, 0x61, 0x66, 0xe9]) }, Buffer.from('1')), END_OF_ARCHIVE]);
    const { members } = await scan(archive);
    expect(members[0]!.name).toBe('café');
  });

  it('refuses oversized metadata', async () => {
    const archive = Buffer.concat([tarHeader({ name: 'L', typeflag: 'L', size: 100 }), padded(Buffer.alloc(100, 0x61)), END_OF_ARCHIVE]);
    await expect(scanTar(bufferReader(archive), { size: archive.length, maxMetadata: 50 })).rejects.toThrow(
      /GNU long name at offset 0 is 100 bytes, more than the 50 accepted/,
    );
  });
});
