import { chmodSync, existsSync, mkdirSync, truncateSync, writeFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { nbdshOk, needTools, removeDir, run, runOk, tmpDir } from '@nbdx/testkit';
import { CI, isRoot, serveFile } from './test-support.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const hasTools = needTools('nbdsh', 'nbdinfo');

/** Python: run `call`, print OK or the errno name the server answered with. */
const attempt = (call: string) =>
  ['try:', `    ${call}`, '    print("OK")', 'except nbd.Error as e:', '    print(e.errno)'].join('\n');

/**
 * A 1 MiB tmpfs. Mounting needs root (or passwordless sudo, as on CI runners). Under CI=true a
 * failure to mount fails the test instead of skipping it, so the ENOSPC path is always covered there.
 */
async function mountSmallTmpfs(dir: string): Promise<{ unmount(): Promise<void> } | string> {
  const sudo = isRoot ? [] : ['sudo', '-n'];
  const [cmd, ...pre] = [...sudo, 'mount'];
  const r = await run(cmd!, [...pre, '-t', 'tmpfs', '-o', `size=1M,mode=1777`, 'tmpfs', dir]);
  if (r.code !== 0) return `cannot mount a tmpfs (${r.stderr.trim() || `exit ${r.code}`}); needs root or sudo -n`;
  return {
    unmount: async () => {
      const [c, ...p] = [...sudo, 'umount'];
      await run(c!, [...p, dir]);
    },
  };
}

describe.skipIf(!hasTools)('a full file system', () => {
  const tmp = tmpDir('nbdx-file-');
  const mnt = join(tmp, 'small');
  let mounted: Awaited<ReturnType<typeof mountSmallTmpfs>>;
  let server: Awaited<ReturnType<typeof serveFile>> | undefined;

  beforeAll(async () => {
    mkdirSync(mnt);
    mounted = await mountSmallTmpfs(mnt);
    if (typeof mounted === 'string') return;
    const file = join(mnt, 'disk.img');
    writeFileSync(file, '');
    truncateSync(file, 4 * MiB); // sparse: larger than the file system
    server = await serveFile([['file', file]]);
  });
  afterAll(async () => {
    await server?.close();
    if (typeof mounted === 'object') await mounted.unmount();
    removeDir(tmp);
  });

  it('answers a write that fills it with ENOSPC and keeps serving', async (ctx) => {
    if (typeof mounted === 'string') {
      if (CI) throw new Error(mounted);
      ctx.skip();
    }
    const out = await nbdshOk(
      server!.uri,
      [
        'res = "OK"',
        `for off in range(0, ${4 * MiB}, ${256 * KiB}):`,
        '    try:',
        `        h.pwrite(b"\\xee" * ${256 * KiB}, off)`,
        '    except nbd.Error as e:',
        '        res = e.errno',
        '        break',
        'print(res)',
        // the connection still works: reads, and freeing space makes writes work again
        `print(h.pread(4, 0) == b"\\xee" * 4)`,
        `h.trim(${2 * MiB}, 0)`,
        attempt(`h.pwrite(b"\\x01" * ${64 * KiB}, ${64 * KiB})`),
      ].join('\n'),
    );
    expect(out.trim().split('\n')).toEqual(['ENOSPC', 'True', 'OK']);
    // and a new connection too
    expect(await runOk('nbdinfo', ['--size', server!.uri])).toBe(`${4 * MiB}\n`);
  });

  it('answers WRITE_ZEROES with NO_HOLE that cannot be allocated with ENOSPC', async (ctx) => {
    if (typeof mounted === 'string') {
      if (CI) throw new Error(mounted);
      ctx.skip();
    }
    const out = await nbdshOk(
      server!.uri,
      [attempt(`h.pwrite(b"\\x02" * ${512 * KiB}, 0)`), attempt(`h.zero(${3 * MiB}, ${MiB}, nbd.CMD_FLAG_NO_HOLE)`)].join('\n'),
    );
    expect(out.trim().split('\n')).toEqual(['OK', 'ENOSPC']);
    expect(await runOk('nbdinfo', ['--size', server!.uri])).toBe(`${4 * MiB}\n`);
  });
});

// /dev/shm takes the synchronous path (tmpfs), the temp dir the thread pool and RWF_NOWAIT.
const truncPlaces = [tmpdir(), ...(existsSync('/dev/shm') ? ['/dev/shm'] : [])];
for (const base of truncPlaces) {
  describe.skipIf(!hasTools)(`a file truncated under the server (in ${base})`, () => {
    let dir: string;
    let file: string;
    let server: Awaited<ReturnType<typeof serveFile>>;
    beforeAll(async () => {
      dir = await mkdtemp(join(base, 'nbdx-file-'));
      file = join(dir, 'disk.img');
      writeFileSync(file, Buffer.alloc(4 * MiB, 0x33));
      server = await serveFile([['file', file]]);
    });
    afterAll(async () => {
      await server?.close();
      await rm(dir, { recursive: true, force: true });
    });

    it('gives EIO for reads past the new end, keeps serving the rest, and new clients see the new size', async () => {
      const out = await nbdshOk(
        server.uri,
        [
          'import os',
          `os.truncate(${JSON.stringify(file)}, ${MiB})`,
          attempt(`h.pread(${64 * KiB}, ${2 * MiB})`),
          attempt(`h.pread(${64 * KiB}, ${MiB - 32 * KiB})`),
          attempt(`h.pread(${2 * MiB}, ${MiB - 32 * KiB})`),
          `print(h.pread(16, 0) == b"\\x33" * 16)`,
        ].join('\n'),
      );
      expect(out.trim().split('\n')).toEqual(['EIO', 'EIO', 'EIO', 'True']);
      expect(await runOk('nbdinfo', ['--size', server.uri])).toBe(`${MiB}\n`);
    });
  });
}

describe.skipIf(!hasTools)('read-only', () => {
  const tmp = tmpDir('nbdx-file-');
  const file = join(tmp, 'disk.img');
  beforeAll(() => writeFileSync(file, Buffer.alloc(MiB, 0x44)));
  afterAll(() => removeDir(tmp));

  it('-r (serve({readonly: true})) answers writes, trims and zeroes with EPERM', async () => {
    const server = await serveFile([['file', file]], { readonly: true });
    try {
      const out = await nbdshOk(
        server.uri,
        [
          'print(h.is_read_only())',
          'h.set_strict_mode(0)', // let the requests reach the server
          attempt('h.pwrite(b"x" * 512, 0)'),
          attempt('h.trim(512, 0)'),
          attempt('h.zero(512, 0)'),
          `print(h.pread(4, 0) == b"\\x44" * 4)`,
        ].join('\n'),
      );
      expect(out.trim().split('\n')).toEqual(['True', 'EPERM', 'EPERM', 'EPERM', 'True']);
    } finally {
      await server.close();
    }
  });

  it('serves a file it cannot open for writing read-only, with a debug line saying so', async (ctx) => {
    const locked = join(tmp, 'locked.img');
    writeFileSync(locked, Buffer.alloc(MiB, 0x45));
    // root ignores permission bits; the immutable attribute stops root too (ext4, xfs, btrfs).
    if (isRoot) {
      const r = await run('chattr', ['+i', locked]);
      if (r.code !== 0) {
        if (CI) throw new Error(`chattr +i failed: ${r.stderr}`);
        ctx.skip();
      }
    } else chmodSync(locked, 0o444);
    const lines: string[] = [];
    const server = await serveFile([['file', locked]], { debug: (m) => lines.push(m) });
    try {
      const info = await runOk('nbdinfo', [server.uri]);
      expect(info).toMatch(/is_read_only: true/);
      expect(lines.some((l) => /cannot open for writing .*read-only/.test(l))).toBe(true);
    } finally {
      await server.close();
      if (isRoot) await run('chattr', ['-i', locked]);
    }
  });
});
