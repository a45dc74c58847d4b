/**
 * Releases with changesets (.changeset/config.json): `changeset add` and `changeset version` on a
 * copy of the workspace's manifests. First-party packages move together (a fixed group), a minor
 * change stays a minor release while we are below 1.0 (the core is a peer dependency of every
 * plugin, and changesets would otherwise turn any non-patch core release into a major one), and
 * the examples, private, are never versioned.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { satisfies } from '../scripts/check-packages.mjs';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const changesetBin = path.join(root, 'node_modules', '@changesets', 'cli', 'bin.js');

type Manifest = { name: string; version: string; private?: boolean; peerDependencies?: Record<string, string> };

let tmp: string;
const groups = ['packages', 'examples'];

/** A copy of what changesets reads: manifests, the workspace file and .changeset/. */
function copyWorkspace(): string {
  const dir = fs.mkdtempSync(path.join(tmp, 'ws-'));
  for (const f of ['package.json', 'pnpm-workspace.yaml']) fs.copyFileSync(path.join(root, f), path.join(dir, f));
  fs.mkdirSync(path.join(dir, '.changeset'));
  fs.copyFileSync(path.join(root, '.changeset', 'config.json'), path.join(dir, '.changeset', 'config.json'));
  fs.symlinkSync(path.join(root, 'node_modules'), path.join(dir, 'node_modules'));
  for (const g of groups) {
    if (!fs.existsSync(path.join(root, g))) continue;
    for (const d of fs.readdirSync(path.join(root, g))) {
      const pj = path.join(root, g, d, 'package.json');
      if (!fs.existsSync(pj)) continue;
      fs.mkdirSync(path.join(dir, g, d), { recursive: true });
      fs.copyFileSync(pj, path.join(dir, g, d, 'package.json'));
    }
  }
  return dir;
}

function manifests(dir: string): Manifest[] {
  return groups.flatMap((g) =>
    fs.existsSync(path.join(dir, g))
      ? fs.readdirSync(path.join(dir, g)).map((d) => JSON.parse(fs.readFileSync(path.join(dir, g, d, 'package.json'), 'utf8')) as Manifest)
      : [],
  );
}

function bump(version: string, type: 'patch' | 'minor' | 'major'): string {
  const [a, b, c] = version.split('.').map(Number) as [number, number, number];
  return type === 'major' ? `${a + 1}.0.0` : type === 'minor' ? `${a}.${b + 1}.0` : `${a}.${b}.${c + 1}`;
}

beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-changesets-'));
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

describe('changesets', () => {
  it('puts every first-party package in one fixed group with public access', () => {
    const config = JSON.parse(fs.readFileSync(path.join(root, '.changeset', 'config.json'), 'utf8'));
    expect(config.fixed).toEqual([['nbdx', '@nbdx/*']]);
    expect(config.access).toBe('public');
    const names = manifests(root).filter((m) => !m.private).map((m) => m.name);
    expect(names.every((n) => n === 'nbdx' || n.startsWith('@nbdx/'))).toBe(true);
  });

  it('`changeset add --empty` writes a changeset file', async () => {
    const dir = copyWorkspace();
    await run(process.execPath, [changesetBin, 'add', '--empty'], { cwd: dir });
    expect(fs.readdirSync(path.join(dir, '.changeset')).filter((f) => f.endsWith('.md'))).toHaveLength(1);
  });

  for (const [type, pkg] of [['minor', '@nbdx/plugin-memory'], ['patch', '@nbdx/server']] as const) {
    it(`\`changeset version\`: a ${type} change to ${pkg} releases every first-party package at one ${type} version`, async () => {
      const dir = copyWorkspace();
      const before = manifests(dir);
      const core = before.find((m) => m.name === '@nbdx/server')!;
      fs.writeFileSync(path.join(dir, '.changeset', 'some-change.md'), `---\n"${pkg}": ${type}\n---\n\nA change.\n`);
      await run(process.execPath, [changesetBin, 'version'], { cwd: dir });
      const after = manifests(dir);
      const next = bump(core.version, type);
      for (const m of after) {
        const old = before.find((b) => b.name === m.name)!;
        if (m.private) {
          expect(m, `${m.name} is private: never versioned`).toEqual(old);
          continue;
        }
        expect(m.version, m.name).toBe(next);
        const peer = m.peerDependencies?.['@nbdx/server'];
        if (peer) expect(satisfies(next, peer), `${m.name}: peer range ${peer} accepts core ${next}`).toBe(true);
      }
      expect(fs.existsSync(path.join(dir, 'packages', 'plugin-memory', 'CHANGELOG.md'))).toBe(true);
      expect(fs.readdirSync(path.join(dir, '.changeset')).filter((f) => f.endsWith('.md'))).toEqual([]);
    });
  }
});
