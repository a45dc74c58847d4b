import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { NbdClient } from '@nbdx/client';
import { serve, type ServeOptions } from '@nbdx/server';
import { createFilePlugin } from '@nbdx/plugin-file';
import { createNbdPlugin } from '@nbdx/plugin-nbd';
import { createCacheFilter } from '@nbdx/filter-cache';
import { createDelayFilter } from '@nbdx/filter-delay';
import { nbdxBin, needNbdx, needTools, removeDir, run, runOk, startRangeServer, tmpDir } from '@nbdx/testkit';
import { PIECE, createReadaheadFilter, parseMode } from './index.js';
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
beforeAll(() => {
  dir = tmpDir('nbdx-readahead-test-');
});
afterAll(() => removeDir(dir));

/** Read [0, size) in `step` pieces, one at a time (a sequential reader with one request in flight). */
async function readAll(c: NbdClient, size: number, step: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let off = 0; off < size; off += step) parts.push(await c.pread(Math.min(step, size - off), off));
  return Buffer.concat(parts);
}

describe('parameters', () => {
  it('parses the mode and refuses bad values, on the command line with one line and exit 1', async () => {
    expect(parseMode('buffer')).toBe('buffer');
    expect(() => parseMode('always')).toThrow(/auto, cache, buffer/);
    if (!needNbdx()) return;
    for (const [args, msg] of [
      [['readahead-mode=always'], /auto, cache, buffer/],
      [['readahead-max=12Q'], /readahead-max/],
      [['readahead-min=1M', 'readahead-max=64K'], /larger than readahead-max/],
      [['readahead-memory=1'], /less than 512/],
    ] as const) {
      const r = await run(process.execPath, [nbdxBin(), '-f', '-U', path.join(dir, 'never.sock'), '--filter=readahead', 'memory', '1M', ...args]);
      expect(r.code, r.stderr).toBe(0 + 1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(msg);
    }
  });
});

describe("the window, and buffer mode (the layer below has no native cache)", () => {
  it('a sequential reader gets the right bytes with far fewer reads below; the client\'s read goes below before its prefetch', async () => {
    const disk = randomBytes(8 * MiB);
    const { plugin, stats } = createCountingPlugin(Buffer.from(disk));
    const ra = createReadaheadFilter();
    const s = await start({ plugin, filters: [ra] });
    const c = await connect(s.uri);
    expect(sha(await readAll(c, 8 * MiB, 64 * KiB))).toBe(sha(disk));
    // The first read reaches the disk as the client asked, before anything is read ahead.
    expect(stats.readLog[0]).toEqual([0, 64 * KiB]);
    expect(stats.readLog[1]![0]).toBe(64 * KiB);
    expect(stats.reads).toBeLessThan(128 / 4);
    expect(ra.stats.bufferHits).toBeGreaterThan(100);
    // Never more than the window ahead: at most readahead-max (8M) of extra bytes, here none past the end.
    expect(stats.bytesRead).toBeLessThanOrEqual(8 * MiB);
  });

  it('random reads prefetch nothing; a sequence after them starts with a small window again', async () => {
    const { plugin, stats } = createCountingPlugin(randomBytes(64 * MiB), { cache: 'native' });
    const ra = createReadaheadFilter();
    const s = await start({ plugin, filters: [ra] });
    const c = await connect(s.uri);
    for (let i = 0; i < 40; i++) await c.pread(4096, ((i * 7_919_993) % (60 * MiB)) + 2 * MiB);
    expect(stats.cacheLog).toEqual([]);
    expect(ra.stats.resets).toBeGreaterThan(30);
    // Now sequential from 32M: the prefetches grow, from small to PIECE-sized, never past 8M ahead.
    for (let off = 32 * MiB; off < 40 * MiB; off += 64 * KiB) {
      await c.pread(64 * KiB, off);
      const ahead = Math.max(...stats.cacheLog.map(([o, n]) => o + n)) - (off + 64 * KiB);
      expect(ahead).toBeLessThanOrEqual(8 * MiB);
    }
    const sizes = stats.cacheLog.map(([, n]) => n);
    expect(sizes[0]).toBeLessThanOrEqual(256 * KiB);
    expect(Math.max(...sizes)).toBe(PIECE);
    // Each prefetch starts where the previous one ended: nothing asked for twice.
    for (let i = 1; i < stats.cacheLog.length; i++) {
      expect(stats.cacheLog[i]![0]).toBe(stats.cacheLog[i - 1]![0] + stats.cacheLog[i - 1]![1]);
    }
  });

  it('stands aside for a client that already has more reads in flight than readahead-max', async () => {
    const disk = randomBytes(64 * MiB);
    const { plugin, stats } = createCountingPlugin(Buffer.from(disk), { readDelay: 5, cache: 'native' });
    const ra = createReadaheadFilter();
    const s = await start({ plugin, filters: [ra], config: { 'readahead-max': '4M' } });
    const c = await connect(s.uri);
    // 64 sequential reads of 256K all in flight at once (16 MiB), twice over.
    for (const base of [0, 16 * MiB]) {
      const parts = await Promise.all(Array.from({ length: 64 }, (_, i) => c.pread(256 * KiB, base + i * 256 * KiB)));
      expect(sha(Buffer.concat(parts))).toBe(sha(disk.subarray(base, base + 16 * MiB)));
    }
    expect(ra.stats.deepClient).toBeGreaterThan(64);
    // Only at the start of each batch (until 4M were in flight) was anything prefetched: at most
    // two windows per batch, against 32 MiB read.
    const prefetched = stats.cacheLog.reduce((n, [, len]) => n + len, 0);
    expect(prefetched).toBeLessThanOrEqual(2 * 8 * MiB);
  });

  it('never holds more than readahead-memory', async () => {
    const disk = randomBytes(16 * MiB);
    const { plugin } = createCountingPlugin(Buffer.from(disk), { readDelay: 2 });
    const ra = createReadaheadFilter();
    const s = await start({ plugin, filters: [ra], config: { 'readahead-memory': '1M', 'readahead-max': '8M' } });
    const c = await connect(s.uri);
    expect(sha(await readAll(c, 16 * MiB, 128 * KiB))).toBe(sha(disk));
    expect(ra.stats.peakBytes).toBeGreaterThan(0);
    expect(ra.stats.peakBytes).toBeLessThanOrEqual(MiB);
    expect(ra.stats.overBudget).toBeGreaterThan(0);
    // Everything is given back once the connection is gone, prefetches in flight included.
    await c.disconnect();
    await expect.poll(() => ra.heldBytes()).toBe(0);
  });

  it('a failed prefetch is ignored (debug log); the client only sees errors of its own reads', async () => {
    const { plugin } = createCountingPlugin(randomBytes(8 * MiB), { failFrom: 4 * MiB, failTo: 4 * MiB + 4096 });
    const ra = createReadaheadFilter();
    const debugLines: string[] = [];
    const s = await start({ plugin, filters: [ra], debug: (m) => debugLines.push(m) });
    const c = await connect(s.uri);
    for (let off = 0; off < 4 * MiB; off += 64 * KiB) expect((await c.pread(64 * KiB, off)).length).toBe(64 * KiB);
    expect(ra.stats.prefetchErrors).toBeGreaterThan(0);
    expect(debugLines.join('\n')).toMatch(/readahead: prefetch of \d+ bytes at \d+ failed \(ignored\)/);
    const bad = await c.request({ type: 0 /* READ */, offset: 4 * MiB, length: 64 * KiB });
    expect(bad.error).toBe(5 /* EIO */);
    expect((await c.pread(64 * KiB, 5 * MiB)).length).toBe(64 * KiB);
  });

  it('a prefetch in flight does not hold up a client read elsewhere', async () => {
    // Reads anywhere in [1M, 8M) take 400 ms; the rest of the disk answers at once.
    const { plugin } = createCountingPlugin(randomBytes(16 * MiB), { slowFrom: MiB, slowTo: 8 * MiB, slowDelay: 400 });
    const ra = createReadaheadFilter();
    const s = await start({ plugin, filters: [ra] });
    const c = await connect(s.uri);
    for (let off = 0; off < 512 * KiB; off += 64 * KiB) await c.pread(64 * KiB, off);
    expect(ra.stats.prefetches).toBeGreaterThan(0);
    // Prefetches reaching into the slow part are now in flight.
    const t = performance.now();
    await c.pread(64 * KiB, 12 * MiB);
    expect(performance.now() - t).toBeLessThan(200);
  });

  it('writes win over data read ahead before or during them', async () => {
    const disk = randomBytes(4 * MiB);
    const { plugin } = createCountingPlugin(Buffer.from(disk), { readDelay: 30 });
    const ra = createReadaheadFilter();
    const s = await start({ plugin, filters: [ra] });
    const c = await connect(s.uri);
    // Prefetch of what follows [0, 64K) starts, and is still in flight when the write arrives.
    await c.pread(64 * KiB, 0);
    const pending = c.pread(64 * KiB, 64 * KiB);
    const data = randomBytes(8 * KiB);
    await c.pwrite(data, 100 * KiB);
    data.copy(disk, 100 * KiB);
    await pending;
    expect(sha(await c.pread(256 * KiB, 64 * KiB))).toBe(sha(disk.subarray(64 * KiB, 320 * KiB)));
    await c.zero(64 * KiB, 128 * KiB);
    disk.fill(0, 128 * KiB, 192 * KiB);
    expect(sha(await readAll(c, 4 * MiB, 64 * KiB))).toBe(sha(disk));
  });
});

describe('the purpose: sequential copies over a slow layer', () => {
  it('nbdcopy with one request in flight is faster with readahead (buffer, and cache mode over the cache filter), with far fewer reads below', async () => {
    if (!needTools('nbdcopy')) return;
    const disk = randomBytes(16 * MiB);
    const out = path.join(dir, 'copy.img');
    const figures: Record<string, { ms: number; reads: number }> = {};
    for (const [label, filters] of [
      ['none', () => []],
      ['readahead (buffer)', () => [createReadaheadFilter()]],
      ['readahead + cache', () => [createReadaheadFilter(), createCacheFilter()]],
    ] as const) {
      // Best of three runs: on a busy shared machine one run can stall for a while (a CI run
      // beside a fuzzer once had both of two take 5x their usual time).
      for (let round = 0; round < 3; round++) {
        const { plugin, stats } = createCountingPlugin(Buffer.from(disk));
        // Every read below waits 10 ms, however big: a remote store's round trip.
        const s = await start({ plugin, filters: [...filters(), createDelayFilter()], config: { rdelay: '10ms' } });
        const t = performance.now();
        await runOk('nbdcopy', ['--connections=1', '--requests=1', s.uri, out]);
        const ms = Math.round(performance.now() - t);
        if (!figures[label] || ms < figures[label]!.ms) figures[label] = { ms, reads: stats.reads };
        expect(sha(fs.readFileSync(out))).toBe(sha(disk));
        await s.close();
        if (label === 'none') break; // 64 reads in a row at 10 ms: never under 640 ms anyway
      }
    }
    console.log('nbdcopy --connections=1 --requests=1, 16 MiB, rdelay=10ms:', JSON.stringify(figures));
    // 64 reads of 256K at 10 ms each without readahead: at least 640 ms.
    expect(figures.none!.reads).toBe(64);
    expect(figures.none!.ms).toBeGreaterThanOrEqual(640);
    for (const label of ['readahead (buffer)', 'readahead + cache']) {
      expect(figures[label]!.reads).toBeLessThan(24);
      expect(figures[label]!.ms).toBeLessThan(figures.none!.ms * 0.7);
    }
  });

  it('CLI: --filter=readahead --filter=cache over a delayed file: qemu-img convert and compare equal, nbdinfo shows can_cache', async () => {
    if (!needTools('qemu-img', 'nbdinfo') || !needNbdx()) return;
    const file = path.join(dir, 'src.img');
    fs.writeFileSync(file, randomBytes(8 * MiB + 512));
    const out = path.join(dir, 'converted.img');
    const r = await run(process.execPath, [
      nbdxBin(), '-U', '-', '--filter=readahead', '--filter=cache', '--filter=delay', 'file', file, 'rdelay=2ms',
      '--run', `nbdinfo --json "$uri" && qemu-img convert -f raw -O raw "$uri" ${out} && qemu-img compare -f raw -F raw ${file} "$uri"`,
    ]);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout.slice(0, r.stdout.lastIndexOf('}') + 1)).exports[0].can_cache).toBe(true);
    expect(r.stdout).toMatch(/Images are identical/);
    expect(sha(fs.readFileSync(out))).toBe(sha(fs.readFileSync(file)));
  });

  it('CLI over the memory plugin: nbdcopy in (writeback, flushed) and out through readahead + cache + delay, qemu-io checks patterns', async () => {
    if (!needTools('nbdcopy', 'qemu-io') || !needNbdx()) return;
    const src = path.join(dir, 'mem-src.img');
    fs.writeFileSync(src, randomBytes(8 * MiB));
    const out = path.join(dir, 'mem-out.img');
    const script = [
      `nbdcopy --flush ${src} "$uri"`,
      `nbdcopy --connections=1 --requests=1 "$uri" ${out}`,
      `qemu-io -f raw -c "write -P 0x3c 5M 300K" -c "read -P 0x3c 5M 300K" "$uri"`,
      `nbdcopy "$uri" ${out}.2`,
    ].join(' && ');
    const r = await run(process.execPath, [
      nbdxBin(), '-U', '-', '--filter=readahead', '--filter=cache', '--filter=delay', 'memory', '8M',
      'rdelay=2ms', 'cache-max-size=2M', `cachedir=${dir}`, '--run', script,
    ]);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).not.toMatch(/Pattern verification failed/);
    const expected = fs.readFileSync(src);
    expect(sha(fs.readFileSync(out))).toBe(sha(expected));
    expected.fill(0x3c, 5 * MiB, 5 * MiB + 300 * KiB);
    expect(sha(fs.readFileSync(`${out}.2`))).toBe(sha(expected));
    expect(fs.readdirSync(dir).filter((f) => f.startsWith('nbdx-cache-'))).toEqual([]);
  });

  it('--filter=readahead --filter=cache nbd: a proxy in front of a slow upstream NBD server', async () => {
    if (!needTools('nbdcopy')) return;
    const disk = randomBytes(8 * MiB);
    const { plugin, stats } = createCountingPlugin(Buffer.from(disk));
    const upstream = await start({ plugin, filters: [createDelayFilter()], config: { rdelay: '10ms' } });
    const proxy = await start({
      plugin: createNbdPlugin(),
      filters: [createReadaheadFilter(), createCacheFilter()],
      config: { uri: upstream.uri },
    });
    const out = path.join(dir, 'proxy-copy.img');
    const t = performance.now();
    await runOk('nbdcopy', ['--connections=1', '--requests=1', proxy.uri, out]);
    const ms = performance.now() - t;
    expect(sha(fs.readFileSync(out))).toBe(sha(disk));
    console.log(`nbd proxy, 8 MiB, upstream rdelay=10ms: ${Math.round(ms)} ms, ${stats.reads} reads upstream`);
    // 32 reads of 256K without readahead (≥ 320 ms).
    expect(stats.reads).toBeLessThan(16);
  });

  it('over the file plugin (native cache): prefetches go below as NBD_CMD_CACHE, data unchanged', async () => {
    if (!needTools('nbdcopy')) return;
    const file = path.join(dir, 'native.img');
    fs.writeFileSync(file, randomBytes(4 * MiB));
    const ra = createReadaheadFilter();
    const s = await start({ plugin: createFilePlugin(), filters: [ra], config: [['file', file]] });
    const out = path.join(dir, 'native-out.img');
    await runOk('nbdcopy', ['--connections=1', '--requests=1', s.uri, out]);
    expect(sha(fs.readFileSync(out))).toBe(sha(fs.readFileSync(file)));
    expect(ra.stats.prefetches).toBeGreaterThan(0);
    expect(ra.stats.bufferHits).toBe(0);
  });

  it('the stack people use: --filter=retry --filter=readahead http over a real range server (GETs counted), a flaky one with 5xx and dropped connections completes', async () => {
    if (!needTools('nbdcopy', 'qemu-img') || !needNbdx()) return;
    const file = path.join(dir, 'http.img');
    fs.writeFileSync(file, randomBytes(16 * MiB));
    const server = await startRangeServer({ file });
    try {
      const out = path.join(dir, 'http-out.img');
      const figures: Record<string, { ms: number; gets: number }> = {};
      // The delay filter stands for the network's round trip (the range server is on loopback).
      for (const [label, filters] of [
        ['http', []],
        ['readahead', ['--filter=readahead']],
        ['retry + readahead', ['--filter=retry', '--filter=readahead']],
        ['readahead + cache', ['--filter=readahead', '--filter=cache']],
      ] as const) {
        const before = server.stats.ranged;
        const t = performance.now();
        const r = await run(process.execPath, [
          nbdxBin(), '-U', '-', ...filters, '--filter=delay', 'http', server.url, 'rdelay=10ms', `cachedir=${dir}`,
          '--run', `nbdcopy --connections=1 --requests=1 "$uri" ${out}`,
        ].filter((a) => label.includes('cache') || !a.startsWith('cachedir=')));
        expect(r.code, r.stderr).toBe(0);
        figures[label] = { ms: Math.round(performance.now() - t), gets: server.stats.ranged - before };
        expect(sha(fs.readFileSync(out))).toBe(sha(fs.readFileSync(file)));
      }
      console.log('nbdcopy 1x1 of 16 MiB over http (rdelay=10ms):', JSON.stringify(figures));
      expect(figures.http!.gets).toBeGreaterThanOrEqual(64);
      for (const label of ['readahead', 'retry + readahead', 'readahead + cache']) {
        expect(figures[label]!.gets).toBeLessThan(figures.http!.gets / 2);
      }

      // A flaky server: some GETs get 503, some connections are cut half-way. retry (outermost)
      // retries the client's reads; failed prefetches are dropped by readahead.
      server.setFaults({ errorRate: 0.1, dropRate: 0.1 });
      server.failNext(3, 'status');
      const r = await run(process.execPath, [
        nbdxBin(), '-U', '-', '--filter=retry', '--filter=readahead', 'http', server.url, 'retries=20', 'retry-delay=10ms',
        '--run', `qemu-img convert -f raw -O raw "$uri" ${out} && qemu-img compare -f raw -F raw ${file} ${out}`,
      ]);
      expect(r.code, r.stdout + r.stderr).toBe(0);
      expect(r.stdout).toMatch(/Images are identical/);
      expect(server.stats.errors).toBeGreaterThanOrEqual(3);
    } finally {
      await server.close();
    }
  });
});
