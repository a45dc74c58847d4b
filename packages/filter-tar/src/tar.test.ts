/**
 * End to end: archives made by GNU tar, served in-process through the tar filter over a small
 * file plugin, checked with nbdinfo, nbdsh, qemu-img, qemu-io and GNU tar itself.
 */
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import { createTarFilter } from './index.js';
import { exportUri, nbdxBin, needNbdx, needTools, removeDir, run, runOk, socketOf, tmpDir } from '@nbdx/testkit';
import { END_OF_ARCHIVE, createTestFilePlugin, padded, paxRecords, tarHeader, tarMember } from './test-support.js';

const HAVE = {
  tar: needTools('tar'),
  nbdsh: needTools('nbdsh'),
  nbdinfo: needTools('nbdinfo'),
  qemuImg: needTools('qemu-img'),
  qemuIo: needTools('qemu-io'),
};
const TOOLS = HAVE.tar && HAVE.nbdsh && HAVE.nbdinfo;

let dir: string;
beforeAll(() => {
  dir = tmpDir('nbdx-tar-');
  fs.writeFileSync(path.join(dir, 'read.py'), READ_SCRIPT);
});
afterAll(() => removeDir(dir));

/** nbdsh script: connect to each export, read it whole into a file, report sizes or errors. */
const READ_SCRIPT = `
import json
out = {}
for item in A['exports']:
    h = nbd.NBD()
    h.set_full_info(True)
    h.set_export_name(item['name'])
    try:
        h.connect_unix(A['socket'])
    except nbd.Error as e:
        out[item['name']] = {'error': str(e)}
        continue
    size = h.get_size()
    with open(item['out'], 'wb') as f:
        off = 0
        while off < size:
            n = min(8 << 20, size - off)
            f.write(h.pread(n, off))
            off += n
    out[item['name']] = {'size': size, 'name': h.get_canonical_export_name()}
    h.shutdown()
json.dump(out, open(A['result'], 'w'))
`;

let seq = 0;
/** Read several exports whole with one nbdsh process; returns name → bytes (or error). */
async function readExports(uri: string, names: string[]): Promise<Map<string, Buffer | { error: string }>> {
  const id = ++seq;
  const exports = names.map((name, i) => ({ name, out: path.join(dir, `out-${id}-${i}`) }));
  const argsPath = path.join(dir, `args-${id}.json`);
  const result = path.join(dir, `result-${id}.json`);
  fs.writeFileSync(argsPath, JSON.stringify({ socket: socketOf(uri), exports, result }));
  await runOk('nbdsh', ['-c', `import json; A = json.load(open(${JSON.stringify(argsPath)}))`, '-c', `exec(open(${JSON.stringify(path.join(dir, 'read.py'))}).read())`]);
  const r = JSON.parse(fs.readFileSync(result, 'utf8')) as Record<string, { size?: number; error?: string }>;
  const out = new Map<string, Buffer | { error: string }>();
  exports.forEach((e) => {
    const x = r[e.name]!;
    if (x.error !== undefined) out.set(e.name, { error: x.error });
    else {
      out.set(e.name, fs.readFileSync(e.out));
      fs.rmSync(e.out);
    }
  });
  return out;
}

async function listExports(uri: string): Promise<{ name: string; description?: string; size: number }[]> {
  const out = await runOk('nbdinfo', ['--list', '--json', uri]);
  const j = JSON.parse(out.toString()) as { exports: { 'export-name': string; description?: string; 'export-size': number }[] };
  return j.exports.map((e) => ({ name: e['export-name'], description: e.description, size: e['export-size'] }));
}

/** Serve an archive file through a fresh tar filter; collects debug lines. */
async function start(archive: string, config: [string, string][] = [], options: { readonly?: boolean } = {}) {
  const { plugin, stats } = createTestFilePlugin();
  const filter = createTarFilter();
  const log: string[] = [];
  const server = await serve({
    plugin,
    filters: [filter],
    config: [['file', archive], ...config],
    readonly: options.readonly ?? false,
    debug: (m) => log.push(m),
    error: (m) => log.push(m),
  });
  return { server, filter, stats, log, uri: server.uri };
}

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

