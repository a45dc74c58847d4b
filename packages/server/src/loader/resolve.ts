import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { packageVersion } from '../api/common.js';
import { unsupportedApiVersion, type Filter, type Plugin } from '../api/define.js';
import { suggestions } from './names.js';

export type Kind = 'plugin' | 'filter';

/** A loader failure: one clear message for the command line. */
export class LoadError extends Error {}

/** Does this name point at a file rather than a package? */
export function isPathName(name: string): boolean {
  return name.startsWith('.') || name.startsWith('/') || /\.(m|c)?js$/.test(name);
}

/**
 * Package names to try for a plugin or filter name, in order (DESIGN.md, "Finding plugins"):
 * `@nbdx/plugin-NAME`, `nbdx-plugin-NAME`; `@scope/NAME` → `@scope/nbdx-plugin-NAME`;
 * `@scope` → `@scope/nbdx-plugin`; a name already containing `nbdx-plugin` is used as is.
 */
export function candidatePackages(name: string, kind: Kind): string[] {
  const tag = `nbdx-${kind}`;
  if (name.includes(tag)) return [name];
  if (name.startsWith('@')) {
    const [scope, rest] = name.split('/', 2);
    return rest ? [`${scope}/${tag}-${rest}`, name] : [`${scope}/${tag}`];
  }
  return [`@nbdx/${kind}-${name}`, `${tag}-${name}`];
}

/**
 * The plugins and filters released with nbdx itself, as `@nbdx/plugin-NAME` / `@nbdx/filter-NAME`
 * at nbdx's own version (a fixed release group). Only these are ever installed on demand
 * (cli/install.ts); the packaging test checks this list against packages/.
 */
export const FIRST_PARTY: Readonly<Record<Kind, readonly string[]>> = {
  plugin: ['memory', 'file', 'nbd', 'imageio', 'rbd', 'http', 's3'],
  filter: ['offset', 'partition', 'delay', 'cow', 'shared', 'tar', 'stats', 'log', 'retry', 'retry-request', 'readahead', 'cache'],
};

/** The first-party package a name stands for (`memory` or `@nbdx/plugin-memory`), else null. */
export function firstPartyPackage(name: string, kind: Kind): string | null {
  const short = name.startsWith(`@nbdx/${kind}-`) ? name.slice(`@nbdx/${kind}-`.length) : name;
  return FIRST_PARTY[kind].includes(short) ? `@nbdx/${kind}-${short}` : null;
}

/**
 * The package to suggest installing for a name nothing was found for: the first-party package
 * when there is one, else the third-party convention (`nbdx-plugin-NAME`, `@scope/nbdx-plugin-NAME`).
 */
export function suggestedPackage(name: string, kind: Kind): string {
  const first = firstPartyPackage(name, kind);
  if (first) return first;
  const candidates = candidatePackages(name, kind).filter((p) => !p.startsWith(`@nbdx/${kind}-`));
  return candidates[0] ?? candidatePackages(name, kind)[0]!;
}

/** Did the user type a whole package name (`nbdx-plugin-x`, `@scope/...`) rather than a short name? */
export function isPackageName(name: string, kind: Kind): boolean {
  return name.startsWith('@') || name.includes(`nbdx-${kind}`);
}

