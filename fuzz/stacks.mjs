/**
 * The server stacks under attack, each a separate nbdx CLI process on its own Unix socket (plus
 * an upstream server where the stack proxies). Every stack serves 64 MiB and holds the same
 * protected region: 1 MiB at 8 MiB whose bytes come from the seed, put there before fuzzing
 * starts (through the server, or into the image file for file-backed stacks).
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as net from 'node:net';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { writeRegion } from './probe.mjs';
import { Rng } from './rng.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
export const NBDX = path.resolve(here, '../packages/nbdx/bin/nbdx.js');
export const ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH}` };
export const SIZE = 64 * 1024 * 1024;
export const REGION = { offset: 8 * 1024 * 1024, length: 1024 * 1024 };

/** The Ceph programs startCeph runs (as @nbdx/testkit's cephPrograms lists them). */
const CEPH = ['ceph-mon', 'ceph-osd', 'ceph', 'monmaptool', 'rados', 'rbd'];
const RGW = ['radosgw', 'radosgw-admin'];

/**
 * name → definition. `args(ctx)` builds the nbdx command line after `-f -U SOCKET`;
 * `image`: a 64 MiB file with the region written into it; `upstream`: a server the stack proxies
 * to ('nbdkit' or 'nbdx' memory 64M, or 'http': the range server serving the image);
 * `service(ctx)`: something bigger started once per stack (a Ceph cluster), resolving to a stop
 * function; `restoreThroughServer`: the stack keeps its own copy of the image's data (a cache),
 * so a damaged region is put back through the server, not behind its back into the file;
 * `extra`: not in the default set (run when named, or with --stack all).
 */
