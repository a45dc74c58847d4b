#!/usr/bin/env node
/**
 * qemu-img convert of an image served over https (a small range server in this script), through
 * `nbdx http` with and without readahead (not a test, not published):
 *
 *   node packages/filter-readahead/bench/https-1g.mjs [SIZE_MIB=1024] [RDELAY]
 *
 * With RDELAY (e.g. 5ms) a delay filter under readahead stands for the network's round trip.
 * Prints time, throughput and the ranged GETs the server answered; checks the copy with cmp.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import * as https from 'node:https';

const nbdxBin = () => path.resolve(import.meta.dirname, '../../nbdx/bin/nbdx.js');

/** A small https server with byte ranges, counting the ranged GETs it answers. */
async function startRangeServer(file, key, cert) {
  const size = fs.statSync(file).size;
  const fd = fs.openSync(file, 'r');
  const stats = { ranged: 0 };
  const server = https.createServer({ key, cert, keepAliveTimeout: 30_000 }, (req, res) => {
    const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
    if (req.method === 'HEAD' || !m) {
      res.writeHead(200, { 'content-length': size, 'accept-ranges': 'bytes' });
      return res.end();
    }
    const first = Number(m[1]);
    const last = Math.min(Number(m[2]), size - 1);
    stats.ranged++;
    res.writeHead(206, { 'content-length': last - first + 1, 'content-range': `bytes ${first}-${last}/${size}`, 'accept-ranges': 'bytes' });
    fs.createReadStream('', { fd, start: first, end: last, autoClose: false }).pipe(res);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `https://127.0.0.1:${server.address().port}/disk.img`,
    stats,
    close: () => new Promise((resolve) => { server.closeAllConnections(); server.close(() => { fs.closeSync(fd); resolve(); }); }),
  };
}

const run = promisify(execFile);
const mib = Number(process.argv[2] ?? 1024);
const rdelay = process.argv[3];
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-https-bench-'));
try {
  const file = path.join(work, 'disk.img');
  // Random data (not zeroes: nothing may be skipped), written in 16 MiB pieces.
  const fd = fs.openSync(file, 'w');
  const piece = Buffer.alloc(16 << 20);
  for (let i = 0; i < mib / 16; i++) {
    for (let j = 0; j < piece.length; j += 65536) piece.writeUInt32LE((i * 65536 + j) ^ 0x5bd1e995, j);
    fs.writeSync(fd, piece);
  }
  fs.closeSync(fd);
  const keyFile = path.join(work, 'key.pem');
  const certFile = path.join(work, 'cert.pem');
  await run('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', keyFile, '-out', certFile, '-days', '1',
    '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1']);
  const server = await startRangeServer(file, fs.readFileSync(keyFile), fs.readFileSync(certFile));
  const out = path.join(work, 'out.img');
  try {
    for (const [label, filters] of [
      ['http', []],
      ['readahead', ['--filter=readahead']],
      ['readahead + cache', ['--filter=readahead', '--filter=cache']],
    ]) {
      const delay = rdelay ? ['--filter=delay'] : [];
      const params = [`cafile=${certFile}`, ...(rdelay ? [`rdelay=${rdelay}`] : []), ...(label.includes('cache') ? [`cachedir=${work}`] : [])];
      const before = server.stats.ranged;
      const t = performance.now();
      const r = await run(process.execPath, [nbdxBin(), ...(process.env.VERBOSE ? ['-v'] : []), '-U', '-', ...filters, ...delay, 'http', server.url, ...params,
        '--run', `qemu-img convert -f raw -O raw "$uri" ${out}`], { maxBuffer: 64 << 20 });
      if (process.env.VERBOSE) for (const l of r.stderr.split('\n')) if (/readahead: export|cache: cache for/.test(l)) console.log('  ', l);
      const s = (performance.now() - t) / 1000;
      await run('cmp', [file, out]);
      console.log(`${label.padEnd(18)} ${s.toFixed(2)} s  ${(mib / s).toFixed(0)} MiB/s  ${server.stats.ranged - before} GETs`);
      fs.rmSync(out);
    }
  } finally {
    await server.close();
  }
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}
