import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import {
  LoadError,
  NBDX_VERSION,
  findPackageDir,
  firstPartyPackage,
  installCacheDir,
  isPackageName,
  isPathName,
  locate,
  notFoundMessage,
  searchBases,
  shellQuote,
  suggestedPackage,
  type Kind,
} from '../loader/resolve.js';
import { METRICS_PACKAGE } from '../metrics.js';
import type { CliOptions } from './args.js';

export { shellQuote };

/**
 * Installing missing first-party plugins and filters on demand, so that `npx nbdx memory 1G`
 * works from an empty directory, and inside a project that has nbdx installed.
 *
 * When a plugin or filter named on the command line is one of nbdx's own (`@nbdx/plugin-*`,
 * `@nbdx/filter-*`) and is found nowhere the loader looks, nbdx installs exactly those packages,
 * at its own version, into its install cache (resolve.ts, installCacheDir) with npm:
 *
 *   npm install --prefix ~/.cache/nbdx/VERSION @nbdx/server@VERSION @nbdx/plugin-memory@VERSION
 *
 * and then loads them in this same process. The cache is searched on every start, so the next
 * `npx nbdx memory 1G` finds the plugin at once: nothing is spawned and nothing is said. The
 * server package is pinned beside the plugins because they take it as a peer dependency (their
 * API); the core recognises the errors and log calls of that copy (api/common.ts).
 *
 * Third-party packages are never installed implicitly: the error names the package and the exact
 * command. `--no-install` or NBDX_NO_INSTALL=1 turn the installing off (the error then gives
 * the command instead).
 */

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
  /** The install cache (an npm prefix). */
  dir: string;
  /** What npm installs there: @nbdx/server, then every missing first-party package, pinned. */
  packages: string[];
  /** The same install as a command for a POSIX shell, for messages. */
  command: string;
  /** For a third-party package the user named in full: this command line through npx. */
  npxCommand: string;
}

/** What would be needed to run this command line; null when everything named is installed. */
export function planInstall(
  o: Pick<CliOptions, 'plugin' | 'filters' | 'metrics'>,
  argv: readonly string[],
  options: { version?: string; dir?: string; isInstalled?: (name: string, kind: Kind) => boolean } = {},
): InstallPlan | null {
  const version = options.version ?? NBDX_VERSION;
  const dir = options.dir ?? installCacheDir(version);
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
  // --metrics: its endpoint is a package of its own (server/src/metrics.ts).
  const support = o.metrics && !bases.some((b) => findPackageDir(METRICS_PACKAGE, b)) ? [METRICS_PACKAGE] : [];
  if (missing.length === 0 && support.length === 0) return null;
  const packages = [`@nbdx/server@${version}`];
  for (const pkg of [...missing.filter((m) => m.firstParty).map((m) => m.pkg), ...support]) {
    const spec = `${pkg}@${version}`;
    if (!packages.includes(spec)) packages.push(spec);
  }
  const command = ['npm', 'install', '--prefix', dir, ...packages].map(shellQuote).join(' ');
  // Third-party packages beside nbdx at this version; any missing first-party ones that nbdx
  // then installs by itself.
  const npxPackages = [`nbdx@${version}`, ...missing.filter((m) => !m.firstParty).map((m) => m.pkg)];
  const npxCommand = ['npx', ...npxPackages.flatMap((p) => ['-p', p]), 'nbdx', ...argv].map(shellQuote).join(' ');
  return { missing, dir, packages, command, npxCommand };
}

function truthy(v: string | undefined): boolean {
  return v !== undefined && v !== '' && !['0', 'false', 'no', 'off'].includes(v.toLowerCase());
}

/** `~/x` for messages, when the path is under the home directory. */
function tildify(p: string): string {
  const home = os.homedir();
  return home && p.startsWith(home + path.sep) ? `~${p.slice(home.length)}` : p;
}

/**
 * Called by the CLI before it loads plugins. Installs the missing first-party packages into the
 * install cache (saying so on stderr) and returns; the loader then finds them. Does nothing and
 * says nothing when everything named is installed. Throws LoadError for what it will not install.
 */
