/**
 * End to end against a real object store: a single-node Ceph with radosgw started by @nbdx/testkit
 * (startCeph) ← this plugin (in-process through serve(), or the nbdx command) ← the real NBD tools
 * (nbdcopy, qemu-img, qemu-io, nbdinfo, nbdsh). No mocks: every byte goes through radosgw.
 */
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CreateBucketCommand, ListObjectsV2Command, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import {
  NBDSH_HELPERS,
  nbdinfoMap,
  nbdshOk,
  needCeph,
  needNbdx,
  needTools,
  qemuImgMap,
  qemuIo,
  removeDir,
  run,
  runOk,
  startCeph,
  startCli,
  tmpDir,
  type CephCluster,
} from '@nbdx/testkit';
import { createS3Plugin, objectName } from './index.js';
import { Store, storeOptions } from './store.js';
import { defaultSettings } from './config.js';

const MiB = 1024 * 1024;
const haveCeph = needCeph({ rgw: true });
const haveTools = needTools('nbdcopy', 'nbdinfo', 'nbdsh', 'qemu-img', 'qemu-io', 'cmp');
const haveCli = needNbdx();
/** The 1 GiB copy is the figure; S3_COPY_MIB=… makes it smaller when iterating. */
const COPY_MIB = Number(process.env.S3_COPY_MIB ?? 1024);

type Nbd = Awaited<ReturnType<typeof serve>>;
const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

let ceph: CephCluster;
let s3: S3Client;
let dir: string;
let secretFile: string;
const BUCKET = 'nbdx-test';
let seq = 0;
/** A fresh prefix per test, so tests never see each other's objects. */
const freshPrefix = (name: string) => `${name}-${++seq}/`;

beforeAll(async () => {
  if (!haveCeph || !haveTools) return;
  dir = tmpDir('nbdx-s3-');
  ceph = await startCeph({ rgw: true, memstoreBytes: 3 * 1024 ** 3 });
  const c = ceph.s3!;
  secretFile = path.join(dir, 'secret');
  fs.writeFileSync(secretFile, `${c.secretKey}\n`, { mode: 0o600 });
  s3 = new S3Client({
    endpoint: c.endpoint,
    region: c.region,
    forcePathStyle: true,
    credentials: { accessKeyId: c.accessKey, secretAccessKey: c.secretKey },
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
  });
  await s3.send(new CreateBucketCommand({ Bucket: BUCKET }));
}, 60_000);

afterAll(async () => {
  s3?.destroy();
  await ceph?.stop();
  if (dir) removeDir(dir);
}, 60_000);

/** Plugin parameters for the test store (the secret from a file, never on the command line). */
function params(extra: Record<string, string>): [string, string][] {
  const c = ceph.s3!;
  return Object.entries({ endpoint: c.endpoint, bucket: BUCKET, 'access-key': c.accessKey, 'secret-key': `+${secretFile}`, ...extra });
}

async function startNbd(extra: Record<string, string>): Promise<Nbd> {
  const plugin = createS3Plugin();
  const nbd = await serve({ plugin, config: params(extra) });
  cleanups.push(() => nbd.close());
  return nbd;
}

/** The data objects (not the manifest) under a prefix, as the store lists them. */
async function listObjects(prefix: string): Promise<string[]> {
  const keys: string[] = [];
  let token: string | undefined;
  do {
    const r = await s3.send(new ListObjectsV2Command({ Bucket: BUCKET, Prefix: prefix, ContinuationToken: token }));
    for (const o of r.Contents ?? []) if (/^[0-9a-f]{16}$/.test(o.Key!.slice(prefix.length))) keys.push(o.Key!.slice(prefix.length));
    token = r.IsTruncated ? r.NextContinuationToken : undefined;
  } while (token);
  return keys;
}

async function nbdsh(uri: string, body: string): Promise<string> {
  const out = await nbdshOk(uri, `${NBDSH_HELPERS}${body}\nprint("done")\n`);
  if (!out.includes('done')) throw new Error(`nbdsh script did not finish:\n${out}`);
  return out;
}

function sha256File(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const h = createHash('sha256');
    fs.createReadStream(file, { highWaterMark: 4 * MiB })
      .on('data', (d) => h.update(d))
      .on('end', () => resolve(h.digest('hex')))
      .on('error', reject);
  });
}

