/**
 * Helpers shared by this package's tests (not part of the published bundle: only index.ts is an
 * entry): serving the file plugin in-process, and facts about files and this process. Finding and
 * running the tools comes from @nbdx/testkit.
 */
import { serve } from '@nbdx/server';
import { createFilePlugin, type FilePluginOptions } from './index.js';

export const CI = process.env.CI === 'true';

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