/** A tree of files for GNU tar to archive. */
function makeTree(root: string, format: string): { files: Record<string, Buffer>; dirs: string[]; links: string[] } {
  const files: Record<string, Buffer> = {
    'small.txt': Buffer.from('hello from a tar archive\n'),
    'data.bin': randomBytes(100_000),
    empty: Buffer.alloc(0),
    'données-ü-日本語.txt': Buffer.from('non-ASCII name\n'),
    'sub/inner.dat': randomBytes(5000),
  };
  if (format !== 'v7') {
    // 170 bytes with a directory part (ustar splits it into prefix + name).
    files[`deep/${'d'.repeat(90)}/${'f'.repeat(70)}.bin`] = randomBytes(3000);
  }
  if (format === 'gnu' || format === 'pax') {
    // One component longer than 100 bytes: only GNU long names or pax can store it.
    files[`${'n'.repeat(150)}-é.img`] = randomBytes(1024);
  }
  for (const [name, data] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(root, name)), { recursive: true });
    fs.writeFileSync(path.join(root, name), data);
  }
  fs.symlinkSync('small.txt', path.join(root, 'link'));
  return { files, dirs: ['sub'], links: ['link'] };
}

describe.skipIf(!TOOLS)('archives made by GNU tar', () => {
  for (const format of ['gnu', 'ustar', 'pax', 'v7']) {
    it(`--format=${format}: every member is listed and byte-identical to tar -xOf`, async () => {
      const root = path.join(dir, `tree-${format}`);
      fs.mkdirSync(root);
      const tree = makeTree(root, format);
      const archive = path.join(dir, `${format}.tar`);
      const top = fs.readdirSync(root);
      await runOk('tar', [`--format=${format}`, '-cf', archive, '-C', root, ...top]);

      const t = await start(archive);
      try {
        const listed = await listExports(t.uri);
        const names = Object.keys(tree.files);
        expect(listed.map((e) => e.name).sort()).toEqual([...names].sort());
        for (const e of listed) {
          expect(e.size).toBe(tree.files[e.name]!.length);
          expect(e.description).toContain(`${e.size} byte`);
        }

        const got = await readExports(t.uri, [...names, 'sub', 'link', 'missing']);
        for (const name of names) {
          const fromTar = await runOk('tar', ['-xOf', archive, name], { encoding: 'buffer' });
          const fromNbd = got.get(name);
          expect(Buffer.isBuffer(fromNbd), `${name}: ${JSON.stringify(fromNbd)}`).toBe(true);
          expect(sha(fromNbd as Buffer)).toBe(sha(fromTar));
          expect(sha(fromNbd as Buffer)).toBe(sha(tree.files[name]!));
        }
        // Directories, links and unknown names are refused, with a clear message in the log.
        for (const name of ['sub', 'link', 'missing']) expect(got.get(name)).toHaveProperty('error');
        const log = t.log.join('\n');
        expect(log).toMatch(/'sub\/?' is a directory in the archive/);
        expect(log).toMatch(/'link' is a symbolic link to 'small.txt'/);
        expect(log).toMatch(/export 'missing' is not in the archive; its files are/);
        expect(t.filter.scanCount).toBe(1);
      } finally {
        await t.server.close();
      }
    });
  }

  it('serves one member by URI name and picks the default with tar-default', async () => {
    const root = path.join(dir, 'tree-default');
    fs.mkdirSync(root);
    const tree = makeTree(root, 'gnu');
    const archive = path.join(dir, 'default.tar');
    await runOk('tar', ['--format=gnu', '-cf', archive, '-C', root, '.']);

    // Stored as ./sub/inner.dat; listed and reachable as sub/inner.dat.
    const t = await start(archive, [['tar-default', 'sub/inner.dat']]);
    try {
      const listed = await listExports(t.uri);
      expect(listed.map((e) => e.name)).toContain('sub/inner.dat');
      const info = JSON.parse((await runOk('nbdinfo', ['--json', t.uri])).toString()) as { exports: { 'export-name': string; 'export-size': number }[] };
      expect(info.exports[0]!['export-name']).toBe('sub/inner.dat');
      expect(info.exports[0]!['export-size']).toBe(5000);

      const out = path.join(dir, 'copied.bin');
      await runOk('nbdcopy', [exportUri(t.uri, 'données-ü-日本語.txt'), out]);
      expect(fs.readFileSync(out)).toEqual(tree.files['données-ü-日本語.txt']);
      await runOk('nbdcopy', [exportUri(t.uri, 'sub/inner.dat'), out]);
      expect(sha(fs.readFileSync(out))).toBe(sha(tree.files['sub/inner.dat']!));
    } finally {
      await t.server.close();
    }
    // Without tar-default the first regular file is the default.
    const u = await start(archive);
    try {
      const got = await readExports(u.uri, ['']);
      expect(Buffer.isBuffer(got.get(''))).toBe(true);
    } finally {
      await u.server.close();
    }
  });

  it('git archive output: the pax global header is not a member', async () => {
    if (!needTools('git')) return;
    const repo = path.join(dir, 'repo');
    fs.mkdirSync(path.join(repo, 'src'), { recursive: true });
    const files: Record<string, Buffer> = {
      'README.md': Buffer.from('# repo\n'),
      [`src/${'m'.repeat(120)}.bin`]: randomBytes(2000),
    };
    for (const [name, data] of Object.entries(files)) fs.writeFileSync(path.join(repo, name), data);
    const git = (...args: string[]) => runOk('git', ['-c', 'user.name=t', '-c', 'user.email=t@example.invalid', ...args], { cwd: repo });
    await git('init', '-q');
    await git('add', '.');
    await git('commit', '-q', '-m', 'one');
    const archive = path.join(dir, 'git.tar');
    await git('archive', '--format=tar', '-o', archive, 'HEAD');
    // git writes a pax global header (the commit id) first.
    expect(fs.readFileSync(archive).subarray(156, 157).toString()).toBe('g');
    const t = await start(archive);
    try {
      expect((await listExports(t.uri)).map((e) => e.name).sort()).toEqual(Object.keys(files).sort());
      const got = await readExports(t.uri, Object.keys(files));
      for (const [name, data] of Object.entries(files)) expect(got.get(name)).toEqual(data);
    } finally {
      await t.server.close();
    }
  });

  it('scans the archive once however many clients connect', async () => {
    const root = path.join(dir, 'tree-once');
    fs.mkdirSync(root);
    const tree = makeTree(root, 'pax');
    const archive = path.join(dir, 'once.tar');
    await runOk('tar', ['--format=pax', '-cf', archive, '-C', root, ...fs.readdirSync(root)]);
    const t = await start(archive);
    try {
      // afterStart scanned already. GNU tar says where the header blocks are.
      const listing = (await runOk('tar', ['-R', '-tvf', archive])).toString();
      const headers = [...listing.matchAll(/^block (\d+): [-dlrwx]/gm)].map((m) => Number(m[1]) * 512);
      expect(headers.length).toBe(fs.readdirSync(root).length + 3); // the top level, plus sub/inner.dat, deep/d…/ and the file inside it
      const touches = (r: { offset: number; length: number }) => headers.some((h) => r.offset < h + 512 && h < r.offset + r.length);
      const scanReads = t.stats.reads.slice();
      expect(headers.every((h) => scanReads.some((r) => r.offset <= h && h + 512 <= r.offset + r.length))).toBe(true);
      expect(t.stats.opens).toEqual([{ readonly: true, exportName: '' }]);

      const names = Object.keys(tree.files);
      await listExports(t.uri);
      await listExports(t.uri);
      await readExports(t.uri, names);
      await readExports(t.uri, names.slice(0, 2));
      await Promise.all([runOk('nbdinfo', [t.uri]), runOk('nbdinfo', [exportUri(t.uri, 'data.bin')])]);

      expect(t.filter.scanCount).toBe(1);
      // One read-only context for the scan; every connection opened its own read-write one.
      expect(t.stats.opens.filter((o) => o.readonly)).toHaveLength(1);
      expect(t.stats.opens.length).toBeGreaterThanOrEqual(1 + names.length + 2 + 2 + 2 * names.length);
      // Clients read member data only: no header block was read again.
      const later = t.stats.reads.slice(scanReads.length);
      expect(later.length).toBeGreaterThan(names.length);
      expect(later.filter(touches)).toEqual([]);
    } finally {
      await t.server.close();
    }
  });
});