/** Quote for a POSIX shell (for commands we suggest). */
export function shellQuote(s: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/**
 * The one-line "not found" message. A package name is suggested only where someone has checked
 * it exists: nbdx's own packages, or a full package name the user typed. A short name that is
 * neither gets "did you mean" suggestions and a pointer to `nbdx --list`, never an invented
 * package name (which would be bait for typosquatting). `run`: the command to suggest (default:
 * this command line through npx).
 */
export function notFoundMessage(name: string, kind: Kind, bases: readonly string[], extra?: { pkg?: string; run?: string; note?: string }): string {
  const note = extra?.note ? ` ${extra.note}` : '';
  const first = firstPartyPackage(name, kind);
  const npxRun = (pkg: string) =>
    extra?.run ?? ['npx', '-p', 'nbdx', '-p', pkg, 'nbdx', ...process.argv.slice(2)].map(shellQuote).join(' ');
  if (first) {
    const pkg = extra?.pkg ?? first;
    return `${kind} '${name}' is not installed (looked in ${bases.join(', ')}).${note} Install it with: npm install ${pkg}   (or run: ${npxRun(pkg)})`;
  }
  if (isPackageName(name, kind)) {
    const pkg = candidatePackages(name, kind)[0]!;
    return `${kind} package '${pkg}' is not installed (looked in ${bases.join(', ')}).${note} To run it: ${npxRun(pkg)}`;
  }
  const near = suggestions(name, kind, bases);
  return (
    `${kind} '${name}' not found.` +
    (near.length ? ` Did you mean ${near.join(' or ')}?` : '') +
    `${note} 'nbdx --list' shows the plugins and filters available; a third-party ${kind} is run by its full package name ` +
    `(nbdx-${kind}-NAME or @SCOPE/nbdx-${kind}-NAME).`
  );
}

/** nbdx's version: its own plugins and filters are released with it, at the same version. */
export const NBDX_VERSION: string = packageVersion(import.meta.url);

/**
 * Where nbdx installs its own plugins and filters when a command line names one that is missing
 * (cli/install.ts): an npm prefix per nbdx version, `$NBDX_CACHE_DIR/VERSION`, by default
 * `${XDG_CACHE_HOME:-~/.cache}/nbdx/VERSION`. Outside any project, so it never edits the user's
 * package.json, and searched on every start, so a package is downloaded once.
 */
export function installCacheDir(version: string = NBDX_VERSION, env: NodeJS.ProcessEnv = process.env): string {
  const root = env.NBDX_CACHE_DIR || path.join(env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache'), 'nbdx');
  return path.join(root, version);
}

/**
 * Directories searched, in order: the working directory (a project's own node_modules), where
 * the CLI itself is installed, the packages `npx -p PKG` put on PATH (npx adds their
 * node_modules/.bin; inside a project that has nbdx, npx runs the project's nbdx, which must
 * still see them), and the on-demand install cache.
 */
export function searchBases(cwd: string = process.cwd(), env: NodeJS.ProcessEnv = process.env): string[] {
  const here = path.dirname(fileURLToPath(import.meta.url));
  const bases = [cwd, here];
  try {
    bases.push(path.dirname(fs.realpathSync(process.argv[1] ?? here)));
  } catch {}
  for (const dir of (env.PATH ?? '').split(path.delimiter)) {
    if (dir.endsWith(`${path.sep}node_modules${path.sep}.bin`)) bases.push(path.dirname(path.dirname(dir)));
  }
  bases.push(installCacheDir(NBDX_VERSION, env));
  return [...new Set(bases)];
}

/** Find `node_modules/<pkg>` walking up from `base`; returns the package directory. */
export function findPackageDir(pkg: string, base: string): string | null {
  let dir = path.resolve(base);
  for (;;) {
    const candidate = path.join(dir, 'node_modules', pkg);
    if (fs.existsSync(path.join(candidate, 'package.json'))) return candidate;
    const up = path.dirname(dir);
    if (up === dir) return null;
    dir = up;
  }
}

/** The ESM entry of an installed package, from its `exports` (import/default) or `main`. */
export function packageEntry(dir: string): string {
  const pj = JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8'));
  let target: unknown = pj.exports;
  if (target && typeof target === 'object' && '.' in (target as object)) target = (target as Record<string, unknown>)['.'];
  while (target && typeof target === 'object') {
    const t = target as Record<string, unknown>;
    target = t.import ?? t.node ?? t.default ?? null;
  }
  const rel = typeof target === 'string' ? target : (pj.module ?? pj.main ?? 'index.js');
  return path.join(dir, rel);
}

export interface Located {
  /** What was loaded: a path or a package name. */
  spec: string;
  file: string;
}

/** Locate a plugin or filter; throws LoadError naming everything tried and the install command. */
export function locate(name: string, kind: Kind, bases = searchBases()): Located {
  if (isPathName(name)) {
    const file = path.resolve(bases[0]!, name);
    if (!fs.existsSync(file)) throw new LoadError(`${kind} file not found: ${file}`);
    return { spec: file, file };
  }
  for (const pkg of candidatePackages(name, kind)) {
    for (const base of bases) {
      const dir = findPackageDir(pkg, base);
      if (dir) return { spec: pkg, file: packageEntry(dir) };
    }
  }
  throw new LoadError(notFoundMessage(name, kind, bases));
}

/** Import and validate a plugin or filter module. */
export async function load(name: string, kind: Kind, bases?: string[]): Promise<{ value: Plugin | Filter; spec: string; file: string }> {
  const where = locate(name, kind, bases);
  let mod: Record<string, unknown>;
  try {
    mod = await import(pathToFileURL(where.file).href);
  } catch (err) {
    throw new LoadError(`cannot load ${kind} '${name}' from ${where.file}: ${(err as Error).message}`);
  }
  const value = (mod.default ?? mod[kind]) as Plugin | Filter | undefined;
  validate(value, kind, `${kind} '${name}' (${where.spec})`);
  return { value: value!, spec: where.spec, file: where.file };
}

export function validate(value: unknown, kind: Kind, what: string): void {
  if (!value || typeof value !== 'object') throw new LoadError(`${what} has no default export object`);
  const v = value as Record<string, unknown>;
  if (v.kind !== undefined && v.kind !== kind) throw new LoadError(`${what} is a ${String(v.kind)}, not a ${kind}`);
  if (typeof v.name !== 'string' || !v.name) throw new LoadError(`${what} has no name`);
  const unsupported = unsupportedApiVersion(kind, v.apiVersion ?? 1);
  if (unsupported) throw new LoadError(`${what} ${unsupported}`);
  if (kind === 'plugin') {
    for (const m of ['getSize', 'pread']) {
      if (typeof v[m] !== 'function') throw new LoadError(`${what} is not a plugin: it has no ${m}()`);
    }
  }
}
