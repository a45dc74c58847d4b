import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { NbdClient, NbdRequestError } from '@nbdx/client';
import { definePlugin, type Extent } from '@nbdx/server/api';
import { serve, type ServeOptions } from '@nbdx/server';
import { nbdinfoMap, nbdxBin, needTools, qemuImgMap, qemuIo, removeDir, run, runOk, tmpDir } from '@nbdx/testkit';
import { createCowFilter, parseBlockSize, parseCopyOnRead } from './index.js';
import { HOLE_ZERO, createLayoutPlugin, createReadOnlyFilePlugin } from './fixtures.test-helper.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

type Server = Awaited<ReturnType<typeof serve>>;
const servers: Server[] = [];
const conns: NbdClient[] = [];
async function start(options: ServeOptions): Promise<Server> {
  const s = await serve({ error: () => {}, ...options });
  servers.push(s);
  return s;
}
async function connect(uri: string): Promise<NbdClient> {
  const c = await NbdClient.connect(uri);
  conns.push(c);
  return c;
}
afterEach(async () => {
  for (const c of conns.splice(0)) if (c.isOpen) c.close();
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

let dir: string;
beforeAll(() => {
  dir = tmpDir('nbdx-cow-test-');
});
afterAll(() => {
  removeDir(dir);
});

/** A file of random data with some zero runs, written once. */
function makeImage(name: string, size: number, seed: number): string {
  const buf = randomBytes(size);
  for (let z = seed * 97 * KiB; z < size; z += 700 * KiB) buf.fill(0, z, Math.min(size, z + 200 * KiB + seed));
  const file = path.join(dir, name);
  fs.writeFileSync(file, buf);
  return file;
}

describe('cow over a read-only file', () => {
  it('qemu-img convert writes through the overlay, qemu-img compare sees the new data, the file is unchanged', async () => {
    if (!needTools('qemu-img')) return;
    const base = makeImage('base.img', 6 * MiB + 512, 1);
    const src = makeImage('src.img', 6 * MiB + 512, 2);
    const before = sha(fs.readFileSync(base));
    const { plugin } = createReadOnlyFilePlugin(base);

    // Control: without the filter the export cannot be written.
    const plain = await start({ plugin });
    expect((await connect(plain.uri)).readOnly).toBe(true);
    expect((await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, plain.uri])).code).not.toBe(0);

    const { plugin: below, stats } = createReadOnlyFilePlugin(base);
    const s = await start({ plugin: below, filters: [createCowFilter()] });
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, s.uri], { timeout: 60_000 });
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, s.uri]);
    expect(cmp.stdout + cmp.stderr).toMatch(/Images are identical/);
    expect(cmp.code).toBe(0);
    // The overlay differs from the file; the file itself is untouched.
    expect((await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', base, s.uri])).code).toBe(1);
    expect(sha(fs.readFileSync(base))).toBe(before);
    expect(stats.opens.every((o) => o.readonly)).toBe(true);
  });

  it('partial overwrite: bytes written land, every other byte still comes from the file (nbdcopy, qemu-io)', async () => {
    if (!needTools('qemu-io', 'nbdcopy')) return;
    const base = makeImage('base2.img', 2 * MiB, 3);
    const { plugin, stats } = createReadOnlyFilePlugin(base);
    const s = await start({ plugin, filters: [createCowFilter()], config: [['cow-block-size', '4K']] });
    await qemuIo(s.uri, 'write -P 0xab 1000 5000', 'write -z 70000 10000');
    const out = path.join(dir, 'out.img');
    await runOk('nbdcopy', [s.uri, out]);
    const expected = fs.readFileSync(base);
    expected.fill(0xab, 1000, 6000);
    expected.fill(0, 70000, 80000);
    expect(sha(fs.readFileSync(out))).toBe(sha(expected));
    expect(stats.opens.every((o) => o.readonly)).toBe(true);
  });

  it('with -r the export stays read-only and reads pass through', async () => {
    if (!needTools('qemu-img', 'nbdinfo')) return;
    const base = makeImage('base3.img', 1 * MiB, 4);
    const { plugin } = createReadOnlyFilePlugin(base);
    const s = await start({ plugin, filters: [createCowFilter()], readonly: true });
    const info = JSON.parse(await runOk('nbdinfo', ['--json', s.uri])).exports[0];
    expect(info.is_read_only).toBe(true);
    expect((await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', base, s.uri])).code).toBe(0);
    const c = await connect(s.uri);
    const reply = await c.request({ type: 1 /* WRITE */, offset: 0, length: 512, payload: Buffer.alloc(512) });
    expect(reply.error).toBe(1 /* EPERM */);
  });
});

