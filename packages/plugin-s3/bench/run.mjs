#!/usr/bin/env node
/**
 * Throughput of `nbdx s3` on a local radosgw (a throw-away single-node Ceph from @nbdx/testkit),
 * against the raw object throughput of the same SDK from Node (PARALLEL 1 MiB PUTs and GETs, the
 * `aws s3 cp` way) and, when installed, nbdkit's S3 plugin (Python, boto3) and curl plugin.
 *
 *   node packages/plugin-s3/bench/run.mjs [SIZE_MiB=1024] [PARALLEL=256]
 *
 * Needs: the built CLI and packages (pnpm build), Ceph (ceph-mon ceph-osd radosgw), nbdcopy, nbdkit;
 * optional nbdkit-plugin-python + python3-boto3 for nbdkit's S3 plugin.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  CreateBucketCommand,
  GetObjectCommand,
  PutObjectAclCommand,
  PutObjectCommand,
  S3Client,
} from '@aws-sdk/client-s3';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '../../..');
// testkit's index pulls in vitest: bundle just its Ceph bring-up for this plain Node script.
execFileSync(
  'npx',
  ['tsup', '../testkit/src/ceph.ts', '--no-config', '--format', 'esm', '--target', 'node20', '-d', 'bench/.build', '--silent'],
  { cwd: path.resolve(here, '..'), stdio: 'inherit', env: { ...process.env, COREPACK_INTEGRITY_KEYS: '0' } },
);
const { startCeph } = await import('./.build/ceph.js');
const NBDX = path.join(root, 'packages/nbdx/bin/nbdx.js');
const MiB = 1024 * 1024;
const sizeMiB = Number(process.argv[2] ?? 1024);
const parallel = Number(process.argv[3] ?? 256);
const size = sizeMiB * MiB;
const BUCKET = 'bench';

const load = () => os.loadavg().map((l) => l.toFixed(2)).join(' ');
const results = [];
function report(label, seconds, bytes = size) {
  const line = `${label.padEnd(64)} ${seconds.toFixed(2).padStart(7)} s ${(bytes / MiB / seconds).toFixed(0).padStart(5)} MiB/s   load ${load()}`;
  results.push(line);
  console.log(line);
}

const ceph = await startCeph({ rgw: true, memstoreBytes: 8 * 1024 ** 3 });
const c = ceph.s3;
const ENV = {
  ...process.env,
  PATH: `/usr/bin:/usr/sbin:${process.env.PATH}`,
  AWS_ACCESS_KEY_ID: c.accessKey,
  AWS_SECRET_ACCESS_KEY: c.secretKey,
  AWS_REGION: 'us-east-1',
  NODE_NO_WARNINGS: '1',
};
const s3 = new S3Client({
  endpoint: c.endpoint,
  region: c.region,
  forcePathStyle: true,
  credentials: { accessKeyId: c.accessKey, secretAccessKey: c.secretKey },
  requestChecksumCalculation: 'WHEN_REQUIRED',
  responseChecksumValidation: 'WHEN_REQUIRED',
  requestHandler: { httpAgent: { keepAlive: true, maxSockets: parallel }, socketAcquisitionWarningTimeout: 1e9 },
});

/** Run `count` jobs with at most `parallel` in flight. */
async function pool(count, job) {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(parallel, count) }, async () => {
      while (next < count) await job(next++);
    }),
  );
}

function timed(label, cmd, args, bytes) {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { env: ENV, stdio: ['ignore', 'inherit', 'inherit'], cwd: root });
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) {
    results.push(`${label}: FAILED (exit ${r.status})`);
    console.log(`${label}: FAILED (exit ${r.status})`);
    return;
  }
  report(label, s, bytes);
}

