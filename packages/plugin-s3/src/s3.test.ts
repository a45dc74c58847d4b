/**
 * End to end against a real object store: a single-node Ceph with radosgw started by @nbdx/testkit
 * (startCeph) ← this plugin (in-process through serve(), or the nbdx command) ← the real NBD tools
 * (nbdcopy, qemu-img, qemu-io, nbdinfo, nbdsh). No mocks: every byte goes through radosgw.
 */
import { createHash, randomBytes } from 'node:crypto';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as path from 'node:path';
import { CreateBucketCommand, ListObjectsV2Command, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import { NbdClient, parseNbdUri } from '@nbdx/client';
import {
  NBDSH_HELPERS,
  TOOL_ENV,
  nbdinfoMap,
  nbdshOk,
  needCeph,
  nbdxBin,
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
    // writing into a deleted object creates it again, zero around the write
    await qemuIo(nbd.uri, 'write -P 0x99 9M 4k', 'flush', 'read -P 0 8M 1M', 'read -P 0x99 9M 4k', 'read -P 0 9220k 1020k');
    expect((await listObjects(prefix)).map((k) => parseInt(k, 16))).toEqual([0, 6, 7, 9]);
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
    // a client still connected, its write never flushed, when the server gets SIGTERM
    const client = await NbdClient.connect(parseNbdUri(srv.uri));
    await client.pwrite(Buffer.alloc(8192, 0x88), 30 * MiB + 512);
    expect(await srv.stop()).toBe(0);
    client.close();
    // size= that matches the manifest is accepted
    srv = await startCli(cli({ prefix, size: '32M' }));
    await qemuIo(srv.uri, 'read -P 0x77 20M 4k', 'read -P 0x55 1M 3M', 'read -P 0 30M 512', 'read -P 0x88 31457792 8k');
  }, 60_000);
});

/** Python for nbdsh: write 4 KiB blocks i (for i ≡ parity mod 2) of [0, span) with byte tag+i%200, all in flight. */
function interleavedWrites(span: number, parity: number, tag: number, flushEvery = 0): string {
  return `
span, par, tag = ${span}, ${parity}, ${tag}
for i in range(par, span // 4096, 2):
    h.aio_pwrite(bytes([(tag + i) % 200 + 1]) * 4096, i * 4096)
    if ${flushEvery} and i % ${flushEvery || 1} == par:
        h.aio_flush()
    while h.aio_in_flight() > 64:
        h.poll(-1)
wait_all()
h.flush()
`;
}

/** Python for nbdsh: check what interleavedWrites(span, 0, tagA) and (span, 1, tagB) leave. */
function checkInterleaved(span: number, tagA: number, tagB: number): string {
  return `
span = ${span}
data = h.pread(span, 0)
for i in range(span // 4096):
    tag = ${tagA} if i % 2 == 0 else ${tagB}
    want = bytes([(tag + i) % 200 + 1]) * 4096
    assert data[i*4096:(i+1)*4096] == want, "block %d lost its write" % i
`;
}