describe('cow over @nbdx/plugin-file', () => {
  it('a sparse image file: qemu-img convert + compare through the overlay, the file unchanged, -r too', async () => {
    if (!needTools('qemu-img')) return;
    // The file plugin is another package of this repository (a devDependency): used from its build.
    const { createFilePlugin } = await import('@nbdx/plugin-file');
    const base = path.join(dir, 'sparse-base.img');
    fs.writeFileSync(base, '');
    fs.truncateSync(base, 8 * MiB);
    const fd = fs.openSync(base, 'r+');
    fs.writeSync(fd, randomBytes(1 * MiB), 0, 1 * MiB, 3 * MiB);
    fs.closeSync(fd);
    fs.chmodSync(base, 0o444);
    const before = sha(fs.readFileSync(base));
    const src = makeImage('sparse-src.img', 8 * MiB, 6);

    const s = await start({ plugin: createFilePlugin(), filters: [createCowFilter()], config: [['file', base]] });
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, s.uri], { timeout: 60_000 });
    expect((await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, s.uri])).code).toBe(0);
    expect(sha(fs.readFileSync(base))).toBe(before);
    expect(fs.statSync(base).blocks * 512).toBeLessThan(2 * MiB); // still sparse: never written

    const r = await start({ plugin: createFilePlugin(), filters: [createCowFilter()], config: [['file', base]], readonly: true });
    expect((await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', base, r.uri])).code).toBe(0);
    expect((await connect(r.uri)).readOnly).toBe(true);
  });
});

