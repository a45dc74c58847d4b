/**
 * Helpers for tests that drive the real NBD tools (nbdinfo, nbdsh, qemu-img, qemu-io, …), foreign
 * servers (nbdkit, qemu-nbd) and the `nbdx` command.
 *
 * The servers under test usually live in the test process, so every tool runs asynchronously:
 * a synchronous spawn would block the event loop the server needs to answer it.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

/** nbdsh is a Python script: /usr/bin must come before any pyenv shims. */
export const TOOL_ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH ?? ''}` };

/** Whether `name` is an executable in TOOL_ENV's PATH (never throws: for optional extras). */
export function hasTool(name: string): boolean {
  return TOOL_ENV.PATH.split(':').some((d) => {
    if (!d) return false;
    try {
      fs.accessSync(path.join(d, name), fs.constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

/**
 * True when every tool is installed. Under CI=true a missing tool is an error, so the suite fails
 * instead of quietly skipping; elsewhere the caller skips.
 */
export function needTools(...names: string[]): boolean {
  const missing = names.filter((n) => !hasTool(n));
  if (missing.length && process.env.CI === 'true') {
    throw new Error(`required tools missing under CI: ${missing.join(', ')}`);
  }
  return missing.length === 0;
}

// ---------------------------------------------------------------------------------------------
// Running tools

export interface RunOptions {
  /** Written to the tool's stdin. */
  input?: string;
  /** Kill the tool after this many ms (default 60 s). */
  timeout?: number;
  cwd?: string;
  /** Added to TOOL_ENV. */
  env?: NodeJS.ProcessEnv;
}

export interface RunResult<Out = string> {
  /** The exit status; 128 + the signal number when a signal (or the timeout) killed the tool. */
  code: number;
  stdout: Out;
  stderr: string;
  /** The signal that killed the tool, if one did. */
  signal?: NodeJS.Signals;
}

/**
 * Run a tool to completion with TOOL_ENV. Resolves for any exit status (tests look at `code`);
 * rejects only when the tool could not be run at all (not installed, output too big).
 * `encoding: 'buffer'` gives stdout as bytes.
 */
export function run(cmd: string, args: readonly string[], opts?: RunOptions & { encoding?: 'utf8' }): Promise<RunResult>;
export function run(cmd: string, args: readonly string[], opts: RunOptions & { encoding: 'buffer' }): Promise<RunResult<Buffer>>;
export function run(
  cmd: string,
  args: readonly string[],
  opts: RunOptions & { encoding?: 'utf8' | 'buffer' } = {},
): Promise<RunResult<string | Buffer>> {
  return new Promise((resolve, reject) => {
    const child = execFile(
      cmd,
      args,
      {
        cwd: opts.cwd,
        env: opts.env ? { ...TOOL_ENV, ...opts.env } : TOOL_ENV,
        timeout: opts.timeout ?? 60_000,
        maxBuffer: 256 * 1024 * 1024,
        encoding: 'buffer',
      },
      (err, stdout, stderr) => {
        const out = opts.encoding === 'buffer' ? stdout : stdout.toString();
        if (!err) return resolve({ code: 0, stdout: out, stderr: stderr.toString() });
        const e = err as Error & { code?: unknown; signal?: NodeJS.Signals | null };
        if (typeof e.code === 'number') return resolve({ code: e.code, stdout: out, stderr: stderr.toString() });
        // A string code: it could not be started (ENOENT, EACCES) or printed too much.
        if (typeof e.code !== 'string' && e.signal) {
          const code = 128 + (os.constants.signals[e.signal] ?? 0);
          return resolve({ code, signal: e.signal, stdout: out, stderr: stderr.toString() });
        }
        reject(new Error(`${cmd}: ${e.message}`, { cause: err }));
      },
    );
    if (opts.input !== undefined) child.stdin!.end(opts.input);
  });
}

/** Run and insist on success (exit status 0), returning stdout; the error shows the tool's output. */
export function runOk(cmd: string, args: readonly string[], opts?: RunOptions & { encoding?: 'utf8' }): Promise<string>;
export function runOk(cmd: string, args: readonly string[], opts: RunOptions & { encoding: 'buffer' }): Promise<Buffer>;
export async function runOk(
  cmd: string,
  args: readonly string[],
  opts: RunOptions & { encoding?: 'utf8' | 'buffer' } = {},
): Promise<string | Buffer> {
  const r = await run(cmd, args, opts as RunOptions & { encoding: 'buffer' });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}):\n${r.stderr}${r.stdout.toString()}`);
  return opts.encoding === 'buffer' ? r.stdout : r.stdout.toString();
}

