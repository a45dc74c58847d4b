/**
 * nbdx installing what a command line needs (packages/server/src/cli/install.ts), without a
 * registry: a copy of the `nbdx` and `@nbdx/server` packages in a temporary node_modules, and a
 * fake `npm` first in PATH that records how it was called and "installs" by copying the
 * workspace's packages into the prefix it was given. The real npm, npx and a registry are
 * exercised by registry.test.ts.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FIRST_PARTY } from '../packages/server/src/loader/resolve.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const VERSION: string = JSON.parse(fs.readFileSync(path.join(root, 'packages/server/package.json'), 'utf8')).version;

let tmp: string;
let bin: string;
let log: string;
let work: string;
let cache: string;

function copyPackage(from: string, to: string): void {
  fs.mkdirSync(to, { recursive: true });
  fs.copyFileSync(path.join(from, 'package.json'), path.join(to, 'package.json'));
  for (const dir of ['dist', 'bin']) {
    if (fs.existsSync(path.join(from, dir))) fs.cpSync(path.join(from, dir), path.join(to, dir), { recursive: true });
  }
}

beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-install-'));
  const nm = path.join(tmp, 'lib', 'node_modules');
  copyPackage(path.join(root, 'packages/nbdx'), path.join(nm, 'nbdx'));
  copyPackage(path.join(root, 'packages/server'), path.join(nm, '@nbdx', 'server'));
  bin = path.join(nm, 'nbdx', 'bin', 'nbdx.js');
  log = path.join(tmp, 'npm.log');
  work = path.join(tmp, 'work');
  cache = path.join(tmp, 'cache');
  fs.mkdirSync(work);
  fs.mkdirSync(path.join(tmp, 'bin'));
  const fake = path.join(tmp, 'bin', 'npm');
  // `npm install --prefix DIR ... @nbdx/NAME@V ...`: copies packages/NAME (package.json, dist)
  // into DIR/node_modules/@nbdx/NAME; FAKE_NPM_STATUS makes it fail instead.
  fs.writeFileSync(
    fake,
    `#!${process.execPath}
const fs = require('node:fs');
const path = require('node:path');
const args = process.argv.slice(2);
fs.appendFileSync(process.env.FAKE_NPM_LOG, JSON.stringify({ args, cwd: process.cwd() }) + '\\n');
if (process.env.FAKE_NPM_STATUS) { console.log('npm says no'); process.exit(Number(process.env.FAKE_NPM_STATUS)); }
const prefix = args[args.indexOf('--prefix') + 1];
for (const spec of args.filter((a) => a.startsWith('@nbdx/'))) {
  const name = spec.slice('@nbdx/'.length, spec.lastIndexOf('@'));
  const to = path.join(prefix, 'node_modules', '@nbdx', name);
  fs.mkdirSync(to, { recursive: true });
  fs.copyFileSync(path.join(${JSON.stringify(root)}, 'packages', name, 'package.json'), path.join(to, 'package.json'));
  fs.cpSync(path.join(${JSON.stringify(root)}, 'packages', name, 'dist'), path.join(to, 'dist'), { recursive: true });
}
console.log('added some packages');
`,
  );
  fs.chmodSync(fake, 0o755);
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
  calls: Array<{ args: string[]; cwd: string }>;
}

function nbdx(args: string[], env: Record<string, string> = {}): Promise<Result> {
  const logFile = env.FAKE_NPM_LOG ?? log;
  fs.rmSync(logFile, { force: true });
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('NBDX_')));
  // The test runner's PATH has the workspace's node_modules/.bin folders, which nbdx searches
  // (where `npx -p` puts packages): a user's shell has none.
  clean.PATH = (process.env.PATH ?? '').split(':').filter((d) => !d.endsWith('/node_modules/.bin')).join(':');
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [bin, ...args], {
      cwd: work,
      env: { ...clean, PATH: `${path.join(tmp, 'bin')}:${clean.PATH}`, FAKE_NPM_LOG: logFile, NBDX_CACHE_DIR: cache, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    child.on('exit', (code) => {
      const calls = fs.existsSync(logFile) ? fs.readFileSync(logFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l)) : [];
      resolve({ code, stdout, stderr, calls });
    });
  });
}

const cacheDir = () => path.join(cache, VERSION);
const installArgs = (...pkgs: string[]) => [
  'install', '--prefix', cacheDir(), '--no-audit', '--no-fund', '--no-update-notifier', '--loglevel=error',
  `@nbdx/server@${VERSION}`, ...pkgs.map((p) => `${p}@${VERSION}`),
];

describe('first-party names: nbdx installs what is missing into its cache, then serves in the same process', () => {
  afterAll(() => fs.rmSync(cache, { recursive: true, force: true }));

  it('nbdx memory 1M: npm install --prefix CACHE @nbdx/server@V @nbdx/plugin-memory@V, then it serves', async () => {
    fs.rmSync(cache, { recursive: true, force: true });
    const r = await nbdx(['-U', '-', 'memory', '1M', '--run', 'echo "uri=$uri"']);
    expect(r.calls).toEqual([{ args: installArgs('@nbdx/plugin-memory'), cwd: work }]);
    // One line of ours; npm's output goes to stderr too (stdout may be the NBD channel with -s).
    expect(r.stderr).toBe(
      `nbdx: installing @nbdx/plugin-memory@${VERSION} into ${cacheDir()} (--no-install or NBDX_NO_INSTALL=1 turns this off)\nadded some packages\n`,
    );
    expect(r.stdout).toMatch(/^uri=nbd\+unix:/);
    expect(r.code).toBe(0);
    expect(JSON.parse(fs.readFileSync(path.join(cacheDir(), 'package.json'), 'utf8')).private).toBe(true);
    expect(fs.existsSync(`${cacheDir()}.lock`)).toBe(false);
  });

  it('the next start finds it in the cache: no npm, not a word on stderr', async () => {
    const r = await nbdx(['-U', '-', 'memory', '1M', '--run', 'echo "uri=$uri"']);
    expect(r.calls).toEqual([]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    const listed = await nbdx(['--list']);
    expect(listed.stdout).toMatch(/memory\s.*@nbdx\/plugin-memory/);
  });

  it('asks only for the packages that are missing (the plugin is in the cache, two filters are not)', async () => {
    const r = await nbdx(['-U', '-', '--filter=shared', '--filter=@nbdx/filter-offset', 'memory', '1M', 'range=4k', '--run', 'nbdinfo --size "$uri"']);
    expect(r.calls.map((c) => c.args)).toEqual([installArgs('@nbdx/filter-shared', '@nbdx/filter-offset')]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe('4096\n');
  });

  it('a failed npm: one line with the command, exit 1', async () => {
    const r = await nbdx(['--filter=tar', 'memory', '1M'], { FAKE_NPM_STATUS: '7' });
    expect(r.code).toBe(1);
    const lines = r.stderr.trim().split('\n');
    expect(lines[0]).toContain('nbdx: installing @nbdx/filter-tar');
    expect(lines.at(-1)).toBe(
      `nbdx: installing @nbdx/filter-tar@${VERSION} failed (npm exit 7); the command was: npm install --prefix ${cacheDir()} @nbdx/server@${VERSION} @nbdx/filter-tar@${VERSION}`,
    );
    expect(fs.existsSync(`${cacheDir()}.lock`)).toBe(false);
  });

  it('two nbdx starting at once: npm runs once (a lock, then a second look), both serve', async () => {
    const both = await Promise.all(
      ['a', 'b'].map((n) => nbdx(['-U', '-', '--filter=delay', 'memory', '1M', '--run', 'true'], { FAKE_NPM_LOG: path.join(tmp, `npm-${n}.log`) })),
    );
    expect(both.map((r) => r.code)).toEqual([0, 0]);
    expect(both.flatMap((r) => r.calls).map((c) => c.args)).toEqual([installArgs('@nbdx/filter-delay')]);
    expect(both.filter((r) => r.stderr.includes('installing')).length).toBe(1);
  });

  it('--metrics: the endpoint package is installed with what the command line names', async () => {
    const r = await nbdx(['-U', '-', '--metrics=127.0.0.1:0', 'memory', '1M', '--run', 'true'], { FAKE_NPM_STATUS: '3' });
    expect(r.calls.map((c) => c.args)).toEqual([installArgs('@nbdx/metrics')]);
    expect(r.code).toBe(1);
    const blocked = await nbdx(['-U', '-', '--metrics=0', 'memory', '1M', '--no-install']);
    expect(blocked.calls).toEqual([]);
    expect(blocked.stderr).toBe(
      `nbdx: --metrics needs the @nbdx/metrics package, which is not installed. Not installing it (--no-install). ` +
        `Install it with: npm install @nbdx/metrics@${VERSION}   (or run: npm install --prefix ${cacheDir()} @nbdx/server@${VERSION} @nbdx/metrics@${VERSION})\n`,
    );
  });

  for (const [how, extra, env, said] of [
    ['--no-install', ['--no-install'], {}, '--no-install'],
    ['NBDX_NO_INSTALL=1', [], { NBDX_NO_INSTALL: '1' }, 'NBDX_NO_INSTALL=1'],
  ] as const) {
    it(`${how}: installs nothing and gives the commands instead`, async () => {
      const r = await nbdx(['--filter=cow', 'memory', '1M', ...extra], { ...env });
      expect(r.calls).toEqual([]);
      expect(r.code).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toContain(`nbdx: filter 'cow' is not installed (looked in ${work}`);
      expect(r.stderr).toContain(`Not installing it (${said}).`);
      expect(r.stderr).toContain(`npm install @nbdx/filter-cow@${VERSION}`);
      expect(r.stderr).toContain(`(or run: npm install --prefix ${cacheDir()} @nbdx/server@${VERSION} @nbdx/filter-cow@${VERSION})`);
      expect(r.stderr).not.toContain('...');
    });
  }
});

describe('third-party names are never installed: the error gives the exact command', () => {
  it('a short name that is not ours: no package name is invented; did-you-mean and nbdx --list instead', async () => {
    const r = await nbdx(['pattern', '1M', 'pattern=c0ffee']);
    expect(r.calls).toEqual([]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain("nbdx: plugin 'pattern' not found.");
    expect(r.stderr).toContain("'nbdx --list' shows the plugins and filters available");
    expect(r.stderr).not.toMatch(/npm install|npx -p/);
    const typo = await nbdx(['memroy', '1G']);
    expect(typo.stderr).toContain("nbdx: plugin 'memroy' not found. Did you mean 'memory'?");
    expect(typo.stderr).not.toMatch(/nbdx-plugin-memroy/);
  });

  it('a full package name: the npx command that runs it, which works when pasted', async () => {
    const args = ['nbdx-plugin-pattern', '1M', 'pattern=c0ffee', '--run', `nbdinfo "$uri" | grep 'export-size'`];
    const r = await nbdx(args);
    expect(r.calls).toEqual([]);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toContain("nbdx: plugin package 'nbdx-plugin-pattern' is not installed (looked in");
    expect(r.stderr).toContain('nbdx installs only its own @nbdx packages by itself, never third-party ones.');
    const command = /To run it: (npx .*)\n$/.exec(r.stderr)![1]!;
    expect(command).toBe(`npx -p nbdx@${VERSION} -p nbdx-plugin-pattern nbdx nbdx-plugin-pattern 1M pattern=c0ffee --run 'nbdinfo "$uri" | grep '\\''export-size'\\'''`);
    // Paste it into a shell: npx gets exactly the arguments nbdx was given.
    const pasted = await new Promise<string>((resolve) => {
      const argLog = path.join(tmp, 'args.log');
      const echo = path.join(tmp, 'echo-bin');
      fs.mkdirSync(echo, { recursive: true });
      fs.writeFileSync(path.join(echo, 'npx'), `#!${process.execPath}\nrequire('node:fs').writeFileSync(${JSON.stringify(argLog)}, JSON.stringify(process.argv.slice(2)));\n`, { mode: 0o755 });
      spawn('/bin/sh', ['-c', command], { env: { ...process.env, PATH: `${echo}:${process.env.PATH}` } }).on('exit', () => resolve(fs.readFileSync(argLog, 'utf8')));
    });
    expect(JSON.parse(pasted)).toEqual(['-p', `nbdx@${VERSION}`, '-p', 'nbdx-plugin-pattern', 'nbdx', ...args]);
  });

  it('a missing third-party filter with a missing first-party plugin: the npx command for the third-party one, nothing installed', async () => {
    const r = await nbdx(['--filter=nbdx-filter-xor', 'memory', '1M', 'xor=0x5a']);
    expect(r.calls).toEqual([]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("filter package 'nbdx-filter-xor' is not installed");
    expect(r.stderr).toContain("Also missing: plugin 'memory'.");
    // nbdx run by that command installs the memory plugin by itself.
    expect(r.stderr).toContain(`npx -p nbdx@${VERSION} -p nbdx-filter-xor nbdx --filter=nbdx-filter-xor memory 1M xor=0x5a`);
  });

  it('scoped names follow the convention: @acme/disk → @acme/nbdx-plugin-disk', async () => {
    const r = await nbdx(['@acme/disk']);
    expect(r.calls).toEqual([]);
    expect(r.stderr).toContain("plugin package '@acme/nbdx-plugin-disk' is not installed");
    expect(r.stderr).toContain('-p @acme/nbdx-plugin-disk nbdx @acme/disk');
  });

  it('a key=value where the plugin name belongs: a usage hint, nothing installed', async () => {
    const r = await nbdx(['--filter=offset', 'offset=1M', 'memory', '1G']);
    expect(r.calls).toEqual([]);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe(
      "nbdx: 'offset=1M' is not a plugin name: the plugin comes first, then its and the filters' key=value parameters " +
        '(e.g. nbdx --filter=offset memory 1G offset=1M)\n',
    );
  });

  it('a path is loaded as a file, never installed', async () => {
    const r = await nbdx(['./nowhere.js']);
    expect(r.calls).toEqual([]);
    expect(r.stderr).toMatch(/plugin file not found: .*nowhere\.js/);
  });
});

describe('the first-party list', () => {
  it('names exactly the plugin and filter packages in packages/', () => {
    const dirs = fs.readdirSync(path.join(root, 'packages'));
    const of = (kind: string) => dirs.filter((d) => d.startsWith(`${kind}-`)).map((d) => d.slice(kind.length + 1)).sort();
    expect([...FIRST_PARTY.plugin].sort()).toEqual(of('plugin'));
    expect([...FIRST_PARTY.filter].sort()).toEqual(of('filter'));
  });
});
