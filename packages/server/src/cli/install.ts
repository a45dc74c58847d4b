import { spawn } from 'node:child_process';
import * as os from 'node:os';
import * as path from 'node:path';
import { LoadError, firstPartyPackage, isPackageName, isPathName, locate, notFoundMessage, searchBases, shellQuote, suggestedPackage, type Kind } from '../loader/resolve.js';

export { shellQuote };
import type { CliOptions } from './args.js';
import { VERSION } from './main.js';

/**
 * Installing missing first-party plugins and filters on demand, so that `npx nbdx memory 1G`
 * works from an empty directory.
 *
 * When a plugin or filter named on the command line is one of nbdx's own (`@nbdx/plugin-*`,
 * `@nbdx/filter-*`) and cannot be found, nbdx runs itself again through npx with exactly those
 * packages added, at its own version:
 *
 *   npx --yes -p nbdx@VERSION -p @nbdx/plugin-memory@VERSION -- nbdx memory 1G
 *
 * and exits with that run's status. Third-party packages are never installed implicitly: the
 * error names the package and the exact command. `--no-install` or NBDX_NO_INSTALL=1 turn the
 * installing off (the error then gives the command instead).
 */

/** Set in the re-run, so a package that npx could not make visible cannot cause a loop. */
export const RERUN_ENV = 'NBDX_NPX_RERUN';
export const NO_INSTALL_ENV = 'NBDX_NO_INSTALL';

export interface Missing {
  kind: Kind;
  name: string;
  /** The package that provides it: `@nbdx/...` for first-party names, else the third-party convention. */
  pkg: string;
  firstParty: boolean;
}

export interface InstallPlan {
  missing: Missing[];
  /** `-p` packages for npx: nbdx itself, then every missing package (first-party ones pinned). */
  packages: string[];
  /** The whole command, quoted for a POSIX shell. */
  command: string;
}

/** What would be needed to run this command line; null when everything named is installed. */
export function planInstall(
  o: Pick<CliOptions, 'plugin' | 'filters'>,
  argv: readonly string[],
  options: { version?: string; isInstalled?: (name: string, kind: Kind) => boolean } = {},
): InstallPlan | null {
  const version = options.version ?? VERSION;
  const bases = searchBases();
  const isInstalled =
    options.isInstalled ??
    ((name: string, kind: Kind) => {
      try {
        locate(name, kind, bases);
        return true;
      } catch (err) {
        if (err instanceof LoadError) return false;
        throw err;
      }
    });
  const named: Array<{ kind: Kind; name: string }> = [];
  if (o.plugin) named.push({ kind: 'plugin', name: o.plugin });
  for (const f of o.filters) named.push({ kind: 'filter', name: f });

  const missing: Missing[] = [];
  for (const { kind, name } of named) {
    if (isPathName(name) || isInstalled(name, kind)) continue;
    const first = firstPartyPackage(name, kind);
    missing.push({ kind, name, pkg: first ?? suggestedPackage(name, kind), firstParty: first !== null });
  }
  if (missing.length === 0) return null;
  const packages = [`nbdx@${version}`];
  for (const m of missing) {
    const spec = m.firstParty ? `${m.pkg}@${version}` : m.pkg;
    if (!packages.includes(spec)) packages.push(spec);
  }
  const command = ['npx', ...packages.flatMap((p) => ['-p', p]), 'nbdx', ...argv].map(shellQuote).join(' ');
  return { missing, packages, command };
}

function truthy(v: string | undefined): boolean {
  return v !== undefined && v !== '' && !['0', 'false', 'no', 'off'].includes(v.toLowerCase());
}

/**
 * Called by the CLI before it loads plugins. Returns the exit status of a re-run through npx
 * when one happened, or null to carry on in this process (everything is installed, or the
 * loader is left to report what is missing). Throws LoadError for what it will not install.
 */
