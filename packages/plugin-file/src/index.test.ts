import { closeSync, mkdirSync, openSync, opendirSync, symlinkSync, writeFileSync, writeSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import plugin, { badExportName, listDirExports, loadNative, MAX_EXTENTS } from './index.js';
import { majorMinor } from './sysfs.js';
import { removeDir, tmpDir } from '@nbdx/testkit';
import { CI, configure } from './test-support.js';

describe('configuration', () => {
  const tmp = tmpDir('nbdx-file-');
  const file = join(tmp, 'disk.img');
  writeFileSync(file, Buffer.alloc(4096));
  afterAll(() => removeDir(tmp));

  it('is a v2 plugin named file whose bare value is file=', () => {
    expect(plugin.name).toBe('file');
    expect(plugin.apiVersion).toBe(2);
    expect(plugin.magicConfigKey).toBe('file');
    expect(plugin.threadModel).toBe('parallel');
    for (const key of ['file=', 'dir=', 'default-export=', 'cache=', 'fadvise=']) expect(plugin.configHelp).toContain(key);
  });

  it('needs file= or dir=, not both, and default-export= only with dir=', async () => {
    await expect(configure([])).rejects.toThrow(/file= or dir= is required/);
    await expect(configure([['file', file], ['dir', tmp]])).rejects.toThrow(/not both/);
    await expect(configure([['file', file], ['default-export', 'x']])).rejects.toThrow(/only makes sense with dir=/);
  });

  it('refuses unknown keys and bad values with clear messages', async () => {
    await expect(configure([['size', '1G']])).rejects.toThrow(/unknown parameter 'size'/);
    await expect(configure([['file', file], ['cache', 'writeback']])).rejects.toThrow(/cache: 'writeback' is not one of default, none/);
    await expect(configure([['file', file], ['fadvise', 'fast']])).rejects.toThrow(/fadvise: 'fast'/);
    await expect(configure([['dir', tmp], ['default-export', '../etc']])).rejects.toThrow(/contains '\/'/);
  });

  it('checks at start-up that the file or directory is usable', async () => {
    await expect(configure([['file', join(tmp, 'missing')]])).rejects.toThrow(/file=.*missing.*ENOENT|no such file/i);
    await expect(configure([['file', tmp]])).rejects.toThrow(/not a regular file or block device/);
    await expect(configure([['dir', file]])).rejects.toThrow(/not a directory/);
    await expect(configure([['file', file], ['cache', 'none'], ['fadvise', 'random']])).resolves.toBeTruthy();
  });

  it('opens with cache=none and fadvise=sequential, and reads through them', async () => {
    const p = await configure([['file', file], ['cache', 'none'], ['fadvise', 'sequential']]);
    const h = await p.open!(false, '', false);
    try {
      const buf = Buffer.alloc(4096, 1);
      await p.pread(h, buf, 0, 0);
      expect(buf.equals(Buffer.alloc(4096))).toBe(true);
      await p.pwrite!(h, Buffer.alloc(512, 7), 512, 0);
      await p.pread(h, buf, 0, 0);
      expect(buf[512]).toBe(7);
    } finally {
      await p.close!(h);
    }
  });
});

describe('export names in dir= mode', () => {
  it('refuses names that could leave the directory', () => {
    for (const bad of ['', '.', '..', '../x', 'a/b', '/etc/passwd', 'a\0b', 'x'.repeat(4097)]) {
      expect(badExportName(bad), JSON.stringify(bad)).toBeTypeOf('string');
    }
    for (const good of ['disk.img', 'a..b', '.hidden', 'with space', 'ünïcode']) {
      expect(badExportName(good), good).toBeUndefined();
    }
  });

  it("lists regular files and links to them, in the directory's order (as nbdkit), and nothing else", async () => {
    const tmp = tmpDir('nbdx-file-');
    try {
      writeFileSync(join(tmp, 'b'), '');
      writeFileSync(join(tmp, 'a'), '');
      mkdirSync(join(tmp, 'd'));
      symlinkSync('a', join(tmp, 'l'));
      symlinkSync('d', join(tmp, 'ld'));
      symlinkSync('nothing', join(tmp, 'dead'));
      const order: string[] = [];
      const d = opendirSync(tmp);
      for (let e = d.readSync(); e; e = d.readSync()) order.push(e.name);
      d.closeSync();
      expect(await listDirExports(tmp)).toEqual(order.filter((n) => ['a', 'b', 'l'].includes(n)));
    } finally {
      removeDir(tmp);
    }
  });
});

describe('sysfs helpers', () => {
  it('splits dev_t like glibc', () => {
    expect(majorMinor(0x0801)).toBe('8:1');
    expect(majorMinor((259 << 8) | 3)).toBe('259:3');
    expect(majorMinor(Number((7n << 8n) | (0x12n) | (0x345n << 20n)))).toBe(`7:${0x345 * 256 + 0x12}`);
  });
});

describe('the addon', () => {
  const loaded = loadNative();

  it('is built and loads (required under CI=true)', () => {
    if (!loaded.ops && !CI) return; // degraded mode is covered by the { native: false } tests
    expect(loaded.ops, 'reason' in loaded ? loaded.reason : '').not.toBeNull();
    expect(loaded.ops!.features.seekData).toBe(true);
  });

  it.skipIf(!loaded.ops)('maps holes and data, stops at maxExtents with the rest as data', async () => {
    const native = loaded.ops!;
    const tmp = tmpDir('nbdx-file-');
    try {
      const path = join(tmp, 'f');
      writeFileSync(path, '');
      truncateSync(path, 1 << 20);
      const fd = openSync(path, 'r+');
      for (const off of [64 << 10, 256 << 10, 512 << 10]) writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, off);
      const triples = (a: Float64Array) => Array.from({ length: a.length / 3 }, (_, i) => Array.from(a.subarray(3 * i, 3 * i + 3)));
      expect(triples(await native.map(fd, 0, 1 << 20, MAX_EXTENTS))).toEqual([
        [0, 65536, 3],
        [65536, 4096, 0],
        [69632, 192512, 3],
        [262144, 4096, 0],
        [266240, 258048, 3],
        [524288, 4096, 0],
        [528384, 520192, 3],
      ]);
      // at most maxExtents+1 entries; the tail is data, never a hole it did not look at
      const capped = triples(await native.map(fd, 0, 1 << 20, 2));
      expect(capped[0]).toEqual([0, 65536, 3]);
      expect(capped[capped.length - 1]![2]).toBe(0);
      expect(capped.reduce((n, e) => n + e[1]!, 0)).toBe(1 << 20);
      // a range starting inside data, and one past the end of the file
      expect(triples(await native.map(fd, 66000, 100, 10))).toEqual([[66000, 100, 0]]);
      expect(triples(await native.map(fd, 2 << 20, 4096, 10))).toEqual([[2 << 20, 4096, 3]]);
      closeSync(fd);
      await expect(native.fallocate(fd, 0, 4096, 0)).rejects.toMatchObject({ code: 'EBADF', syscall: 'fallocate' });
      expect(() => native.fallocate(-1 as number, -5, 1, 0)).toThrow(/non-negative whole numbers/);
    } finally {
      removeDir(tmp);
    }
  });
});
