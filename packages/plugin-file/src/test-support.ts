/**
 * Helpers shared by this package's tests (not part of the published bundle: only index.ts is an
 * entry): serving the file plugin in-process, and facts about files and this process. Finding and
 * running the tools comes from @nbdx/testkit.
 */
import { cpSync, existsSync, mkdirSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { serve } from '@nbdx/server';
import { run } from '@nbdx/testkit';
import { createFilePlugin, type FilePluginOptions } from './index.js';

export const CI = process.env.CI === 'true';

/** A file plugin configured with `pairs` and made ready, as the CLI would (not opened). */
export async function configure(pairs: [string, string][]) {
  const p = createFilePlugin();
  for (const [k, v] of pairs) await p.config!(k, v);
  await p.configComplete!();
  await p.getReady!();
  return p;
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

/** 512-byte blocks allocated to a file (stat's %b). */
export async function allocatedBlocks(path: string): Promise<number> {
  const { stat } = await import('node:fs/promises');
  return (await stat(path)).blocks;
}

/** Whether this process may mount file systems (root); tests that need it say what to do otherwise. */
export const isRoot = process.getuid?.() === 0;

/** This package's root (holding scripts/, dist/, native/). */
export const PACKAGE_ROOT = fileURLToPath(new URL('..', import.meta.url));

/**
 * Compile the native helper for this machine with scripts/prebuild.mjs into
 * `out/TARGET/file_ops.node` (extra compiler flags through NBDX_FILE_PREBUILD_CFLAGS) and return
 * that path. Needs a C compiler (`needTools('cc')`).
 */
export async function compileHelper(out: string, target: string, cflags = ''): Promise<string> {
  const r = await run(process.execPath, [join(PACKAGE_ROOT, 'scripts/prebuild.mjs'), '--target', target, '--out', out], {
    env: { NBDX_FILE_PREBUILD_CFLAGS: cflags },
  });
  if (r.code !== 0) throw new Error(`prebuild.mjs failed (${r.code}):\n${r.stdout}${r.stderr}`);
  return join(out, target, 'file_ops.node');
}

/**
 * A copy of the package as installed, in `dir`: package.json and the built dist/ (run the build
 * first), node_modules pointing at this package's (for @nbdx/server), and no build/ or
 * prebuilds/ unless the caller adds them. The plugin is `dir/dist/index.js`.
 */
export function installedCopy(dir: string): string {
  const dist = join(PACKAGE_ROOT, 'dist/index.js');
  if (!existsSync(dist)) throw new Error(`${dist} is missing: build the package first (pnpm --filter @nbdx/plugin-file build)`);
  mkdirSync(dir, { recursive: true });
  cpSync(join(PACKAGE_ROOT, 'package.json'), join(dir, 'package.json'));
  cpSync(join(PACKAGE_ROOT, 'dist'), join(dir, 'dist'), { recursive: true });
  symlinkSync(join(PACKAGE_ROOT, 'node_modules'), join(dir, 'node_modules'));
  return join(dir, 'dist/index.js');
}
