/**
 * End to end: real partitioned images made by sfdisk and sgdisk, served through the filter, checked
 * against what those tools report and against dd-extracted bytes with qemu-img compare.
 */
import { randomFillSync } from 'node:crypto';
import { copyFileSync, mkdtempSync, openSync, closeSync, writeSync, rmSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import { createPartitionFilter } from './index.js';
import { createTestFilePlugin } from './file-plugin.test-helper.js';
import { nbdxBin, needNbdx, needTools, qemuIo, run, runOk } from '@nbdx/testkit';

const tools = needTools('sfdisk', 'sgdisk', 'qemu-img', 'qemu-io', 'nbdinfo', 'dd');

interface Span {
  number: number;
  start: number;
  size: number;
}

/** Partitions as sfdisk --json reports them (extended containers left out). */
async function sfdiskParts(dev: string): Promise<{ ss: number; parts: Span[] }> {
  const t = JSON.parse(await runOk('sfdisk', ['--json', dev])).partitiontable;
  const parts: Span[] = [];
  for (const p of t.partitions as Array<{ node: string; start: number; size: number; type: string }>) {
    if (['5', 'f', '85'].includes(p.type)) continue;
    parts.push({ number: Number(/(\d+)$/.exec(p.node)![1]), start: p.start, size: p.size });
  }
  return { ss: t.sectorsize ?? 512, parts };
}

/** First sector and size of one partition as sgdisk -i reports them. */
async function sgdiskInfo(dev: string, n: number): Promise<Span & { name: string }> {
  const out = await runOk('sgdisk', ['-i', String(n), dev]);
  return {
    number: n,
    start: Number(/First sector: (\d+)/.exec(out)![1]),
    size: Number(/Partition size: (\d+) sectors/.exec(out)![1]),
    name: /Partition name: '(.*)'/.exec(out)![1]!,
  };
}

/** Random bytes in every partition, so a wrong offset cannot go unnoticed. */
function fill(img: string, ss: number, parts: Span[]): void {
  const fd = openSync(img, 'r+');
  try {
    for (const p of parts) {
      const buf = randomFillSync(Buffer.alloc(p.size * ss));
      writeSync(fd, buf, 0, buf.length, p.start * ss);
    }
  } finally {
    closeSync(fd);
  }
}

let dir: string;

async function withServer<T>(img: string, config: Array<[string, string]>, fn: (uri: string) => Promise<T>): Promise<T> {
  const s = await serve({
    plugin: createTestFilePlugin(),
    filters: [createPartitionFilter()],
    config: [['file', img], ...config],
    error: () => {},
  });
  try {
    return await fn(s.uri);
  } finally {
    await s.close();
  }
}

/** The filtered export's size and description equal the table's numbers, and its bytes equal dd's. */
async function checkPartition(img: string, ss: number, p: Span, config: Array<[string, string]> = []): Promise<void> {
  const extracted = join(dir, `p${p.number}-${ss}-${Math.random().toString(36).slice(2)}.raw`);
  await runOk('dd', [`if=${img}`, `of=${extracted}`, `bs=${ss}`, `skip=${p.start}`, `count=${p.size}`, 'status=none']);
  await withServer(img, [['partition', String(p.number)], ...config], async (uri) => {
    const info = JSON.parse(await runOk('nbdinfo', ['--json', '--no-content', uri])).exports[0];
    expect(info['export-size']).toBe(p.size * ss);
    expect(info.description).toContain(`partition ${p.number}`);
    expect(info.description).toContain(`offset ${p.start * ss}, ${p.size * ss} bytes, ${ss}-byte sectors`);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', extracted, uri]);
    expect(cmp.stdout + cmp.stderr).toMatch(/Images are identical/);
    expect(cmp.code).toBe(0);
  });
  rmSync(extracted);
}

/** Attach an image to a loop device with 4096-byte logical sectors, run fn, detach. */
async function withLoop4k<T>(img: string, fn: (dev: string) => Promise<T>): Promise<T> {
  const dev = (await runOk('losetup', ['-f', '--show', '-b', '4096', img])).trim();
  try {
    return await fn(dev);
  } finally {
    await run('losetup', ['-d', dev]);
  }
}

async function canLoop(): Promise<boolean> {
  if (!needTools('losetup')) return false;
  const probe = join(tmpdir(), `nbdx-loop-probe-${process.pid}.img`);
  truncateSync((closeSync(openSync(probe, 'w')), probe), 1024 * 1024);
  const r = await run('losetup', ['-f', '--show', '-b', '4096', probe]);
  if (r.code === 0) await run('losetup', ['-d', r.stdout.trim()]);
  rmSync(probe);
  if (r.code !== 0 && process.env.CI === 'true') throw new Error(`losetup -b 4096 failed under CI: ${r.stderr}`);
  return r.code === 0;
}

describe.skipIf(!tools)('partition filter on images made by sfdisk and sgdisk', () => {
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'nbdx-partition-'));
  });
  afterAll(() => {
    rmSync(dir, { recursive: true, force: true });
  });

  describe('MBR: three primaries, an extended partition with three logical ones', () => {
    let img: string;
    let parts: Span[];
    beforeAll(async () => {
      img = join(dir, 'mbr.img');
      truncateSync((closeSync(openSync(img, 'w')), img), 64 * 1024 * 1024);
      const script = [
        'label: dos',
        'start=2048, size=8192, type=83',
        'size=8192, type=c',
        'size=81920, type=5',
        'size=8192, type=83',
        'size=16384, type=83',
        'size=8192, type=82',
        'size=16384, type=83',
      ].join('\n');
      await runOk('sh', ['-c', `printf '%s\\n' "$0" | sfdisk -q "$1"`, script, img]);
      const t = await sfdiskParts(img);
      parts = t.parts;
      expect(parts.map((p) => p.number)).toEqual([1, 2, 4, 5, 6, 7]);
      fill(img, 512, parts);
    });

    it('every partition: offset and size as sfdisk --json says, bytes as dd extracts', async () => {
      for (const p of parts) await checkPartition(img, 512, p);
    });

    it('the description names the partition', async () => {
      await withServer(img, [['partition', '6']], async (uri) => {
        const info = JSON.parse(await runOk('nbdinfo', ['--json', '--no-content', uri])).exports[0];
        expect(info.description).toBe('partition 6 (MBR logical, type 0x82, offset 19922944, 4194304 bytes, 512-byte sectors)');
      });
    });

    it('writes land inside the partition in the image', async () => {
      const p = parts.find((x) => x.number === 6)!;
      await withServer(img, [['partition', '6']], (uri) => qemuIo(uri, 'write -P 0xc3 0 64k', `write -P 0x3c ${p.size * 512 - 65536} 64k`));
      // Read the image directly through a plain server on the file: the partition's first and last 64k.
      const s = await serve({ plugin: createTestFilePlugin(), config: [['file', img]] });
      try {
        await qemuIo(s.uri, `read -P 0xc3 ${p.start * 512} 64k`, `read -P 0x3c ${(p.start + p.size) * 512 - 65536} 64k`);
      } finally {
        await s.close();
      }
      // Refill so later comparisons keep working with fresh data.
      fill(img, 512, [p]);
    });

    it('clear errors: the extended container, an empty entry, a missing logical partition', async () => {
      const other = join(dir, 'mbr-gaps.img');
      truncateSync((closeSync(openSync(other, 'w')), other), 16 * 1024 * 1024);
      await runOk('sh', ['-c', `printf 'label: dos\\nstart=2048, size=4096, type=83\\n' | sfdisk -q "$0"`, other]);
      for (const [n, re] of [
        ['2', /partition 2 not found: MBR entry 2 is empty/],
        ['5', /partition 5 not found: this MBR disk has no extended partition/],
      ] as const) {
        const r = await withServer(other, [['partition', n]], (uri) => run('qemu-img', ['info', uri]));
        expect(r.code).not.toBe(0);
        expect(r.stderr).toMatch(re);
      }
      for (const [n, re] of [
        ['3', /partition 3 is an extended partition/],
        ['8', /partition 8 not found: the logical partitions are 5 to 7/],
      ] as const) {
        const r = await withServer(img, [['partition', n]], (uri) => run('qemu-img', ['info', uri]));
        expect(r.stderr).toMatch(re);
      }
    });

    it('partition outside the disk (a truncated image): clear error', async () => {
      const cut = join(dir, 'mbr-cut.img');
      copyFileSync(img, cut);
      truncateSync(cut, 30 * 1024 * 1024); // partition 7 (sectors 49152-65535) no longer fits in 61440 sectors
      const r = await withServer(cut, [['partition', '7']], (uri) => run('qemu-img', ['info', uri]));
      expect(r.stderr).toMatch(/partition 7 \(sectors \d+ to \d+, 512-byte sectors\) lies outside the disk \(61440 sectors, 31457280 bytes\)/);
      // Partition 1 of the same image is still served.
      await checkPartition(cut, 512, parts[0]!);
    });

    it('no partition table: clear error', async () => {
      const blank = join(dir, 'blank.img');
      truncateSync((closeSync(openSync(blank, 'w')), blank), 1024 * 1024);
      const r = await withServer(blank, [['partition', '1']], (uri) => run('qemu-img', ['info', uri]));
      expect(r.stderr).toMatch(/no partition table: sector 0 has no MBR boot signature/);
    });
  });

  describe('GPT with 128 entries', () => {
    let img: string;
    beforeAll(async () => {
      img = join(dir, 'gpt.img');
      truncateSync((closeSync(openSync(img, 'w')), img), 64 * 1024 * 1024);
      await runOk('sgdisk', ['-o', '-n', '1:2048:+8M', '-c', '1:EFI boot', '-t', '1:ef00', '-n', '2:0:+16M', '-c', '2:data', '-n', '3:0:0', img]);
      expect(await runOk('sgdisk', ['-p', img])).toMatch(/Partition table holds up to 128 entries/);
    });

    it('offsets and sizes as sgdisk -i and sfdisk --json say; bytes as dd extracts', async () => {
      const fromSfdisk = await sfdiskParts(img);
      const spans: Span[] = [];
      for (const n of [1, 2, 3]) {
        const i = await sgdiskInfo(img, n);
        expect(fromSfdisk.parts.find((p) => p.number === n)).toMatchObject({ start: i.start, size: i.size });
        spans.push(i);
      }
      fill(img, 512, spans);
      for (const p of spans) await checkPartition(img, 512, p);
    });

    it('the description carries the GPT name', async () => {
      await withServer(img, [['partition', '1']], async (uri) => {
        const info = JSON.parse(await runOk('nbdinfo', ['--json', '--no-content', uri])).exports[0];
        expect(info.description).toMatch(/^partition 1 "EFI boot" \(GPT, type C12A7328-F81F-11D2-BA4B-00A0C93EC93B, offset 1048576, 8388608 bytes/);
      });
    });

    it('unused entries and numbers past the table are not found', async () => {
      for (const [n, re] of [
        ['4', /partition 4 not found: GPT entry 4 is unused/],
        ['129', /partition 129 not found: the GPT has 128 partition entries/],
      ] as const) {
        const r = await withServer(img, [['partition', n]], (uri) => run('qemu-img', ['info', uri]));
        expect(r.stderr).toMatch(re);
      }
    });

    it('a damaged primary header is detected; the backup is used', async () => {
      const bad = join(dir, 'gpt-bad.img');
      copyFileSync(img, bad);
      const fd = openSync(bad, 'r+');
      writeSync(fd, Buffer.from([0xff]), 0, 1, 512 + 40); // inside the header, so its CRC no longer matches
      closeSync(fd);
      const p2 = await sgdiskInfo(img, 2);
      await checkPartition(bad, 512, p2);
      // Both copies damaged: a clear error.
      const fd2 = openSync(bad, 'r+');
      writeSync(fd2, Buffer.from([0xff]), 0, 1, 64 * 1024 * 1024 - 512 + 40);
      closeSync(fd2);
      const r = await withServer(bad, [['partition', '2']], (uri) => run('qemu-img', ['info', uri]));
      expect(r.stderr).toMatch(/no usable GPT: 512-byte sectors: primary GPT: GPT header CRC32 mismatch.*backup GPT: GPT header CRC32 mismatch/);
    });
  });

  it('GPT with the partition table moved (sgdisk -j 1024): the header is followed, not LBA 2', async () => {
    const img = join(dir, 'gpt-moved.img');
    truncateSync((closeSync(openSync(img, 'w')), img), 32 * 1024 * 1024);
    await runOk('sgdisk', ['-j', '1024', '-n', '1:0:+4M', '-c', '1:first', '-n', '2:0:+8M', '-c', '2:second', img]);
    expect(await runOk('sgdisk', ['-p', img])).toMatch(/Main partition table begins at sector 1024/);
    const spans = [await sgdiskInfo(img, 1), await sgdiskInfo(img, 2)];
    fill(img, 512, spans);
    // Garbage where the table normally is: a parser that assumed LBA 2 would fail.
    const fd = openSync(img, 'r+');
    writeSync(fd, Buffer.alloc(32 * 512, 0xa5), 0, 32 * 512, 2 * 512);
    closeSync(fd);
    for (const p of spans) await checkPartition(img, 512, p);
  });

  describe('4096-byte sectors (loop device with losetup -b 4096)', () => {
    let loopOk = false;
    beforeAll(async () => {
      loopOk = await canLoop();
    });

    it('GPT: with partition-sectorsize=4096, from the minimum block size, and probed', async (ctx) => {
      if (!loopOk) return ctx.skip();
      const img = join(dir, 'gpt4k.img');
      truncateSync((closeSync(openSync(img, 'w')), img), 32 * 1024 * 1024);
      const spans = await withLoop4k(img, async (dev) => {
        await runOk('sgdisk', ['-o', '-n', '1:0:+4M', '-c', '1:four', '-n', '2:0:+8M', dev]);
        expect(await runOk('sgdisk', ['-p', dev])).toMatch(/Sector size \(logical\/physical\): 4096\/\d+ bytes/);
        const t = await sfdiskParts(dev);
        expect(t.ss).toBe(4096);
        const list = [await sgdiskInfo(dev, 1), await sgdiskInfo(dev, 2)];
        for (const i of list) expect(t.parts.find((p) => p.number === i.number)).toMatchObject({ start: i.start, size: i.size });
        return list;
      });
      fill(img, 4096, spans);
      for (const p of spans) {
        await checkPartition(img, 4096, p, [['partition-sectorsize', '4096']]);
        await checkPartition(img, 4096, p, [['min-block', '4096']]);
        await checkPartition(img, 4096, p, [['partition-sectorsize', '4k']]);
        await checkPartition(img, 4096, p);
      }
      // Told the wrong size: a clear error rather than wrong data.
      const r = await withServer(img, [['partition', '1'], ['partition-sectorsize', '512']], (uri) => run('qemu-img', ['info', uri]));
      expect(r.stderr).toMatch(/no usable GPT: primary GPT: no GPT signature \('EFI PART'\) at sector 1/);
    });

    it('MBR with a logical partition', async (ctx) => {
      if (!loopOk) return ctx.skip();
      const img = join(dir, 'mbr4k.img');
      truncateSync((closeSync(openSync(img, 'w')), img), 32 * 1024 * 1024);
      const t = await withLoop4k(img, async (dev) => {
        await runOk('sh', ['-c', `printf 'label: dos\\nstart=256, size=1024, type=83\\nsize=512, type=83\\nsize=4096, type=5\\nsize=512, type=83\\nsize=1024, type=83\\nsize=1024, type=83\\n' | sfdisk -q "$0"`, dev]);
        return sfdiskParts(dev);
      });
      expect(t.ss).toBe(4096);
      expect(t.parts.map((p) => p.number)).toEqual([1, 2, 4, 5, 6]);
      fill(img, 4096, t.parts);
      for (const p of t.parts) {
        await checkPartition(img, 4096, p, [['partition-sectorsize', '4096']]);
        await checkPartition(img, 4096, p, [['min-block', '4096']]);
      }
    });
  });

  it('under the nbdx CLI: --filter=partition file IMG partition=N', async (ctx) => {
    if (!needNbdx()) return ctx.skip();
    const img = join(dir, 'cli.img');
    truncateSync((closeSync(openSync(img, 'w')), img), 16 * 1024 * 1024);
    await runOk('sgdisk', ['-n', '1:0:+4M', '-c', '1:alpha', '-n', '2:0:+2M', '-c', '2:beta', img]);
    const p2 = await sgdiskInfo(img, 2);
    const r = await run(process.execPath, [
      nbdxBin(), '-r', '-U', '-', '--filter=partition', 'file', img, 'partition=2',
      '--run', 'nbdinfo --json --no-content "$uri"',
    ]);
    expect(r.code, r.stderr).toBe(0);
    const info = JSON.parse(r.stdout).exports[0];
    expect(info['export-size']).toBe(p2.size * 512);
    expect(info.description).toMatch(new RegExp(`^partition 2 "beta" \\(GPT, .*offset ${p2.start * 512}, ${p2.size * 512} bytes`));
  });

  it('bad parameters are refused at configuration time', async () => {
    const make = (config: Array<[string, string]>) =>
      serve({ plugin: createTestFilePlugin(), filters: [createPartitionFilter()], config: [['file', '/dev/null'], ...config] });
    await expect(make([])).rejects.toThrow(/partition=N parameter is required/);
    await expect(make([['partition', '0']])).rejects.toThrow(/'0' is not a partition number/);
    await expect(make([['partition', 'two']])).rejects.toThrow(/'two' is not a partition number/);
    await expect(make([['partition', '1'], ['partition-sectorsize', '1024']])).rejects.toThrow(/must be 512 or 4096/);
    await expect(make([['partition', '1'], ['partition-sectorsize', 'big']])).rejects.toThrow(/'big' must be 512 or 4096/);
  });
});