export async function ensureInstalled(o: CliOptions, argv: string[]): Promise<void> {
  for (const [kind, name] of [['plugin', o.plugin], ...o.filters.map((f) => ['filter', f])] as const) {
    if (name && !isPathName(name) && name.includes('=')) {
      throw new LoadError(
        `'${name}' is not a ${kind} name: the plugin comes first, then its and the filters' key=value parameters ` +
          `(e.g. nbdx --filter=offset memory 1G offset=1M)`,
      );
    }
  }
  const plan = planInstall(o, argv);
  if (!plan) return;
  const bases = searchBases();

  const thirdParty = plan.missing.find((m) => !m.firstParty);
  if (thirdParty) {
    const others = plan.missing.filter((m) => m !== thirdParty).map((m) => `${m.kind} '${m.name}'`);
    const typedPackage = isPackageName(thirdParty.name, thirdParty.kind);
    throw new LoadError(
      notFoundMessage(thirdParty.name, thirdParty.kind, bases, {
        // The whole npx command only for a package name the user typed (see notFoundMessage).
        ...(typedPackage ? { run: plan.npxCommand } : {}),
        note:
          (typedPackage ? `nbdx installs only its own @nbdx packages by itself, never third-party ones.` : '') +
          (others.length ? ` Also missing: ${others.join(', ')}.` : ''),
      }),
    );
  }

  const noInstall = o.noInstall ? '--no-install' : truthy(process.env[NO_INSTALL_ENV]) ? `${NO_INSTALL_ENV}=${process.env[NO_INSTALL_ENV]}` : null;
  if (noInstall) {
    const m = plan.missing[0];
    if (!m) {
      throw new LoadError(
        `--metrics needs the ${METRICS_PACKAGE} package, which is not installed. Not installing it (${noInstall}). ` +
          `Install it with: npm install ${METRICS_PACKAGE}@${NBDX_VERSION}   (or run: ${plan.command})`,
      );
    }
    throw new LoadError(
      notFoundMessage(m.name, m.kind, bases, {
        pkg: plan.missing.map((x) => `${x.pkg}@${NBDX_VERSION}`).join(' '),
        run: plan.command,
        note: `Not installing it (${noInstall}).`,
      }),
    );
  }

  await withInstallLock(plan.dir, async () => {
    // Another nbdx may have installed them while this one waited for the lock.
    if (!planInstall(o, argv, { dir: plan.dir })) return;
    const what = plan.packages.slice(1).join(', ');
    process.stderr.write(`nbdx: installing ${what} into ${tildify(plan.dir)} (--no-install or ${NO_INSTALL_ENV}=1 turns this off)\n`);
    await npmInstall(plan);
  });
}

/**
 * npm install into the cache. npm's own output goes to stderr: stdout may be the NBD channel
 * (`-s`) or belong to `--run`.
 */
function npmInstall(plan: InstallPlan): Promise<void> {
  fs.mkdirSync(plan.dir, { recursive: true });
  // A package.json of its own keeps npm from walking up into a project above the cache.
  const manifest = path.join(plan.dir, 'package.json');
  if (!fs.existsSync(manifest)) {
    fs.writeFileSync(manifest, `${JSON.stringify({ name: 'nbdx-install-cache', private: true, description: 'Plugins and filters nbdx installed on demand; safe to delete.' }, null, 2)}\n`);
  }
  const args = ['install', '--prefix', plan.dir, '--no-audit', '--no-fund', '--no-update-notifier', '--loglevel=error', ...plan.packages];
  return new Promise((resolve, reject) => {
    const start = (cmd: string, fallback?: string) => {
      const child = spawn(cmd, args, { stdio: ['ignore', 2, 2], env: process.env });
      child.on('error', (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT' && fallback) return start(fallback);
        reject(new LoadError(`cannot run npm to install ${plan.packages.slice(1).join(', ')}: ${err.message}. Install them yourself: ${plan.command}`));
      });
      child.on('exit', (code, signal) => {
        if (code === 0) return resolve();
        reject(new LoadError(`installing ${plan.packages.slice(1).join(', ')} failed (npm ${signal ?? `exit ${code}`}); the command was: ${plan.command}`));
      });
    };
    // npm from PATH, else the one installed beside this node binary.
    start('npm', path.join(path.dirname(process.execPath), 'npm'));
  });
}

/** A lock directory beside the cache, so two nbdx starting at once do not run npm into one prefix. */
async function withInstallLock(dir: string, body: () => Promise<void>): Promise<void> {
  const lock = `${dir}.lock`;
  fs.mkdirSync(path.dirname(lock), { recursive: true });
  const deadline = Date.now() + 5 * 60_000;
  for (;;) {
    try {
      fs.mkdirSync(lock);
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      // A lock older than any install is left over from a killed nbdx.
      const age = Date.now() - (fs.statSync(lock, { throwIfNoEntry: false })?.mtimeMs ?? Date.now());
      if (age > 10 * 60_000) fs.rmSync(lock, { recursive: true, force: true });
      else if (Date.now() > deadline) throw new LoadError(`another nbdx is installing into ${dir} (lock ${lock}); try again later`);
      else await new Promise((r) => setTimeout(r, 200));
    }
  }
  try {
    await body();
  } finally {
    fs.rmSync(lock, { recursive: true, force: true });
  }
}
