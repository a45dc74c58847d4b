import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { NbdClient } from '@nbdx/client';
import { serve, type ServeOptions } from '@nbdx/server';
import { createFilePlugin } from '@nbdx/plugin-file';
import { createDelayFilter } from '@nbdx/filter-delay';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import { nbdinfoMap, nbdshOk, nbdxBin, needNbdx, needTools, qemuIo, removeDir, run, runOk, tmpDir } from '@nbdx/testkit';
import { createCacheFilter, parseBlockSize, parseCacheOnRead, parseMode, type CacheMode } from './index.js';
import { createCountingPlugin } from './fixtures.test-helper.js';

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
let cachedir: string;
beforeAll(() => {
  dir = tmpDir('nbdx-cache-test-');
  cachedir = path.join(dir, 'cachedir');
  fs.mkdirSync(cachedir);
});
afterAll(() => removeDir(dir));

function randomFile(name: string, size: number): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, randomBytes(size));
  return file;
}

describe('parameters', () => {
  it('parses modes, block sizes and cache-on-read, and refuses bad values', () => {
    expect(parseMode('writethrough')).toBe('writethrough');
    expect(() => parseMode('sometimes')).toThrow(/writeback, writethrough, unsafe/);
    expect(parseBlockSize('1M')).toBe(MiB);
    expect(() => parseBlockSize('3000')).toThrow(/power of two/);
    expect(() => parseBlockSize('2K')).toThrow(/power of two/);
    expect(parseCacheOnRead('on')).toBe(true);
    expect(parseCacheOnRead('/run/flag')).toEqual({ path: '/run/flag' });
    expect(() => parseCacheOnRead('relative/flag')).toThrow(/absolute/);
  });

  it('bad command lines give one clear line and exit 1', async () => {
    if (!needNbdx()) return;
    for (const [args, msg] of [
      [['cache=sometimes'], /writeback, writethrough, unsafe/],
      [['cache-min-block-size=1000'], /power of two/],
      [['cache-max-size=lots'], /cache-max-size/],
      [['cache-high-threshold=50', 'cache-low-threshold=60'], /must be below/],
      [['cache-max-size=4K'], /smaller than one cache block/],
      [['cachedir=/nonexistent/dir'], /cannot create the cache file/],
    ] as const) {
      const r = await run(process.execPath, [nbdxBin(), '-f', '-U', path.join(dir, 'never.sock'), '--filter=cache', 'memory', '1M', ...args]);
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(msg);
    }
  });
});

describe.each(['writeback', 'writethrough', 'unsafe'] as CacheMode[])('cache=%s over a file', (mode) => {
  it('qemu-io and nbdcopy writes read back correctly; flush (and the last close) reach the file as the mode says', async () => {
    if (!needTools('qemu-io', 'nbdcopy')) return;
    const file = randomFile(`base-${mode}.img`, 4 * MiB);
    const expected = fs.readFileSync(file);
    const filter = createCacheFilter();
    const s = await start({
      plugin: createFilePlugin(),
      filters: [filter],
      config: [['file', file], ['cache', mode], ['cachedir', cachedir]],
    });

    // A client connection stays open, so the cache lives on between the tools' connections.
    const c = await connect(s.uri);
    const store = (await filter.caches()).get('')!;
    const onDisk = () => sha(fs.readFileSync(file));
    const data = randomBytes(300 * KiB);
    await c.pwrite(data, 100 * KiB + 7);
    data.copy(expected, 100 * KiB + 7);
    if (mode === 'writethrough') {
      expect(onDisk()).toBe(sha(expected));
      expect(store.dirtyBlocks).toBe(0);
    } else {
      // Only in the cache so far.
      expect(store.dirtyBlocks).toBeGreaterThan(0);
      expect(onDisk()).not.toBe(sha(expected));
      await c.flush();
      // unsafe ignores the flush; writeback wrote every dirty block to the file.
      expect(onDisk() === sha(expected)).toBe(mode === 'writeback');
    }
    // qemu-io flushes before it disconnects: what it writes is on the file after it in writeback.
    await qemuIo(s.uri, 'write -P 0x5a 1048570 70000', 'write -z 2097152 65536');
    expected.fill(0x5a, 1048570, 1048570 + 70000);
    expected.fill(0, 2097152, 2097152 + 65536);

    const out = path.join(dir, `out-${mode}.img`);
    await runOk('nbdcopy', [s.uri, out]);
    expect(sha(fs.readFileSync(out))).toBe(sha(expected));
    expect(sha(await c.pread(4 * MiB, 0))).toBe(sha(expected));

    expect(onDisk() === sha(expected)).toBe(mode !== 'unsafe');
    await c.pwrite(Buffer.alloc(4096, 0xee), 3 * MiB);
    expected.fill(0xee, 3 * MiB, 3 * MiB + 4096);
    await c.flush();
    if (mode === 'unsafe') {
      expect(onDisk()).not.toBe(sha(expected));
      expect(store.dirtyBlocks).toBeGreaterThan(0);
    } else {
      // Read below directly: the file itself now holds every byte.
      expect(onDisk()).toBe(sha(expected));
      expect(store.dirtyBlocks).toBe(0);
    }
    // The last connection closing writes back what is left (unsafe included), and drops the cache.
    await c.disconnect();
    await expect.poll(() => onDisk(), { timeout: 5000 }).toBe(sha(expected));
    await expect.poll(async () => (await filter.caches()).size).toBe(0);
    expect(fs.readdirSync(cachedir)).toEqual([]);
  });
});

