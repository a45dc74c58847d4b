import { closeSync, openSync, readSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { nbdinfoMap, nbdshOk, needTools, qemuImgMap, qemuIo, removeDir, runOk, socketOf, tmpDir } from '@nbdx/testkit';
import { serveFile } from './test-support.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** Data runs written into an otherwise sparse 64 MiB file: [offset, length, fill byte]. */
const DATA: [number, number, number][] = [
  [1 * MiB, 256 * KiB, 0x11],
  [8 * MiB, 1 * MiB, 0x22],
  [63 * MiB, 1 * MiB, 0x33],
];
const SIZE = 64 * MiB;

/** [offset, length, type] with type 3 (hole|zero) for holes and 0 for data. */
function expectedMap(): [number, number, number][] {
  const out: [number, number, number][] = [];
  let pos = 0;
  for (const [o, l] of DATA) {
    if (o > pos) out.push([pos, o - pos, 3]);
    out.push([o, l, 0]);
    pos = o + l;
  }
  if (pos < SIZE) out.push([pos, SIZE - pos, 3]);
  return out;
}

function makeSparse(path: string, size: number, runs: [number, number, number][]): void {
  writeFileSync(path, '');
  truncateSync(path, size);
  const fd = openSync(path, 'r+');
  for (const [o, l, fill] of runs) writeSync(fd, Buffer.alloc(l, fill), 0, l, o);
  closeSync(fd);
}

/** qemu-img map as [start, length, data, zero]. */
const qemuMap = async (target: string[]): Promise<[number, number, boolean, boolean][]> =>
  (await qemuImgMap(...target)).map((e) => [e.start, e.length, e.data, e.zero]);

/** nbdinfo --map as [offset, length, type]. */
const nbdinfoExtents = async (uri: string): Promise<[number, number, number][]> =>
  (await nbdinfoMap(uri)).map((e) => [e.offset, e.length, e.type]);

const hasTools = needTools('qemu-img', 'qemu-io', 'nbdinfo', 'nbdsh');

describe.skipIf(!hasTools)('extents of a sparse file', () => {
  const tmp = tmpDir('nbdx-file-');
  const file = join(tmp, 'sparse.img');
  let server: Awaited<ReturnType<typeof serveFile>>;

  beforeAll(async () => {
    makeSparse(file, SIZE, DATA);
    server = await serveFile([['file', file]]);
  });
  afterAll(async () => {
    await server?.close();
    removeDir(tmp);
  });

  it('the file really has the holes the test expects (qemu-img map on the file itself)', async () => {
    const local = await qemuMap(['-f', 'raw', file]);
    expect(local).toEqual(expectedMap().map(([o, l, t]) => [o, l, t === 0, t !== 0]));
  });

  it('nbdinfo --map through nbdx shows the same holes and data', async () => {
    expect(await nbdinfoExtents(server.uri)).toEqual(expectedMap());
  });

  it('qemu-img map through nbdx (REQ_ONE requests) matches the file', async () => {
    const viaNbd = await qemuMap(['--image-opts', `driver=nbd,server.type=unix,server.path=${socketOf(server.uri)}`]);
    expect(viaNbd).toEqual(await qemuMap(['-f', 'raw', file]));
  });

  it('holes read as zeroes and data reads back as written, across a boundary', async () => {
    const out = await nbdshOk(
      server.uri,
      [
        `b = h.pread(${64 * KiB}, ${2 * MiB})`,
        `print(b == bytes(${64 * KiB}))`,
        `c = h.pread(${8 * KiB}, ${1 * MiB - 4 * KiB})`,
        `print(c[:${4 * KiB}] == bytes(${4 * KiB}), c[${4 * KiB}:] == b"\\x11" * ${4 * KiB})`,
        `print(h.pread(${64 * KiB}, ${SIZE - 64 * KiB}) == b"\\x33" * ${64 * KiB})`,
      ].join('\n'),
    );
    expect(out.trim().split('\n')).toEqual(['True', 'True True', 'True']);
  });

  it('qemu-img compare finds the export identical to the file', async () => {
    await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, server.uri]);
  });

  it('a block-status request in the middle of a data run starts at the request', async () => {
    const out = await nbdshOk(
      server.uri,
      [
        'import nbd',
        'seen = []',
        'def cb(meta, off, ents, err):',
        '    seen.extend(ents)',
        '    return 0',
        `h.block_status(${2 * MiB}, ${8 * MiB + 512 * KiB}, cb)`,
        'print(seen)',
      ].join('\n'),
      { baseAllocation: true },
    );
    // entries are [length, type] pairs from 8.5 MiB: data to 9 MiB, then the hole
    expect(out.trim()).toBe(`[${512 * KiB}, 0, ${1 * MiB + 512 * KiB}, 3]`);
  });
});

describe.skipIf(!hasTools)('without the addon', () => {
  const tmp = tmpDir('nbdx-file-');
  const file = join(tmp, 'sparse.img');
  let server: Awaited<ReturnType<typeof serveFile>>;
  beforeAll(async () => {
    makeSparse(file, SIZE, DATA);
    server = await serveFile([['file', file]], { plugin: { native: false } });
  });
  afterAll(async () => {
    await server?.close();
    removeDir(tmp);
  });

  it('reports everything as data (never a hole that is not there) and still reads correctly', async () => {
    expect(await nbdinfoExtents(server.uri)).toEqual([[0, SIZE, 0]]);
    await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, server.uri]);
  });
});

describe.skipIf(!hasTools)('a sparse file larger than 4 GiB', () => {
  const tmp = tmpDir('nbdx-file-');
  const file = join(tmp, 'big.img');
  const size = 5 * GiB + 4 * KiB;
  let server: Awaited<ReturnType<typeof serveFile>>;
  beforeAll(async () => {
    makeSparse(file, size, [[4 * GiB + 12 * KiB, 4 * KiB, 0x44]]);
    server = await serveFile([['file', file]]);
  });
  afterAll(async () => {
    await server?.close();
    removeDir(tmp);
  });

  it('has its full size', async () => {
    expect(await runOk('nbdinfo', ['--size', server.uri])).toBe(`${size}\n`);
  });

  it('is written and read near its end, and the bytes land at the right offset of the file', async () => {
    const at = size - 64 * KiB;
    await qemuIo(server.uri, `write -P 0xab ${at} 64k`);
    await qemuIo(server.uri, `read -P 0xab ${at} 64k`, `read -P 0 ${at - 4096} 4k`);
    const fd = openSync(file, 'r');
    const got = Buffer.alloc(64 * KiB);
    readSync(fd, got, 0, got.length, at);
    closeSync(fd);
    expect(got.equals(Buffer.alloc(64 * KiB, 0xab))).toBe(true);
  });

  it('maps the data above 4 GiB and the holes around it', async () => {
    const map = await nbdinfoExtents(server.uri);
    expect(map).toEqual([
      [0, 4 * GiB + 12 * KiB, 3],
      [4 * GiB + 12 * KiB, 4 * KiB, 0],
      [4 * GiB + 16 * KiB, size - 64 * KiB - (4 * GiB + 16 * KiB), 3],
      [size - 64 * KiB, 64 * KiB, 0],
    ]);
  });
});