describe.runIf(haveCeph && haveTools)('s3 plugin on radosgw: prefix= disk', () => {
  it(`nbdcopy ${COPY_MIB} MiB in and out, identical; one object per MiB in the store`, async () => {
    const size = COPY_MIB * MiB;
    const src = path.join(dir, 'src.raw');
    const out = path.join(dir, 'out.raw');
    cleanups.push(() => {
      fs.rmSync(src, { force: true });
      fs.rmSync(out, { force: true });
    });
    // random data in 4 MiB pieces (no 1 GiB buffer in the test process)
    const fd = fs.openSync(src, 'w');
    for (let o = 0; o < size; o += 4 * MiB) fs.writeSync(fd, randomBytes(4 * MiB), 0, 4 * MiB, o);
    fs.closeSync(fd);
    const prefix = freshPrefix('copy');
    const nbd = await startNbd({ prefix, size: String(size) });

    let t = performance.now();
    await runOk('nbdcopy', ['--flush', src, nbd.uri], { timeout: 300_000 });
    const inSec = (performance.now() - t) / 1000;
    expect(await listObjects(prefix)).toHaveLength(COPY_MIB);

    t = performance.now();
    await runOk('nbdcopy', [nbd.uri, out], { timeout: 300_000 });
    const outSec = (performance.now() - t) / 1000;
    const cmp = await run('cmp', [src, out], { timeout: 120_000 });
    expect(cmp.stdout + cmp.stderr).toBe('');
    expect(cmp.code).toBe(0);
    console.log(
      `nbdcopy ${COPY_MIB} MiB: in ${inSec.toFixed(1)} s (${(COPY_MIB / inSec).toFixed(0)} MiB/s), ` +
        `out ${outSec.toFixed(1)} s (${(COPY_MIB / outSec).toFixed(0)} MiB/s); load ${fs.readFileSync('/proc/loadavg', 'utf8').trim()}`,
    );
  }, 600_000);

  it('qemu-img map and nbdinfo --map show holes where nothing was written; holes read as zero', async () => {
    const prefix = freshPrefix('map');
    const nbd = await startNbd({ prefix, size: '64M' });
    // 1 MiB at 4 MiB (one whole object), 4 KiB at 20 MiB + 8 KiB (inside an object), the last 512 bytes
    await qemuIo(nbd.uri, 'write -P 0x11 4M 1M', 'write -P 0x22 20488k 4k', 'write -P 0x33 67108352 512', 'flush');
    expect((await listObjects(prefix)).sort()).toEqual([objectName(4), objectName(20), objectName(63)]);
    const map = await qemuImgMap('-f', 'raw', nbd.uri);
    const data = map.filter((e) => e.data).map((e) => [e.start, e.length]);
    expect(data).toEqual([
      [4 * MiB, MiB],
      [20 * MiB, MiB],
      [63 * MiB, MiB],
    ]);
    expect(map.filter((e) => !e.data).every((e) => e.zero)).toBe(true);
    const info = await nbdinfoMap(nbd.uri);
    expect(info.filter((e) => e.type === 3).reduce((n, e) => n + e.length, 0)).toBe(61 * MiB);
    await qemuIo(nbd.uri, 'read -P 0 0 4M', 'read -P 0x11 4M 1M', 'read -P 0 20M 8k', 'read -P 0x22 20488k 4k', 'read -P 0 20492k 1012k', 'read -P 0x33 67108352 512');
  });

  it('trim and write zeroes delete whole objects (counted in the store) and zero the edges', async () => {
    const prefix = freshPrefix('trim');
    const nbd = await startNbd({ prefix, size: '16M' });
    await qemuIo(nbd.uri, 'write -P 0x44 0 16M', 'flush');
    expect(await listObjects(prefix)).toHaveLength(16);
    // 4 whole objects (2M-6M) plus the halves of objects 1 and 6
    await qemuIo(nbd.uri, 'discard 1536k 5M', 'flush');
    expect((await listObjects(prefix)).map((k) => parseInt(k, 16))).toEqual([0, 1, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
    await qemuIo(nbd.uri, 'read -P 0x44 0 1536k', 'read -P 0 1536k 5M', 'read -P 0x44 6656k 9M');
    // write zeroes over the rest of object 1: it is all zero now, so it goes away too
    await qemuIo(nbd.uri, 'write -z 1M 512k', 'flush');
    expect((await listObjects(prefix)).map((k) => parseInt(k, 16))).toEqual([0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
    // zero with FUA (no flush): the objects are gone when the reply comes
    await nbdsh(nbd.uri, 'h.zero(8 * 1048576, 8 * 1048576, nbd.CMD_FLAG_FUA)');
    expect((await listObjects(prefix)).map((k) => parseInt(k, 16))).toEqual([0, 6, 7]);
    const map = await qemuImgMap('-f', 'raw', nbd.uri);
    expect(map.filter((e) => e.data).map((e) => [e.start, e.length])).toEqual([
      [0, MiB],
      [6 * MiB, 2 * MiB],
    ]);
  });

  it.runIf(haveCli)('data survives a restart of nbdx (the nbdx command, secret from a file)', async () => {
    const prefix = freshPrefix('restart');
    const cli = (extra: Record<string, string>) => ['s3', ...params(extra).map(([k, v]) => `${k}=${v}`)];
    let srv = await startCli(cli({ prefix, size: '32M' }));
    cleanups.push(() => srv.stop().then(() => undefined));
    // flushed data, then data written with no flush before a disconnect
    await qemuIo(srv.uri, 'write -P 0x55 1M 3M', 'flush');
    await nbdsh(srv.uri, 'h.pwrite(b"\\x66" * 65536, 10 * 1048576 + 4096)');
    expect(await srv.stop()).toBe(0);

    srv = await startCli(cli({ prefix }));
    await qemuIo(srv.uri, 'read -P 0 0 1M', 'read -P 0x55 1M 3M', 'read -P 0 4M 6M', 'read -P 0 10M 4k', 'read -P 0x66 10244k 64k');
    await nbdsh(srv.uri, 'h.pwrite(b"\\x77" * 4096, 20 * 1048576)');
    expect(await srv.stop()).toBe(0);
    // size= that matches the manifest is accepted
    srv = await startCli(cli({ prefix, size: '32M' }));
    await qemuIo(srv.uri, 'read -P 0x77 20M 4k', 'read -P 0x55 1M 3M');
  }, 60_000);
});
