import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { LoadError, candidatePackages, load, locate } from './resolve.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-loader-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Write a fake installed package under dir/node_modules. */
function pkg(name: string, body: string, pj: Record<string, unknown> = {}): void {
  const d = path.join(dir, 'node_modules', name);
  fs.mkdirSync(path.join(d, 'dist'), { recursive: true });
  fs.writeFileSync(path.join(d, 'package.json'), JSON.stringify({ name, type: 'module', exports: { '.': { import: './dist/index.js' } }, ...pj }));
  fs.writeFileSync(path.join(d, 'dist', 'index.js'), body);
}

const plugin = (name: string, extra = '') =>
  `export default { kind: 'plugin', name: '${name}', apiVersion: 2, getSize: () => 0, pread: () => {} ${extra} };`;

describe('candidate package names', () => {
  it('follows DESIGN.md: first-party, third-party, scoped', () => {
    expect(candidatePackages('memory', 'plugin')).toEqual(['@nbdx/plugin-memory', 'nbdx-plugin-memory']);
    expect(candidatePackages('cow', 'filter')).toEqual(['@nbdx/filter-cow', 'nbdx-filter-cow']);
    expect(candidatePackages('@acme/disk', 'plugin')).toEqual(['@acme/nbdx-plugin-disk', '@acme/disk']);
    expect(candidatePackages('@acme', 'plugin')).toEqual(['@acme/nbdx-plugin']);
    expect(candidatePackages('nbdx-plugin-x', 'plugin')).toEqual(['nbdx-plugin-x']);
    expect(candidatePackages('@acme/nbdx-plugin-x', 'plugin')).toEqual(['@acme/nbdx-plugin-x']);
  });
});

describe('loading', () => {
  pkg('nbdx-plugin-pattern', plugin('pattern'));
  pkg('@acme/nbdx-plugin-disk', plugin('disk'));
  pkg('@acme/nbdx-plugin', plugin('acme'));
  pkg('nbdx-plugin-future', plugin('future').replace('apiVersion: 2', 'apiVersion: 3'));
  pkg('nbdx-plugin-notone', `export default { kind: 'filter', name: 'notone' };`);
  pkg('nbdx-plugin-broken', `export default { name: 'broken', apiVersion: 2 };`);
  fs.writeFileSync(path.join(dir, 'local.mjs'), plugin('local'));

  it('finds third-party and scoped packages from the search directories', async () => {
    expect((await load('pattern', 'plugin', [dir])).value.name).toBe('pattern');
    expect((await load('@acme/disk', 'plugin', [dir])).spec).toBe('@acme/nbdx-plugin-disk');
    expect((await load('@acme', 'plugin', [dir])).value.name).toBe('acme');
    expect((await load('./local.mjs', 'plugin', [dir])).value.name).toBe('local');
  });

  it('walks up from a subdirectory to node_modules', () => {
    const sub = path.join(dir, 'a', 'b');
    fs.mkdirSync(sub, { recursive: true });
    expect(locate('pattern', 'plugin', [sub]).spec).toBe('nbdx-plugin-pattern');
  });

  it('validates what it loaded', async () => {
    await expect(load('future', 'plugin', [dir])).rejects.toThrow(/API version 3, but this nbdx supports versions 1 and 2/);
    await expect(load('notone', 'plugin', [dir])).rejects.toThrow(/is a filter, not a plugin/);
    await expect(load('broken', 'plugin', [dir])).rejects.toThrow(/not a plugin: it has no getSize/);
  });

  it('says what is available when nothing is found, and names only packages someone typed or that are ours', () => {
    expect(() => locate('nope', 'filter', [dir])).toThrow(LoadError);
    expect(() => locate('nope', 'filter', [dir])).toThrow(/^filter 'nope' not found\. 'nbdx --list' shows/);
    expect(() => locate('ofset', 'filter', [dir])).toThrow(/Did you mean 'offset'\?/);
    expect(() => locate('nbdx-filter-nope', 'filter', [dir])).toThrow(/filter package 'nbdx-filter-nope' is not installed.*To run it: npx -p nbdx -p nbdx-filter-nope nbdx/);
    expect(() => locate('cow', 'filter', [dir])).toThrow(/filter 'cow' is not installed .*npm install @nbdx\/filter-cow/);
  });
});