export const STACKS = {
  memory: { describe: 'memory 64M', args: () => ['memory', '64M'] },
  file: { describe: 'file file=IMAGE', image: true, args: (c) => ['file', `file=${c.image}`] },
  nbd: { describe: 'nbd socket=UP (upstream: nbdkit memory 64M)', upstream: 'nbdkit', tools: ['nbdkit'], args: (c) => ['nbd', `socket=${c.upstreamSocket}`] },
  cow: { describe: '--filter=cow file file=IMAGE (the image must never change)', image: true, imageMustNotChange: true, args: (c) => ['--filter=cow', 'file', `file=${c.image}`] },
  shared: { describe: '--filter=shared nbd socket=UP (upstream: nbdx memory 64M)', upstream: 'nbdx', args: (c) => ['--filter=shared', 'nbd', `socket=${c.upstreamSocket}`] },
  readonly: { describe: '-r file file=IMAGE', image: true, readonly: true, immutable: true, imageMustNotChange: true, args: (c) => ['-r', 'file', `file=${c.image}`] },
  tls: { describe: '--tls=on --tls-psk=KEYS memory 64M', tls: 'on', args: (c) => ['--tls=on', `--tls-psk=${c.pskFile}`, 'memory', '64M'] },
  // Filters and plugins added after the first stacks. A writable cache that is small enough to
  // reclaim (16 MiB of a 64 MiB export, in 64 KiB blocks) and keeps what it reads.
  cache: {
    describe: '--filter=cache file file=IMAGE (writeback, cache-max-size=16M, cache-on-read=true)',
    image: true,
    restoreThroughServer: true,
    args: (c) => ['--filter=cache', 'file', `file=${c.image}`, `cachedir=${c.dir}`, 'cache-max-size=16M', 'cache-on-read=true'],
  },
  readahead: { describe: '--filter=readahead file file=IMAGE', image: true, restoreThroughServer: true, args: (c) => ['--filter=readahead', 'file', `file=${c.image}`] },
  retry: { describe: '--filter=retry nbd socket=UP (upstream: nbdkit memory 64M)', upstream: 'nbdkit', tools: ['nbdkit'], args: (c) => ['--filter=retry', 'nbd', `socket=${c.upstreamSocket}`] },
  // The same over an upstream that fails 2 % of data requests with EIO (nbdkit's error filter),
  // so that retries and reopens happen under hostile traffic; short delays keep a retried
  // request well inside the hang timeout (20+40+80+160+320 ms at most). Six failures in a row
  // (2 %^6) are needed before a valid request may fail, so the oracle's rules stand, except
  // the filter's documented EIO on the first flush after a reopen that lost unflushed writes.
  'retry-flaky': {
    describe: '--filter=retry nbd socket=UP retry-delay=20ms (upstream: nbdkit --filter=error memory 64M error=EIO error-rate=2%)',
    upstream: 'nbdkit-flaky',
    tools: ['nbdkit'],
    flushMayFailAfterReopen: true,
    // counted on the server's stderr and printed in the summary, to show the retries happened
    counts: { retries: /\bretry \d+ of \d+ in /, 'given up': /retry: .*giv(?:e|ing) up/i, 'flush EIO after a reopen': /may be lost/ },
    args: (c) => ['--filter=retry', 'nbd', `socket=${c.upstreamSocket}`, 'retry-delay=20ms'],
  },
  'stats-log': {
    describe: '--filter=stats --filter=log memory 64M (report every 500 ms, log file in the stack directory)',
    files: ['stats.txt', 'requests.log'], // their sizes at the end are printed in the summary
    args: (c) => ['--filter=stats', '--filter=log', 'memory', '64M', `statsfile=${c.dir}/stats.txt`, 'statsinterval=500ms', `logfile=${c.dir}/requests.log`],
  },
  http: {
    describe: 'http http://localhost/disk.img (upstream: @nbdx/testkit range server for IMAGE on a Unix socket)',
    image: true,
    upstream: 'http',
    readonly: true,
    immutable: true,
    imageMustNotChange: true,
    args: (c) => ['http', 'http://localhost/disk.img', `unix-socket-path=${c.upstreamSocket}`],
  },
  // The http plugin behind retry, with a server that answers 2 % of GETs with 503 and cuts 2 %
  // half-way through the body: hostile bytes from the remote side, which the plugin must turn
  // into EIO (never short or wrong data) and the filter must hide.
  'http-flaky': {
    describe: '--filter=retry http http://localhost/disk.img retry-delay=20ms (upstream: the range server, 2 % 503s, 2 % bodies cut half-way)',
    image: true,
    upstream: 'http',
    upstreamFaults: { errorRate: 0.02, dropRate: 0.02 },
    readonly: true,
    immutable: true,
    imageMustNotChange: true,
    counts: { retries: /\bretry \d+ of \d+ in /, 'given up': /retry: .*giv(?:e|ing) up/i },
    args: (c) => ['--filter=retry', 'http', 'http://localhost/disk.img', `unix-socket-path=${c.upstreamSocket}`, 'retry-delay=20ms'],
  },
  s3: {
    describe: 's3 prefix=fuzz/ size=64M object-size=256K write-buffer=8M (radosgw on a throw-away Ceph cluster)',
    tools: [...CEPH, ...RGW],
    extra: true,
    service: startS3,
    args: (c) => ['s3', `endpoint=${c.s3.endpoint}`, 'bucket=fuzz', 'prefix=fuzz/', 'size=64M', 'object-size=256K', 'write-buffer=8M', `access-key=${c.s3.accessKey}`, `secret-key=+${c.dir}/s3-secret`],
  },
  rbd: {
    describe: 'rbd rbd/fuzz (a 64 MiB image on a throw-away Ceph cluster, memstore OSD)',
    tools: CEPH,
    extra: true,
    service: startRbd,
    args: (c) => ['rbd', 'rbd/fuzz', `conf=${c.ceph.conf}`],
  },
  // Not nbdx: nbdkit itself, to calibrate the oracle (a finding here is first suspected to be
  // the fuzzer's). Only run when named with --stack.
  'nbdkit-reference': { describe: 'nbdkit memory 64M (calibration, not nbdx)', reference: true, tools: ['nbdkit'], command: 'nbdkit', args: () => ['memory', '64M'] },
};

/** The stacks a run covers unless --stack names others. */
export const DEFAULT_STACKS = Object.keys(STACKS).filter((n) => !STACKS[n].reference && !STACKS[n].extra);
/** `--stack all`: every nbdx stack, the extra ones too (not the nbdkit reference). */
export const ALL_STACKS = Object.keys(STACKS).filter((n) => !STACKS[n].reference);

/** @nbdx/testkit's Ceph bring-up, loaded only by the stacks that need it. */
const loadCeph = () => import('@nbdx/testkit/ceph');