try {
  await s3.send(new CreateBucketCommand({ Bucket: BUCKET }));
  const body = Buffer.alloc(MiB, 0x5a);
  const n = sizeMiB;

  // --- raw object throughput, the same SDK from Node -----------------------------------------
  let t = performance.now();
  await pool(n, (i) => s3.send(new PutObjectCommand({ Bucket: BUCKET, Key: `raw/${i}`, Body: body, ContentLength: MiB })));
  report(`raw SDK: ${n} × 1 MiB PUT, ${parallel} in flight`, (performance.now() - t) / 1000);
  const sink = async (r) => {
    for await (const _ of r.Body) {
      // discard
    }
  };
  t = performance.now();
  await pool(n, async (i) => sink(await s3.send(new GetObjectCommand({ Bucket: BUCKET, Key: `raw/${i}` }))));
  report(`raw SDK: ${n} × 1 MiB GET, ${parallel} in flight`, (performance.now() - t) / 1000);
  t = performance.now();
  await pool(n * 4, async (i) =>
    sink(await s3.send(new GetObjectCommand({ Bucket: BUCKET, Key: `raw/${i >> 2}`, Range: `bytes=${(i & 3) * 262144}-${(i & 3) * 262144 + 262143}` }))),
  );
  report(`raw SDK: ${n * 4} × 256 KiB ranged GET, ${parallel} in flight`, (performance.now() - t) / 1000);

  // --- nbdx s3, prefix= disk --------------------------------------------------------------------
  const src = `[ nbdkit -r pattern ${size} ]`;
  const nbdx = (extra, run) => [NBDX, '-U', '-', 's3', `endpoint=${c.endpoint}`, `bucket=${BUCKET}`, ...extra, '--run', run];
  const disk = ['prefix=nbdx/', `size=${size}`];
  timed('nbdx s3 prefix=: nbdcopy in (default 256 KiB requests)', process.execPath, nbdx(disk, `nbdcopy --flush -- ${src} "$uri"`));
  timed('nbdx s3 prefix=: nbdcopy out (default 256 KiB requests)', process.execPath, nbdx(disk, 'nbdcopy "$uri" null:'));
  timed('nbdx s3 prefix=: nbdcopy in --request-size=1M', process.execPath, nbdx(disk, `nbdcopy --request-size=${MiB} --flush -- ${src} "$uri"`));
  timed('nbdx s3 prefix=: nbdcopy out --request-size=1M', process.execPath, nbdx(disk, `nbdcopy --request-size=${MiB} "$uri" null:`));

  // --- nbdx s3, key= one object -----------------------------------------------------------------
  const oneSize = Math.min(size, 512 * MiB);
  await s3.send(new PutObjectCommand({ Bucket: BUCKET, Key: 'one.img', Body: Buffer.alloc(oneSize, 0x6b), ContentLength: oneSize }));
  await s3.send(new PutObjectAclCommand({ Bucket: BUCKET, Key: 'one.img', ACL: 'public-read' }));
  timed(`nbdx s3 key=: nbdcopy out of one ${oneSize / MiB} MiB object`, process.execPath, nbdx(['key=one.img'], 'nbdcopy "$uri" null:'), oneSize);

  // --- nbdkit's S3 plugin (Python, boto3), when installed ------------------------------------------
  // nbdkit 1.32 refuses a minimum block size above 64K, and this plugin makes its minimum the object
  // size, so its writable layout is measured at object-size=64K, beside nbdx at the same setting.
  const hasS3Plugin = spawnSync('nbdkit', ['S3', '--dump-plugin'], { env: ENV, stdio: 'ignore' }).status === 0;
  const small = Math.min(size, 256 * MiB);
  const smallSrc = `[ nbdkit -r pattern ${small} ]`;
  const nbdx64 = ['prefix=nbdx64k/', `size=${small}`, 'object-size=64K'];
  timed(`nbdx s3 prefix= object-size=64K: nbdcopy in ${small / MiB} MiB`, process.execPath, nbdx(nbdx64, `nbdcopy --flush -- ${smallSrc} "$uri"`), small);
  timed(`nbdx s3 prefix= object-size=64K: nbdcopy out ${small / MiB} MiB`, process.execPath, nbdx(nbdx64, 'nbdcopy "$uri" null:'), small);
  if (hasS3Plugin) {
    const nk = (extra, run) => ['-U', '-', 'S3', `endpoint-url=${c.endpoint}`, `bucket=${BUCKET}`, ...extra, '--run', run];
    const nkDisk = ['key=nbdkit', `size=${small}`, 'object-size=65536'];
    timed(`nbdkit S3 size= object-size=64K: nbdcopy in ${small / MiB} MiB`, 'nbdkit', nk(nkDisk, `nbdcopy --flush -- ${smallSrc} "$uri"`), small);
    timed(`nbdkit S3 size= object-size=64K: nbdcopy out ${small / MiB} MiB`, 'nbdkit', nk(nkDisk, 'nbdcopy "$uri" null:'), small);
    timed(`nbdkit S3 key=: nbdcopy out of one ${oneSize / MiB} MiB object`, 'nbdkit', nk(['key=one.img'], 'nbdcopy "$uri" null:'), oneSize);
  } else {
    results.push('nbdkit S3 plugin: not installed (Debian nbdkit-plugin-python + python3-boto3)');
  }
  timed(
    `nbdkit curl (public-read object): nbdcopy out of one ${oneSize / MiB} MiB object`,
    'nbdkit',
    ['-U', '-', 'curl', `${c.endpoint}/${BUCKET}/one.img`, '--run', 'nbdcopy "$uri" null:'],
    oneSize,
  );
} finally {
  s3.destroy();
  await ceph.stop();
}
console.log(`\n${results.join('\n')}`);
