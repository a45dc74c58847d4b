/**
 * Test helpers for running real NBD peers (nbdkit, qemu-nbd) on Unix sockets in temp dirs.
 * Not part of the package's public API.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, it } from 'vitest';

const toolCache = new Map<string, boolean>();
/** Tools that do not take --version. */
const VERSION_ARGS: Record<string, string[]> = { openssl: ['version'] };

export function haveTool(name: string): boolean {
  let ok = toolCache.get(name);
  if (ok === undefined) {
    const r = spawnSync(name, VERSION_ARGS[name] ?? ['--version'], { stdio: 'ignore' });
    ok = r.status === 0;
    toolCache.set(name, ok);
  }
  return ok;
}

/** `nbdkit --version` as [major, minor, patch], or null. */
export function nbdkitVersion(): [number, number, number] | null {
  const r = spawnSync('nbdkit', ['--version'], { encoding: 'utf8' });
  const m = /nbdkit (\d+)\.(\d+)\.(\d+)/.exec(r.stdout ?? '');
  return m ? [Number(m[1]), Number(m[2]), Number(m[3])] : null;
}

/**
 * describe() that needs external tools: skipped when one is missing, except under CI
 * (`CI=true`), where the missing tool is a failure.
 */
export function describeWithTools(tools: string[], name: string, fn: () => void): void {
  const missing = tools.filter((t) => !haveTool(t));
  if (missing.length === 0) {
    describe(name, fn);
  } else if (process.env.CI === 'true') {
    describe(name, () => {
      it(`needs ${missing.join(', ')}`, () => {
        throw new Error(`required tool(s) not installed: ${missing.join(', ')}`);
      });
    });
  } else {
    describe.skip(`${name} (missing ${missing.join(', ')})`, fn);
  }
}

export async function makeTempDir(prefix = 'nbdx-client-'): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(path.join(os.tmpdir(), prefix));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

export interface Peer {
  proc: ChildProcess;
  socket: string;
  /** stderr collected so far. */
  stderr(): string;
  /** Resolves when the process has exited. */
  exited: Promise<void>;
  stop(signal?: NodeJS.Signals): Promise<void>;
}

/** Start a server that listens on `socket` and wait until the socket exists. */
export async function startPeer(cmd: string, args: string[], socket: string, timeoutMs = 10_000): Promise<Peer> {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (s: string) => {
    err += s;
  });
  let hasExited = false;
  const exited = new Promise<void>((resolve) => {
    proc.once('exit', () => {
      hasExited = true;
      resolve();
    });
    proc.once('error', (e) => {
      err += String(e);
      hasExited = true;
      resolve();
    });
  });
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(socket)) {
    if (hasExited) throw new Error(`${cmd} exited before listening: ${err}`);
    if (Date.now() > deadline) {
      proc.kill('SIGKILL');
      throw new Error(`${cmd} did not create ${socket} in time: ${err}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    proc,
    socket,
    stderr: () => err,
    exited,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (!hasExited) {
        proc.kill(signal);
        const t = setTimeout(() => proc.kill('SIGKILL'), 5000);
        await exited;
        clearTimeout(t);
      }
    },
  };
}

let counter = 0;
/** A fresh socket path inside `dir`. */
export function sockPath(dir: string, name = 'nbd'): string {
  return path.join(dir, `${name}-${process.pid}-${++counter}.sock`);
}

/** nbdkit in the foreground on a Unix socket; exits with the test process. */
export function startNbdkit(dir: string, args: string[]): Promise<Peer> {
  const sock = sockPath(dir, 'nbdkit');
  return startPeer('nbdkit', ['-f', '--exit-with-parent', '-U', sock, ...args], sock);
}

/** qemu-nbd serving `file` (raw unless `format` says otherwise) under `exportName`. */
export function startQemuNbd(dir: string, file: string, opts: { exportName?: string; format?: string; extra?: string[] } = {}): Promise<Peer> {
  const sock = sockPath(dir, 'qemu');
  const args = ['-f', opts.format ?? 'raw', '-k', sock, '--persistent', ...(opts.exportName !== undefined ? ['-x', opts.exportName] : []), ...(opts.extra ?? []), file];
  return startPeer('qemu-nbd', args, sock);
}