describe.skipIf(!TOOLS || !HAVE.qemuImg || !HAVE.qemuIo)('images inside archives', () => {
  it('qemu-img sees a qcow2 image inside a tar and compares it equal', async () => {
    const root = path.join(dir, 'tree-qcow2');
    fs.mkdirSync(root);
    const image = path.join(root, 'disk.qcow2');
    fs.writeFileSync(path.join(root, 'before.txt'), 'a member before the image\n');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', image, '64M']);
    await runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x5a 1M 3M', '-c', 'write -P 0xa5 60M 64k', image]);
    const archive = path.join(dir, 'qcow2.tar');
    await runOk('tar', ['--format=posix', '-cf', archive, '-C', root, 'before.txt', 'disk.qcow2']);

    const t = await start(archive, [['tar-entry', 'disk.qcow2']]);
    try {
      const info = JSON.parse((await runOk('qemu-img', ['info', '--output=json', t.uri])).toString()) as {
        format: string;
        'virtual-size': number;
      };
      expect(info.format).toBe('qcow2');
      expect(info['virtual-size']).toBe(64 * 1024 * 1024);
      const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', image, t.uri]);
      expect(cmp.code, cmp.stderr).toBe(0);
      expect(cmp.stdout.toString()).toMatch(/Images are identical/);
      // Export names pass through to the layer below in tar-entry mode.
      expect((await listExports(t.uri)).map((e) => e.name)).toEqual(['']);
    } finally {
      await t.server.close();
    }
  });
});

