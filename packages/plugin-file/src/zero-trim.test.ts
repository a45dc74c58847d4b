import { existsSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { nbdshOk, needTools, removeDir, runOk, tmpDir } from '@nbdx/testkit';
import { allocatedBlocks, serveFile } from './test-support.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;
const hasTools = needTools('nbdsh', 'nbdinfo');

/** Python for nbdsh: run `call`, print OK or the errno name the server answered with. */
const attempt = (call: string) =>
  ['try:', `    ${call}`, '    print("OK")', 'except nbd.Error as e:', '    print(e.errno)'].join('\n');

/** Python: print whether [offset, offset+length) reads as zeroes. */
const readsZero = (offset: number, length: number) => `print(h.pread(${length}, ${offset}) == bytes(${length}))`;

/** A 16 MiB file full of 0x5a, every block allocated. */
function fillFile(path: string): void {
  writeFileSync(path, Buffer.alloc(SIZE, 0x5a));
}

/** Both file systems behave differently: ext4 has ZERO_RANGE, tmpfs only punching holes. */
const places: [string, () => Promise<string>][] = [
  ['the temp dir', async () => mkdtemp(join(tmpdir(), 'nbdx-file-'))],
];
if (existsSync('/dev/shm')) places.push(['tmpfs (/dev/shm)', async () => mkdtemp('/dev/shm/nbdx-file-')]);

for (const [where, makeDir] of places) {
  describe.skipIf(!hasTools)(`trim and zero on ${where}`, () => {
    let dir: string;
    let file: string;
    let server: Awaited<ReturnType<typeof serveFile>>;

    beforeAll(async () => {
      dir = await makeDir();
      file = join(dir, 'disk.img');
      fillFile(file);
      server = await serveFile([['file', file]]);
    });
    afterAll(async () => {
      await server?.close();
      await rm(dir, { recursive: true, force: true });
    });
    beforeEach(() => fillFile(file));

    it('advertises trim, zero and fast zero', async () => {
      const info = await runOk('nbdinfo', [server.uri]);
      expect(info).toMatch(/can_trim: true/);
      expect(info).toMatch(/can_zero: true/);
      expect(info).toMatch(/can_fast_zero: true/);
    });

    it('TRIM punches a hole: fewer allocated blocks, and the range reads as zeroes', async () => {
      const before = await allocatedBlocks(file);
      expect(before).toBeGreaterThanOrEqual(SIZE / 512);
      const out = await nbdshOk(server.uri, [`h.trim(${4 * MiB}, ${4 * MiB})`, 'h.flush()', readsZero(4 * MiB, 4 * MiB)].join('\n'));
      expect(out.trim()).toBe('True');
      expect(await allocatedBlocks(file)).toBeLessThanOrEqual(before - (4 * MiB) / 512);
    });

    it('WRITE_ZEROES without NO_HOLE reads back zeroes and frees the blocks', async () => {
      const before = await allocatedBlocks(file);
      const out = await nbdshOk(
        server.uri,
        [`h.zero(${2 * MiB}, ${1 * MiB})`, readsZero(1 * MiB, 2 * MiB), `print(h.pread(1, ${3 * MiB}) == b"\\x5a")`].join('\n'),
      );
      expect(out.trim().split('\n')).toEqual(['True', 'True']);
      expect(await allocatedBlocks(file)).toBeLessThanOrEqual(before - (2 * MiB) / 512);
    });

    it('WRITE_ZEROES with NO_HOLE reads back zeroes and keeps the blocks allocated', async () => {
      const before = await allocatedBlocks(file);
      const out = await nbdshOk(
        server.uri,
        [`h.zero(${2 * MiB}, ${5 * MiB}, nbd.CMD_FLAG_NO_HOLE)`, readsZero(5 * MiB, 2 * MiB)].join('\n'),
      );
      expect(out.trim()).toBe('True');
      expect(await allocatedBlocks(file)).toBeGreaterThanOrEqual(before);
    });

    it('FAST_ZERO succeeds here (fallocate), with and without NO_HOLE, and with FUA', async () => {
      const out = await nbdshOk(
        server.uri,
        [
          attempt(`h.zero(${MiB}, 0, nbd.CMD_FLAG_FAST_ZERO)`),
          attempt(`h.zero(${MiB}, ${MiB}, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)`),
          attempt(`h.zero(4097, ${3 * MiB - 1}, nbd.CMD_FLAG_FAST_ZERO)`),
          readsZero(0, 2 * MiB),
          readsZero(3 * MiB - 1, 4097),
          `print(h.pread(1, ${3 * MiB - 2}) == b"\\x5a", h.pread(1, ${3 * MiB + 4096}) == b"\\x5a")`,
        ].join('\n'),
      );
      expect(out.trim().split('\n')).toEqual(['OK', 'OK', 'OK', 'True', 'True', 'True True']);
    });

    it('TRIM and WRITE_ZEROES with FUA are accepted', async () => {
      const out = await nbdshOk(
        server.uri,
        [attempt(`h.trim(${MiB}, 0, nbd.CMD_FLAG_FUA)`), attempt(`h.zero(${MiB}, ${MiB}, nbd.CMD_FLAG_FUA)`)].join('\n'),
      );
      expect(out.trim().split('\n')).toEqual(['OK', 'OK']);
    });
  });
}

describe.skipIf(!hasTools)('zero and trim without the addon', () => {
  const tmp = tmpDir('nbdx-file-');
  const file = join(tmp, 'disk.img');
  let server: Awaited<ReturnType<typeof serveFile>>;
  beforeAll(async () => {
    fillFile(file);
    server = await serveFile([['file', file]], { plugin: { native: false } });
  });
  afterAll(async () => {
    await server?.close();
    removeDir(tmp);
  });

  it('still offers zero and fast zero, but not trim', async () => {
    const info = await runOk('nbdinfo', [server.uri]);
    expect(info).toMatch(/can_zero: true/);
    expect(info).toMatch(/can_fast_zero: true/);
    expect(info).toMatch(/can_trim: false/);
  });

  it('FAST_ZERO fails at once with ENOTSUP and leaves the data alone', async () => {
    const out = await nbdshOk(
      server.uri,
      [attempt(`h.zero(${MiB}, 0, nbd.CMD_FLAG_FAST_ZERO)`), `print(h.pread(${MiB}, 0) == b"\\x5a" * ${MiB})`].join('\n'),
    );
    expect(out.trim().split('\n')).toEqual(['ENOTSUP', 'True']);
  });

  it('a plain WRITE_ZEROES is done by writing zeroes', async () => {
    const out = await nbdshOk(server.uri, [`h.zero(${3 * MiB}, ${MiB})`, readsZero(MiB, 3 * MiB)].join('\n'));
    expect(out.trim()).toBe('True');
    expect(await allocatedBlocks(file)).toBeGreaterThanOrEqual(SIZE / 512);
  });
});