describe.runIf(haveCeph && haveTools)('s3 plugin on radosgw: concurrent writers', () => {
  it('two connections write alternate 4 KiB blocks of the same objects at once: no lost update', async () => {
    const prefix = freshPrefix('conns');
    const span = 8 * MiB;
    // a small object size and buffer so that objects are written back while both are writing
    const nbd = await startNbd({ prefix, size: '16M', 'object-size': '256K', 'write-buffer': '1M' });
    await Promise.all([nbdsh(nbd.uri, interleavedWrites(span, 0, 10)), nbdsh(nbd.uri, interleavedWrites(span, 1, 90))]);
    // read back through a second server, which has nothing buffered: this is what the store holds
    const fresh = await startNbd({ prefix });
    await nbdsh(fresh.uri, checkInterleaved(span, 10, 90));
  }, 60_000);

  it('two servers on one prefix write alternate blocks of the same objects: merges with If-Match lose nothing', async () => {
    const prefix = freshPrefix('servers');
    const span = 4 * MiB;
    const pluginA = createS3Plugin();
    const pluginB = createS3Plugin();
    const cfg = { prefix, size: '8M', 'object-size': '64K' };
    const a = await serve({ plugin: pluginA, config: params(cfg) });
    cleanups.push(() => a.close());
    const b = await serve({ plugin: pluginB, config: params(cfg) });
    cleanups.push(() => b.close());
    // both flush often, so both merge the same objects at the same time again and again
    await Promise.all([nbdsh(a.uri, interleavedWrites(span, 0, 20, 8)), nbdsh(b.uri, interleavedWrites(span, 1, 70, 8))]);
    const fresh = await startNbd({ prefix });
    await nbdsh(fresh.uri, checkInterleaved(span, 20, 70));
    const sa = pluginA.stats()!;
    const sb = pluginB.stats()!;
    console.log(`two servers: merges ${sa.merges}+${sb.merges}, conditional PUTs refused and merged again ${sa.conflicts}+${sb.conflicts}`);
    expect(sa.merges! + sb.merges!).toBeGreaterThan(0);
  }, 60_000);

  it('a conditional PUT against a changed object is refused by radosgw (the lost-update check works here)', async () => {
    const store = new Store(storeOptions({ ...defaultSettings(), ...storeSettings() }));
    try {
      const key = `${freshPrefix('cond')}x`;
      expect(await store.put(key, Buffer.from('one'), { ifNoneMatch: '*' })).toBeTruthy();
      expect(await store.put(key, Buffer.from('two'), { ifNoneMatch: '*' })).toBe(false);
      const first = (await store.head(key))!.etag!;
      const second = await store.put(key, Buffer.from('three'), { ifMatch: first });
      expect(second).toBeTruthy();
      expect(await store.put(key, Buffer.from('four'), { ifMatch: first })).toBe(false);
      expect(await store.put(key, Buffer.from('five'), { ifMatch: second as string })).toBeTruthy();
    } finally {
      store.destroy();
    }
  });
});

function storeSettings() {
  const c = ceph.s3!;
  return { bucket: BUCKET, endpoint: new URL(c.endpoint), accessKey: c.accessKey, secretKey: c.secretKey };
}

describe.runIf(haveCeph && haveTools)('s3 plugin on radosgw: key= one object, read-only', () => {
  it('size from HEAD, ranged reads anywhere, nbdcopy out identical, writes refused, a replaced object is EIO', async () => {
    const size = 5 * MiB + 12345;
    const body = randomBytes(size);
    const key = `${freshPrefix('one')}disk.img`;
    await s3.send(new PutObjectCommand({ Bucket: BUCKET, Key: key, Body: body, ContentLength: size }));
    fs.writeFileSync(path.join(dir, 'one.img'), body);
    cleanups.push(() => fs.rmSync(path.join(dir, 'one.img'), { force: true }));
    const nbd = await startNbd({ key });
    const out = await nbdsh(
      nbd.uri,
      `
import hashlib
assert h.get_size() == ${size}
assert h.is_read_only() and not h.can_trim() and not h.can_zero()
want = open(${JSON.stringify(path.join(dir, 'one.img'))}, 'rb').read()
for off, n in [(0, 1), (0, 4096), (1048575, 2), (3 * 1048576 + 17, 65536), (${size - 1}, 1), (${size - 100000}, 100000), (0, ${size})]:
    assert h.pread(n, off) == want[off:off+n], (off, n)
# many ranged reads in flight at once
bufs = [nbd.Buffer(4096) for _ in range(64)]
for i, b in enumerate(bufs):
    h.aio_pread(b, (i * 81919) % (${size} - 4096))
wait_all()
for i, b in enumerate(bufs):
    off = (i * 81919) % (${size} - 4096)
    assert b.to_bytearray() == want[off:off+4096]
expect_err("EPERM", lambda: h.pwrite(b"x", 0))
`,
    );
    expect(out).toContain('ok EPERM');
    const copy = path.join(dir, 'one-out.img');
    cleanups.push(() => fs.rmSync(copy, { force: true }));
    await runOk('nbdcopy', [nbd.uri, copy]);
    expect(fs.readFileSync(copy).equals(body)).toBe(true);

    // replace the object: reads fail instead of mixing two versions
    await s3.send(new PutObjectCommand({ Bucket: BUCKET, Key: key, Body: randomBytes(size), ContentLength: size }));
    await nbdsh(nbd.uri, 'expect_err("EIO", lambda: h.pread(4096, 0))');
  }, 60_000);
});

