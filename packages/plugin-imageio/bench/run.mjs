#!/usr/bin/env node
/**
 * nbdcopy 1 GiB in and out of the test imageio server (its own process, HTTPS plus an abstract
 * local socket, like an oVirt host's daemon), through:
 *   - nbdx      this package (dist/), as `nbdx imageio`;
 *   - before    optional (--before REF): the plugin as it was at git REF, bundled from that
 *               commit's src/ (to measure a change on the same machine, same minute);
 *   - v2v       optional (--v2v FILE): virt-v2v's ovirt-upload-plugin.py under
 *               `nbdkit --threads 8 python` (the reference; needs nbdkit-plugin-python).
 * Each over the URL's HTTPS (nbdx unix-socket=never, v2v is_ovirt_host=false) and over the
 * local socket (nbdx unix-socket=auto, v2v is_ovirt_host=true).
 *
 * Workloads, in this order on one image: random-in (random data → imageio), random-out
 * (imageio → null:), sparse-in (sparse random data, 10% data), sparse-out.
 *
 * The data for the "-in" workloads comes from files made once, before the first round, from
 * nbdkit's random and sparse-random plugins (--source file, the default). Generating the data
 * while copying (--source nbdkit) costs nbdkit about 4.5 CPU-s per GiB of random data, more than
 * the NBD server and the imageio server together: on a 2-core machine that generator, shared by
 * every implementation, was what limited the writes. Before the first round the image is also
 * written once, untimed, so that no measured run pays for the test server's first touch of its
 * memory.
 *
 * Each run also starts with an untimed copy of the first --warm bytes (default 64M; 0 turns it
 * off) through the freshly started NBD server, the same data the run then copies: 1 GiB is
 * short enough that compiling the hot paths (Node's JIT) would otherwise count in the figures,
 * while a real conversion copies many GiB per process.
 *
 * Measured per run: wall time, CPU seconds of the NBD server process (nbdx's node or nbdkit;
 * utime+stime from /proc) and of the test imageio server, both per GiB copied; the load average.
 *
 *   node packages/plugin-imageio/bench/run.mjs [--size 1G] [--rounds N] [--before REF]
 *        [--v2v /path/ovirt-upload-plugin.py] [--transports https,unix]
 *        [--workloads random-in,random-out,sparse-in,sparse-out] [--source file|nbdkit] [--warm 64M]
 *        [--json FILE]
 *
 * Needs: the built CLI and this package built (pnpm build), nbdcopy, nbdkit (random,
 * sparse-random), openssl; Node.js 22+ for the abstract socket.
 */
import { execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const pkg = path.resolve(here, '..');
const root = path.resolve(pkg, '../..');
const NBDX = path.join(root, 'packages/nbdx/bin/nbdx.js');
const ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH}`, COREPACK_INTEGRITY_KEYS: '0' };
const TICK = 100; // USER_HZ: /proc/PID/stat counts CPU time in 1/100 s on Linux

const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const size = opt('--size', '1G');
const bytes = parseBytes(size);
const rounds = Number(opt('--rounds', '1'));
const before = opt('--before');
const v2v = opt('--v2v');
const transports = opt('--transports', 'https,unix').split(',');
const ORDER = ['random-in', 'random-out', 'sparse-in', 'sparse-out'];
// Always in this order: an "-out" reads what the "-in" before it wrote (an image never written
// is all zero, and block status would skip it).
const workloads = opt('--workloads', ORDER.join(','))
  .split(',')
  .sort((a, b) => ORDER.indexOf(a) - ORDER.indexOf(b));
for (const w of workloads) {
  if (!ORDER.includes(w)) throw new Error(`unknown workload ${w} (${ORDER.join(', ')})`);
  if (w.endsWith('-out') && !workloads.includes(w.replace(/-out$/, '-in'))) {
    console.warn(`${w} without ${w.replace(/-out$/, '-in')}: reads whatever the image holds`);
  }
}
const jsonOut = opt('--json');
const source = opt('--source', 'file');
if (source !== 'file' && source !== 'nbdkit') throw new Error(`--source must be file or nbdkit, not ${source}`);
const warm = opt('--warm', '64M') === '0' ? 0 : parseBytes(opt('--warm', '64M'));

function parseBytes(s) {
  const m = /^(\d+)([KMGT]?)$/i.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  return Number(m[1]) * 1024 ** ' KMGT'.indexOf((m[2] || ' ').toUpperCase());
}

function cpuSeconds(pid) {
  // Fields after the command name (which may hold spaces): utime is the 14th field overall.
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / TICK;
}

const build = path.join(here, '.build');
const tsup = (entry, outDir) =>
  execFileSync(
    'npx',
    ['tsup', entry, '--no-config', '--format', 'esm', '--target', 'node22', '-d', outDir, '--silent', '--external', 'undici', '--external', '@nbdx/server'],
    { cwd: pkg, stdio: 'inherit', env: ENV },
  );

// The test server (TypeScript, not in dist) bundled into bench/.build.
tsup('bench/test-server-main.ts', path.join(build, 'server'));

// The plugin at --before REF: its src/ from git, bundled next to this package's node_modules
// (older versions import undici, kept as a devDependency for this).
let beforePlugin = null;
if (before) {
  const src = path.join(build, `before-src`);
  fs.rmSync(src, { recursive: true, force: true });
  fs.mkdirSync(src, { recursive: true });
  const files = execFileSync('git', ['ls-tree', '--name-only', `${before}:packages/plugin-imageio/src`], { cwd: root, encoding: 'utf8' })
    .split('\n')
    .filter((f) => f.endsWith('.ts') && !f.endsWith('.test.ts'));
  for (const f of files) {
    fs.writeFileSync(path.join(src, f), execFileSync('git', ['show', `${before}:packages/plugin-imageio/src/${f}`], { cwd: root }));
  }
  tsup(path.join(src, 'index.ts'), path.join(build, 'before'));
  beforePlugin = path.join(build, 'before', 'index.js');
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-imageio-bench-'));
const children = new Set();
async function cleanup() {
  for (const c of children) c.kill('SIGKILL');
  fs.rmSync(tmp, { recursive: true, force: true });
}
process.on('SIGINT', () => void cleanup().then(() => process.exit(130)));
// A failed step (an nbdcopy that exits non-zero) must not leave servers or files behind.
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
  fs.rmSync(tmp, { recursive: true, force: true });
});

// A CA-signed certificate, as on a real host; the NBD servers skip verification (insecure).
const f = (n) => path.join(tmp, n);
const quiet = { stdio: 'ignore' };
execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=bench CA', '-keyout', f('ca.key'), '-out', f('ca.pem')], quiet);
execFileSync('openssl', ['req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost', '-keyout', f('key.pem'), '-out', f('csr.pem')], quiet);
fs.writeFileSync(f('ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
execFileSync('openssl', ['x509', '-req', '-in', f('csr.pem'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial', '-days', '1', '-extfile', f('ext.cnf'), '-out', f('cert.pem')], quiet);

const abstract = `@/nbdx-bench/imageio-${process.pid}`;
const server = spawn(
  process.execPath,
  [path.join(build, 'server/test-server-main.js'), '--size', size, '--tls', `${f('key.pem')},${f('cert.pem')}`, '--unix', abstract],
  { env: ENV, stdio: ['ignore', 'pipe', 'inherit'] },
);
children.add(server);
const [line] = await once(server.stdout, 'data');
const url = String(line).trim();

async function waitForSocket(p, child) {
  for (let i = 0; i < 600; i++) {
    if (fs.existsSync(p)) return;
    if (child.exitCode !== null) throw new Error(`NBD server exited with ${child.exitCode}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`no socket ${p}`);
}

/** Start an NBD server for one implementation/transport; returns { child, uri }. */
async function startNbd(impl, transport) {
  const sock = f(`nbd-${impl}-${transport}.sock`);
  fs.rmSync(sock, { force: true });
  let child;
  if (impl === 'v2v') {
    child = spawn(
      'nbdkit',
      ['-f', '-U', sock, '--threads', '8', 'python', v2v, `url=${url}`, 'insecure=true', `size=${bytes}`, `is_ovirt_host=${transport === 'unix'}`],
      { env: ENV, stdio: ['ignore', 'ignore', 'inherit'] },
    );
  } else {
    const plugin = impl === 'before' ? beforePlugin : 'imageio';
    const socket = transport === 'unix' ? 'auto' : 'never';
    child = spawn(process.execPath, [NBDX, '-f', '-U', sock, plugin, `url=${url}`, 'insecure=true', `unix-socket=${socket}`], {
      env: ENV,
      stdio: ['ignore', 'ignore', 'inherit'],
    });
  }
  children.add(child);
  await waitForSocket(sock, child);
  return { child, uri: `nbd+unix:///?socket=${sock}`, sock };
}

