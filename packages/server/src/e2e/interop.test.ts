/**
 * The tools people use, against `nbdx memory` started as a real CLI process.
 */
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { needTools, runOk, startCli, tmpDir, type CliServer } from '@nbdx/testkit';

const have = needTools('nbdinfo', 'qemu-img', 'nbdcopy', 'qemu-nbd');
const MiB = 1024 * 1024;

describe.skipIf(!have)('interop with nbdinfo, qemu-img, nbdcopy', () => {
  let dir: string;
  let srv: CliServer;
  beforeAll(async () => {
    dir = tmpDir();
    srv = await startCli(['-U', path.join(dir, 'sock'), '-e', 'disk', 'memory', '128M']);
  });
  afterAll(async () => {
    expect(await srv.stop()).toBe(0);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('nbdinfo --json reports size, flags, block sizes and base:allocation', async () => {
    const info = JSON.parse(await runOk('nbdinfo', ['--json', srv.uri]));
    const e = info.exports[0];
    expect(info.protocol).toMatch(/newstyle-fixed/);
    expect(e['export-name']).toBe('disk');
    expect(e['export-size']).toBe(128 * MiB);
    expect(e['is_read_only']).toBe(false);
    for (const k of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_cache', 'can_multi_conn', 'can_df']) {
      expect(e[k], k).toBe(true);
    }
    expect(e['block_size_minimum']).toBe(1);
    expect(e['block_size_preferred']).toBe(4096);
    expect(e['block_size_maximum']).toBe(32 * MiB);
    expect(e['contexts']).toContain('base:allocation');
  });

  it('nbdinfo --list and qemu-nbd --list show the export', async () => {
    const list = await runOk('nbdinfo', ['--list', '--json', srv.uri]);
    expect(JSON.parse(list).exports.map((x: { 'export-name': string }) => x['export-name'])).toEqual(['']);
    const q = await runOk('qemu-nbd', ['--list', '-k', path.join(dir, 'sock')]);
    expect(q).toMatch(/exports available: 1/);
    expect(q).toMatch(/size:\s+134217728/);
  });

  it('qemu-img convert of a random 100 MiB image round-trips; qemu-img compare says equal', async () => {
    const img = path.join(dir, 'random.raw');
    const fd = fs.openSync(img, 'w');
    for (let i = 0; i < 100; i++) fs.writeSync(fd, randomBytes(MiB));
    fs.closeSync(fd);
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', img, srv.uri], { timeout: 120_000 });
    const out = await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', img, srv.uri]);
    expect(out).toMatch(/Images are identical/);
    fs.rmSync(img);
  });

  it('nbdcopy round trip keeps every byte (checksums)', async () => {
    const src = path.join(dir, 'src.raw');
    const back = path.join(dir, 'back.raw');
    const data = randomBytes(16 * MiB);
    fs.writeFileSync(src, data);
    // Into a second export so the big image above stays put.
    const other = await startCli(['-U', path.join(dir, 'sock2'), 'memory', '16M']);
    try {
      await runOk('nbdcopy', [src, other.uri]);
      await runOk('nbdcopy', [other.uri, back]);
    } finally {
      await other.stop();
    }
    const sum = (b: Buffer) => createHash('sha256').update(b).digest('hex');
    expect(sum(fs.readFileSync(back))).toBe(sum(data));
  });

  it('qemu-img map shows data only where written', async () => {
    const s2 = await startCli(['-U', path.join(dir, 'sock3'), 'memory', '64M']);
    try {
      await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 7 1M 64k', '-c', 'write -P 8 10M 1M', s2.uri]);
      const map = JSON.parse(await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', s2.uri]));
      const data = map.filter((m: { data: boolean }) => m.data).map((m: { start: number; length: number }) => [m.start, m.length]);
      expect(data).toEqual([
        [1 * MiB, 64 * 1024],
        [10 * MiB, MiB],
      ]);
      const text = await runOk('nbdinfo', ['--map', s2.uri]);
      expect(text).toMatch(/1048576\s+65536\s+0\s+data/);
    } finally {
      await s2.stop();
    }
  });
});
