/**
 * Foreign upstream servers for the tests (nbdkit, qemu-nbd), each on a Unix socket in a temp dir.
 * Tool checks, runs and temp dirs come from @nbdx/testkit.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { TOOL_ENV } from '@nbdx/testkit';

export interface Peer {
  readonly socket: string;
  readonly uri: string;
  readonly proc: ChildProcess;
  stderr(): string;
  /** Kill it (SIGKILL by default, like a crash) and wait for it to exit. */
  kill(signal?: NodeJS.Signals): Promise<void>;
}

const live = new Set<ChildProcess>();
process.once('exit', () => {
  for (const p of live) p.kill('SIGKILL');
});

let n = 0;
export function sockIn(dir: string, name: string): string {
  return path.join(dir, `${name}-${++n}.sock`);
}

export function unixUri(socket: string, exportName = ''): string {
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socket}`;
}

/** Resolves once something accepts connections on `socket`. */
async function waitForSocket(socket: string, proc: ChildProcess, err: () => string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`${proc.spawnfile} exited before listening:\n${err()}`);
    if (existsSync(socket)) {
      const ok = await new Promise<boolean>((resolve) => {
        const s = net.connect(socket);
        s.once('connect', () => {
          s.destroy();
          resolve(true);
        });
        s.once('error', () => resolve(false));
      });
      if (ok) return;
    }
    if (Date.now() > deadline) {
      proc.kill('SIGKILL');
      throw new Error(`${proc.spawnfile} did not listen on ${socket} in time:\n${err()}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

export async function startPeer(cmd: string, args: string[], socket: string): Promise<Peer> {
  const proc = spawn(cmd, args, { env: TOOL_ENV, stdio: ['ignore', 'ignore', 'pipe'] });
  live.add(proc);
  let err = '';
  proc.stderr!.setEncoding('utf8');
  proc.stderr!.on('data', (d: string) => {
    err += d;
  });
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  proc.once('exit', () => live.delete(proc));
  proc.once('error', (e) => {
    err += String(e);
  });
  await waitForSocket(socket, proc, () => err);
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

/** `nbdkit -f --exit-with-parent -U SOCKET ARGS...` (socket chosen in `dir` unless given). */
export function startNbdkit(dir: string, args: string[], socket = sockIn(dir, 'nbdkit')): Promise<Peer> {
  return startPeer('nbdkit', ['-f', '--exit-with-parent', '-U', socket, ...args], socket);
}

/** `qemu-nbd` serving an image (qcow2 unless `format` says otherwise). */
export function startQemuNbd(dir: string, image: string, opts: { format?: string; extra?: string[] } = {}): Promise<Peer> {
  const socket = sockIn(dir, 'qemu');
  return startPeer('qemu-nbd', ['-f', opts.format ?? 'qcow2', '-k', socket, '--persistent', '--shared=8', ...(opts.extra ?? []), image], socket);
}
