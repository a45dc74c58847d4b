// ../testkit/src/ceph.ts
import { spawn as spawn2 } from "child_process";
import { randomBytes, randomUUID } from "crypto";
import * as fs2 from "fs";
import * as http from "http";
import * as net2 from "net";
import * as path2 from "path";

// ../testkit/src/tools.ts
import { execFile, spawn } from "child_process";
import * as fs from "fs";
import * as net from "net";
import * as os from "os";
import * as path from "path";
import { fileURLToPath } from "url";
var TOOL_ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH ?? ""}` };
function hasTool(name) {
  return TOOL_ENV.PATH.split(":").some((d) => {
    if (!d) return false;
    try {
      fs.accessSync(path.join(d, name), fs.constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}
function needTools(...names) {
  const missing = names.filter((n) => !hasTool(n));
  if (missing.length && process.env.CI === "true") {
    throw new Error(`required tools missing under CI: ${missing.join(", ")}`);
  }
  return missing.length === 0;
}
function run(cmd, args, opts = {}) {
  return new Promise((resolve, reject) => {
    const child = execFile(
      cmd,
      args,
      {
        cwd: opts.cwd,
        env: opts.env ? { ...TOOL_ENV, ...opts.env } : TOOL_ENV,
        timeout: opts.timeout ?? 6e4,
        maxBuffer: 256 * 1024 * 1024,
        encoding: "buffer"
      },
      (err, stdout, stderr) => {
        const out = opts.encoding === "buffer" ? stdout : stdout.toString();
        if (!err) return resolve({ code: 0, stdout: out, stderr: stderr.toString() });
        const e = err;
        if (typeof e.code === "number") return resolve({ code: e.code, stdout: out, stderr: stderr.toString() });
        if (typeof e.code !== "string" && e.signal) {
          const code = 128 + (os.constants.signals[e.signal] ?? 0);
          return resolve({ code, signal: e.signal, stdout: out, stderr: stderr.toString() });
        }
        reject(new Error(`${cmd}: ${e.message}`, { cause: err }));
      }
    );
    if (opts.input !== void 0) child.stdin.end(opts.input);
  });
}
async function runOk(cmd, args, opts = {}) {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.code}):
${r.stderr}${r.stdout.toString()}`);
  return opts.encoding === "buffer" ? r.stdout : r.stdout.toString();
}
function tmpDir(prefix = "nbdx-test-", base = os.tmpdir()) {
  return fs.mkdtempSync(path.join(base, prefix));
}
function removeDir(dir) {
  fs.rmSync(dir, { recursive: true, force: true });
}

