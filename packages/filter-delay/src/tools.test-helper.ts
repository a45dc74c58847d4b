/**
 * Test helpers: run the real NBD tools (qemu-io, qemu-img, nbdinfo, nbdsh) against a server.
 * Not part of the built package (tsup builds src/index.ts only).
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';

const PATH = '/usr/bin:/usr/sbin:/bin:/sbin:' + (process.env.PATH ?? '');
export const toolEnv = { ...process.env, PATH, LIBNBD_DEBUG: '0' };

export function haveTool(name: string): boolean {
  const found = PATH.split(':').some((d) => d && existsSync(`${d}/${name}`));
  if (!found && process.env.CI === 'true') throw new Error(`${name} is required under CI but is not installed`);
  return found;
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function run(cmd: string, args: string[], timeoutMs = 30_000): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { env: toolEnv, timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

/** Run and require success; the error names the command and shows its stderr. */
export async function ok(cmd: string, args: string[], timeoutMs?: number): Promise<string> {
  const r = await run(cmd, args, timeoutMs);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** qemu-io on a raw NBD export; qemu-io reports failed commands on stdout with status 0. */
export async function qemuIo(uri: string, ...commands: string[]): Promise<string> {
  const args = ['-f', 'raw'];
  for (const c of commands) args.push('-c', c);
  args.push(uri);
  const out = await ok('qemu-io', args);
  if (/error|fail|Pattern verification/i.test(out)) throw new Error(`qemu-io ${commands.join('; ')}: ${out}`);
  return out;
}

export async function exportSize(uri: string): Promise<number> {
  return Number((await ok('nbdinfo', ['--size', uri])).trim());
}

export interface MapEntry {
  offset: number;
  length: number;
  type: number;
}

export async function map(uri: string): Promise<MapEntry[]> {
  const out = await ok('nbdinfo', ['--map', '--json', uri]);
  return (JSON.parse(out) as MapEntry[]).map((e) => ({ offset: e.offset, length: e.length, type: e.type }));
}