describe.runIf(haveCeph && haveTools && haveCli)('s3 plugin: key= under --filter=cow', () => {
  it('nbdx --filter=cow s3 key=… is writable; the object stays as it was', async () => {
    const key = `${freshPrefix('cow')}golden.img`;
    const body = Buffer.alloc(2 * MiB, 0x42);
    await s3.send(new PutObjectCommand({ Bucket: BUCKET, Key: key, Body: body, ContentLength: body.length }));
    const srv = await startCli(['--filter=cow', 's3', ...params({ key }).map(([k, v]) => `${k}=${v}`)]);
    cleanups.push(() => srv.stop().then(() => undefined));
    await qemuIo(srv.uri, 'write -P 0x43 1M 4k', 'flush', 'read -P 0x42 0 1M', 'read -P 0x43 1M 4k', 'read -P 0x42 1028k 1020k');
    await srv.stop();
    const plain = await startNbd({ key });
    await nbdsh(plain.uri, 'assert h.pread(2 * 1048576, 0) == b"\\x42" * (2 * 1048576)');
  }, 60_000);
});

describe.runIf(haveCeph && haveTools && haveCli)('s3 plugin: credentials from the AWS environment and profiles', () => {
  it('AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, and profile= from a shared credentials file', async () => {
    const c = ceph.s3!;
    const prefix = freshPrefix('creds');
    const base = ['s3', `endpoint=${c.endpoint}`, `bucket=${BUCKET}`, `prefix=${prefix}`];
    // nothing from the developer's own ~/.aws may leak in
    const isolated = {
      AWS_CONFIG_FILE: path.join(dir, 'no-config'),
      AWS_SHARED_CREDENTIALS_FILE: path.join(dir, 'no-credentials'),
      AWS_EC2_METADATA_DISABLED: 'true',
      AWS_PROFILE: '',
      AWS_REGION: '',
    };
    let srv = await startCli([...base, 'size=4M'], {
      env: { ...isolated, AWS_ACCESS_KEY_ID: c.accessKey, AWS_SECRET_ACCESS_KEY: c.secretKey },
    });
    await qemuIo(srv.uri, 'write -P 0x21 0 64k', 'flush');
    await srv.stop();

    const credentials = path.join(dir, 'credentials');
    fs.writeFileSync(credentials, `[nbdx-test]\naws_access_key_id = ${c.accessKey}\naws_secret_access_key = ${c.secretKey}\n`, { mode: 0o600 });
    cleanups.push(() => fs.rmSync(credentials, { force: true }));
    srv = await startCli([...base, 'profile=nbdx-test'], { env: { ...isolated, AWS_SHARED_CREDENTIALS_FILE: credentials } });
    cleanups.push(() => srv.stop().then(() => undefined));
    await qemuIo(srv.uri, 'read -P 0x21 0 64k');
  }, 60_000);
});

