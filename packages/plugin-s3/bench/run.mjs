#!/usr/bin/env node
/**
 * Throughput of `nbdx s3` on a local radosgw (a throw-away single-node Ceph from @nbdx/testkit),
 * against the raw object throughput of the same SDK from Node (PARALLEL 1 MiB PUTs and GETs, the
 * `aws s3 cp` way) and, when installed, nbdkit's S3 plugin (Python, boto3) and curl plugin.
 *
 *   node packages/plugin-s3/bench/run.mjs [SIZE_MiB=1024] [PARALLEL=256] [ROUNDS=3]
 *
 * Every measurement is repeated ROUNDS times, the rounds interleaved (this machine is shared and
 * its load moves a lot), and the median is reported with the range and the load average.
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
const rounds = Number(process.argv[4] ?? 3);
const size = sizeMiB * MiB;
const BUCKET = 'bench';

const load = () => os.loadavg().map((l) => l.toFixed(2)).join(' ');
const results = [];
/** label → [MiB/s per round], in first-seen order */
const figures = new Map();
function report(label, seconds, bytes = size) {
  const rate = bytes / MiB / seconds;
  if (!figures.has(label)) figures.set(label, []);
  figures.get(label).push(rate);
  console.log(`${label.padEnd(66)} ${seconds.toFixed(2).padStart(7)} s ${rate.toFixed(0).padStart(5)} MiB/s   load ${load()}`);
}

let loadAtStart = '';
let sockSeq = 0;
const sockDir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-s3-bench-'));
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
const newClient = () =>
  new S3Client({
  endpoint: c.endpoint,
  region: c.region,
  forcePathStyle: true,
  credentials: { accessKeyId: c.accessKey, secretAccessKey: c.secretKey },
  requestChecksumCalculation: 'WHEN_REQUIRED',
  responseChecksumValidation: 'WHEN_REQUIRED',
  requestHandler: { httpAgent: { keepAlive: true, maxSockets: parallel }, socketAcquisitionWarningTimeout: 1e9 },
  });
// The event loop is blocked while the servers run (spawnSync), so idle keep-alive sockets the
// store closed meanwhile look alive afterwards: each round starts with a fresh client.
let s3 = newClient();

/** Run `count` jobs with at most `parallel` in flight. */
async function pool(count, job) {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(parallel, count) }, async () => {
      while (next < count) await job(next++);
    }),
  );
}

/**
 * Run a server with `--run CMD` and time CMD alone (GNU time inside --run), so that the start-up
 * of the server (Node and the SDK, or Python and boto3) is not counted.
 */
function timed(label, cmd, args, bytes) {
  const run = args[args.length - 1];
  const r = spawnSync(cmd, [...args.slice(0, -1), `/usr/bin/time -f 'elapsed %e' ${run}`], {
    env: ENV,
    stdio: ['ignore', 'inherit', 'pipe'],
    encoding: 'utf8',
    cwd: root,
  });
  const m = /elapsed ([\d.]+)\s*$/.exec(r.stderr ?? '');
  if (r.status !== 0 || !m) {
    results.push(`${label}: FAILED (exit ${r.status})`);
    console.log(`${label}: FAILED (exit ${r.status})\n${(r.stderr ?? '').slice(-1000)}`);
    return;
  }
  report(label, Number(m[1]), bytes);
}

try {
  await s3.send(new CreateBucketCommand({ Bucket: BUCKET }));
  const oneSize = Math.min(size, 512 * MiB);
  await s3.send(new PutObjectCommand({ Bucket: BUCKET, Key: 'one.img', Body: Buffer.alloc(oneSize, 0x6b), ContentLength: oneSize }));
  await s3.send(new PutObjectAclCommand({ Bucket: BUCKET, Key: 'one.img', ACL: 'public-read' }));
  loadAtStart = load();
  for (let round = 1; round <= rounds; round++) {
    console.log(`--- round ${round} of ${rounds}`);
    s3.destroy();
    s3 = newClient();
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
      // An explicit socket in our directory, a new one each time: nbdkit with the Python plugin
      // exits without removing its socket (with -U -, an empty /tmp/nbdkitXXXXXX stays behind).
      const nk = (extra, run) => ['-U', path.join(sockDir, `nbdkit-${++sockSeq}.sock`), 'S3', `endpoint-url=${c.endpoint}`, `bucket=${BUCKET}`, ...extra, '--run', run];
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
  }
} finally {
  s3.destroy();
  await ceph.stop();
  fs.rmSync(sockDir, { recursive: true, force: true });
}
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
console.log(`\nMedian of ${rounds} rounds (MiB/s, range in brackets); load average at the start ${loadAtStart}, at the end ${load()}:`);
for (const [label, xs] of figures) {
  console.log(`${label.padEnd(66)} ${median(xs).toFixed(0).padStart(5)}  [${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)}]`);
}
if (results.length) console.log(results.join('\n'));
