import type { CliOptions } from './args.js';

/**
 * Installing missing first-party plugins and filters on demand (npx). Returns the exit status
 * of a re-run when one happened, or null to carry on in this process.
 */
export async function ensureInstalled(_o: CliOptions, _argv: string[]): Promise<number | null> {
  return null;
}
