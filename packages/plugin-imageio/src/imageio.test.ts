/**
 * End to end: the test imageio server ← this plugin (served in-process by serve()) ← the real NBD
 * tools (qemu-img, nbdinfo, nbdsh, nbdcopy).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import { createImageioPlugin } from './index.js';
import { TestImageioServer, type TestServerOptions } from './test-server.js';
import { makeCerts, nbdsh, needTools, run, runOk, tmpDir, type TestCerts } from './test-tools.js';

const have = needTools('nbdsh', 'nbdinfo', 'qemu-img', 'nbdcopy', 'openssl');
const MiB = 1024 * 1024;

type Nbd = Awaited<ReturnType<typeof serve>>;
const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

let dir: string;
beforeAll(() => {
  dir = tmpDir();
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

async function startImageio(options: TestServerOptions): Promise<TestImageioServer> {
  const srv = await TestImageioServer.start(options);
  cleanups.push(() => srv.close());
  return srv;
}

async function startNbd(config: [string, string][]): Promise<Nbd> {
  const nbd = await serve({ plugin: createImageioPlugin(), config });
  cleanups.push(() => nbd.close());
  return nbd;
}

async function setup(options: TestServerOptions, extra: [string, string][] = []): Promise<{ srv: TestImageioServer; nbd: Nbd }> {
  const srv = await startImageio(options);
  const nbd = await startNbd([['url', srv.url], ...extra]);
  return { srv, nbd };
}

/** A raw image with random data in some places and holes elsewhere, also as qcow2. */
function makeSourceImage(size: number): { raw: string; qcow2: Promise<string>; bytes: Buffer; dataRanges: [number, number][] } {
  const raw = path.join(dir, `src-${Date.now()}.raw`);
  const bytes = Buffer.alloc(size);
  const dataRanges: [number, number][] = [];
  // data at 0-1M, 5M-5.5M, 20M-23M, and the last 256K; everything else a hole
  for (const [o, l] of [
    [0, MiB],
    [5 * MiB, MiB / 2],
    [20 * MiB, 3 * MiB],
    [size - 256 * 1024, 256 * 1024],
  ] as [number, number][]) {
    randomBytes(l).copy(bytes, o);
    dataRanges.push([o, l]);
  }
  const fd = fs.openSync(raw, 'w');
  fs.ftruncateSync(fd, size);
  for (const [o, l] of dataRanges) fs.writeSync(fd, bytes, o, l, o);
  fs.closeSync(fd);
  const qcow2 = raw.replace(/\.raw$/, '.qcow2');
  return { raw, bytes, dataRanges, qcow2: runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]).then(() => qcow2) };
}

interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

async function nbdMap(uri: string): Promise<MapEntry[]> {
  return JSON.parse(await runOk('nbdinfo', ['--map', '--json', uri])) as MapEntry[];
}

describe.skipIf(!have)('imageio plugin end to end', () => {
  it('qemu-img convert into it, qemu-img compare equal, nbdinfo --map shows the extents', async () => {
    const size = 32 * MiB;
    const { srv, nbd } = await setup({ size, reportHoles: true });
    const src = makeSourceImage(size);
    const qcow2 = await src.qcow2;
    // dirty the target first so that converting must also zero the holes
    srv.store.write(10 * MiB, Buffer.alloc(MiB, 0xaa));

    await runOk('qemu-img', ['convert', '-n', '-f', 'qcow2', '-O', 'raw', qcow2, nbd.uri]);
    const cmp = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow2, nbd.uri]);
    expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
    expect(cmp.code).toBe(0);
    // and the server holds exactly the source bytes
    expect(srv.store.read(0, size).equals(src.bytes)).toBe(true);

    // the writes went out as PUT flush=n with explicit ranges; holes as PATCH zero
    const puts = srv.requests.filter((r) => r.method === 'PUT');
    expect(puts.length).toBeGreaterThan(0);
    expect(puts.every((r) => r.url.endsWith('?flush=n') && r.status === 200)).toBe(true);
    expect(srv.requests.some((r) => r.method === 'PATCH' && (r.json as { op?: string })?.op === 'zero')).toBe(true);
    // qemu-img flushes at the end: nothing is left unflushed on any connection
    expect(srv.dirtyConnections()).toEqual([]);

    const map = await nbdMap(nbd.uri);
    const covered = map.reduce((n, e) => n + e.length, 0);
    expect(covered).toBe(size);
    const typeAt = (off: number) => map.find((e) => e.offset <= off && off < e.offset + e.length)!.type;
    for (const [o, l] of src.dataRanges) {
      expect(typeAt(o)).toBe(0);
      expect(typeAt(o + l - 1)).toBe(0);
    }
    // holes read as zero and are unallocated (imageio "hole": true → NBD HOLE|ZERO)
    expect(typeAt(2 * MiB)).toBe(3);
    expect(typeAt(10 * MiB)).toBe(3);
    expect(typeAt(30 * MiB)).toBe(3);
    expect(map.find((e) => e.type === 3)!.description).toBe('hole,zero');
  });

  it('nbdcopy out of it reproduces the image', async () => {
    const size = 8 * MiB;
    const srv = await startImageio({ size });
    const data = randomBytes(3 * MiB);
    // written before the plugin starts: its extents cache is filled at start-up
    srv.store.write(MiB, data);
    const nbd = await startNbd([['url', srv.url]]);
    const out = path.join(dir, 'copy-out.raw');
    await runOk('nbdcopy', [nbd.uri, out]);
    const got = fs.readFileSync(out);
    expect(got.length).toBe(size);
    expect(got.subarray(MiB, 4 * MiB).equals(data)).toBe(true);
    expect(got.subarray(0, MiB).equals(Buffer.alloc(MiB))).toBe(true);
    // every GET was a Range request answered 206
    const gets = srv.requests.filter((r) => r.method === 'GET' && !r.url.endsWith('/extents'));
    expect(gets.length).toBeGreaterThan(0);
    expect(gets.every((r) => r.status === 206)).toBe(true);
  });
});
