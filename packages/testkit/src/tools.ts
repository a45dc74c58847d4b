/**
 * Helpers for tests that drive the real NBD tools (nbdinfo, nbdsh, qemu-img, …) and the `nbdx`
 * command.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

/** nbdsh is a Python script: /usr/bin must come before any pyenv shims. */
export const TOOL_ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH ?? ''}` };

export function hasTool(name: string): boolean {
  return TOOL_ENV.PATH.split(':').some((d) => {
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

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function run(cmd: string, args: string[], opts: { input?: string; timeout?: number } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = execFile(
      cmd,
      args,
      { env: TOOL_ENV, timeout: opts.timeout ?? 60_000, maxBuffer: 64 * 1024 * 1024 },
      (err, stdout, stderr) => {
        const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
        resolve({ code, stdout: String(stdout), stderr: String(stderr) });
      },
    );
    if (opts.input !== undefined) child.stdin!.end(opts.input);
  });
}

/** Run and insist on success, returning stdout. */
export async function runOk(cmd: string, args: string[], opts?: { input?: string; timeout?: number }): Promise<string> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}):\n${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** nbdsh with a Python script; `h` is connected to the URI. */
export function nbdsh(uri: string, script: string): Promise<RunResult> {
  return run('nbdsh', ['-u', uri, '-c', script]);
}

export function tmpDir(prefix = 'nbdx-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** The `nbdx` command: the installed `nbdx` package's bin (NBDX_BIN overrides). */
export function nbdxBin(): string {
  if (process.env.NBDX_BIN) return process.env.NBDX_BIN;
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    for (const p of [path.join(dir, 'node_modules', 'nbdx', 'dist', 'bin.js'), path.join(dir, 'packages', 'nbdx', 'dist', 'bin.js')]) {
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