export interface BackgroundExit {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** stdout and stderr interleaved as they arrived. */
  output: string;
  /** Date.now() when the process exited. */
  at: number;
}

export interface BackgroundTool {
  child: ChildProcess;
  /** Resolves (never rejects) once the tool has exited and its output is complete. */
  done: Promise<BackgroundExit>;
  /** SIGKILL it unless it has exited already (for cleanups). */
  kill(): void;
}

/** Start a tool in the background with TOOL_ENV, collecting its output. */
export function spawnTool(cmd: string, args: readonly string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): BackgroundTool {
  const child = spawn(cmd, args, {
    cwd: opts.cwd,
    env: opts.env ? { ...TOOL_ENV, ...opts.env } : TOOL_ENV,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  let output = '';
  let at = 0;
  child.stdout!.setEncoding('utf8').on('data', (d: string) => {
    stdout += d;
    output += d;
  });
  child.stderr!.setEncoding('utf8').on('data', (d: string) => {
    stderr += d;
    output += d;
  });
  child.once('exit', () => (at = Date.now()));
  const done = new Promise<BackgroundExit>((resolve) => {
    child.once('error', (e) => {
      stderr += String(e);
      output += String(e);
    });
    child.once('close', (code, signal) => resolve({ code, signal, stdout, stderr, output, at: at || Date.now() }));
  });
  return {
    child,
    done,
    kill: () => {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The NBD tools

export interface NbdshOptions {
  /** Ask for the base:allocation meta context before connecting (for h.block_status). */
  baseAllocation?: boolean;
}

function nbdshArgs(uri: string, script: string, opts: NbdshOptions): string[] {
  return [...(opts.baseAllocation ? ['--base-allocation'] : []), '-u', uri, '-c', script];
}

/** nbdsh with a Python script; `h` is connected to the URI. */
export function nbdsh(uri: string, script: string, opts: NbdshOptions = {}): Promise<RunResult> {
  return run('nbdsh', nbdshArgs(uri, script, opts));
}

/** nbdsh that must succeed (a Python exception fails it); resolves with what the script printed. */
export function nbdshOk(uri: string, script: string, opts: NbdshOptions = {}): Promise<string> {
  return runOk('nbdsh', nbdshArgs(uri, script, opts));
}

/**
 * Python for nbdsh scripts: `expect_err("EIO", lambda: h.pread(512, 0))` checks that the call fails
 * with that errno, prints `ok EIO` and returns the error's message; `wait_all()` waits for every
 * aio command in flight.
 */
export const NBDSH_HELPERS = `
import errno
def expect_err(name, f):
    try:
        f()
    except nbd.Error as ex:
        got = errno.errorcode.get(ex.errno, str(ex.errno))
        assert got == name, "expected %s, got %s (%s)" % (name, got, ex.string)
        print("ok", name)
        return ex.string
    raise AssertionError("expected %s, got success" % name)
def wait_all():
    while h.aio_in_flight() > 0:
        h.poll(-1)
`;

/**
 * qemu-io on a raw NBD export (or file). qemu-io reports a failed command (an I/O error, a
 * `read -P` pattern mismatch) on stdout and still exits 0, so that output fails here too.
 */
export async function qemuIo(uri: string, ...commands: string[]): Promise<string> {
  const args = ['-f', 'raw'];
  for (const c of commands) args.push('-c', c);
  args.push(uri);
  const out = await runOk('qemu-io', args);
  if (/error|fail|Pattern verification/i.test(out)) throw new Error(`qemu-io ${commands.join('; ')}: ${out}`);
  return out;
}

/** The export's size (`nbdinfo --size`). */
export async function exportSize(uri: string): Promise<number> {
  return Number((await runOk('nbdinfo', ['--size', uri])).trim());
}

/** One extent of `nbdinfo --map --json`; type 1 = hole, 2 = zero, 3 = both, 0 = data. */
export interface NbdinfoExtent {
  offset: number;
  length: number;
  type: number;
  description: string;
}

/** The export's base:allocation map (`nbdinfo --map --json`). */
export async function nbdinfoMap(uri: string): Promise<NbdinfoExtent[]> {
  return JSON.parse(await runOk('nbdinfo', ['--map', '--json', uri])) as NbdinfoExtent[];
}

/** One entry of `qemu-img map --output=json`. */
export interface QemuImgMapEntry {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** `qemu-img map --output=json ARGS...`, e.g. `qemuImgMap('-f', 'raw', uri)`. */
export async function qemuImgMap(...args: string[]): Promise<QemuImgMapEntry[]> {
  return JSON.parse(await runOk('qemu-img', ['map', '--output=json', ...args])) as QemuImgMapEntry[];
}

// ---------------------------------------------------------------------------------------------
// URIs, directories, waiting

/** The nbd+unix URI of export `exportName` on a Unix socket. */
export function unixUri(socket: string, exportName = ''): string {
  const name = exportName
    .split('/')
    .map((p) => encodeURIComponent(p))
    .join('/');
  return `nbd+unix:///${name}?socket=${socket}`;
}

/** The socket path of an nbd+unix URI. */
export function socketOf(uri: string): string {
  const socket = new URL(uri).searchParams.get('socket');
  if (!socket) throw new Error(`not an nbd+unix URI with a socket: ${uri}`);
  return socket;
}

/** The URI of another export on the same Unix socket as `uri`. */
export function exportUri(uri: string, exportName: string): string {
  return unixUri(socketOf(uri), exportName);
}

/** A fresh directory under os.tmpdir() (or under `base`, e.g. /dev/shm for tmpfs). */
export function tmpDir(prefix = 'nbdx-test-', base = os.tmpdir()): string {
  return fs.mkdtempSync(path.join(base, prefix));
}

/** Remove a directory tree; no error if it is gone already. */
export function removeDir(dir: string): void {
  fs.rmSync(dir, { recursive: true, force: true });
}

/**
 * Poll `cond` every 10 ms until it holds; resolves with the milliseconds that took. After
 * `timeoutMs` it rejects, naming `what` it waited for.
 */
export async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs = 5000, what = 'a condition'): Promise<number> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
  return Date.now() - t0;
}

function canConnect(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(socket);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/**
 * Resolves once something accepts connections on the Unix socket. With `proc`, fails as soon as
 * that process exits, and kills it on timeout; `stderr` goes into the error.
 */
export async function waitForSocket(
  socket: string,
  opts: { proc?: ChildProcess; stderr?: () => string; timeoutMs?: number } = {},
): Promise<void> {
  const { proc, stderr = () => '', timeoutMs = 10_000 } = opts;
  const name = proc?.spawnfile ?? 'the server';
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (proc && (proc.exitCode !== null || proc.signalCode !== null)) throw new Error(`${name} exited before listening:\n${stderr()}`);
    if (fs.existsSync(socket) && (await canConnect(socket))) return;
    if (Date.now() > deadline) {
      proc?.kill('SIGKILL');
      throw new Error(`${name} did not listen on ${socket} in time:\n${stderr()}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

// ---------------------------------------------------------------------------------------------
// Foreign servers

/** A server process (nbdkit, qemu-nbd, …) listening on a Unix socket. */
export interface Peer {
  readonly socket: string;
  readonly uri: string;
  readonly proc: ChildProcess;
  stderr(): string;
  /** Kill it (SIGKILL by default, like a crash) and wait for it to exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
}

const livePeers = new Set<ChildProcess>();
let peerExitHook = false;

let socketSeq = 0;
/** A fresh socket path in `dir`. */
export function socketIn(dir: string, name: string): string {
  return path.join(dir, `${name}-${++socketSeq}.sock`);
}

/** Start `cmd ARGS` (with TOOL_ENV) and wait until it accepts connections on `socket`. */
export async function startPeer(cmd: string, args: readonly string[], socket: string): Promise<Peer> {
  if (!peerExitHook) {
    peerExitHook = true;
    process.once('exit', () => {
      for (const p of livePeers) p.kill('SIGKILL');
    });
  }
  const proc = spawn(cmd, args, { env: TOOL_ENV, stdio: ['ignore', 'ignore', 'pipe'] });
  livePeers.add(proc);
  let err = '';
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (d: string) => {
    err += d;
  });
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  proc.once('exit', () => livePeers.delete(proc));
  proc.once('error', (e) => {
    err += String(e);
  });
  await waitForSocket(socket, { proc, stderr: () => err });
  return {
    socket,
    uri: unixUri(socket),
    proc,
    stderr: () => err,
    async kill(signal: NodeJS.Signals = 'SIGKILL') {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill(signal);
        await exited;
      }
    },
  };
}

/** `nbdkit -f --exit-with-parent -U SOCKET ARGS...` (a fresh socket in `dir` unless given). */
export function startNbdkit(dir: string, args: readonly string[], socket = socketIn(dir, 'nbdkit')): Promise<Peer> {
  return startPeer('nbdkit', ['-f', '--exit-with-parent', '-U', socket, ...args], socket);
}

/** `qemu-nbd` serving an image (qcow2 unless `format` says otherwise) on a fresh socket in `dir`. */
export function startQemuNbd(dir: string, image: string, opts: { format?: string; extra?: readonly string[] } = {}): Promise<Peer> {
  const socket = socketIn(dir, 'qemu');
  return startPeer('qemu-nbd', ['-f', opts.format ?? 'qcow2', '-k', socket, '--persistent', '--shared=8', ...(opts.extra ?? []), image], socket);
}

// ---------------------------------------------------------------------------------------------
// The nbdx command
/** The `nbdx` command: the installed `nbdx` package's bin (NBDX_BIN overrides). */
export function nbdxBin(): string {
  if (process.env.NBDX_BIN) return process.env.NBDX_BIN;
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    for (const p of [path.join(dir, 'node_modules', 'nbdx', 'bin', 'nbdx.js'), path.join(dir, 'packages', 'nbdx', 'bin', 'nbdx.js')]) {
      if (fs.existsSync(p)) return p;
    }
    const up = path.dirname(dir);
    if (up === dir) throw new Error('cannot find the nbdx command: install the nbdx package or set NBDX_BIN');
    dir = up;
  }
}

export interface CliServer {
  uri: string;
  child: ChildProcess;
  stderr: () => string;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

/** Start `nbdx -f --print-uri ARGS` and wait for its URI. */
export function startCli(args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {}): Promise<CliServer> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [nbdxBin(), '-f', '--print-uri', ...args], {
      cwd: opts.cwd,
      env: { ...TOOL_ENV, ...opts.env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    child.stderr!.on('data', (d) => (err += d));
    child.stdout!.on('data', (d) => {
      out += d;
      const line = out.split('\n')[0];
      if (out.includes('\n') && line) {
        resolve({
          uri: line.trim(),
          child,
          stderr: () => err,
          stop: (signal = 'SIGTERM') => {
            if (child.exitCode === null) child.kill(signal);
            return exited;
          },
        });
      }
    });
    child.on('exit', (code) => reject(new Error(`nbdx exited (${code}) before listening:\n${err}`)));
  });
}

/**
 * Whether the `nbdx` command is there (built, or NBDX_BIN set). Under CI=true its absence is an
 * error, as with needTools; elsewhere the caller skips.
 */
export function needNbdx(): boolean {
  try {
    nbdxBin();
    return true;
  } catch (e) {
    if (process.env.CI === 'true') throw e;
    return false;
  }
}