/** A Ceph cluster with radosgw, and the bucket the s3 stack's disk lives in. */
async function startS3(ctx) {
  const { startCeph } = await loadCeph();
  const ceph = await startCeph({ rgw: true, memstoreBytes: 1024 ** 3 });
  try {
    ctx.s3 = ceph.s3;
    fs.writeFileSync(path.join(ctx.dir, 's3-secret'), `${ceph.s3.secretKey}\n`, { mode: 0o600 });
    // The SDK is the s3 plugin's dependency, not the workspace root's: resolve it from there.
    const sdkPath = createRequire(path.resolve(here, '../packages/plugin-s3/package.json')).resolve('@aws-sdk/client-s3');
    const { S3Client, CreateBucketCommand } = await import(pathToFileURL(sdkPath).href);
    const s3 = new S3Client({
      endpoint: ceph.s3.endpoint,
      region: ceph.s3.region,
      forcePathStyle: true,
      credentials: { accessKeyId: ceph.s3.accessKey, secretAccessKey: ceph.s3.secretKey },
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    });
    try {
      await s3.send(new CreateBucketCommand({ Bucket: 'fuzz' }));
    } finally {
      s3.destroy();
    }
  } catch (err) {
    await ceph.stop();
    throw err;
  }
  return () => ceph.stop();
}

/** A Ceph cluster with an `rbd` pool holding the 64 MiB image `fuzz`. */
async function startRbd(ctx) {
  const { startCeph } = await loadCeph();
  const ceph = await startCeph({ pools: ['rbd'], memstoreBytes: 1024 ** 3 });
  ctx.ceph = ceph;
  const r = spawnSync('rbd', ['--conf', ceph.conf, 'create', '--size', '64M', 'rbd/fuzz'], { env: ENV, encoding: 'utf8', timeout: 60000 });
  if (r.status !== 0) {
    await ceph.stop();
    throw new Error(`rbd create failed (${r.status ?? r.signal}): ${r.stderr}`);
  }
  return () => ceph.stop();
}

export function hasTool(name) {
  return spawnSync('sh', ['-c', `command -v ${name}`], { env: ENV }).status === 0;
}

/** Lines on a server's stderr that mean an exception escaped somewhere it should not. */
const INTERNAL_ERROR = /internal error|TypeError|RangeError|ReferenceError|SyntaxError|AssertionError|Unhandled|uncaught|FATAL|heap out of memory|Maximum call stack/i;

/** Every server started, so that an interrupted run does not leave any behind. */
const running = new Set();
const stopAll = () => {
  for (const p of running) p.child?.kill('SIGKILL');
};
process.on('exit', stopAll);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.once(sig, () => (stopAll(), process.exit(130)));

/** One server process; remembers how it ended and what it said. (--exit-with-parent as well.) */
class ServerProcess {
  constructor(label, cmd, args, socket, protocol = 'nbd') {
    this.label = label;
    this.cmd = cmd;
    this.args = args;
    this.socket = socket;
    this.protocol = protocol;
    this.stderrTail = [];
    this.internalErrors = [];
    this.exit = null;
    /** name → pattern: stderr lines counted (the stack's `counts`), name → count in `counted`. */
    this.countPatterns = {};
    this.counted = {};
  }

  async start() {
    fs.rmSync(this.socket, { force: true });
    this.exit = null;
    this.child = spawn(this.cmd, this.args, { env: ENV, stdio: ['ignore', 'ignore', 'pipe'] });
    this.pid = this.child.pid;
    running.add(this);
    let partial = '';
    this.child.stderr.on('data', (d) => {
      const lines = (partial + d.toString()).split('\n');
      partial = lines.pop();
      for (const l of lines) {
        this.stderrTail.push(l);
        if (this.stderrTail.length > 50) this.stderrTail.shift();
        for (const [name, re] of Object.entries(this.countPatterns)) if (re.test(l)) this.counted[name] = (this.counted[name] ?? 0) + 1;
        if (INTERNAL_ERROR.test(l)) {
          this.internalErrors.push({ line: l, at: Date.now() });
          this.onInternalError?.(l);
        }
      }
    });
    this.exited = new Promise((resolve) => this.child.on('exit', (code, signal) => {
      running.delete(this);
      this.exit = { code, signal, at: Date.now() };
      resolve(this.exit);
    }));
    await waitReady(this.socket, this);
  }

  get alive() {
    return this.exit === null;
  }

  async stop() {
    if (!this.child || !this.alive) return;
    this.child.kill('SIGTERM');
    const t = setTimeout(() => this.child.kill('SIGKILL'), 5000);
    await this.exited;
    clearTimeout(t);
  }

