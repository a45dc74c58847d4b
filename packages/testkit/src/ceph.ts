/**
 * A throw-away single-node Ceph cluster for tests: one monitor, one OSD keeping its data in RAM
 * (memstore), and optionally radosgw with an S3 user. No manager, no systemd: the daemons are
 * children of the test process, bound to 127.0.0.1 on free ports, with everything (config,
 * keyring, store, logs, sockets) in one temporary directory, so several test files can each run
 * their own cluster at the same time.
 *
 * The settings that make this fast and reliable here are measured facts (docs: ceph-notes):
 * `ms mon client mode = crc` (radosgw otherwise hangs for minutes wanting a secure monitor
 * session), `paxos propose interval` near zero (map changes are otherwise batched for a second
 * each), small PG counts (radosgw's pools plus a test pool would otherwise hit the PG limit), and
 * `tcp_nodelay=1` on the radosgw frontend (small requests otherwise stall 40 ms).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import { TOOL_ENV, hasTool, needTools, runOk, tmpDir, removeDir } from './tools.js';

export interface CephCluster {
  /** Temporary directory under TMPDIR holding conf, keyring, data, logs (removed by stop). */
  dir: string;
  /** Path of ceph.conf (use with --conf / CEPH_CONF). */
  conf: string;
  /** The monitor's address as `mon_host` / `-m` take it, e.g. "127.0.0.1:PORT". */
  monHost: string;
  /** The admin client's name, "client.admin". */
  client: string;
  /** Path of the keyring holding client.admin's key (a real key even when auth is off). */
  keyring: string;
  /** The radosgw S3 endpoint and a user's keys, when started with `rgw: true`. */
  s3?: { endpoint: string; accessKey: string; secretKey: string; region: 'us-east-1' };
  /** Stop every daemon this cluster started (by pid, waiting for each to exit) and remove `dir`. */
  stop(): Promise<void>;
}

export interface CephOptions {
  /** Also start radosgw with an S3 user (default false). */
  rgw?: boolean;
  /** Pools to create (8 PGs each) and initialise for RBD with `rbd pool init`. */
  pools?: string[];
  /** The OSD's RAM store capacity (default 4 GiB; RAM is only used as data is written). */
  memstoreBytes?: number;
  /**
   * 'none' (default) or 'cephx': with cephx every daemon and client authenticates with the keys
   * in `keyring`, as on a real cluster (for tests of keys, users and permission errors).
   */
  auth?: 'none' | 'cephx';
}

const CORE_PROGRAMS = ['ceph-mon', 'ceph-osd', 'ceph', 'monmaptool', 'rados', 'rbd'];
const RGW_PROGRAMS = ['radosgw', 'radosgw-admin'];

/** The programs a cluster with these options needs. */
export function cephPrograms(opts: { rgw?: boolean } = {}): string[] {
  return opts.rgw ? [...CORE_PROGRAMS, ...RGW_PROGRAMS] : [...CORE_PROGRAMS];
}

/** Whether the Ceph programs are installed (never throws). */
export function hasCeph(opts: { rgw?: boolean } = {}): boolean {
  return cephPrograms(opts).every(hasTool);
}

/** Like needTools: true when Ceph is installed; under CI=true its absence throws (fails the suite). */
export function needCeph(opts: { rgw?: boolean } = {}): boolean {
  return needTools(...cephPrograms(opts));
}

/** Daemons of every cluster still running, killed if the test process exits without stop(). */
const liveDaemons = new Set<ChildProcess>();
const liveDirs = new Set<string>();
let exitHook = false;

function installExitHook(): void {
  if (exitHook) return;
  exitHook = true;
  process.once('exit', () => {
    for (const d of liveDaemons) d.kill('SIGKILL');
    for (const dir of liveDirs) removeDir(dir);
  });
}

/** A TCP port nothing listens on at the moment (the kernel's pick). */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen({ port: 0, host: '127.0.0.1', exclusive: true }, () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

/** A Ceph secret in the keyring's format: base64 of (type 1 = AES, creation time, length 16, key). */
function cephKey(): string {
  const b = Buffer.alloc(12 + 16);
  b.writeUInt16LE(1, 0);
  b.writeUInt32LE(Math.floor(Date.now() / 1000), 2);
  b.writeUInt32LE(0, 6);
  b.writeUInt16LE(16, 10);
  randomBytes(16).copy(b, 12);
  return b.toString('base64');
}

interface Daemon {
  name: string;
  proc: ChildProcess;
  exited: Promise<void>;
  /** The end of its stderr, for error messages. */
  stderr(): string;
}

function startDaemon(name: string, cmd: string, args: string[]): Daemon {
  const proc = spawn(cmd, args, { env: TOOL_ENV, stdio: ['ignore', 'ignore', 'pipe'] });
  liveDaemons.add(proc);
  let err = '';
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => {
    err = (err + d).slice(-8192);
  });
  proc.once('error', (e) => (err += String(e)));
  const exited = new Promise<void>((resolve) =>
    proc.once('exit', () => {
      liveDaemons.delete(proc);
      resolve();
    }),
  );
  return { name, proc, exited, stderr: () => err };
}

