import { createHash, randomBytes } from 'node:crypto';
import { closeSync, existsSync, openSync, readFileSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { needTools, removeDir, run, runOk, tmpDir } from '@nbdx/testkit';
import { serveFile } from './test-support.js';

const MiB = 1024 * 1024;
const SIZE = 24 * MiB;
const hasTools = needTools('qemu-img', 'nbdcopy');

const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

/** Random data with holes between, so sparse copying paths are exercised too. */
function makeSource(path: string): void {
  writeFileSync(path, '');
  truncateSync(path, SIZE);
  const fd = openSync(path, 'r+');
  for (let off = 0; off < SIZE; off += 4 * MiB) writeSync(fd, randomBytes(MiB + 4096), 0, MiB + 4096, off + 512 * 1024);
  closeSync(fd);
}

function emptyFile(path: string): void {
  writeFileSync(path, '');
  truncateSync(path, SIZE);
}

// tmpfs (/dev/shm) takes the synchronous copy path, the temp dir the thread pool.
const variants: [boolean, string | undefined][] = [
  [true, undefined],
  [false, undefined],
  ...(existsSync('/dev/shm') ? ([[true, '/dev/shm']] as [boolean, string][]) : []),
];
for (const [native, base] of variants) {
  describe.skipIf(!hasTools)(`round trips ${native ? 'with' : 'without'} the addon in ${base ?? 'the temp dir'}`, () => {
    const tmp = tmpDir('nbdx-file-', base);
    const src = join(tmp, 'src.img');
    const target = join(tmp, 'target.img');
    let server: Awaited<ReturnType<typeof serveFile>>;

    beforeAll(async () => {
      makeSource(src);
      emptyFile(target);
      server = await serveFile([['file', target]], { plugin: { native } });
    });
    afterAll(async () => {
      await server?.close();
      removeDir(tmp);
    });

    it('qemu-img convert into nbdx and back gives the same bytes', async () => {
      await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, server.uri]);
      expect(sha256(target)).toBe(sha256(src));
      const back = join(tmp, 'back-qemu.img');
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', server.uri, back]);
      expect(sha256(back)).toBe(sha256(src));
    });

    it('nbdcopy into nbdx (over old contents) and back gives the same bytes', async () => {
      writeFileSync(target, Buffer.alloc(SIZE, 0xff)); // the holes of src must be written as zeroes
      await runOk('nbdcopy', ['--flush', src, server.uri]);
      expect(sha256(target)).toBe(sha256(src));
      const back = join(tmp, 'back-nbdcopy.img');
      await runOk('nbdcopy', [server.uri, back]);
      expect(sha256(back)).toBe(sha256(src));
    });
  });
}

describe.skipIf(!hasTools)('a read-only server', () => {
  const tmp = tmpDir('nbdx-file-');
  const src = join(tmp, 'src.img');
  const target = join(tmp, 'target.img');
  afterAll(() => removeDir(tmp));

  it('refuses a copy into it and leaves the file alone', async () => {
    makeSource(src);
    emptyFile(target);
    const before = sha256(target);
    const server = await serveFile([['file', target]], { readonly: true });
    try {
      const r = await run('nbdcopy', [src, server.uri]);
      expect(r.code).not.toBe(0);
      expect(sha256(target)).toBe(before);
    } finally {
      await server.close();
    }
  });
});