describe('many connections and requests in flight (nbdcopy multi-conn)', () => {
  it('nbdcopy writes a whole image in through writeback (4 connections x 64 requests, cache-max-size far smaller), reads it back equal; one flush puts it all on the file', async () => {
    if (!needTools('nbdcopy', 'nbdinfo')) return;
    const file = path.join(dir, 'multiconn.img');
    fs.writeFileSync(file, Buffer.alloc(12 * MiB));
    const src = randomFile('multiconn-src.img', 12 * MiB);
    const filter = createCacheFilter();
    const s = await start({
      plugin: createFilePlugin(),
      filters: [filter],
      config: [['file', file], ['cache-max-size', '4M'], ['cache-on-read', 'true'], ['cachedir', cachedir]],
    });
    const info = JSON.parse(await runOk('nbdinfo', ['--json', s.uri])).exports[0];
    expect(info.can_multi_conn).toBe(true);
    // A connection held open keeps the cache alive between the two copies.
    const c = await connect(s.uri);
    await runOk('nbdcopy', ['--connections=4', '--requests=64', src, s.uri]);
    const store = (await filter.caches()).get('')!;
    // Without --flush nbdcopy leaves part of the image dirty in the cache (at most 4M of it).
    expect(store.dirtyBlocks).toBeGreaterThan(0);
    expect(sha(fs.readFileSync(file))).not.toBe(sha(fs.readFileSync(src)));
    const out = path.join(dir, 'multiconn-out.img');
    await runOk('nbdcopy', ['--connections=4', '--requests=64', s.uri, out]);
    expect(sha(fs.readFileSync(out))).toBe(sha(fs.readFileSync(src)));
    expect(store.file.allocatedBytes()).toBeLessThanOrEqual(4 * MiB);
    expect(store.locks.size).toBe(0);
    // A flush on any connection writes back what every connection left dirty.
    await c.flush();
    expect(store.dirtyBlocks).toBe(0);
    expect(sha(fs.readFileSync(file))).toBe(sha(fs.readFileSync(src)));
    await c.disconnect();
  });
});

