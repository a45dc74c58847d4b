/**
 * Test helpers (not built: tsup builds src/index.ts only): run the real NBD tools.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';

const PATH = '/usr/bin:/usr/sbin:/bin:/sbin:' + (process.env.PATH ?? '');
export const toolEnv = { ...process.env, PATH };

/** Whether a tool is installed; under CI a missing tool is an error, not a skip. */
export function haveTool(name: string): boolean {
  const found = PATH.split(':').some((dir) => dir !== '' && existsSync(`${dir}/${name}`));
  if (!found && process.env.CI === 'true') throw new Error(`${name} is required under CI but is not installed`);
  return found;
}

export interface ToolResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function run(cmd: string, args: readonly string[], timeoutMs = 30_000): Promise<ToolResult> {
  return new Promise((resolve) => {
    execFile(cmd, args, { env: toolEnv, timeout: timeoutMs, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      const status = (err as { code?: unknown } | null)?.code;
      resolve({ code: err ? (typeof status === 'number' ? status : 1) : 0, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

/** Run a tool and insist that it succeeds; the error carries its output. */
export async function ok(cmd: string, args: readonly string[], timeoutMs?: number): Promise<string> {
  const r = await run(cmd, args, timeoutMs);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited with ${r.code}:\n${r.stderr}${r.stdout}`);
  return r.stdout;
}