export async function ensureInstalled(o: CliOptions, argv: string[]): Promise<number | null> {
  for (const [kind, name] of [['plugin', o.plugin], ...o.filters.map((f) => ['filter', f])] as const) {
    if (name && !isPathName(name) && name.includes('=')) {
      throw new LoadError(
        `'${name}' is not a ${kind} name: the plugin comes first, then its and the filters' key=value parameters ` +
          `(nbdx [OPTIONS] PLUGIN [KEY=VALUE]..., e.g. nbdx --filter=offset memory 1G offset=1M)`,
      );
    }
  }
  const plan = planInstall(o, argv);
  if (!plan) return null;
  // Already re-run once: let the loader say what it still cannot find.
  if (truthy(process.env[RERUN_ENV])) return null;
  const bases = searchBases();

  const thirdParty = plan.missing.find((m) => !m.firstParty);
  if (thirdParty) {
    const others = plan.missing.filter((m) => m !== thirdParty).map((m) => `${m.kind} '${m.name}'`);
    const typedPackage = isPackageName(thirdParty.name, thirdParty.kind);
    throw new LoadError(
      notFoundMessage(thirdParty.name, thirdParty.kind, bases, {
        // The whole npx command only for a package name the user typed (see notFoundMessage).
        ...(typedPackage ? { run: plan.command } : {}),
        note:
          (typedPackage ? `nbdx installs only its own @nbdx packages by itself, never third-party ones.` : '') +
          (others.length ? ` Also missing: ${others.join(', ')}.` : ''),
      }),
    );
  }

  const noInstall = o.noInstall ? '--no-install' : truthy(process.env[NO_INSTALL_ENV]) ? `${NO_INSTALL_ENV}=${process.env[NO_INSTALL_ENV]}` : null;
  if (noInstall) {
    const m = plan.missing[0]!;
    throw new LoadError(
      notFoundMessage(m.name, m.kind, bases, {
        pkg: plan.missing.map((x) => `${x.pkg}@${VERSION}`).join(' '),
        run: plan.command,
        note: `Not installing it (${noInstall}).`,
      }),
    );
  }

  const what = plan.packages.slice(1).join(', ');
  process.stderr.write(`nbdx: installing ${what} with npx (--no-install or ${NO_INSTALL_ENV}=1 turns this off)\n`);
  return rerun(plan, argv);
}

/** Run `npx --yes -p ... -- nbdx ARGV` with our stdio and environment; resolve with its status. */
function rerun(plan: InstallPlan, argv: readonly string[]): Promise<number> {
  const args = ['--yes', ...plan.packages.flatMap((p) => ['-p', p]), '--', 'nbdx', ...argv];
  const env = { ...process.env, [RERUN_ENV]: '1' };
  return new Promise((resolve, reject) => {
    const start = (cmd: string, fallback?: string) => {
      const child = spawn(cmd, args, { stdio: 'inherit', env });
      // Ctrl-C reaches the whole process group already; pass on what is sent to us alone.
      const forward = (sig: NodeJS.Signals) => child.kill(sig);
      const onInt = () => {};
      process.on('SIGTERM', forward);
      process.on('SIGHUP', forward);
      process.on('SIGINT', onInt);
      const done = () => {
        process.off('SIGTERM', forward);
        process.off('SIGHUP', forward);
        process.off('SIGINT', onInt);
      };
      child.on('error', (err: NodeJS.ErrnoException) => {
        done();
        if (err.code === 'ENOENT' && fallback) return start(fallback);
        reject(new LoadError(`cannot run npx to install ${plan.packages.slice(1).join(', ')}: ${err.message}. Run it yourself: ${plan.command}`));
      });
      child.on('exit', (code, signal) => {
        done();
        resolve(code ?? (signal ? 128 + signalNumber(signal) : 1));
      });
    };
    // npx from PATH, else the one installed beside this node binary.
    start('npx', path.join(path.dirname(process.execPath), 'npx'));
  });
}

function signalNumber(signal: NodeJS.Signals): number {
  return (os.constants.signals as Record<string, number>)[signal] ?? 0;
}

/** Quote one argument for a POSIX shell (only when needed). */