describe.skipIf(!TOOLS || !HAVE.qemuIo)('writes', () => {
  let archive: string;
  let data: Buffer;
  let member: { start: number; size: number };

  beforeAll(async () => {
    const root = path.join(dir, 'tree-write');
    fs.mkdirSync(root);
    data = randomBytes(200_000);
    fs.writeFileSync(path.join(root, 'first.txt'), 'first\n');
    fs.writeFileSync(path.join(root, 'target.img'), data);
    fs.writeFileSync(path.join(root, 'last.txt'), 'last\n');
    archive = path.join(dir, 'write.tar');
    await runOk('tar', ['--format=gnu', '-cf', archive, '-C', root, 'first.txt', 'target.img', 'last.txt']);
    // Find the member's bytes in the archive to check nothing else changes.
    const whole = fs.readFileSync(archive);
    member = { start: whole.indexOf(data), size: data.length };
    expect(member.start % 512).toBe(0);
  });

  it('writes, zeroes and trims land in the member; GNU tar still reads the archive', async () => {
    const listingBefore = (await runOk('tar', ['-tvf', archive])).toString();
    const before = fs.readFileSync(archive);
    const t = await start(archive, [['tar-entry', 'target.img']]);
    try {
      await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 1000 3000', '-c', 'write -z 8192 4096', '-c', 'flush', t.uri]);
      // The end of the member can be written; one byte further is ENOSPC.
      const py = [
        'h = nbd.NBD()',
        'h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_BOUNDS)',
        `h.connect_unix(${JSON.stringify(socketOf(t.uri))})`,
        'size = h.get_size()',
        "h.pwrite(b'E' * 512, size - 512)",
        'try:',
        "    h.pwrite(b'X' * 1024, size - 512)",
        "    print('no error')",
        'except nbd.Error as e:',
        '    print(e.string)',
        'try:',
        "    h.zero(1024, size - 512)",
        "    print('no error')",
        'except nbd.Error as e:',
        '    print(e.string)',
        'print(size)',
        'h.shutdown()',
      ].join('\n');
      const out = (await runOk('nbdsh', ['-c', py])).toString().trim().split('\n');
      expect(out).toEqual([
        'nbd_pwrite: write: command failed: No space left on device',
        'nbd_zero: write-zeroes: command failed: No space left on device',
        String(data.length),
      ]);
    } finally {
      await t.server.close();
    }
    const expected = Buffer.from(data);
    expected.fill(0xab, 1000, 4000);
    expected.fill(0, 8192, 8192 + 4096);
    expected.fill('E', data.length - 512);
    const extracted = await runOk('tar', ['-xOf', archive, 'target.img'], { encoding: 'buffer' });
    expect(sha(extracted)).toBe(sha(expected));
    expect((await runOk('tar', ['-tvf', archive])).toString()).toBe(listingBefore);
    expect((await runOk('tar', ['-xOf', archive, 'last.txt'])).toString()).toBe('last\n');
    // Every byte outside the member is unchanged.
    const after = fs.readFileSync(archive);
    expect(after.length).toBe(before.length);
    expect(after.subarray(0, member.start)).toEqual(before.subarray(0, member.start));
    expect(after.subarray(member.start + member.size)).toEqual(before.subarray(member.start + member.size));
  });

  it('-r keeps the archive untouched', async () => {
    const before = sha(fs.readFileSync(archive));
    const t = await start(archive, [['tar-entry', 'target.img']], { readonly: true });
    try {
      const r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4096', t.uri]);
      expect(r.code !== 0 || /failed|read-only|Operation not permitted/i.test(r.stdout.toString() + r.stderr)).toBe(true);
      expect(t.stats.opens.every((o) => o.readonly)).toBe(true);
    } finally {
      await t.server.close();
    }
    expect(sha(fs.readFileSync(archive))).toBe(before);
  });

  it('extents are shifted into the member', async () => {
    // A member with a zero run in the middle; the test plugin reports zero blocks as holes.
    const root = path.join(dir, 'tree-extents');
    fs.mkdirSync(root);
    const img = Buffer.concat([randomBytes(65536), Buffer.alloc(131072), randomBytes(65536)]);
    fs.writeFileSync(path.join(root, 'a.txt'), 'x'.repeat(700));
    fs.writeFileSync(path.join(root, 'img'), img);
    const arch = path.join(dir, 'extents.tar');
    await runOk('tar', ['--format=ustar', '-cf', arch, '-C', root, 'a.txt', 'img']);
    const t = await start(arch, [['tar-entry', 'img']]);
    try {
      const map = JSON.parse((await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', t.uri])).toString()) as {
        start: number;
        length: number;
        zero: boolean;
        data: boolean;
      }[];
      const zeros = map.filter((e) => e.zero).map((e) => [e.start, e.length]);
      expect(zeros).toEqual([[65536, 131072]]);
      expect(map.reduce((n, e) => n + e.length, 0)).toBe(img.length);
    } finally {
      await t.server.close();
    }
  });
});

describe.skipIf(!TOOLS)('members over 8 GiB', () => {
  it('base-256 (GNU) and pax sizes: GNU tar and nbdx agree', async () => {
    const big = 9 * 2 ** 30 + 100;
    const afterBig = 512 + Math.ceil(big / 512) * 512;
    const archive = path.join(dir, 'huge.tar');
    const fd = fs.openSync(archive, 'w');
    try {
      // GNU header with a base-256 size, the data sparse except a marker at its end.
      fs.writeSync(fd, tarHeader({ name: 'big.img', size: big }), 0, 512, 0);
      fs.writeSync(fd, Buffer.from('TAIL!'), 0, 5, 512 + big - 5);
      // A pax header carrying a size over 8 GiB, then a small member.
      const pax = paxRecords([['size', String(big + 1)]]);
      const paxMember = Buffer.concat([
        tarHeader({ name: 'PaxHeaders/big2', typeflag: 'x', size: pax.length, format: 'ustar' }),
        padded(pax),
        tarHeader({ name: 'big2.img', size: 0, format: 'ustar' }),
      ]);
      fs.writeSync(fd, paxMember, 0, paxMember.length, afterBig);
      const data2 = afterBig + paxMember.length;
      fs.writeSync(fd, Buffer.from('HEAD2'), 0, 5, data2);
      const afterBig2 = data2 + Math.ceil((big + 1) / 512) * 512;
      const small = Buffer.concat([tarMember({ name: 'small.txt' }, Buffer.from('small after huge\n')), END_OF_ARCHIVE]);
      fs.writeSync(fd, small, 0, small.length, afterBig2);
    } finally {
      fs.closeSync(fd);
    }
    const listing = (await runOk('tar', ['-tvf', archive])).toString();
    expect(listing).toMatch(new RegExp(`\\s${big}\\s.*big\\.img`));
    expect(listing).toMatch(new RegExp(`\\s${big + 1}\\s.*big2\\.img`));
    expect(listing).toMatch(/small\.txt/);

    const t = await start(archive);
    try {
      const listed = await listExports(t.uri);
      expect(listed.map((e) => [e.name, e.size])).toEqual([
        ['big.img', big],
        ['big2.img', big + 1],
        ['small.txt', 17],
      ]);
      expect(listed[0]!.description).toMatch(/9\.0 GiB/);
      const py = [
        `h = nbd.NBD()`,
        `h.set_export_name('big.img')`,
        `h.connect_unix(${JSON.stringify(socketOf(t.uri))})`,
        `print(h.pread(5, ${big - 5}).decode())`,
        `h.shutdown()`,
        `h = nbd.NBD()`,
        `h.set_export_name('big2.img')`,
        `h.connect_unix(${JSON.stringify(socketOf(t.uri))})`,
        `print(h.pread(5, 0).decode())`,
      ].join('\n');
      expect((await runOk('nbdsh', ['-c', py])).toString()).toBe('TAIL!\nHEAD2\n');
      const got = await readExports(t.uri, ['small.txt']);
      expect((got.get('small.txt') as Buffer).toString()).toBe((await runOk('tar', ['-xOf', archive, 'small.txt'])).toString());
    } finally {
      await t.server.close();
    }
  });
});

describe.skipIf(!TOOLS)('bad archives and parameters give clear errors', () => {
  let archive: string;
  beforeAll(async () => {
    const root = path.join(dir, 'tree-errors');
    fs.mkdirSync(path.join(root, 'd'), { recursive: true });
    for (let i = 0; i < 5; i++) fs.writeFileSync(path.join(root, `f${i}.txt`), `file ${i}\n`.repeat(100));
    archive = path.join(dir, 'errors.tar');
    await runOk('tar', ['--format=gnu', '-cf', archive, '-C', root, 'd', 'f0.txt', 'f1.txt', 'f2.txt', 'f3.txt', 'f4.txt']);
  });

  const startFails = async (file: string, config: [string, string][]) => {
    const { plugin } = createTestFilePlugin();
    return serve({ plugin, filters: [createTarFilter()], config: [['file', file], ...config], error: () => {} }).then(
      async (s) => {
        await s.close();
        throw new Error('the server started');
      },
      (err: Error) => err.message,
    );
  };

  it('a missing tar-entry lists the files', async () => {
    expect(await startFails(archive, [['tar-entry', 'nope.img']])).toMatch(
      /tar-entry 'nope.img' is not in the archive; its files are 'f0.txt', 'f1.txt'/,
    );
  });

  it('a directory is refused', async () => {
    expect(await startFails(archive, [['tar-entry', 'd']])).toMatch(/'d\/' is a directory in the archive/);
  });

  it('tar-limit bounds the scan', async () => {
    // Each member is 512 + 1024 bytes; f4.txt's header is at 512 + 4 * 1536 = 6656.
    expect(await startFails(archive, [['tar-entry', 'f4.txt'], ['tar-limit', '6k']])).toMatch(
      /tar-entry 'f4.txt' was not found within the first 6144 bytes of the archive \(tar-limit=6144/,
    );
    const t = await start(archive, [['tar-entry', 'f4.txt'], ['tar-limit', '7k']]);
    await t.server.close();
    // Listing mode lists what lies within the limit.
    const u = await start(archive, [['tar-limit', '4k']]);
    try {
      // Headers lying wholly below 4096: f0 (512), f1 (2048), f2 (3584).
      expect((await listExports(u.uri)).map((e) => e.name)).toEqual(['f0.txt', 'f1.txt', 'f2.txt']);
    } finally {
      await u.server.close();
    }
  });

  it('a compressed archive is named', async () => {
    const gz = path.join(dir, 'errors.tar.gz');
    fs.writeFileSync(gz, gzipSync(fs.readFileSync(archive)));
    expect(await startFails(gz, [['tar-entry', 'f0.txt']])).toMatch(/the archive is gzip-compressed.*gunzip/);
    expect(await startFails(gz, [])).toMatch(/gzip-compressed/);
  });

  it('a corrupted header is reported with its offset', async () => {
    const bad = path.join(dir, 'corrupt.tar');
    const bytes = fs.readFileSync(archive);
    bytes[512 + 1536 + 5] ^= 0x20; // f1.txt's header name
    fs.writeFileSync(bad, bytes);
    expect(await startFails(bad, [])).toMatch(/corrupted tar header at offset 2048: checksum mismatch/);
  });

  it('parameters are checked', async () => {
    expect(await startFails(archive, [['tar-entry', 'f0.txt'], ['tar-default', 'f1.txt']])).toMatch(/tar-default applies only without tar-entry/);
    expect(await startFails(archive, [['tar-default', 'nope']])).toMatch(/tar-default 'nope' is not in the archive/);
    expect(await startFails(archive, [['tar-limit', 'lots']])).toMatch(/tar-limit: could not parse 'lots'/);
  });

  it('GNU sparse members are not served', async () => {
    const root = path.join(dir, 'tree-sparse');
    fs.mkdirSync(root);
    const f = path.join(root, 'sparse.img');
    fs.writeFileSync(f, 'start');
    fs.truncateSync(f, 4 * 1024 * 1024);
    fs.appendFileSync(f, 'end');
    fs.writeFileSync(path.join(root, 'plain.txt'), 'plain\n');
    for (const format of ['gnu', 'pax']) {
      const arch = path.join(dir, `sparse-${format}.tar`);
      await runOk('tar', [`--format=${format}`, '--sparse', '-cf', arch, '-C', root, 'sparse.img', 'plain.txt']);
      expect(await startFails(arch, [['tar-entry', 'sparse.img']])).toMatch(/'sparse.img' is a GNU sparse file/);
      const t = await start(arch);
      try {
        expect((await listExports(t.uri)).map((e) => e.name)).toEqual(['plain.txt']);
        const got = await readExports(t.uri, ['plain.txt']);
        expect((got.get('plain.txt') as Buffer).toString()).toBe('plain\n');
      } finally {
        await t.server.close();
      }
    }
  });
});

/** The real command line with the real file plugin: `nbdx --filter=tar file disk.tar tar-entry=…`. */
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');
const CLI_READY = needNbdx() && fs.existsSync(path.join(ROOT, 'packages/plugin-file/dist/index.js'));
if (!CLI_READY && process.env.CI === 'true') throw new Error('the nbdx CLI and the file plugin must be built under CI');

describe.skipIf(!TOOLS || !HAVE.qemuImg || !CLI_READY)('command line', () => {
  it('nbdx --filter=tar file disk.tar tar-entry=disk.qcow2, and listing without tar-entry', async () => {
    const root = path.join(dir, 'tree-cli');
    fs.mkdirSync(path.join(root, 'images'), { recursive: true });
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(root, 'images/disk.qcow2'), '16M']);
    fs.writeFileSync(path.join(root, 'notes.txt'), 'notes\n');
    const archive = path.join(dir, 'cli.tar');
    await runOk('tar', ['--format=gnu', '-cf', archive, '-C', root, 'notes.txt', 'images']);

    const info = await run(
      process.execPath,
      [nbdxBin(), '-U', path.join(dir, 'cli1.sock'), '--filter=tar', 'file', archive, 'tar-entry=images/disk.qcow2', '--run', 'qemu-img info --output=json "$uri"'],
      { cwd: ROOT },
    );
    expect(info.code, info.stderr).toBe(0);
    const j = JSON.parse(info.stdout.toString()) as { format: string; 'virtual-size': number };
    expect([j.format, j['virtual-size']]).toEqual(['qcow2', 16 * 1024 * 1024]);

    const list = await run(process.execPath, [nbdxBin(), '-U', path.join(dir, 'cli2.sock'), '--filter=tar', 'file', archive, '--run', 'nbdinfo --list --json "$uri"'], {
      cwd: ROOT,
    });
    expect(list.code, list.stderr).toBe(0);
    const names = (JSON.parse(list.stdout.toString()) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name']);
    expect(names).toEqual(['notes.txt', 'images/disk.qcow2']);

    const bad = await run(process.execPath, [nbdxBin(), '-U', path.join(dir, 'cli3.sock'), '--filter=tar', 'file', archive, 'tar-entry=images', '--run', 'true'], { cwd: ROOT });
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/'images\/' is a directory in the archive/);
  });
});