describe('cow: concurrent writers', () => {
  it.each(['auto', 'sync', 'async'])('many clients writing overlapping unaligned ranges lose no update (cow-io=%s)', async (io) => {
    const size = 3 * MiB + 333;
    const base = makeImage(`conc-${io}.img`, size, 5);
    const model = fs.readFileSync(base);
    const { plugin } = createReadOnlyFilePlugin(base);
    const s = await start({
      plugin,
      filters: [createCowFilter()],
      config: [
        ['cow-block-size', '4K'],
        ['cow-io', io],
      ],
    });
    const clients = await Promise.all(Array.from({ length: 8 }, () => connect(s.uri)));
    let seed = 12345;
    const random = (n: number) => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return (seed >>> 8) % n;
    };
    for (let round = 0; round < 4; round++) {
      // Stripes of 1..12000 bytes dealt round-robin: neighbours share blocks (4K), often with
      // another client's stripe in the same block; across rounds the ranges overlap.
      const jobs: Promise<void>[] = [];
      let pos = random(3000);
      let i = 0;
      while (pos < size) {
        const len = Math.min(size - pos, 1 + random(12000));
        const c = clients[i++ % clients.length]!;
        if (random(8) === 0) {
          jobs.push(c.zero(len, pos));
          model.fill(0, pos, pos + len);
        } else {
          const data = randomBytes(len);
          jobs.push(c.pwrite(data, pos));
          data.copy(model, pos);
        }
        pos += len;
      }
      await Promise.all(jobs);
      const got = Buffer.alloc(size);
      for (let off = 0; off < size; off += 1 * MiB) {
        const n = Math.min(1 * MiB, size - off);
        (await clients[round]!.pread(n, off)).copy(got, off);
      }
      expect(sha(got)).toBe(sha(model));
    }
    if (needTools('qemu-img')) {
      const modelFile = path.join(dir, `model-${io}.img`);
      fs.writeFileSync(modelFile, model);
      expect((await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', modelFile, s.uri])).code).toBe(0);
    }
  });
});

describe('cow: extents', () => {
  const size = 4 * MiB;
  const layout: Extent[] = [
    { offset: 0, length: 512 * KiB, type: 0 },
    { offset: 512 * KiB, length: 1 * MiB, type: HOLE_ZERO },
    { offset: 1536 * KiB, length: size - 1536 * KiB, type: 0 },
  ];
  type Op = ['write' | 'zero' | 'trim', number, number];
  const ops: Op[] = [
    ['write', 600 * KiB + 10, 100], // into a hole below: that block becomes data
    ['zero', 2 * MiB + 64 * KiB, 192 * KiB], // whole blocks of data below: zero
    ['zero', 3 * MiB + 100, 1000], // part of a data block: stays data
    ['trim', 1 * MiB + 5, 200 * KiB], // mostly whole blocks in the hole; partial ends become data
    ['write', 500 * KiB, 20 * KiB], // across the data/hole boundary
    ['write', 3584 * KiB, 64 * KiB],
    ['trim', 3584 * KiB, 64 * KiB], // written, then trimmed whole: zero
  ];

  /** The expected map, 64K blocks over the layout, as [start, length, data, zero] merged. */
  function model(bs: number): Array<[number, number, boolean, boolean]> {
    const states: string[] = Array.from({ length: size / bs }, () => 'below');
    for (const [kind, off, len] of ops) {
      for (let b = Math.floor(off / bs); b <= Math.floor((off + len - 1) / bs); b++) {
        const whole = off <= b * bs && off + len >= (b + 1) * bs;
        if (kind === 'write') states[b] = 'data';
        else if (whole) states[b] = 'zero';
        else if (states[b] === 'below') states[b] = 'data';
      }
    }
    const out: Array<[number, number, boolean, boolean]> = [];
    const push = (start: number, length: number, data: boolean, zero: boolean) => {
      const last = out[out.length - 1];
      if (last && last[2] === data && last[3] === zero && last[0] + last[1] === start) last[1] += length;
      else out.push([start, length, data, zero]);
    };
    states.forEach((st, b) => {
      if (st === 'data') push(b * bs, bs, true, false);
      else if (st === 'zero') push(b * bs, bs, false, true);
      else {
        for (const e of layout) {
          const s = Math.max(e.offset, b * bs);
          const f = Math.min(e.offset + e.length, (b + 1) * bs);
          if (s < f) push(s, f - s, e.type === 0, e.type !== 0);
        }
      }
    });
    return out;
  }

  it('qemu-img map through nbdx matches the model after writes, zeroes and trims', async () => {
    if (!needTools('qemu-img')) return;
    const { plugin } = createLayoutPlugin(size, layout);
    const s = await start({ plugin, filters: [createCowFilter()] });
    const c = await connect(s.uri);
    for (const [kind, off, len] of ops) {
      if (kind === 'write') await c.pwrite(Buffer.alloc(len, 0x5c), off);
      else if (kind === 'zero') await c.zero(len, off);
      else await c.trim(len, off);
    }
    const raw = await qemuImgMap('-f', 'raw', s.uri);
    const got: Array<[number, number, boolean, boolean]> = [];
    for (const e of raw) {
      const last = got[got.length - 1];
      if (last && last[2] === e.data && last[3] === e.zero) last[1] += e.length;
      else got.push([e.start, e.length, e.data, e.zero]);
    }
    expect(got).toEqual(model(64 * KiB));
    // And the bytes: trimmed/zeroed ranges read as zero, written ones as written.
    expect((await c.pread(100, 600 * KiB + 10)).every((x) => x === 0x5c)).toBe(true);
    expect((await c.pread(64 * KiB, 3584 * KiB)).every((x) => x === 0)).toBe(true);
    expect((await c.pread(1000, 3 * MiB + 100)).every((x) => x === 0)).toBe(true);
  });

  it('nbdinfo --map agrees (HOLE|ZERO = 3, data = 0)', async () => {
    if (!needTools('nbdinfo')) return;
    const { plugin } = createLayoutPlugin(size, layout);
    const s = await start({ plugin, filters: [createCowFilter()] });
    const c = await connect(s.uri);
    await c.trim(128 * KiB, 0);
    await c.pwrite(Buffer.alloc(10, 1), 1 * MiB);
    const map = await nbdinfoMap(s.uri);
    expect(map.map((e) => [e.offset, e.length, e.type])).toEqual([
      [0, 128 * KiB, 3],
      [128 * KiB, 384 * KiB, 0],
      [512 * KiB, 512 * KiB, 3],
      [1 * MiB, 64 * KiB, 0],
      [1 * MiB + 64 * KiB, 448 * KiB, 3],
      [1536 * KiB, size - 1536 * KiB, 0],
    ]);
  });
});

describe('cow: copy on read and on cache', () => {
  const size = 1 * MiB;
  const layout: Extent[] = [{ offset: 0, length: size, type: 0 }];

  it('cow-on-read=false (default): every read goes below', async () => {
    const { plugin, stats } = createLayoutPlugin(size, layout);
    const s = await start({ plugin, filters: [createCowFilter()] });
    const c = await connect(s.uri);
    await c.pread(4096, 0);
    await c.pread(4096, 0);
    expect(stats.reads).toBe(2);
  });

  it('cow-on-read=true: a block read once is served from the overlay afterwards', async () => {
    const { plugin, stats, bytes } = createLayoutPlugin(size, layout);
    const s = await start({ plugin, filters: [createCowFilter()], config: [['cow-on-read', 'true']] });
    const c = await connect(s.uri);
    const first = await c.pread(4096, 100);
    const n = stats.reads;
    expect(n).toBeGreaterThan(0);
    const again = await c.pread(4096, 100);
    expect(stats.reads).toBe(n);
    expect(first.equals(bytes.subarray(100, 4196))).toBe(true);
    expect(again.equals(first)).toBe(true);
  });

  it('cow-on-read=PATH copies only while PATH exists', async () => {
    const flag = path.join(dir, 'cow-on-read-flag');
    fs.rmSync(flag, { force: true });
    const { plugin, stats } = createLayoutPlugin(size, layout);
    const s = await start({ plugin, filters: [createCowFilter()], config: [['cow-on-read', flag]] });
    const c = await connect(s.uri);
    await c.pread(512, 0);
    await c.pread(512, 0);
    expect(stats.reads).toBe(2); // no flag file: plain reads
    fs.writeFileSync(flag, '');
    await c.pread(512, 0);
    const n = stats.reads;
    await c.pread(512, 0);
    expect(stats.reads).toBe(n); // copied up
    fs.rmSync(flag);
    await c.pread(512, 512 * KiB);
    await c.pread(512, 512 * KiB);
    expect(stats.reads).toBe(n + 2);
  });

  it('cow-on-cache=true copies on NBD_CMD_CACHE; false passes the cache request below', async () => {
    const a = createLayoutPlugin(size, layout);
    const s1 = await start({ plugin: a.plugin, filters: [createCowFilter()], config: [['cow-on-cache', 'true']] });
    const c1 = await connect(s1.uri);
    expect(c1.canCache).toBe(true);
    await c1.cache(256 * KiB, 0);
    expect(a.stats.cached).toEqual([]);
    const n = a.stats.reads;
    await c1.pread(256 * KiB, 0);
    expect(a.stats.reads).toBe(n);

    const b = createLayoutPlugin(size, layout);
    const s2 = await start({ plugin: b.plugin, filters: [createCowFilter()] });
    const c2 = await connect(s2.uri);
    await c2.pwrite(Buffer.alloc(64 * KiB, 1), 64 * KiB);
    await c2.cache(256 * KiB, 0);
    // The written block is in the overlay already: only the rest is passed on.
    expect(b.stats.cached).toEqual([
      [0, 64 * KiB],
      [128 * KiB, 128 * KiB],
    ]);
  });
});

describe('cow: capabilities and commands', () => {
  it('advertises write, trim, zero, fast zero, flush, FUA, multi-conn, extents; nbdsh-level commands work', async () => {
    if (!needTools('nbdinfo')) return;
    const { plugin } = createLayoutPlugin(1 * MiB, [{ offset: 0, length: 1 * MiB, type: 0 }]);
    const s = await start({ plugin, filters: [createCowFilter()] });
    const info = JSON.parse(await runOk('nbdinfo', ['--json', s.uri])).exports[0];
    expect(info).toMatchObject({
      is_read_only: false,
      can_trim: true,
      can_zero: true,
      can_fast_zero: true,
      can_flush: true,
      can_fua: true,
      can_multi_conn: true,
      can_cache: true,
    });
    const c = await connect(s.uri);
    await c.pwrite(Buffer.alloc(1000, 7), 5, 1 /* FUA */);
    await c.flush();
    await c.zero(64 * KiB, 64 * KiB, 1 << 4 /* FAST_ZERO */);
    expect((await c.pread(64 * KiB, 64 * KiB)).every((x) => x === 0)).toBe(true);
    expect((await c.pread(1000, 5)).every((x) => x === 7)).toBe(true);
  });

  it('a second connection sees the first one\'s writes (one overlay per export)', async () => {
    const { plugin } = createLayoutPlugin(1 * MiB, [{ offset: 0, length: 1 * MiB, type: 0 }]);
    const s = await start({ plugin, filters: [createCowFilter()] });
    const a = await connect(s.uri);
    await a.pwrite(Buffer.from('written by a'), 4000);
    const b = await connect(s.uri);
    expect((await b.pread(12, 4000)).toString()).toBe('written by a');
  });

  it('separate exports get separate overlays', async () => {
    const plugin = definePlugin({
      apiVersion: 2,
      name: 'two',
      listExports: () => ['a', 'b'],
      getSize: () => 1 * MiB,
      pread: (_h, buf) => void buf.fill(1),
    });
    const s = await start({ plugin, filters: [createCowFilter()] });
    const a = await NbdClient.connect(s.uri, { exportName: 'a' });
    const b = await NbdClient.connect(s.uri, { exportName: 'b' });
    conns.push(a, b);
    await a.pwrite(Buffer.alloc(10, 2), 0);
    expect((await b.pread(10, 0)).every((x) => x === 1)).toBe(true);
    expect((await a.pread(10, 0)).every((x) => x === 2)).toBe(true);
  });

  it('requests beyond the end get errors, and the server keeps working', async () => {
    const { plugin } = createLayoutPlugin(1 * MiB + 100, [{ offset: 0, length: 1 * MiB + 100, type: 0 }]);
    const s = await start({ plugin, filters: [createCowFilter()] });
    const c = await connect(s.uri);
    const bad = await c.request({ type: 1, offset: 1 * MiB, length: 200, payload: Buffer.alloc(200) });
    expect(bad.error).toBe(28 /* ENOSPC */);
    // The last, partial block can be written and read.
    await c.pwrite(Buffer.alloc(100, 9), 1 * MiB);
    expect((await c.pread(100, 1 * MiB)).every((x) => x === 9)).toBe(true);
    const err = await c.pread(10, 1 * MiB + 95).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdRequestError);
  });
});