  /** Resident set size in KiB, from /proc (null once gone). */
  rssKiB() {
    try {
      const m = /VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${this.pid}/status`, 'utf8'));
      return m ? Number(m[1]) : null;
    } catch {
      return null;
    }
  }
}

/**
 * Ready = accepts a connection and sends the 18-byte greeting (NBD), or answers a HEAD of the
 * image with 200 (the http stack's upstream).
 */
async function waitReady(socket, proc) {
  const t0 = Date.now();
  for (;;) {
    if (proc.exit) throw new Error(`${proc.label} exited during start-up (${JSON.stringify(proc.exit)}): ${proc.stderrTail.join('\n')}`);
    if (Date.now() - t0 > 20000) throw new Error(`${proc.label} did not start within 20 s: ${proc.stderrTail.join('\n')}`);
    if (fs.existsSync(socket)) {
      const ok = await new Promise((resolve) => {
        const s = net.createConnection(socket);
        let got = Buffer.alloc(0);
        const done = (v) => (s.destroy(), resolve(v));
        if (proc.protocol === 'http') s.write('HEAD /disk.img HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n');
        s.on('data', (d) => {
          got = Buffer.concat([got, d]);
          if (proc.protocol === 'http') {
            if (got.includes('\r\n')) done(/^HTTP\/1\.1 200 /.test(got.toString('latin1')));
          } else if (got.length >= 18) done(true);
        });
        s.on('error', () => done(false));
        setTimeout(() => done(false), 2000);
      });
      if (ok) return;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The tools a stack needs that this machine lacks (without creating the stack's directory). */
export function missingTools(name) {
  return (STACKS[name].tools ?? []).filter((t) => !hasTool(t));
}

export class Stack {
  /**
   * @param {string} name key of STACKS
   * @param {string} dir private temporary directory
   * @param {string|number} seed the run's seed (the region's bytes derive from it)
   */
  constructor(name, dir, seed) {
    this.name = name;
    this.def = STACKS[name];
    this.dir = path.join(dir, name);
    fs.mkdirSync(this.dir, { recursive: true });
    this.socket = path.join(this.dir, 'nbdx.sock');
    this.regionBytes = new Rng(`${seed}/region`).bytes(REGION.length);
    this.ctx = { dir: this.dir, image: path.join(this.dir, 'disk.img'), upstreamSocket: path.join(this.dir, 'upstream.sock'), pskFile: path.join(this.dir, 'keys.psk') };
    this.psk = randomBytes(32);
    this.restarts = 0;
  }

  /** What sessions and the oracle need to know about this stack. */
  get profile() {
    return {
      size: SIZE,
      region: { ...REGION, bytes: this.regionBytes },
      tls: this.def.tls ?? 'off',
      readonly: !!this.def.readonly,
      immutable: !!this.def.immutable,
      // [nbdx] filter-retry: a flush after a reopen that may have lost unflushed writes fails with EIO once
      flushMayFailAfterReopen: !!this.def.flushMayFailAfterReopen,
      // nbdx's --max-options default: after this many options a hang-up is allowed (DoS rule)
      maxOptions: 32,
      // the longest option data nbdx reads (64 KiB) before ERR_TOO_BIG and a hang-up
      maxOptionLength: 65536,
    };
  }

  /** Options for tls.connect on a socket after STARTTLS (PSK, as the server is configured). */
  get tlsClient() {
    if (!this.def.tls) return null;
    return {
      pskCallback: () => ({ psk: this.psk, identity: 'fuzz' }),
      ciphers: 'PSK',
      minVersion: 'TLSv1.2',
      maxVersion: 'TLSv1.2',
      checkServerIdentity: () => undefined,
    };
  }

  missingTools() {
    return missingTools(this.name);
  }

  async start() {
    if (this.def.image) {
      // sparse 64 MiB with the region written into it; its hash is kept to prove it never changes
      const fd = fs.openSync(this.ctx.image, 'w');
      fs.ftruncateSync(fd, SIZE);
      fs.writeSync(fd, this.regionBytes, 0, this.regionBytes.length, REGION.offset);
      fs.closeSync(fd);
      this.imageStat = fs.statSync(this.ctx.image);
    }
    if (this.def.tls) fs.writeFileSync(this.ctx.pskFile, `fuzz:${this.psk.toString('hex')}\n`);
    if (this.def.service) this.stopService = await this.def.service(this.ctx);
    if (this.def.upstream) {
      const up = this.ctx.upstreamSocket;
      if (this.def.upstream === 'nbdkit') this.upstream = new ServerProcess('upstream nbdkit', 'nbdkit', ['-f', '--exit-with-parent', '-U', up, 'memory', '64M'], up);
      else if (this.def.upstream === 'nbdkit-flaky') this.upstream = new ServerProcess('upstream nbdkit', 'nbdkit', ['-f', '--exit-with-parent', '-U', up, '--filter=error', 'memory', '64M', 'error=EIO', 'error-rate=2%'], up);
      else if (this.def.upstream === 'nbdx') this.upstream = new ServerProcess('upstream nbdx', process.execPath, [NBDX, '-f', '--exit-with-parent', '-U', up, 'memory', '64M'], up);
      else {
        const faults = this.def.upstreamFaults ? [JSON.stringify(this.def.upstreamFaults)] : [];
        this.upstream = new ServerProcess('upstream http', process.execPath, [path.join(here, 'http-upstream.mjs'), this.ctx.image, up, ...faults], up, 'http');
      }
      await this.upstream.start();
    }
    this.server = this.def.command === 'nbdkit'
      ? new ServerProcess(`nbdkit ${this.name}`, 'nbdkit', ['-f', '--exit-with-parent', '-U', this.socket, ...this.def.args(this.ctx)], this.socket)
      : new ServerProcess(`nbdx ${this.name}`, process.execPath, [NBDX, '-f', '--exit-with-parent', '-U', this.socket, ...this.def.args(this.ctx)], this.socket);
    this.server.countPatterns = this.def.counts ?? {};
    await this.server.start();
    if (!this.def.image) await writeRegion(this.socket, REGION.offset, this.regionBytes);
  }

  /** After a crash: a fresh server (and the region again, where it lived in the dead process). */
  async restart() {
    this.restarts++;
    await this.server.stop();
    if (this.upstream && !this.upstream.alive) await this.upstream.start();
    await this.server.start();
    if (!this.def.image) await writeRegion(this.socket, REGION.offset, this.regionBytes);
  }

  /** Put the region back after a check found it damaged, so later checks mean something. */
  async restoreRegion() {
    if (this.def.image && this.def.imageMustNotChange) return; // the image itself must be intact
    if (this.def.image && !this.def.restoreThroughServer) {
      const fd = fs.openSync(this.ctx.image, 'r+');
      fs.writeSync(fd, this.regionBytes, 0, this.regionBytes.length, REGION.offset);
      fs.closeSync(fd);
      return;
    }
    await writeRegion(this.socket, REGION.offset, this.regionBytes);
  }

  /**
   * For every image-backed stack, once the server has stopped (a cache has written back what it
   * held by then): is the region in the file as it was put there? Null when fine or no image.
   */
  imageRegionAfterStop() {
    if (!this.def.image) return null;
    const buf = this.imageRegion();
    if (buf.equals(this.regionBytes)) return null;
    let i = 0;
    while (buf[i] === this.regionBytes[i]) i++;
    return `after the server stopped, the image file's protected region differs at offset ${REGION.offset + i}`;
  }

  /** The protected region's bytes as the image file holds them now. */
  imageRegion() {
    const buf = Buffer.alloc(REGION.length);
    const fd = fs.openSync(this.ctx.image, 'r');
    try {
      fs.readSync(fd, buf, 0, buf.length, REGION.offset);
    } finally {
      fs.closeSync(fd);
    }
    return buf;
  }

  /** For stacks that must never write their image: did they? */
  imageChanged() {
    if (!this.def.imageMustNotChange) return null;
    const buf = this.imageRegion();
    const st = fs.statSync(this.ctx.image);
    if (!buf.equals(this.regionBytes)) return 'the protected region of the image file changed';
    if (st.size !== SIZE) return `the image file size changed to ${st.size}`;
    if (st.mtimeMs !== this.imageStat.mtimeMs) return 'the image file was modified (mtime changed)';
    return null;
  }

  /** Does the server accept a connection and greet within `ms`? */
  async acceptsWithin(ms) {
    return new Promise((resolve) => {
      const s = net.createConnection(this.socket);
      let got = 0;
      const done = (v) => (clearTimeout(t), s.destroy(), resolve(v));
      const t = setTimeout(() => done(false), ms);
      s.on('data', (d) => ((got += d.length), got >= 18 && done(true)));
      s.on('error', () => done(false));
    });
  }

  /** name → size in bytes of the stack's `files` (what its filters wrote), -1 when missing. */
  fileSizes() {
    const out = {};
    for (const f of this.def.files ?? []) {
      try {
        out[f] = fs.statSync(path.join(this.dir, f)).size;
      } catch {
        out[f] = -1;
      }
    }
    return out;
  }

  processes() {
    return [this.server, this.upstream].filter(Boolean);
  }

  async stop() {
    await this.server?.stop();
    await this.upstream?.stop();
    const stopService = this.stopService;
    this.stopService = null;
    await stopService?.();
  }
}