function alive(d: Daemon): boolean {
  return d.proc.exitCode === null && d.proc.signalCode === null;
}

/** Poll until `cond` holds; fail early when a daemon dies, naming it and its last words. */
async function until(what: string, cond: () => boolean | Promise<boolean>, daemons: Daemon[], timeoutMs: number, logDir: string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const dead = daemons.find((d) => !alive(d));
    if (dead) throw new Error(`ceph: ${dead.name} exited while waiting for ${what}:\n${dead.stderr()}${logTail(logDir, dead.name)}`);
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`ceph: timed out after ${timeoutMs} ms waiting for ${what}${daemons.map((d) => logTail(logDir, d.name)).join('')}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function logTail(logDir: string, name: string): string {
  try {
    const text = fs.readFileSync(path.join(logDir, `${name}.log`), 'utf8');
    return `\n--- ${name}.log (end) ---\n${text.slice(-3000)}`;
  } catch {
    return '';
  }
}

function fileHas(file: string, needle: string): boolean {
  try {
    return fs.readFileSync(file, 'utf8').includes(needle);
  } catch {
    return false;
  }
}

/** Whether an HTTP server answers at 127.0.0.1:port (any status). */
function httpAnswers(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const req = http.get({ host: '127.0.0.1', port, path: '/', timeout: 2000 }, (res) => {
      res.resume();
      resolve(true);
    });
    req.once('timeout', () => req.destroy());
    req.once('error', () => resolve(false));
  });
}

/**
 * Start a cluster. Resolves once the OSD is up, the pools are created and initialised for RBD, and
 * (with `rgw`) radosgw answers S3 requests for the user in `s3`. On any failure everything started
 * so far is stopped and removed before the error (with the failing daemon's log) is thrown.
 */
export async function startCeph(opts: CephOptions = {}): Promise<CephCluster> {
  const missing = cephPrograms(opts).filter((p) => !hasTool(p));
  if (missing.length) {
    throw new Error(`ceph: missing ${missing.join(', ')} (apt-get install ceph-mon ceph-osd${opts.rgw ? ' radosgw' : ''})`);
  }
  installExitHook();
  const dir = tmpDir('nbdx-ceph-');
  liveDirs.add(dir);
  const daemons: Daemon[] = [];
  const stop = async (): Promise<void> => {
    // The store is in RAM and thrown away: SIGKILL is safe and saves the daemons' 2–6 s shutdown.
    for (const d of daemons) if (alive(d)) d.proc.kill('SIGKILL');
    await Promise.all(daemons.map((d) => d.exited));
    removeDir(dir);
    liveDirs.delete(dir);
  };
  try {
    return await bringUp(dir, daemons, opts, stop);
  } catch (e) {
    await stop();
    throw e;
  }
}

async function bringUp(dir: string, daemons: Daemon[], opts: CephOptions, stop: () => Promise<void>): Promise<CephCluster> {
  const cephx = opts.auth === 'cephx';
  const monPort = await freePort();
  const rgwPort = opts.rgw ? await freePort() : 0;
  const fsid = randomUUID();
  const osdUuid = randomUUID();
  const conf = path.join(dir, 'ceph.conf');
  const keyring = path.join(dir, 'keyring');
  const logDir = path.join(dir, 'log');
  for (const sub of ['mon', 'osd/0', 'run', 'log', 'rgw']) fs.mkdirSync(path.join(dir, sub), { recursive: true });
  const monHost = `127.0.0.1:${monPort}`;
  const auth = cephx ? 'cephx' : 'none';

  fs.writeFileSync(
    conf,
    `[global]
fsid = ${fsid}
mon host = v2:${monHost}
mon initial members = a
public addr = 127.0.0.1
auth cluster required = ${auth}
auth service required = ${auth}
auth client required = ${auth}
auth allow insecure global id reclaim = false
# radosgw otherwise insists on a secure monitor session and hangs (ceph-notes)
ms mon client mode = crc
# commit map changes at once instead of batching them for a second each
paxos propose interval = 0.01
paxos min wait = 0.01
mon osd report timeout = 60
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
osd crush chooseleaf type = 0
client mount timeout = 60
run dir = ${dir}/run
admin socket = ${dir}/run/$name.asok
log file = ${logDir}/$name.log
log to stderr = false
err to stderr = true
keyring = ${keyring}
mon data = ${dir}/mon/$name
osd data = ${dir}/osd/$id
osd objectstore = memstore
memstore device bytes = ${opts.memstoreBytes ?? 4 * 1024 ** 3}
osd op num shards = 2
osd op num threads per shard = 1

[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:${rgwPort} tcp_nodelay=1
rgw data = ${dir}/rgw
rgw dns name = 127.0.0.1
rgw enable usage log = false
`,
  );
  // One keyring serves every daemon and client of the cluster; with auth off it is unused but is
  // still a valid keyring, so clients that insist on a file have one.
  const caps = (mon: string, osd: string) => `\tcaps mon = "${mon}"\n\tcaps osd = "${osd}"\n`;
  fs.writeFileSync(
    keyring,
    `[mon.]\n\tkey = ${cephKey()}\n\tcaps mon = "allow *"\n` +
      `[client.admin]\n\tkey = ${cephKey()}\n${caps('allow *', 'allow *')}\tcaps mds = "allow *"\n\tcaps mgr = "allow *"\n` +
      `[osd.0]\n\tkey = ${cephKey()}\n${caps('allow profile osd', 'allow *')}\tcaps mgr = "allow profile osd"\n` +
      `[client.rgw]\n\tkey = ${cephKey()}\n${caps('allow rw', 'allow rwx')}`,
    { mode: 0o600 },
  );
  const base = ['--conf', conf];

  // The monitor, with every key of the keyring imported at mkfs (so the OSD and radosgw need no
  // further `ceph auth` round trips).
  const monmap = path.join(dir, 'monmap');
  await runOk('monmaptool', ['--create', '--addv', 'a', `[v2:${monHost}]`, '--fsid', fsid, monmap]);
  await runOk('ceph-mon', [...base, '--mkfs', '-i', 'a', '--monmap', monmap, '--keyring', keyring]);
  const mon = startDaemon('mon.a', 'ceph-mon', [...base, '-f', '-i', 'a']);
  daemons.push(mon);

  // One python `ceph` session for every monitor command: each start of it costs seconds when
  // the machine is busy. Registers osd.0 and creates the pools (before the OSD exists: fine).
  const pools = opts.pools ?? [];
  const script = [`osd new ${osdUuid} 0`, ...pools.map((p) => `osd pool create ${p} 8`)].join('\n') + '\n';
  await runOk('ceph', [...base, '--connect-timeout', '60'], { input: script, timeout: 120_000 });
  await runOk('ceph-osd', [...base, '--mkfs', '-i', '0', '--osd-uuid', osdUuid], { timeout: 60_000 });
  const osd = startDaemon('osd.0', 'ceph-osd', [...base, '-f', '-i', '0']);
  daemons.push(osd);
  await until('osd.0 to be up', () => fileHas(path.join(logDir, 'osd.0.log'), 'state: booting -> active'), daemons, 60_000, logDir);

  // `rbd pool init` writes to the pool, so it also waits for the pool's PGs to be active.
  await Promise.all(pools.map((p) => runOk('rbd', [...base, 'pool', 'init', p], { timeout: 60_000 })));

  let s3: CephCluster['s3'];
  if (opts.rgw) {
    const rgw = startDaemon('client.rgw', 'radosgw', [...base, '-f', '-n', 'client.rgw']);
    daemons.push(rgw);
    await until('radosgw to answer HTTP', () => httpAnswers(rgwPort), daemons, 90_000, logDir);
    const accessKey = `NBDX${randomBytes(8).toString('hex').toUpperCase()}`;
    const secretKey = randomBytes(24).toString('base64url');
    await runOk(
      'radosgw-admin',
      [...base, '-n', 'client.admin', 'user', 'create', '--uid=nbdx', '--display-name=nbdx tests', `--access-key=${accessKey}`, `--secret=${secretKey}`],
      { timeout: 60_000 },
    );
    s3 = { endpoint: `http://127.0.0.1:${rgwPort}`, accessKey, secretKey, region: 'us-east-1' };
  }

  return { dir, conf, monHost, client: 'client.admin', keyring, ...(s3 ? { s3 } : {}), stop };
}

/** Pids of the daemons a cluster runs (for tests that check stop() left nothing behind). */
export function cephDaemonPids(cluster: CephCluster): number[] {
  const found: number[] = [];
  for (const d of liveDaemons) {
    const args = d.spawnargs.join(' ');
    if (args.includes(cluster.conf) && d.pid) found.push(d.pid);
  }
  return found;
}