describe('cow over shared (--filter=cow --filter=shared)', () => {
  it('one read-only context below for every client, one overlay above it', async () => {
    // The shared filter is another package of this repository (a devDependency): used from its build.
    const { createSharedFilter } = await import('@nbdx/filter-shared');
    const { plugin, stats } = createLayoutPlugin(1 * MiB, [{ offset: 0, length: 1 * MiB, type: 0 }]);
    const s = await start({
      plugin,
      filters: [createCowFilter(), createSharedFilter()],
      config: [['shared-open', 'lazy']],
    });
    const cs = await Promise.all(Array.from({ length: 5 }, () => connect(s.uri)));
    await Promise.all(cs.map((c, i) => c.pwrite(Buffer.alloc(1000, i + 1), i * 100_000 + 7)));
    for (const c of cs) {
      for (let i = 0; i < cs.length; i++) expect((await c.pread(1000, i * 100_000 + 7)).every((x) => x === i + 1)).toBe(true);
    }
    expect(stats.opens).toEqual([{ readonly: true, exportName: '' }]);
    if (needTools('nbdinfo')) {
      const info = JSON.parse(await runOk('nbdinfo', ['--json', s.uri])).exports[0];
      expect(info.is_read_only).toBe(false);
      expect(info.can_multi_conn).toBe(true);
    }
  });
});