describe('behaviour against a counting disk', () => {
  it('cache-on-read keeps what was read: the second pass costs no read below', async () => {
    const { plugin, stats } = createCountingPlugin(randomBytes(2 * MiB));
    const s = await start({ plugin, filters: [createCacheFilter()], config: { 'cache-on-read': 'true', cachedir } });
    const c = await connect(s.uri);
    const first = await c.pread(2 * MiB, 0);
    const reads = stats.reads;
    expect(reads).toBeGreaterThan(0);
    for (let off = 0; off < 2 * MiB; off += 256 * KiB) {
      expect(sha(await c.pread(256 * KiB, off))).toBe(sha(first.subarray(off, off + 256 * KiB)));
    }
    expect(stats.reads).toBe(reads);
  });

  it('cache-on-read=false (the default) does not keep reads, but NBD_CMD_CACHE does (one read below per run)', async () => {
    const { plugin, stats } = createCountingPlugin(randomBytes(2 * MiB));
    const s = await start({ plugin, filters: [createCacheFilter()], config: { cachedir } });
    const c = await connect(s.uri);
    await c.pread(128 * KiB, 0);
    await c.pread(128 * KiB, 0);
    expect(stats.reads).toBe(2);
    await c.cache(MiB, MiB);
    // One read of the whole missing run, not one per block.
    expect(stats.readLog.at(-1)).toEqual([MiB, MiB]);
    const before = stats.reads;
    await c.pread(MiB, MiB);
    await c.cache(512 * KiB, MiB);
    expect(stats.reads).toBe(before);
  });

  it('a read overlapping a prefetch in flight takes one round trip, not two; a prefetch skips blocks a read holds', async () => {
    const disk = randomBytes(MiB);
    const { plugin, stats } = createCountingPlugin(Buffer.from(disk), { readDelay: 300 });
    const s = await start({ plugin, filters: [createCacheFilter()], config: { cachedir } });
    const c = await connect(s.uri);
    const prefetch = c.cache(128 * KiB, 0);
    await new Promise((r) => setTimeout(r, 20));
    const t = performance.now();
    // Blocks 0-1 are being fetched; block 2 is read below at the same time.
    expect(sha(await c.pread(128 * KiB, 64 * KiB))).toBe(sha(disk.subarray(64 * KiB, 192 * KiB)));
    expect(performance.now() - t).toBeLessThan(550);
    await prefetch;
    expect(stats.readLog).toEqual([[0, 128 * KiB], [128 * KiB, 64 * KiB]]);
    // Now a read holds block 8 while a prefetch of blocks 8-9 arrives: only block 9 is fetched.
    const read = c.pread(64 * KiB, 512 * KiB);
    await new Promise((r) => setTimeout(r, 20));
    await c.cache(128 * KiB, 512 * KiB);
    await read;
    expect(stats.readLog.slice(2)).toEqual([[512 * KiB, 64 * KiB], [576 * KiB, 64 * KiB]]);
  });

  it('a cache request for a huge range is fetched in pieces of at most 4 MiB (no giant buffer)', async () => {
    const disk = randomBytes(48 * MiB);
    const { plugin, stats } = createCountingPlugin(Buffer.from(disk));
    const s = await start({ plugin, filters: [createCacheFilter()], config: { cachedir } });
    const c = await connect(s.uri);
    await c.cache(48 * MiB, 0);
    expect(stats.readLog.length).toBe(12);
    expect(Math.max(...stats.readLog.map(([, n]) => n))).toBe(4 * MiB);
    expect(sha(await c.pread(48 * MiB - 4096, 4096))).toBe(sha(disk.subarray(4096)));
    expect(stats.reads).toBe(12);
  });

  it('zero and trim of nearly 4 GiB over a 1 TiB memory disk lock only the cached blocks; partial blocks are zeroed in the cache', async () => {
    const s = await start({ plugin: createMemoryPlugin(), filters: [createCacheFilter()], config: { size: '1T', cachedir } });
    const c = await connect(s.uri);
    const data = randomBytes(256 * KiB);
    await c.pwrite(data, 3 * MiB);
    await c.pwrite(data, 5 * 1024 * MiB);
    const t = performance.now();
    // Zero from the middle of the first written block on: it keeps its first 10000 bytes.
    await c.zero(4 * 1024 * MiB - 64 * KiB, 3 * MiB + 10000);
    await c.trim(4 * 1024 * MiB - 64 * KiB, 4 * 1024 * MiB);
    expect(performance.now() - t).toBeLessThan(2000);
    const expected = Buffer.alloc(256 * KiB);
    data.copy(expected, 0, 0, 10000);
    expect(sha(await c.pread(256 * KiB, 3 * MiB))).toBe(sha(expected));
    await c.flush();
    expect(sha(await c.pread(256 * KiB, 3 * MiB))).toBe(sha(expected));
  });

  it('cache-on-read=/PATH follows the file existing', async () => {
    const flag = path.join(dir, 'cache-on-read-flag');
    const { plugin, stats } = createCountingPlugin(randomBytes(MiB));
    const s = await start({ plugin, filters: [createCacheFilter()], config: { 'cache-on-read': flag, cachedir } });
    const c = await connect(s.uri);
    await c.pread(64 * KiB, 0);
    await c.pread(64 * KiB, 0);
    expect(stats.reads).toBe(2);
    fs.writeFileSync(flag, '');
    try {
      await c.pread(64 * KiB, 0);
      await c.pread(64 * KiB, 0);
      expect(stats.reads).toBe(3);
    } finally {
      fs.rmSync(flag);
    }
  });

  it('cache-max-size is respected (allocated size of the cache file) while LRU blocks are reclaimed, dirty ones written back first', async () => {
    const disk = randomBytes(16 * MiB);
    const { plugin, stats, bytes } = createCountingPlugin(Buffer.from(disk));
    const filter = createCacheFilter();
    const s = await start({
      plugin,
      filters: [filter],
      config: { 'cache-on-read': 'true', 'cache-max-size': '1M', cachedir },
    });
    const c = await connect(s.uri);
    const store = (await filter.caches()).get('')!;
    let peak = 0;
    // Dirty writes over 4 MiB, then reads over the whole disk: far more than 1 MiB passes through.
    const written = randomBytes(4 * MiB);
    for (let off = 0; off < 4 * MiB; off += 256 * KiB) {
      await c.pwrite(written.subarray(off, off + 256 * KiB), 8 * MiB + off);
      peak = Math.max(peak, store.file.allocatedBytes());
    }
    written.copy(disk, 8 * MiB);
    for (let off = 0; off < 16 * MiB; off += 512 * KiB) {
      expect(sha(await c.pread(512 * KiB, off))).toBe(sha(disk.subarray(off, off + 512 * KiB)));
      peak = Math.max(peak, store.file.allocatedBytes());
    }
    expect(peak).toBeGreaterThan(512 * KiB);
    expect(peak).toBeLessThanOrEqual(MiB);
    expect(store.cachedBlocks).toBeLessThanOrEqual(16);
    expect(store.stats.reclaimed).toBeGreaterThan(0);
    // Dirty blocks pushed out by reclaim reached the disk before they were dropped.
    expect(store.stats.writtenBack).toBeGreaterThan(0);
    await c.flush();
    expect(sha(bytes)).toBe(sha(disk));
    expect(stats.writes).toBeGreaterThan(0);
  });

  it('many requests in flight, with reclaim going on, lose no write (checked on the disk after flush)', async () => {
    const size = 8 * MiB;
    const model = randomBytes(size);
    const { plugin, bytes } = createCountingPlugin(Buffer.from(model), { readDelay: 1 });
    const s = await start({
      plugin,
      filters: [createCacheFilter()],
      config: { 'cache-on-read': 'true', 'cache-max-size': '512K', 'cache-min-block-size': '4K', cachedir },
    });
    const c = await connect(s.uri);
    // 64 writes in flight at once at unaligned, non-overlapping places, and reads beside them.
    const ops: Promise<unknown>[] = [];
    for (let i = 0; i < 64; i++) {
      const off = i * 128 * KiB + ((i * 7919) % 60000);
      const len = 1 + ((i * 104729) % 50000);
      const data = randomBytes(len);
      data.copy(model, off);
      ops.push(c.pwrite(data, off));
      ops.push(c.pread(10000, ((i * 31337) % (size - 10000))));
    }
    await Promise.all(ops);
    expect(sha(await c.pread(size, 0))).toBe(sha(model));
    await c.flush();
    expect(sha(bytes)).toBe(sha(model));
  });

  it('FUA writes go through at once in writeback mode; unsafe ignores FUA', async () => {
    for (const mode of ['writeback', 'unsafe']) {
      const { plugin, bytes } = createCountingPlugin(Buffer.alloc(MiB));
      const s = await start({ plugin, filters: [createCacheFilter()], config: { cache: mode, cachedir } });
      const c = await connect(s.uri);
      await c.pwrite(Buffer.alloc(4096, 0x77), 8192, 1 /* FUA */);
      expect(bytes[8192]).toBe(mode === 'writeback' ? 0x77 : 0);
      await c.close();
    }
  });

  it('block status: blocks only in the cache are data, whatever the disk below says (nbdinfo --map)', async () => {
    if (!needTools('nbdinfo')) return;
    const file = path.join(dir, 'sparse.img');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 4 * MiB);
    const s = await start({ plugin: createFilePlugin(), filters: [createCacheFilter()], config: [['file', file], ['cachedir', cachedir]] });
    const c = await connect(s.uri);
    await c.pwrite(randomBytes(128 * KiB), MiB);
    const map = await nbdinfoMap(s.uri);
    const data = map.filter((e) => (e.type & 1) === 0);
    expect(data).toEqual([expect.objectContaining({ offset: MiB, length: 128 * KiB })]);
    // Nothing reached the file yet: it is all hole.
    expect(fs.statSync(file).blocks).toBe(0);
  });

  it('an error below is the client\'s EIO, names the layer, and the connection goes on', async () => {
    const { plugin } = createCountingPlugin(randomBytes(MiB), { failFrom: 512 * KiB, failTo: 576 * KiB });
    const errors: string[] = [];
    const s = await serve({ plugin, filters: [createCacheFilter()], config: { 'cache-on-read': 'true', cachedir }, error: (m) => errors.push(m) });
    servers.push(s);
    const c = await connect(s.uri);
    const reply = await c.request({ type: 0 /* READ */, offset: 500 * KiB, length: 64 * KiB });
    expect(reply.error).toBe(5 /* EIO */);
    expect((await c.pread(64 * KiB, 0)).length).toBe(64 * KiB);
    expect(errors.join('\n')).toMatch(/injected read error/);
    // The failed blocks were not cached: once the disk answers again, reads work.
  });
});

