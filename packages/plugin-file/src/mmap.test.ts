import { closeSync, openSync, readFileSync, statfsSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { needTools, removeDir, runOk, tmpDir } from '@nbdx/testkit';
import { loadNative, Mappings, type NativeOps } from './index.js';
import { OpenFile } from './open-file.js';
import { allocatedBlocks, configure, serveFile } from './test-support.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const TMPFS_MAGIC = 0x01021994;

/**
 * Files on tmpfs are mapped read-only and READ replies are sent from the mapping (readView).
 * /dev/shm is the tmpfs every Linux has; TMPDIR here is often a disk (then nothing is mapped).
 */
const native = loadNative().ops;
const shmIsTmpfs = (() => {
  try {
    return statfsSync('/dev/shm').type === TMPFS_MAGIC;
  } catch {
    return false;
  }
})();
if (process.env.CI === 'true' && (!native?.mapShared || !shmIsTmpfs)) {
  throw new Error(`mmap tests need the helper with mapShared (${!!native?.mapShared}) and /dev/shm on tmpfs (${shmIsTmpfs})`);
}
const canMap = !!native?.mapShared && shmIsTmpfs;

/** A file of `size` bytes, `data` written at each offset of `parts`, the rest a hole. */
function sparseFile(path: string, size: number, parts: [number, Buffer][]): void {
  writeFileSync(path, '');
  truncateSync(path, size);
  const fd = openSync(path, 'r+');
  for (const [at, data] of parts) writeSync(fd, data, 0, data.length, at);
  closeSync(fd);
}

describe.skipIf(!canMap)('mmap=auto on tmpfs', () => {
  let shm = '';
  let file = '';
  const data = randomBytes(256 * KiB);
  beforeAll(() => {
    shm = tmpDir('nbdx-file-mmap-', '/dev/shm');
    file = join(shm, 'disk.img');
    sparseFile(file, 8 * MiB, [[0, data]]);
  });
  afterAll(() => {
    if (shm) removeDir(shm);
  });

  it('sends READ replies from the mapping where the pages exist, and pread elsewhere', async () => {
    const p = await configure([['file', file]]);
    const h = (await p.open!(false, '', false)) as OpenFile;
    try {
      expect(h.mapped).toBe(true);
      const v = p.readView!(h, 64 * KiB, 4 * KiB)!;
      expect(v).toBeInstanceOf(Uint8Array);
      expect(Buffer.from(v).equals(data.subarray(4 * KiB, 68 * KiB))).toBe(true);
      // Over a hole (or partly over one): no view, so the hole is not allocated by reading it.
      const before = await allocatedBlocks(file);
      expect(p.readView!(h, 64 * KiB, 4 * MiB)).toBeUndefined();
      expect(p.readView!(h, 64 * KiB, 224 * KiB)).toBeUndefined();
      const buf = Buffer.alloc(64 * KiB, 0xff);
      await p.pread(h, buf, 4 * MiB, 0);
      expect(buf.equals(Buffer.alloc(64 * KiB))).toBe(true);
      expect(await allocatedBlocks(file)).toBe(before);
      // Writes go through pwrite, into the same pages the mapping shows.
      await p.pwrite!(h, Buffer.alloc(4 * KiB, 0x5a), 8 * KiB, 0);
      expect(Buffer.from(p.readView!(h, 4 * KiB, 8 * KiB)!).equals(Buffer.alloc(4 * KiB, 0x5a))).toBe(true);
      // and written data can be sent from the mapping from then on
      await p.pwrite!(h, Buffer.alloc(4 * KiB, 0x33), 6 * MiB, 0);
      expect(Buffer.from(p.readView!(h, 4 * KiB, 6 * MiB)!).equals(Buffer.alloc(4 * KiB, 0x33))).toBe(true);
    } finally {
      await p.close!(h);
      await p.unload!();
    }
  });

  it('writes up to 1 MiB are copied at once on tmpfs, without the thread pool', async () => {
    const h = await OpenFile.open(file, false, { cacheNone: false, fadvise: 'normal', native, mappings: null });
    try {
      expect(h.memoryBacked).toBe(true);
      expect(h.pwrite(Buffer.alloc(256 * KiB, 1), 0, 0)).toBeUndefined();
      expect(h.pwrite(Buffer.alloc(1 * MiB, 2), 1 * MiB, 0)).toBeUndefined();
      // Larger ones would stall the other connections for too long.
      const later = h.pwrite(Buffer.alloc(1 * MiB + 4 * KiB, 3), 2 * MiB, 0);
      expect(later).toBeInstanceOf(Promise);
      await later;
      const back = readFileSync(file);
      expect(back[256 * KiB - 1]).toBe(1);
      expect(back[2 * MiB - 1]).toBe(2);
      expect(back[3 * MiB + 4 * KiB - 1]).toBe(3);
    } finally {
      await h.close();
      sparseFile(file, 8 * MiB, [[0, data]]);
    }
  });

  it('a client alone has its big writes copied on the thread pool; with others, at once', async () => {
    const clients = new Int32Array(new SharedArrayBuffer(4));
    const options = { cacheNone: false, fadvise: 'normal' as const, native, mappings: null, clients };
    const a = await OpenFile.open(file, false, options);
    try {
      expect(Atomics.load(clients, 0)).toBe(1);
      // Alone: the copy overlaps with receiving the next payload on another core.
      const pooled = a.pwrite(Buffer.alloc(256 * KiB, 4), 0, 0);
      expect(pooled).toBeInstanceOf(Promise);
      await pooled;
      // Small writes are always copied at once.
      expect(a.pwrite(Buffer.alloc(64 * KiB, 5), 256 * KiB, 0)).toBeUndefined();
      const b = await OpenFile.open(file, false, options);
      try {
        expect(Atomics.load(clients, 0)).toBe(2);
        expect(a.pwrite(Buffer.alloc(256 * KiB, 6), 0, 0)).toBeUndefined();
      } finally {
        await b.close();
      }
      expect(Atomics.load(clients, 0)).toBe(1);
      const back = readFileSync(file);
      expect(back[0]).toBe(6);
      expect(back[256 * KiB]).toBe(5);
    } finally {
      await a.close();
      sparseFile(file, 8 * MiB, [[0, data]]);
    }
    expect(Atomics.load(clients, 0)).toBe(0);
  });

  it('mmap=off, cache=none and read-only files on a disk are not mapped; bad values are refused', async () => {
    for (const extra of [[['mmap', 'off']], [['cache', 'none']]] as [string, string][][]) {
      const p = await configure([['file', file], ...extra]);
      const h = (await p.open!(false, '', false)) as OpenFile;
      try {
        expect(h.mapped).toBe(false);
        expect(p.readView!(h, 4 * KiB, 0)).toBeUndefined();
      } finally {
        await p.close!(h);
      }
    }
    const disk = tmpDir('nbdx-file-mmap-');
    try {
      const onDisk = join(disk, 'disk.img');
      writeFileSync(onDisk, data);
      const p = await configure([['file', onDisk]]);
      const h = (await p.open!(true, '', false)) as OpenFile;
      // A file on a disk would make a mapped read wait for the disk on the event loop.
      expect(h.mapped).toBe(h.memoryBacked);
      await p.close!(h);
    } finally {
      removeDir(disk);
    }
    await expect(configure([['file', file], ['mmap', 'yes']])).rejects.toThrow(/mmap: 'yes' is not one of auto, off/);
  });

  it('handles of one instance share a mapping, which outlives them briefly and goes at unload', async () => {
    const p = await configure([['file', file]]);
    const h1 = (await p.open!(false, '', false)) as OpenFile;
    const h2 = (await p.open!(true, '', false)) as OpenFile;
    const v1 = p.readView!(h1, 4 * KiB, 0)!;
    const v2 = p.readView!(h2, 4 * KiB, 0)!;
    expect(v1.buffer === v2.buffer).toBe(true);
    await p.close!(h1);
    await p.close!(h2);
    // A reply still queued reads the file while the mapping lingers...
    expect(Buffer.from(v1).equals(data.subarray(0, 4 * KiB))).toBe(true);
    await p.unload!();
    // ...and zeroes once it was let go: never a fault, and the file is not held any more.
    expect(Buffer.from(v1).equals(Buffer.alloc(4 * KiB))).toBe(true);
    expect(readFileSync(file).subarray(0, 4 * KiB).equals(data.subarray(0, 4 * KiB))).toBe(true);
  });

  it('the helper maps a file once per process: each user (a worker thread) detaches only itself', () => {
    const ops = native as NativeOps;
    const fd = openSync(file, 'r');
    try {
      const a = new Mappings(ops);
      const b = new Mappings(ops);
      const bufA = a.acquire('k', () => ops.mapShared!(fd, 8 * MiB, `test:${file}`))!;
      const bufB = b.acquire('k', () => ops.mapShared!(fd, 8 * MiB, `test:${file}`))!;
      // Not expect().not.toBe: on a mismatch it compares the contents, which reads every page
      // through the mapping and so allocates the file's holes (what readView avoids).
      expect(bufA === bufB).toBe(false);
      expect(bufA.byteLength).toBe(8 * MiB);
      a.releaseAll();
      // b's view still shows the file after a let go
      expect(Buffer.from(new Uint8Array(bufB, 0, 4 * KiB)).equals(data.subarray(0, 4 * KiB))).toBe(true);
      expect(ops.resident!(bufB, 0, 4 * KiB)).toBe(true);
      expect(ops.resident!(bufB, 4 * MiB, 4 * KiB)).toBe(false);
      b.releaseAll();
      expect(new Uint8Array(bufB, 0, 4 * KiB).every((x) => x === 0)).toBe(true);
      expect(() => ops.mapShared!(fd, 0, 'x')).toThrow(/expected \(fd, length > 0/);
      expect(() => ops.mapShared!(fd, 4096, '')).toThrow(/key of 1 to 62 bytes/);
      expect(() => ops.resident!(bufB, 8 * MiB, 1)).toThrow(/within it/);
    } finally {
      closeSync(fd);
    }
  });
});

const hasTools = needTools('nbdcopy', 'nbdsh');

describe.skipIf(!canMap || !hasTools)('mmap=auto through a real client', () => {
  let shm = '';
  let file = '';
  let out = '';
  const parts: [number, Buffer][] = [
    [0, randomBytes(1 * MiB)],
    [3 * MiB + 12 * KiB, randomBytes(300 * KiB)],
    [7 * MiB, randomBytes(1 * MiB)],
  ];
  let server: Awaited<ReturnType<typeof serveFile>>;
  beforeAll(async () => {
    shm = tmpDir('nbdx-file-mmap-', '/dev/shm');
    file = join(shm, 'disk.img');
    out = join(shm, 'copy.img');
    sparseFile(file, 16 * MiB, parts);
    server = await serveFile([['file', file]]);
  });
  afterAll(async () => {
    await server?.close();
    if (shm) removeDir(shm);
  });

  it('nbdcopy out and nbdsh reads see the file exactly, and reading holes allocates nothing', async () => {
    const before = await allocatedBlocks(file);
    await runOk('nbdcopy', ['--requests=16', server.uri, out]);
    expect(readFileSync(out).equals(readFileSync(file))).toBe(true);
    // Every byte once more, with reads that straddle data and holes, then a write read back.
    const printed = await runOk('nbdsh', [
      '-u',
      server.uri,
      '-c',
      [
        'import hashlib',
        'm = hashlib.sha256()',
        `for off in range(0, ${16 * MiB}, ${192 * KiB}):`,
        `    m.update(h.pread(min(${192 * KiB}, ${16 * MiB} - off), off))`,
        'print(m.hexdigest())',
        `h.pwrite(b"\\x77" * 5000, ${3 * MiB})`,
        `print(h.pread(5000, ${3 * MiB}) == b"\\x77" * 5000)`,
      ].join('\n'),
    ]);
    const { createHash } = await import('node:crypto');
    const want = createHash('sha256').update(readFileSync(out)).digest('hex');
    expect(printed.trim().split('\n')).toEqual([want, 'True']);
    // Only the 5000 bytes written (two 4 KiB pages) were allocated on top of the data.
    expect(await allocatedBlocks(file)).toBeLessThanOrEqual(before + 16);
  });
});
