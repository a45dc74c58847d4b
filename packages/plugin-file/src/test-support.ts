/**
 * Helpers shared by this package's tests (not part of the published bundle: only index.ts is an
 * entry). The server runs in-process, so every tool is spawned asynchronously: a synchronous
 * spawn would block the event loop the server needs to answer it.
 */
import { execFile, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { serve } from '@nbdx/server';
import { createFilePlugin, type FilePluginOptions } from './index.js';

export const CI = process.env.CI === 'true';
export const toolEnv = { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` };

export function haveTool(name: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${name}`], { env: toolEnv, stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/**
 * True when every tool is installed. When one is missing: under CI=true that is an error (the
 * suite fails); elsewhere the caller skips.
 */
export function tools(...names: string[]): boolean {
  const missing = names.filter((n) => !haveTool(n));
  if (missing.length && CI) throw new Error(`CI=true and these tools are missing: ${missing.join(', ')}`);
  return missing.length === 0;
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run a tool to completion; never throws for a non-zero exit (tests look at `code`). */
export function run(cmd: string, args: string[], options: { input?: string; timeoutMs?: number } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = execFile(
      cmd,
      args,
      { env: toolEnv, maxBuffer: 256 * 1024 * 1024, timeout: options.timeoutMs ?? 30_000, encoding: 'utf8' },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
        resolve({ code, stdout, stderr });
      },
    );
    if (options.input !== undefined) child.stdin!.end(options.input);
  });
}

/** Like run() but fails the test with the tool's stderr when the exit status is not 0. */
export async function ok(cmd: string, args: string[], options: { input?: string; timeoutMs?: number } = {}): Promise<string> {
  const r = await run(cmd, args, options);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr || r.stdout}`);
  return r.stdout;
}

/**
 * nbdsh -u URI -c SCRIPT; the script prints what the test checks. With `baseAllocation` the
 * script connects itself after asking for the base:allocation context (for h.block_status).
 */
export function nbdsh(uri: string, script: string, opts: { baseAllocation?: boolean } = {}): Promise<string> {
  if (!opts.baseAllocation) return ok('nbdsh', ['-u', uri, '-c', script]);
  const connect = `h.add_meta_context("base:allocation")\nh.connect_uri(${JSON.stringify(uri)})\n`;
  return ok('nbdsh', ['-c', connect + script]);
}

/** A fresh directory under os.tmpdir() (or under `base`, e.g. /dev/shm for tmpfs). */
export function tempDir(base = tmpdir()): { path: string; remove(): void } {
  const path = mkdtempSync(join(base, 'nbdx-file-'));
  return { path, remove: () => rmSync(path, { recursive: true, force: true }) };
}

export async function serveFile(
  config: [string, string][],
  options: { readonly?: boolean; plugin?: FilePluginOptions; debug?: (message: string) => void } = {},
) {
  return serve({
    plugin: createFilePlugin(options.plugin),
    config,
    readonly: options.readonly,
    debug: options.debug,
    // expected failures (ENOSPC, EIO) would fill the test output
    error: () => {},
  });
}

/** The URI of export `name` on the same Unix socket as `uri`. */
export function withExport(uri: string, name: string): string {
  const socket = new URL(uri).searchParams.get('socket')!;
  return `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`;
}

/** 512-byte blocks allocated to a file (stat's %b). */
export async function allocatedBlocks(path: string): Promise<number> {
  const { stat } = await import('node:fs/promises');
  return (await stat(path)).blocks;
}

/** Whether this process may mount file systems (root); tests that need it say what to do otherwise. */
export const isRoot = process.getuid?.() === 0;