describe('cow from the command line', () => {
  it('nbdx --filter=cow --filter=shared file FILE --run (loaded by name)', async () => {
    if (!needTools('qemu-io', 'nbdinfo')) return;
    const file = path.join(dir, 'cli.img');
    fs.writeFileSync(file, Buffer.alloc(1 * MiB, 0x22));
    const script =
      'qemu-io -f raw -c "write -P 0x11 4096 64k" "$uri" && qemu-io -f raw -c "read -P 0x11 4096 64k" ' +
      '-c "read -P 0x22 0 4096" "$uri" && nbdinfo --json "$uri"';
    const r = await run(process.execPath, [nbdxBin(), '-U', '-', '--filter=cow', '--filter=shared', 'file', file, 'shared-open=lazy', '--run', script]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).not.toMatch(/Pattern verification failed/);
    expect(JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).exports[0].can_multi_conn).toBe(true);
    expect(fs.readFileSync(file).every((x) => x === 0x22)).toBe(true);
  });
});

describe('cow: overlay file and configuration', () => {
  it('the overlay is an unlinked file in TMPDIR', async () => {
    const tmp = fs.mkdtempSync(path.join(dir, 'tmpdir-'));
    const saved = process.env.TMPDIR;
    process.env.TMPDIR = tmp;
    try {
      const { plugin } = createLayoutPlugin(1 * MiB, [{ offset: 0, length: 1 * MiB, type: 0 }]);
      const s = await start({ plugin, filters: [createCowFilter()] });
      const c = await connect(s.uri);
      await c.pwrite(Buffer.alloc(64 * KiB, 3), 0);
      // (The server's own socket directory lives there too.)
      expect(fs.readdirSync(tmp).filter((n) => n.startsWith('nbdx-cow-'))).toEqual([]);
      const links = fs.readdirSync('/proc/self/fd').map((fd) => {
        try {
          return fs.readlinkSync(`/proc/self/fd/${fd}`);
        } catch {
          return '';
        }
      });
      expect(links.some((l) => l.startsWith(path.join(tmp, 'nbdx-cow-')) && l.endsWith('(deleted)'))).toBe(true);
    } finally {
      if (saved === undefined) delete process.env.TMPDIR;
      else process.env.TMPDIR = saved;
    }
  });

  it('an unusable TMPDIR stops the server at start-up with a clear message', async () => {
    const saved = process.env.TMPDIR;
    process.env.TMPDIR = path.join(dir, 'does-not-exist');
    try {
      const { plugin } = createLayoutPlugin(1 * MiB, []);
      await expect(serve({ plugin, filters: [createCowFilter()] })).rejects.toThrow(
        /cow: cannot create the overlay in .*does-not-exist \(set TMPDIR/,
      );
    } finally {
      if (saved === undefined) delete process.env.TMPDIR;
      else process.env.TMPDIR = saved;
    }
  });

  it('parses parameters and rejects bad ones clearly', async () => {
    expect(parseBlockSize('4K')).toBe(4096);
    expect(parseBlockSize('64k')).toBe(65536);
    expect(parseBlockSize('4G')).toBe(4 * 1024 * MiB);
    for (const bad of ['2K', '8G', '48K', '1000', 'big']) expect(() => parseBlockSize(bad)).toThrow(/cow-block-size/);
    expect(parseCopyOnRead('true')).toBe(true);
    expect(parseCopyOnRead('off')).toBe(false);
    expect(parseCopyOnRead('/run/flag')).toEqual({ path: '/run/flag' });
    const { plugin } = createLayoutPlugin(1 * MiB, []);
    await expect(serve({ plugin, filters: [createCowFilter()], config: [['cow-block-size', '3000']] })).rejects.toThrow(
      "cow-block-size: '3000' must be a power of two from 4K to 4G",
    );
    await expect(serve({ plugin, filters: [createCowFilter()], config: [['cow-on-cache', 'maybe']] })).rejects.toThrow(
      /cow-on-cache/,
    );
    await expect(serve({ plugin, filters: [createCowFilter()], config: [['cow-io', 'fast']] })).rejects.toThrow(
      "cow-io: 'fast' is not one of auto, sync, async",
    );
    // Keys the filter does not know go on to the plugin (which takes none).
    await expect(serve({ plugin, filters: [createCowFilter()], config: [['size', '1M']] })).rejects.toThrow(
      /takes no parameters/,
    );
  });

  it('a 4G block size works (nothing is allocated per block)', async () => {
    const { plugin } = createLayoutPlugin(3 * MiB, [{ offset: 0, length: 3 * MiB, type: 0 }]);
    const s = await start({ plugin, filters: [createCowFilter()], config: [['cow-block-size', '4G']] });
    const c = await connect(s.uri);
    await c.pwrite(Buffer.from('xyz'), 2 * MiB + 1);
    const got = await c.pread(5, 2 * MiB);
    expect(got.subarray(1, 4).toString()).toBe('xyz');
  });
});
