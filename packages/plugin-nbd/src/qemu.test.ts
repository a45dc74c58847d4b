/**
 * The proxy in front of foreign upstreams: qemu-nbd serving a qcow2 image with holes, and
 * nbdkit memory; checked with qemu-img map/compare/convert and nbdcopy, with checksums.
 */
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  needTools,
  qemuImgMap,
  runOk,
  servePlugin,
  startNbdkit,
  startQemuNbd,
  tmpDir,
  type Peer,
  type QemuImgMapEntry,
  type TestServer,
} from '@nbdx/testkit';
import { createNbdPlugin } from './index.js';

const HAVE = needTools('qemu-img', 'qemu-io', 'qemu-nbd', 'nbdcopy', 'nbdkit', 'nbdinfo');
const MiB = 1024 * 1024;

function sha256(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** Only what the guest sees: ranges of (data, zero), neighbours merged. */
function guestView(map: QemuImgMapEntry[]): Array<[number, number, boolean, boolean]> {
  const out: Array<[number, number, boolean, boolean]> = [];
  for (const e of map) {
    const last = out[out.length - 1];
    if (last && last[2] === e.data && last[3] === e.zero && last[0] + last[1] === e.start) last[1] += e.length;
    else out.push([e.start, e.length, e.data, e.zero]);
  }
  return out;
}

/** `qemu-img map`; -U reads an image qemu-nbd holds open. */
const qemuMap = (target: string, shared = false) => qemuImgMap(...(shared ? ['-U'] : []), target);

describe.skipIf(!HAVE)('in front of qemu-nbd (qcow2 with holes)', () => {
  let dir: string;
  let image: string;
  let qemu: Peer;
  let proxy: TestServer;

  beforeAll(async () => {
    dir = tmpDir('nbdx-plugin-nbd-');
    image = path.join(dir, 'disk.qcow2');
    await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', image, '64M']);
    await runOk('qemu-io', [
      '-f', 'qcow2',
      '-c', 'write -P 0x11 0 1M', // data
      '-c', 'write -P 0x22 8M 512k',
      '-c', 'write -z 16M 1M', // a zero cluster run: reads as zero, not data
      '-c', 'write -P 0x33 40M 64k',
      '-c', 'write -P 0 48M 64k', // allocated, holding zeroes: still data
      '-c', 'write -P 0x44 63M 1M', // up to the end
      image,
    ]);
    qemu = await startQemuNbd(dir, image);
    proxy = await servePlugin(createNbdPlugin(), { config: [['uri', qemu.uri]] });
  });
  afterAll(async () => {
    await proxy?.close();
    await qemu?.kill('SIGTERM');
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('qemu-img map through nbdx equals qemu-img map of the image (and of qemu-nbd itself)', async () => {
    const viaNbdx = await qemuMap(proxy.uri);
    const viaQemu = await qemuMap(qemu.uri);
    const ofImage = await qemuMap(image, true);
    // Exactly what qemu-nbd says itself.
    expect(viaNbdx).toEqual(viaQemu);
    // And what the image holds, as a guest sees it (host offsets and "present" are not visible over NBD).
    expect(guestView(viaNbdx)).toEqual(guestView(ofImage));
    expect(guestView(viaNbdx)).toEqual([
      [0, 1 * MiB, true, false],
      [1 * MiB, 7 * MiB, false, true],
      [8 * MiB, 512 * 1024, true, false],
      [8 * MiB + 512 * 1024, 32 * MiB - 512 * 1024, false, true],
      [40 * MiB, 64 * 1024, true, false],
      [40 * MiB + 64 * 1024, 8 * MiB - 64 * 1024, false, true],
      [48 * MiB, 64 * 1024, true, false],
      [48 * MiB + 64 * 1024, 15 * MiB - 64 * 1024, false, true],
      [63 * MiB, 1 * MiB, true, false],
    ]);
  });

  it('nbdcopy out through nbdx gives the image content (sha256)', async () => {
    const ref = path.join(dir, 'ref.raw');
    const out = path.join(dir, 'out.raw');
    await runOk('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', image, ref]);
    await runOk('nbdcopy', ['--requests=16', proxy.uri, out]);
    expect(sha256(out)).toBe(sha256(ref));
    await runOk('qemu-img', ['compare', '-U', '-f', 'qcow2', image, proxy.uri]);
  });

  it('qemu-img convert and nbdcopy into the image through nbdx, then compare', async () => {
    const src = path.join(dir, 'src.raw');
    const data = Buffer.alloc(64 * MiB);
    // Random data with a zero gap, so zeroing and sparse writes are exercised.
    randomBytes(20 * MiB).copy(data, 0);
    randomBytes(10 * MiB).copy(data, 50 * MiB);
    fs.writeFileSync(src, data);
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, proxy.uri]);
    await runOk('qemu-img', ['compare', '-f', 'raw', src, proxy.uri]);
    await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, qemu.uri]);
    // Again with nbdcopy, the other way round: the image now must equal the file.
    const src2 = path.join(dir, 'src2.raw');
    const data2 = randomBytes(64 * MiB);
    data2.fill(0, 30 * MiB, 40 * MiB);
    fs.writeFileSync(src2, data2);
    await runOk('nbdcopy', ['--requests=16', src2, proxy.uri]);
    const back = path.join(dir, 'back.raw');
    await runOk('nbdcopy', [qemu.uri, back]);
    expect(sha256(back)).toBe(sha256(src2));
    await runOk('qemu-img', ['compare', '-f', 'raw', src2, proxy.uri]);
  });
});

describe.skipIf(!HAVE)('in front of nbdkit memory', () => {
  let dir: string;
  let nbdkit: Peer;
  let proxy: TestServer;

  beforeAll(async () => {
    dir = tmpDir('nbdx-plugin-nbd-');
    nbdkit = await startNbdkit(dir, ['memory', '32M']);
    proxy = await servePlugin(createNbdPlugin(), { config: [['uri', nbdkit.uri]] });
  });
  afterAll(async () => {
    await proxy?.close();
    await nbdkit?.kill('SIGTERM');
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('nbdcopy in and out round trip (sha256), extents as nbdkit reports them', async () => {
    const src = path.join(dir, 'src.raw');
    const data = Buffer.alloc(32 * MiB);
    randomBytes(8 * MiB).copy(data, 4 * MiB);
    randomBytes(1 * MiB).copy(data, 31 * MiB);
    fs.writeFileSync(src, data);
    await runOk('nbdcopy', ['--requests=32', src, proxy.uri]);
    const out = path.join(dir, 'out.raw');
    await runOk('nbdcopy', [proxy.uri, out]);
    expect(sha256(out)).toBe(sha256(src));
    await runOk('qemu-img', ['compare', '-f', 'raw', src, nbdkit.uri]);
    const viaNbdx = await runOk('nbdinfo', ['--map', proxy.uri]);
    const direct = await runOk('nbdinfo', ['--map', nbdkit.uri]);
    expect(viaNbdx).toBe(direct);
    expect(viaNbdx).toMatch(/hole,zero/);
  });

  it('nbdinfo shows nbdkit\'s capabilities through nbdx', async () => {
    const strip = (j: string) => {
      const e = JSON.parse(j).exports[0];
      delete e.uri;
      delete e['export-name'];
      // nbdkit sends no block size; nbdx always advertises its defaults.
      for (const k of Object.keys(e)) if (k.startsWith('block_size_')) delete e[k];
      return e;
    };
    const a = strip(await runOk('nbdinfo', ['--json', nbdkit.uri]));
    const b = strip(await runOk('nbdinfo', ['--json', proxy.uri]));
    expect(b).toEqual(a);
  });
});