const generator = (workload) => (workload.startsWith('random') ? ['random', size] : ['sparse-random', size, 'seed=1']);
const sourceFile = (workload) => f(`${workload.replace(/-(in|out)$/, '')}.img`);

function copyArgs(workload, uri) {
  if (workload.endsWith('-in')) {
    if (source === 'file') return ['--flush', sourceFile(workload), uri];
    return ['--flush', '--', '[', 'nbdkit', '-r', ...generator(workload), ']', uri];
  }
  return [uri, 'null:'];
}

/** The untimed start of a run: the first `warm` bytes of what the run copies. */
function warmArgs(workload, uri, socket) {
  const cut = (plugin) => ['nbdkit', '-r', '--filter=truncate', ...plugin, `truncate=${warm}`];
  if (workload.endsWith('-out')) return ['--', '[', ...cut(['nbd', `socket=${socket}`]), ']', 'null:'];
  return ['--', '[', ...cut(source === 'file' ? ['file', sourceFile(workload)] : generator(workload)), ']', uri];
}

// The source files (sparse where the generator reports holes: nbdcopy punches them).
if (source === 'file') {
  for (const w of workloads.filter((x) => x.endsWith('-in'))) {
    execFileSync('nbdcopy', ['--', '[', 'nbdkit', '-r', ...generator(w), ']', sourceFile(w)], { env: ENV, stdio: 'inherit' });
  }
}
// Untimed warm-up: one write of the whole image through nbdx over HTTPS.
{
  const nbd = await startNbd('nbdx', 'https');
  const from = fs.existsSync(sourceFile('random-in')) ? [sourceFile('random-in')] : ['--', '[', 'nbdkit', '-r', ...generator('random-in'), ']'];
  execFileSync('nbdcopy', ['--flush', ...from, nbd.uri], { env: ENV, stdio: 'inherit' });
  nbd.child.kill('SIGTERM');
  await once(nbd.child, 'exit');
  children.delete(nbd.child);
}

const impls = ['nbdx', ...(before ? ['before'] : []), ...(v2v ? ['v2v'] : [])];
const results = [];
const gib = bytes / 2 ** 30;
for (let round = 1; round <= rounds; round++) {
  for (const transport of transports) {
    for (const impl of impls) {
      for (const workload of workloads) {
        const nbd = await startNbd(impl, transport);
        if (warm > 0) execFileSync('nbdcopy', warmArgs(workload, nbd.uri, nbd.sock), { env: ENV, stdio: 'inherit' });
        const cpu0 = cpuSeconds(nbd.child.pid);
        const srv0 = cpuSeconds(server.pid);
        const t0 = process.hrtime.bigint();
        execFileSync('nbdcopy', copyArgs(workload, nbd.uri), { env: ENV, stdio: 'inherit' });
        const secs = Number(process.hrtime.bigint() - t0) / 1e9;
        const cpu = cpuSeconds(nbd.child.pid) - cpu0;
        const srv = cpuSeconds(server.pid) - srv0;
        nbd.child.kill('SIGTERM');
        await once(nbd.child, 'exit');
        children.delete(nbd.child);
        const r = {
          round,
          transport,
          impl,
          workload,
          seconds: +secs.toFixed(2),
          mibPerS: Math.round(bytes / 2 ** 20 / secs),
          nbdCpuPerGiB: +(cpu / gib).toFixed(2),
          serverCpuPerGiB: +(srv / gib).toFixed(2),
          load: os.loadavg()[0].toFixed(1),
        };
        results.push(r);
        console.log(
          `${transport.padEnd(5)} ${impl.padEnd(6)} ${workload.padEnd(10)} ${String(r.seconds).padStart(6)} s ${String(r.mibPerS).padStart(5)} MiB/s` +
            `  NBD server ${r.nbdCpuPerGiB.toFixed(2)} CPU-s/GiB  imageio server ${r.serverCpuPerGiB.toFixed(2)} CPU-s/GiB  load ${r.load}`,
        );
      }
    }
  }
}
server.kill('SIGTERM');
await once(server, 'exit');
children.delete(server);
await cleanup();
if (jsonOut) fs.writeFileSync(jsonOut, `${JSON.stringify({ size, date: new Date().toISOString(), results }, null, 2)}\n`);