describe.runIf(haveCeph && haveTools && haveCli)('s3 plugin: bad command lines and refused start-ups are one line, exit 1', () => {
  const cases: [string, Record<string, string>, RegExp][] = [
    ['no layout', {}, /exactly one of key= .* or prefix=/],
    ['both layouts', { key: 'a', prefix: 'b/' }, /exactly one of key=/],
    ['object-size not a multiple of 4K', { prefix: 'p/', size: '1M', 'object-size': '1000' }, /object-size: '1000' must be a multiple of 4K/],
    ['a new disk without size=', { prefix: 'nothing-here/' }, /no disk at s3:\/\/nbdx-test\/nothing-here\/ .* give size= to create one/],
    ['a missing object', { key: 'no/such/object' }, /no such object/],
    // (any file that is not the secret; a secret in clear would add a warning line)
    ['a wrong secret', { key: 'x', 'secret-key': '+/etc/hostname' }, /SignatureDoesNotMatch|AccessDenied|403/],
    ['an unreadable secret file', { key: 'x', 'secret-key': '+/nonexistent/secret' }, /secret-key: cannot read '\/nonexistent\/secret'/],
    ['a bad endpoint', { key: 'x', endpoint: 'ftp://h' }, /endpoint: 'ftp:' is not supported/],
  ];
  it.each(cases)('%s', async (_name, extra, message) => {
    const args = ['-f', 's3', ...params(extra).map(([k, v]) => `${k}=${v}`), '--run', 'true'];
    // (NODE_NO_WARNINGS: the SDK warns about Node 20 on stderr, which is not our line)
    const r = await run(process.execPath, [nbdxBin(), ...args], { env: { NODE_NO_WARNINGS: '1' } });
    expect(r.code).toBe(1);
    const lines = r.stderr.split('\n').filter((l) => l.trim());
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(message);
    expect(r.stderr).not.toMatch(/\n\s+at /);
  });

  it('size= that does not match the manifest is refused', async () => {
    const prefix = freshPrefix('mismatch');
    const nbd = await startNbd({ prefix, size: '4M' });
    await nbd.close();
    const r = await run(process.execPath, [nbdxBin(), '-f', 's3', ...params({ prefix, size: '8M' }).map(([k, v]) => `${k}=${v}`), '--run', 'true']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/size=8388608 does not match the disk at .* \(4194304 bytes\); resizing is not supported/);
  });
});

/**
 * A proxy in front of radosgw that can be told to fail: answer 500 or 403 to every request, or
 * hold requests without answering. The store behind it is the real one.
 */