describe('real clients and a slow layer below', () => {
  it('nbdsh: can_cache, cache requests fill the cache, reads after them are fast over a slow layer', async () => {
    if (!needTools('nbdsh')) return;
    const file = randomFile('slow.img', 8 * MiB);
    const s = await start({
      plugin: createFilePlugin(),
      filters: [createCacheFilter(), createDelayFilter()],
      config: [['file', file], ['rdelay', '20ms'], ['cachedir', cachedir]],
    });
    const out = await nbdshOk(
      s.uri,
      [
        'import time, hashlib',
        'assert h.can_cache()',
        'h.cache(8 * 1024 * 1024, 0)',
        't = time.monotonic()',
        'd = b"".join(h.pread(65536, o) for o in range(0, 8 * 1024 * 1024, 65536))',
        'print(round((time.monotonic() - t) * 1000), hashlib.sha256(d).hexdigest())',
      ].join('\n'),
    );
    const [ms, digest] = out.trim().split(' ');
    expect(digest).toBe(sha(fs.readFileSync(file)));
    // 128 reads at 20 ms each would take 2.5 s; from the cache they take a fraction of that.
    expect(Number(ms)).toBeLessThan(1500);
  });

  it('the CLI: the temporary file is unlinked at once, never bigger than cache-max-size, and gone at exit', async () => {
    if (!needTools('nbdcopy') || !needNbdx()) return;
    const file = randomFile('cli.img', 8 * MiB);
    const out = path.join(dir, 'cli-out.img');
    // nbdsh reads the whole disk (kept: cache-on-read), then, still connected, looks for the
    // cache file among the server's descriptors (the server is the --run shell's parent).
    const py = [
      'import os, hashlib',
      'd = b"".join(h.pread(262144, o) for o in range(0, h.get_size(), 262144))',
      'print("sha", hashlib.sha256(d).hexdigest())',
      'fds = "/proc/%s/fd" % os.environ["NBDX_PID"]',
      'for fd in os.listdir(fds):',
      '    link = os.readlink(fds + "/" + fd)',
      '    if link.endswith("(deleted)") and "/cachedir/nbdx-cache-" in link:',
      '        print("file", link)',
      '        print("alloc", os.stat(fds + "/" + fd).st_blocks * 512)',
    ].join('\n');
    const script = [`nbdcopy "$uri" ${out}`, `NBDX_PID=$PPID nbdsh -u "$uri" -c '${py}'`, `ls -A ${cachedir} | wc -l`].join('\n');
    const r = await run(process.execPath, [
      nbdxBin(), '-U', '-', '--filter=cache', 'file', file,
      'cache-on-read=true', 'cache-max-size=1M', `cachedir=${cachedir}`, '--run', script,
    ], { env: { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH ?? ''}` } });
    expect(r.code, r.stderr).toBe(0);
    expect(sha(fs.readFileSync(out))).toBe(sha(fs.readFileSync(file)));
    expect(r.stdout).toContain(`sha ${sha(fs.readFileSync(file))}`);
    expect(r.stdout).toMatch(new RegExp(`file ${cachedir}/nbdx-cache-\\d+-[0-9a-f]+ \\(deleted\\)`));
    const alloc = Number(/alloc (\d+)/.exec(r.stdout)![1]);
    expect(alloc).toBeGreaterThan(0);
    expect(alloc).toBeLessThanOrEqual(MiB);
    expect(r.stdout.trim().split('\n').at(-1)).toBe('0');
    expect(fs.readdirSync(cachedir)).toEqual([]);
  });

  it('qemu-img convert through the cache from a slow file, compare equal', async () => {
    if (!needTools('qemu-img')) return;
    const file = randomFile('convert.img', 6 * MiB + 4096);
    const s = await start({
      plugin: createFilePlugin(),
      filters: [createCacheFilter(), createDelayFilter()],
      config: [['file', file], ['rdelay', '2ms'], ['cache-on-read', 'true'], ['cachedir', cachedir]],
    });
    const out = path.join(dir, 'converted.img');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', s.uri, out]);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, s.uri]);
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    expect(sha(fs.readFileSync(out))).toBe(sha(fs.readFileSync(file)));
  });
});
