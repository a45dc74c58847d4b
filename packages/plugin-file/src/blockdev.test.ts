import { writeFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hasTool, nbdshOk, removeDir, run, runOk, tmpDir } from '@nbdx/testkit';
import { allocatedBlocks, isRoot, serveFile } from './test-support.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

/** Python: run `call`, print OK or the errno name the server answered with. */
const attempt = (call: string) =>
  ['try:', `    ${call}`, '    print("OK")', 'except nbd.Error as e:', '    print(e.errno)'].join('\n');

/**
 * Block devices come from a loop device over a sparse file, which needs root and /dev/loop*.
 * Containers often have neither, so this suite skips (also under CI) when it cannot set one up;
 * the reason is printed.
 */
describe('a block device (loop device)', () => {
  const tmp = tmpDir('nbdx-file-');
  const backing = join(tmp, 'backing.img');
  let device = '';
  let why = '';
  let server: Awaited<ReturnType<typeof serveFile>> | undefined;

  beforeAll(async () => {
    if (!isRoot) why = 'needs root';
    else if (!hasTool('losetup') || !hasTool('nbdsh') || !hasTool('nbdinfo')) why = 'needs losetup, nbdsh, nbdinfo';
    else {
      writeFileSync(backing, '');
      truncateSync(backing, SIZE);
      const r = await run('losetup', ['-f', '--show', backing]);
      if (r.code !== 0) why = `losetup failed: ${r.stderr.trim()}`;
      else {
        device = r.stdout.trim();
        server = await serveFile([['file', device]]);
      }
    }
    if (why) console.warn(`skipping the block device tests: ${why}`);
  });
  afterAll(async () => {
    await server?.close();
    if (device) await run('losetup', ['-d', device]);
    removeDir(tmp);
  });

  it('has the size of the device and serves data that lands in the backing file', async (ctx) => {
    if (why) ctx.skip();
    expect(await runOk('nbdinfo', ['--size', server!.uri])).toBe(`${SIZE}\n`);
    const out = await nbdshOk(
      server!.uri,
      [`h.pwrite(b"\\x77" * ${MiB}, ${4 * MiB}, nbd.CMD_FLAG_FUA)`, `print(h.pread(4, ${5 * MiB - 4}) == b"\\x77" * 4)`].join('\n'),
    );
    expect(out.trim()).toBe('True');
    expect(await allocatedBlocks(backing)).toBeGreaterThanOrEqual(MiB / 512);
  });

  it('trims (BLKDISCARD), zeroes with and without NO_HOLE, and answers FAST_ZERO without MAY_TRIM with ENOTSUP', async (ctx) => {
    if (why) ctx.skip();
    const out = await nbdshOk(
      server!.uri,
      [
        `h.pwrite(b"\\x66" * ${8 * MiB}, ${8 * MiB})`,
        'h.flush()',
        attempt(`h.trim(${2 * MiB}, ${8 * MiB})`),
        attempt(`h.zero(${MiB}, ${10 * MiB})`),
        attempt(`h.zero(${MiB} + 1000, ${11 * MiB} + 24, nbd.CMD_FLAG_NO_HOLE)`),
        attempt(`h.zero(${MiB}, ${13 * MiB}, nbd.CMD_FLAG_FAST_ZERO)`),
        attempt(`h.zero(${MiB}, ${14 * MiB}, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)`),
        `print(h.pread(${MiB}, ${10 * MiB}) == bytes(${MiB}))`,
        `print(h.pread(24, ${11 * MiB}) == b"\\x66" * 24, h.pread(${MiB} + 1000, ${11 * MiB} + 24) == bytes(${MiB} + 1000), h.pread(24, ${12 * MiB} + 1024) == b"\\x66" * 24)`,
        `print(h.pread(${MiB}, ${14 * MiB}) == b"\\x66" * ${MiB})`,
      ].join('\n'),
    );
    const lines = out.trim().split('\n');
    expect(lines.slice(0, 3)).toEqual(['OK', 'OK', 'OK']);
    // FAST_ZERO with MAY_TRIM works where the loop driver can write zeroes without writing (it can)
    expect(['OK', 'ENOTSUP']).toContain(lines[3]);
    expect(lines.slice(4)).toEqual(['ENOTSUP', 'True', 'True True True', 'True']);
  });
});
