import { createHash } from 'node:crypto';
import { mkdirSync, opendirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { exportUri, hasTool, nbdshOk, needTools, removeDir, run, runOk, socketOf, tmpDir } from '@nbdx/testkit';
import { serveFile } from './test-support.js';

const MiB = 1024 * 1024;
const hasTools = needTools('nbdinfo', 'nbdsh', 'mkfifo');

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** Python: connect to `name` on the server's socket, print its size or the error. */
function connectTo(uri: string, name: string): string {
  return [
    'import nbd',
    'h = nbd.NBD()',
    `h.set_export_name(${JSON.stringify(name)})`,
    'try:',
    `    h.connect_unix(${JSON.stringify(socketOf(uri))})`,
    '    print(h.get_size())',
    'except nbd.Error as e:',
    '    print("refused")',
  ].join('\n');
}

describe.skipIf(!hasTools)('dir= mode', () => {
  const tmp = tmpDir('nbdx-file-');
  const dir = join(tmp, 'exports');
  const files: Record<string, Buffer> = {
    'a.img': Buffer.alloc(1 * MiB, 0x61),
    'b.img': Buffer.alloc(2 * MiB, 0x62),
    'with space.raw': Buffer.alloc(64 * 1024, 0x63),
  };
  let server: Awaited<ReturnType<typeof serveFile>>;

  beforeAll(async () => {
    mkdirSync(dir);
    for (const [name, data] of Object.entries(files)) writeFileSync(join(dir, name), data);
    writeFileSync(join(tmp, 'x'), Buffer.alloc(3 * MiB, 0x78)); // outside the directory
    mkdirSync(join(dir, 'sub'));
    writeFileSync(join(dir, 'sub', 'inner.img'), Buffer.alloc(4096));
    symlinkSync('a.img', join(dir, 'link.img'));
    symlinkSync('missing.img', join(dir, 'dangling.img'));
    await runOk('mkfifo', [join(dir, 'pipe')]);
    server = await serveFile([['dir', dir]]);
  });
  afterAll(async () => {
    await server?.close();
    removeDir(tmp);
  });

  it('nbdinfo --list shows every regular file (and links to one), nothing else', async () => {
    const listed = JSON.parse(await runOk('nbdinfo', ['--list', '--json', server.uri])) as {
      exports: { 'export-name': string; 'export-size': number }[];
    };
    const names = listed.exports.map((e) => e['export-name']).sort();
    expect(names).toEqual(['a.img', 'b.img', 'link.img', 'with space.raw']);
    const sizes = Object.fromEntries(listed.exports.map((e) => [e['export-name'], e['export-size']]));
    expect(sizes['b.img']).toBe(2 * MiB);
    expect(sizes['link.img']).toBe(1 * MiB);
  });

  it("lists in the directory's own order, as nbdkit does (not sorted); directory= is dir=", async () => {
    const readdirOrder: string[] = [];
    const d = opendirSync(dir);
    for (let e = d.readSync(); e; e = d.readSync()) readdirOrder.push(e.name);
    d.closeSync();
    const expected = readdirOrder.filter((n) => ['a.img', 'b.img', 'link.img', 'with space.raw'].includes(n));
    const listed = JSON.parse(await runOk('nbdinfo', ['--list', '--json', server.uri])) as { exports: { 'export-name': string }[] };
    expect(listed.exports.map((e) => e['export-name'])).toEqual(expected);
    const other = await serveFile([['directory', dir]]);
    try {
      const again = JSON.parse(await runOk('nbdinfo', ['--list', '--json', other.uri])) as { exports: { 'export-name': string }[] };
      expect(again.exports.map((e) => e['export-name'])).toEqual(expected);
    } finally {
      await other.close();
    }
    if (hasTool('nbdkit')) {
      const k = await run('nbdkit', ['-U', '-', 'file', `dir=${dir}`, '--run', 'nbdinfo --list --json "$uri"']);
      const theirs = (JSON.parse(k.stdout) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name']);
      expect(theirs).toEqual(expected);
    }
  });

  it('each export serves its own file', async () => {
    for (const [name, data] of Object.entries(files)) {
      const out = await nbdshOk(
        exportUri(server.uri, name),
        'import hashlib\nprint(h.get_size(), hashlib.sha256(h.pread(h.get_size(), 0)).hexdigest())',
      );
      expect(out.trim()).toBe(`${data.length} ${sha256(data)}`);
    }
  });

  it('a write to one export lands in that file only', async () => {
    await nbdshOk(exportUri(server.uri, 'b.img'), 'h.pwrite(b"hello", 4096)\nh.flush()');
    const b = readFileSync(join(dir, 'b.img'));
    expect(b.subarray(4096, 4101).toString()).toBe('hello');
    expect(sha256(readFileSync(join(dir, 'a.img')))).toBe(sha256(files['a.img']!));
  });

  it('refuses names that leave the directory or are not files: ../x, .., a/b, sub, pipe, missing', async () => {
    for (const name of ['../x', '..', '.', 'sub/inner.img', 'sub', 'pipe', 'dangling.img', 'nope.img']) {
      expect([name, (await runOk('nbdsh', ['-c', connectTo(server.uri, name)])).trim()]).toEqual([name, 'refused']);
    }
    // and the server still serves afterwards
    expect((await runOk('nbdsh', ['-c', connectTo(server.uri, 'a.img')])).trim()).toBe(String(MiB));
  });

  it('has no default export unless one is configured', async () => {
    const r = await run('nbdinfo', [server.uri]);
    expect(r.code).not.toBe(0);
    expect((await runOk('nbdsh', ['-c', connectTo(server.uri, '')])).trim()).toBe('refused');
  });

  it('default-export=NAME serves that file to clients asking for ""', async () => {
    const s2 = await serveFile([
      ['dir', dir],
      ['default-export', 'b.img'],
    ]);
    try {
      expect(await runOk('nbdinfo', ['--size', s2.uri])).toBe(`${2 * MiB}\n`);
    } finally {
      await s2.close();
    }
  });

  it('a read-only server (-r) serves the directory read-only', async () => {
    const s3 = await serveFile([['dir', dir]], { readonly: true });
    try {
      const out = await nbdshOk(
        exportUri(s3.uri, 'a.img'),
        ['print(h.is_read_only())', 'h.set_strict_mode(0)', 'try:', '    h.pwrite(b"x", 0)', 'except nbd.Error as e:', '    print(e.errno)'].join('\n'),
      );
      expect(out.trim().split('\n')).toEqual(['True', 'EPERM']);
    } finally {
      await s3.close();
    }
  });
});