// ../testkit/src/ceph.ts
var CORE_PROGRAMS = ["ceph-mon", "ceph-osd", "ceph", "monmaptool", "rados", "rbd"];
var RGW_PROGRAMS = ["radosgw", "radosgw-admin"];
function cephPrograms(opts = {}) {
  return opts.rgw ? [...CORE_PROGRAMS, ...RGW_PROGRAMS] : [...CORE_PROGRAMS];
}
function hasCeph(opts = {}) {
  return cephPrograms(opts).every(hasTool);
}
function needCeph(opts = {}) {
  return needTools(...cephPrograms(opts));
}
var liveDaemons = /* @__PURE__ */ new Set();
var liveDirs = /* @__PURE__ */ new Set();
var exitHook = false;
function installExitHook() {
  if (exitHook) return;
  exitHook = true;
  process.once("exit", () => {
    for (const d of liveDaemons) d.kill("SIGKILL");
    for (const dir of liveDirs) removeDir(dir);
  });
}
function freePort() {
  return new Promise((resolve, reject) => {
    const s = net2.createServer();
    s.once("error", reject);
    s.listen({ port: 0, host: "127.0.0.1", exclusive: true }, () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}
function cephKey() {
  const b = Buffer.alloc(12 + 16);
  b.writeUInt16LE(1, 0);
  b.writeUInt32LE(Math.floor(Date.now() / 1e3), 2);
  b.writeUInt32LE(0, 6);
  b.writeUInt16LE(16, 10);
  randomBytes(16).copy(b, 12);
  return b.toString("base64");
}
function startDaemon(name, cmd, args) {
  const proc = spawn2(cmd, args, { env: TOOL_ENV, stdio: ["ignore", "ignore", "pipe"] });
  liveDaemons.add(proc);
  let err = "";
  proc.stderr.setEncoding("utf8").on("data", (d) => {
    err = (err + d).slice(-8192);
  });
  proc.once("error", (e) => err += String(e));
  const exited = new Promise(
    (resolve) => proc.once("exit", () => {
      liveDaemons.delete(proc);
      resolve();
    })
  );
  return { name, proc, exited, stderr: () => err };
}
function alive(d) {
  return d.proc.exitCode === null && d.proc.signalCode === null;
}
async function until(what, cond, daemons, timeoutMs, logDir) {
  const deadline = Date.now() + timeoutMs;
  for (; ; ) {
    const dead = daemons.find((d) => !alive(d));
    if (dead) throw new Error(`ceph: ${dead.name} exited while waiting for ${what}:
${dead.stderr()}${logTail(logDir, dead.name)}`);
    if (await cond()) return;
    if (Date.now() > deadline) throw new Error(`ceph: timed out after ${timeoutMs} ms waiting for ${what}${daemons.map((d) => logTail(logDir, d.name)).join("")}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
function logTail(logDir, name) {
  try {
    const text = fs2.readFileSync(path2.join(logDir, `${name}.log`), "utf8");
    return `
--- ${name}.log (end) ---
${text.slice(-3e3)}`;
  } catch {
    return "";
  }
}
function fileHas(file, needle) {
  try {
    return fs2.readFileSync(file, "utf8").includes(needle);
  } catch {
    return false;
  }
}
function httpAnswers(port) {
  return new Promise((resolve) => {
    const req = http.get({ host: "127.0.0.1", port, path: "/", timeout: 2e3 }, (res) => {
      res.resume();
      resolve(true);
    });
    req.once("timeout", () => req.destroy());
    req.once("error", () => resolve(false));
  });
}
async function startCeph(opts = {}) {
  const missing = cephPrograms(opts).filter((p) => !hasTool(p));
  if (missing.length) {
    throw new Error(`ceph: missing ${missing.join(", ")} (apt-get install ceph-mon ceph-osd${opts.rgw ? " radosgw" : ""})`);
  }
  installExitHook();
  const dir = tmpDir("nbdx-ceph-");
  liveDirs.add(dir);
  const daemons = [];
  const stop = async () => {
    for (const d of daemons) if (alive(d)) d.proc.kill("SIGKILL");
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
async function bringUp(dir, daemons, opts, stop) {
  const cephx = opts.auth === "cephx";
  const monPort = await freePort();
  const rgwPort = opts.rgw ? await freePort() : 0;
  const fsid = randomUUID();
  const osdUuid = randomUUID();
  const conf = path2.join(dir, "ceph.conf");
  const keyring = path2.join(dir, "keyring");
  const logDir = path2.join(dir, "log");
  for (const sub of ["mon", "osd/0", "run", "log", "rgw"]) fs2.mkdirSync(path2.join(dir, sub), { recursive: true });
  const monHost = `127.0.0.1:${monPort}`;
  const auth = cephx ? "cephx" : "none";
  fs2.writeFileSync(
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
`
  );
  const caps = (mon2, osd2) => `	caps mon = "${mon2}"
	caps osd = "${osd2}"
`;
  fs2.writeFileSync(
    keyring,
    `[mon.]
	key = ${cephKey()}
	caps mon = "allow *"
[client.admin]
	key = ${cephKey()}
${caps("allow *", "allow *")}	caps mds = "allow *"
	caps mgr = "allow *"
[osd.0]
	key = ${cephKey()}
${caps("allow profile osd", "allow *")}	caps mgr = "allow profile osd"
[client.rgw]
	key = ${cephKey()}
${caps("allow rw", "allow rwx")}`,
    { mode: 384 }
  );
  const base = ["--conf", conf];
  const monmap = path2.join(dir, "monmap");
  await runOk("monmaptool", ["--create", "--addv", "a", `[v2:${monHost}]`, "--fsid", fsid, monmap]);
  await runOk("ceph-mon", [...base, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring]);
  const mon = startDaemon("mon.a", "ceph-mon", [...base, "-f", "-i", "a"]);
  daemons.push(mon);
  const pools = opts.pools ?? [];
  const script = [`osd new ${osdUuid} 0`, ...pools.map((p) => `osd pool create ${p} 8`)].join("\n") + "\n";
  await runOk("ceph", [...base, "--connect-timeout", "60"], { input: script, timeout: 12e4 });
  await runOk("ceph-osd", [...base, "--mkfs", "-i", "0", "--osd-uuid", osdUuid], { timeout: 6e4 });
  const osd = startDaemon("osd.0", "ceph-osd", [...base, "-f", "-i", "0"]);
  daemons.push(osd);
  await until("osd.0 to be up", () => fileHas(path2.join(logDir, "osd.0.log"), "state: booting -> active"), daemons, 6e4, logDir);
  await Promise.all(pools.map((p) => runOk("rbd", [...base, "pool", "init", p], { timeout: 6e4 })));
  let s3;
  if (opts.rgw) {
    const rgw = startDaemon("client.rgw", "radosgw", [...base, "-f", "-n", "client.rgw"]);
    daemons.push(rgw);
    await until("radosgw to answer HTTP", () => httpAnswers(rgwPort), daemons, 9e4, logDir);
    const accessKey = `NBDX${randomBytes(8).toString("hex").toUpperCase()}`;
    const secretKey = randomBytes(24).toString("base64url");
    await runOk(
      "radosgw-admin",
      [...base, "-n", "client.admin", "user", "create", "--uid=nbdx", "--display-name=nbdx tests", `--access-key=${accessKey}`, `--secret=${secretKey}`],
      { timeout: 6e4 }
    );
    s3 = { endpoint: `http://127.0.0.1:${rgwPort}`, accessKey, secretKey, region: "us-east-1" };
  }
  return { dir, conf, monHost, client: "client.admin", keyring, ...s3 ? { s3 } : {}, stop };
}
function cephDaemonPids(cluster) {
  const found = [];
  for (const d of liveDaemons) {
    const args = d.spawnargs.join(" ");
    if (args.includes(cluster.conf) && d.pid) found.push(d.pid);
  }
  return found;
}
export {
  cephDaemonPids,
  cephPrograms,
  hasCeph,
  needCeph,
  startCeph
};