async function startFaultyProxy(target: string): Promise<{ url: string; mode: 'pass' | '500' | '403' | 'hang'; close(): Promise<void> }> {
  const upstream = new URL(target);
  const held: http.ServerResponse[] = [];
  const proxy = {
    url: '',
    mode: 'pass' as 'pass' | '500' | '403' | 'hang',
    close: async () => {
      for (const r of held.splice(0)) r.destroy();
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
  const server = http.createServer((req, res) => {
    if (proxy.mode === 'hang') {
      req.resume();
      held.push(res);
      return;
    }
    if (proxy.mode !== 'pass') {
      req.resume();
      const code = proxy.mode === '500' ? 'InternalError' : 'AccessDenied';
      res.writeHead(Number(proxy.mode), { 'content-type': 'application/xml' });
      res.end(`<?xml version="1.0" encoding="UTF-8"?><Error><Code>${code}</Code><Message>injected by the test</Message></Error>`);
      return;
    }
    const up = http.request(
      { host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: req.headers },
      (ur) => {
        res.writeHead(ur.statusCode!, ur.headers);
        ur.pipe(res);
      },
    );
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  proxy.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return proxy;
}

describe.runIf(haveCeph && haveTools)('s3 plugin: a failing store', () => {
  it('500s, 403s and a hanging store give EIO/EPERM, buffered data survives, and the server recovers', async () => {
    const proxy = await startFaultyProxy(ceph.s3!.endpoint);
    cleanups.push(() => proxy.close());
    const prefix = freshPrefix('faults');
    const nbd = await startNbd({ prefix, size: '8M', endpoint: proxy.url, timeout: '1' });
    await qemuIo(nbd.uri, 'write -P 0x31 0 1M', 'flush');
    proxy.mode = '500';
    await nbdsh(
      nbd.uri,
      `
h.pwrite(b"\\x32" * 4096, 2 * 1048576)     # buffered: acknowledged without the store
expect_err("EIO", lambda: h.flush())
expect_err("EIO", lambda: h.pread(4096, 0))  # not buffered: needs the store
assert h.pread(4096, 2 * 1048576) == b"\\x32" * 4096  # buffered data still reads
`,
    );
    proxy.mode = '403';
    await nbdsh(nbd.uri, 'expect_err("EPERM", lambda: h.pread(4096, 0))');
    proxy.mode = 'hang';
    const t = performance.now();
    await nbdsh(nbd.uri, 'expect_err("EIO", lambda: h.pread(4096, 4 * 1048576))');
    // timeout=1, and the SDK's 3 attempts
    expect(performance.now() - t).toBeLessThan(15_000);
    proxy.mode = 'pass';
    await nbdsh(nbd.uri, 'h.flush()');
    // what the store holds, through a server with nothing buffered
    const fresh = await startNbd({ prefix });
    await qemuIo(fresh.uri, 'read -P 0x31 0 1M', 'read -P 0 1M 1M', 'read -P 0x32 2M 4k', 'read -P 0 2052k 1020k');
  }, 60_000);
});

describe.runIf(haveCeph && haveTools && haveCli)('s3 plugin under --filter=retry-request', () => {
  it('a burst of 500s from the store is ridden out: the client sees no error', async () => {
    const proxy = await startFaultyProxy(ceph.s3!.endpoint);
    cleanups.push(() => proxy.close());
    const prefix = freshPrefix('retry');
    const args = (extra: Record<string, string>) => [
      '--filter=retry-request',
      's3',
      ...params({ prefix, endpoint: proxy.url, ...extra }).map(([k, v]) => `${k}=${v}`),
      'retry-request-retries=10',
      'retry-request-delay=200ms',
    ];
    const srv = await startCli(args({ size: '4M' }), { env: { NODE_NO_WARNINGS: '1' } });
    cleanups.push(() => srv.stop().then(() => undefined));
    await qemuIo(srv.uri, 'write -P 0x61 0 1M', 'flush');
    proxy.mode = '500';
    const healed = new Promise<void>((r) =>
      setTimeout(() => {
        proxy.mode = 'pass';
        r();
      }, 700),
    );
    await Promise.all([qemuIo(srv.uri, 'read -P 0x61 0 1M', 'write -P 0x62 1M 64k', 'flush', 'read -P 0x62 1M 64k'), healed]);
    expect(srv.stderr()).toMatch(/retry/i);
  }, 60_000);
});

/** nbdkit's S3 plugin (Debian nbdkit-plugin-python + python3-boto3); under CI=true it must be there. */
function needNbdkitS3(): boolean {
  const ok = haveTools && spawnSync('nbdkit', ['S3', '--dump-plugin'], { env: TOOL_ENV, stdio: 'ignore' }).status === 0;
  if (!ok && process.env.CI === 'true') throw new Error('nbdkit S3 plugin missing under CI (nbdkit-plugin-python, python3-boto3)');
  return ok;
}

describe.runIf(haveCeph && needNbdkitS3())('s3 plugin: the same objects as nbdkit\'s S3 plugin', () => {
  it('a disk written by nbdkit S3 (key=K size= object-size=) opens as prefix=K/, and back', async () => {
    const name = freshPrefix('nbdkit').slice(0, -1);
    const c = ceph.s3!;
    const env = { AWS_ACCESS_KEY_ID: c.accessKey, AWS_SECRET_ACCESS_KEY: c.secretKey };
    // an explicit socket: with -U - nbdkit 1.32 leaves an empty /tmp/nbdkitXXXXXX behind
    const nbdkitRun = (cmd: string) =>
      runOk('nbdkit', ['-U', path.join(dir, `nbdkit-${++seq}.sock`), 'S3', `endpoint-url=${c.endpoint}`, `bucket=${BUCKET}`, `key=${name}`, 'size=4M', 'object-size=64k', '--run', cmd], { env });
    await nbdkitRun(`qemu-io -f raw -c "write -P 0x5a 64k 128k" -c "write -P 0x3c 3M 64k" "$uri"`);
    // no manifest yet: size= and object-size= as nbdkit was given them create it
    const nbd = await startNbd({ prefix: `${name}/`, size: '4M', 'object-size': '64K' });
    await qemuIo(nbd.uri, 'read -P 0 0 64k', 'read -P 0x5a 64k 128k', 'read -P 0 192k 2880k', 'read -P 0x3c 3M 64k');
    const map = await nbdinfoMap(nbd.uri);
    expect(map.filter((e) => e.type === 0).map((e) => [e.offset, e.length])).toEqual([
      [65536, 131072],
      [3 * MiB, 65536],
    ]);
    await qemuIo(nbd.uri, 'write -P 0x77 1M 64k', 'flush');
    const out = await nbdkitRun(`qemu-io -f raw -c "read -P 0x77 1M 64k" -c "read -P 0x5a 64k 128k" "$uri"`);
    expect(out).not.toMatch(/Pattern verification failed|error/i);
  }, 60_000);
});
