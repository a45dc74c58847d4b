#!/usr/bin/env node
// nbdcopy out of a disk image on an https server (testkit's range server, in its own process):
// nbdx http against nbdkit's curl plugin, alternating rounds, medians. A benchmark, not a test.
//
//   node packages/plugin-http/bench/compare-nbdkit.mjs [SIZE=1G] [ROUNDS=3]
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, openSync, writeSync, writeFileSync, closeSync, ftruncateSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '../../..');
const sizeArg = process.argv[2] ?? '1G';
const rounds = Number(process.argv[3] ?? 3);
const MiB = 1024 * 1024;
const size = Number(/^(\d+)([MG])$/i.exec(sizeArg)?.[1]) * (/G$/i.test(sizeArg) ? 1024 : 1) * MiB;
const env = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH}` };

// Bundle the range server (TypeScript, not part of dist) into bench/.build.
execFileSync(
  'npx',
  ['tsup', 'bench/range-server-main.ts', '--no-config', '--format', 'esm', '--target', 'node20', '-d', 'bench/.build', '--silent'],
  { cwd: join(here, '..'), stdio: 'inherit', env: { ...env, COREPACK_INTEGRITY_KEYS: '0' } },
);

/** A CA and a server certificate for 127.0.0.1, made with openssl. */
function makeCerts(d) {
  const f = (n) => join(d, n);
  const ssl = (...args) => execFileSync('openssl', args, { stdio: 'ignore' });
  writeFileSync(f('ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n');
  ssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=bench CA', '-keyout', f('ca.key'), '-out', f('ca.pem'));
  ssl('req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost', '-keyout', f('server.key'), '-out', f('server.csr'));
  ssl('x509', '-req', '-in', f('server.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial', '-days', '1', '-extfile', f('ext.cnf'), '-out', f('server.pem'));
  return { caFile: f('ca.pem'), keyFile: f('server.key'), certFile: f('server.pem') };
}

const dir = mkdtempSync(join(tmpdir(), 'nbdx-http-bench-'));
let server;
try {
  const certs = makeCerts(dir);
  const image = join(dir, 'disk.img');
  const fd = openSync(image, 'w');
  ftruncateSync(fd, size);
  const block = randomBytes(4 * MiB);
  for (let off = 0; off < size; off += block.length) writeSync(fd, block, 0, block.length, off);
  closeSync(fd);

  server = spawn(process.execPath, [join(here, '.build/range-server-main.js'), image, certs.keyFile, certs.certFile], { stdio: ['pipe', 'pipe', 'inherit'], cwd: here });
  const url = await new Promise((resolve) => server.stdout.once('data', (d) => resolve(String(d).trim())));

  const copy = 'nbdcopy "$uri" null:';
  const cases = {
    'nbdx http': [process.execPath, [join(root, 'packages/nbdx/bin/nbdx.js'), '-U', '-', 'http', url, `cafile=${certs.caFile}`, '--run', copy]],
    'nbdkit curl': ['nbdkit', ['-r', '-U', '-', 'curl', url, `cainfo=${certs.caFile}`, '--run', copy]],
  };
  const times = Object.fromEntries(Object.keys(cases).map((k) => [k, []]));
  const cpu = Object.fromEntries(Object.keys(cases).map((k) => [k, []]));
  const timeFile = join(dir, 'cpu.txt');
  for (let r = 0; r < rounds; r++) {
    for (const [name, [cmd, args]] of Object.entries(cases)) {
      const t0 = process.hrtime.bigint();
      // /usr/bin/time: CPU of the server and of the nbdcopy it runs (the same nbdcopy for both).
      const res = spawnSync('/usr/bin/time', ['-f', '%U %S', '-o', timeFile, cmd, ...args], { env, cwd: root, stdio: ['ignore', 'inherit', 'inherit'] });
      const s = Number(process.hrtime.bigint() - t0) / 1e9;
      if (res.status !== 0) throw new Error(`${name} failed (${res.status})`);
      const [user, sys] = readFileSync(timeFile, 'utf8').trim().split(/\s+/).slice(-2).map(Number);
      times[name].push(s);
      cpu[name].push(user + sys);
      console.log(`round ${r + 1} ${name}: ${s.toFixed(2)} s = ${(size / MiB / s).toFixed(1)} MiB/s, CPU ${(user + sys).toFixed(2)} s`);
    }
  }
  const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
  const load = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
  const mx = median(times['nbdx http']);
  const mk = median(times['nbdkit curl']);
  console.log(`\nnbdcopy out ${sizeArg} over https (median of ${rounds}):`);
  for (const [name, m] of [['nbdx http', mx], ['nbdkit curl', mk]]) {
    console.log(
      `  ${name.padEnd(12)} ${m.toFixed(2)} s  ${(size / MiB / m).toFixed(1)} MiB/s  [${times[name].map((t) => t.toFixed(2)).join(', ')}]` +
        `  CPU (server + nbdcopy) median ${median(cpu[name]).toFixed(2)} s`,
    );
  }
  console.log(`  throughput ratio nbdx/nbdkit = ${(mk / mx).toFixed(2)}; load average ${load}`);
} finally {
  server?.stdin.end();
  await new Promise((r) => (server ? server.on('exit', r) : r()));
  rmSync(dir, { recursive: true, force: true });
}
