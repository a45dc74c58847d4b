import * as fs from 'node:fs';
import * as path from 'node:path';
import { FIRST_PARTY, type Kind } from './resolve.js';

/**
 * What plugin and filter names exist here: the ones installed where the loader looks (nbdx's
 * own and third-party packages following the naming convention) and nbdx's own ones that are
 * installed on first use. Used for `nbdx --list` and for "did you mean" suggestions.
 */
export interface Available {
  name: string;
  kind: Kind;
  /** The package, when installed. */
  pkg?: string;
  version?: string;
  firstParty: boolean;
}

/** Every node_modules directory from each base up to the root, once. */
function nodeModulesDirs(bases: readonly string[]): string[] {
  const out = new Set<string>();
  for (const base of bases) {
    for (let dir = path.resolve(base); ; dir = path.dirname(dir)) {
      const nm = path.join(dir, 'node_modules');
      if (fs.existsSync(nm)) out.add(nm);
      if (path.dirname(dir) === dir) break;
    }
  }
  return [...out];
}

function readVersion(dir: string): string | undefined {
  try {
    return (JSON.parse(fs.readFileSync(path.join(dir, 'package.json'), 'utf8')) as { version?: string }).version;
  } catch {
    return undefined;
  }
}

/** The plugin or filter name a package directory stands for, if it follows the convention. */
function nameOf(pkg: string, kind: Kind): string | null {
  const own = `@nbdx/${kind}-`;
  if (pkg.startsWith(own)) return pkg.slice(own.length);
  const tag = `nbdx-${kind}-`;
  if (pkg.startsWith(tag)) return pkg.slice(tag.length);
  const scoped = /^(@[^/]+)\/nbdx-(plugin|filter)(?:-(.+))?$/.exec(pkg);
  if (scoped && scoped[2] === kind) return scoped[3] ? `${scoped[1]}/${scoped[3]}` : scoped[1]!;
  return null;
}

export function listAvailable(bases: readonly string[]): Available[] {
  const found = new Map<string, Available>();
  for (const nm of nodeModulesDirs(bases)) {
    let entries: string[];
    try {
      entries = fs.readdirSync(nm);
    } catch {
      continue;
    }
    const pkgs: string[] = [];
    for (const e of entries) {
      if (e.startsWith('@')) {
        try {
          for (const inner of fs.readdirSync(path.join(nm, e))) pkgs.push(`${e}/${inner}`);
        } catch {}
      } else pkgs.push(e);
    }
    for (const pkg of pkgs) {
      for (const kind of ['plugin', 'filter'] as const) {
        const name = nameOf(pkg, kind);
        const key = `${kind}:${name}`;
        if (!name || found.has(key) || !fs.existsSync(path.join(nm, pkg, 'package.json'))) continue;
        found.set(key, { name, kind, pkg, version: readVersion(path.join(nm, pkg)), firstParty: pkg.startsWith('@nbdx/') });
      }
    }
  }
  for (const kind of ['plugin', 'filter'] as const) {
    for (const name of FIRST_PARTY[kind]) {
      if (!found.has(`${kind}:${name}`)) found.set(`${kind}:${name}`, { name, kind, firstParty: true });
    }
  }
  return [...found.values()].sort((a, b) => a.kind.localeCompare(b.kind) || a.name.localeCompare(b.name));
}

/** `nbdx --list`: one line per plugin and filter. */
export function formatList(bases: readonly string[]): string {
  const lines: string[] = [];
  for (const kind of ['plugin', 'filter'] as const) {
    lines.push(`${kind}s:`);
    for (const a of listAvailable(bases).filter((x) => x.kind === kind)) {
      const where = a.pkg ? `${a.pkg}${a.version ? ` ${a.version}` : ''}` : `@nbdx/${kind}-${a.name} (installed on first use)`;
      lines.push(`  ${a.name.padEnd(12)} ${where}`);
    }
  }
  return `${lines.join('\n')}\n`;
}

/** Edit distance with transpositions (a typo swapping two letters counts once). */
export function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i, ...new Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let v = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) v = Math.min(v, d[i - 2]![j - 2]! + 1);
      d[i]![j] = v;
    }
  }
  return d[a.length]![b.length]!;
}

/** Names of this kind close to `name` (a typo), nearest first; also the other kind's exact name. */
export function suggestions(name: string, kind: Kind, bases: readonly string[]): string[] {
  const all = listAvailable(bases);
  const lower = name.toLowerCase();
  const near = all
    .filter((a) => a.kind === kind)
    .map((a) => ({ a, d: editDistance(lower, a.name.toLowerCase()) }))
    .filter(({ a, d }) => d > 0 && d <= Math.max(1, Math.floor(a.name.length / 3)))
    .sort((x, y) => x.d - y.d)
    .map(({ a }) => `'${a.name}'`);
  const other = all.find((a) => a.kind !== kind && a.name === name);
  if (other) near.push(`the ${other.kind} '${other.name}' (${other.kind === 'filter' ? '--filter=' + other.name : 'as the plugin'})`);
  return near;
}
