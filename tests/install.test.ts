/**
 * nbdx installing what a command line needs (packages/server/src/cli/install.ts), without a
 * registry: a copy of the `nbdx` and `@nbdx/server` packages in a temporary node_modules, and a
 * fake `npx` first in PATH that records how it was called. The real npx and registry are
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

function copyPackage(from: string, to: string): void {
  fs.mkdirSync(to, { recursive: true });
  fs.copyFileSync(path.join(from, 'package.json'), path.join(to, 'package.json'));
  fs.cpSync(path.join(from, 'dist'), path.join(to, 'dist'), { recursive: true });
}

beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-install-'));
  const nm = path.join(tmp, 'lib', 'node_modules');
  copyPackage(path.join(root, 'packages/nbdx'), path.join(nm, 'nbdx'));
  copyPackage(path.join(root, 'packages/server'), path.join(nm, '@nbdx', 'server'));
  bin = path.join(nm, 'nbdx', 'dist', 'bin.js');
  log = path.join(tmp, 'npx.log');
  work = path.join(tmp, 'work');
  fs.mkdirSync(work);
  fs.mkdirSync(path.join(tmp, 'bin'));
  const fake = path.join(tmp, 'bin', 'npx');
  fs.writeFileSync(
    fake,
    `#!${process.execPath}
const fs = require('node:fs');
const entry = { args: process.argv.slice(2), rerun: process.env.NBDX_NPX_RERUN ?? null };
fs.appendFileSync(process.env.FAKE_NPX_LOG, JSON.stringify(entry) + '\\n');
if (process.env.FAKE_NPX_WAIT) {
  process.on('SIGTERM', () => { fs.appendFileSync(process.env.FAKE_NPX_LOG, '"SIGTERM"\\n'); process.exit(143); });
  fs.appendFileSync(process.env.FAKE_NPX_LOG, '"waiting"\\n');
  setInterval(() => {}, 1000);
} else process.exit(Number(process.env.FAKE_NPX_STATUS ?? 0));
`,
  );
  fs.chmodSync(fake, 0o755);
});
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

interface Result {
  code: number | null;
  stderr: string;
  calls: unknown[];
}

function nbdx(args: string[], env: Record<string, string> = {}, onStart?: (pid: number) => void): Promise<Result> {
  fs.rmSync(log, { force: true });
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('NBDX_')));
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [bin, ...args], {
      cwd: work,
      env: { ...clean, PATH: `${path.join(tmp, 'bin')}:${process.env.PATH}`, FAKE_NPX_LOG: log, ...env },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    if (onStart) onStart(child.pid!);
    child.on('exit', (code) => {
      const calls = fs.existsSync(log) ? fs.readFileSync(log, 'utf8').trim().split('\n').map((l) => JSON.parse(l)) : [];
      resolve({ code, stderr, calls });
    });
  });
}

describe('first-party names: nbdx runs itself again through npx with exactly what is missing', () => {
  it('nbdx memory 1M → npx --yes -p nbdx@V -p @nbdx/plugin-memory@V -- nbdx memory 1M, and its exit status', async () => {
    const r = await nbdx(['memory', '1M', '--run', 'echo "$uri"'], { FAKE_NPX_STATUS: '7' });
    expect(r.calls).toEqual([
      {
        args: ['--yes', '-p', `nbdx@${VERSION}`, '-p', `@nbdx/plugin-memory@${VERSION}`, '--', 'nbdx', 'memory', '1M', '--run', 'echo "$uri"'],
        rerun: '1',
      },
    ]);
    expect(r.stderr).toBe(`nbdx: installing @nbdx/plugin-memory@${VERSION} with npx (--no-install or NBDX_NO_INSTALL=1 turns this off)\n`);
    expect(r.code).toBe(7);
  });

  it('asks only for the packages that are missing (the plugin is installed here, two filters are not)', async () => {
    const nm = path.join(work, 'node_modules', '@nbdx');
    fs.mkdirSync(nm, { recursive: true });
    fs.symlinkSync(path.join(root, 'packages/plugin-memory'), path.join(nm, 'plugin-memory'));
    try {
      const r = await nbdx(['--filter=shared', '--filter=@nbdx/filter-cow', 'memory', '1M']);
      expect(r.calls).toHaveLength(1);
      const args = (r.calls[0] as { args: string[] }).args;
      expect(args.slice(0, args.indexOf('--'))).toEqual(['--yes', '-p', `nbdx@${VERSION}`, '-p', `@nbdx/filter-shared@${VERSION}`, '-p', `@nbdx/filter-cow@${VERSION}`]);
      expect(r.code).toBe(0);
    } finally {
      fs.rmSync(path.join(work, 'node_modules'), { recursive: true, force: true });
    }
  });

  it('passes SIGTERM on to the run it started', async () => {
    let pid = 0;
    const done = nbdx(['memory', '1M'], { FAKE_NPX_WAIT: '1' }, (p) => (pid = p));
    for (let i = 0; i < 200 && !(fs.existsSync(log) && fs.readFileSync(log, 'utf8').includes('waiting')); i++) {
      await new Promise((r) => setTimeout(r, 25));
    }
    process.kill(pid, 'SIGTERM');
    const r = await done;
    expect(r.calls.slice(1)).toEqual(['waiting', 'SIGTERM']);
    expect(r.code).toBe(143);
  });

  for (const [how, args, env, said] of [
    ['--no-install', ['memory', '1M', '--no-install'], {}, '--no-install'],
    ['NBDX_NO_INSTALL=1', ['memory', '1M'], { NBDX_NO_INSTALL: '1' }, 'NBDX_NO_INSTALL=1'],
  ] as const) {
    it(`${how}: installs nothing and gives the command instead`, async () => {
      const r = await nbdx([...args], { ...env });
      expect(r.calls).toEqual([]);
      expect(r.code).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toContain(`nbdx: plugin 'memory' is not installed (looked in ${work}`);
      expect(r.stderr).toContain(`Not installing it (${said}).`);
      expect(r.stderr).toContain(`npm install @nbdx/plugin-memory@${VERSION}`);
      expect(r.stderr).toContain(`(or run: npx -p nbdx@${VERSION} -p @nbdx/plugin-memory@${VERSION} nbdx ${args.join(' ')})`);
    });
  }

  it('after one re-run (NBDX_NPX_RERUN set) it does not try again: the loader says what is missing', async () => {
    const r = await nbdx(['memory', '1M'], { NBDX_NPX_RERUN: '1' });
    expect(r.calls).toEqual([]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^nbdx: plugin 'memory' is not installed \(looked in .*Install it with: npm install @nbdx\/plugin-memory /);
  });
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
    const pasted = await new Promise<unknown[]>((resolve) => {
      fs.rmSync(log, { force: true });
      spawn('/bin/sh', ['-c', command], { env: { ...process.env, PATH: `${path.join(tmp, 'bin')}:${process.env.PATH}`, FAKE_NPX_LOG: log } }).on('exit', () =>
        resolve(fs.readFileSync(log, 'utf8').trim().split('\n').map((l) => JSON.parse(l))),
      );
    });
    expect((pasted[0] as { args: string[] }).args).toEqual(['-p', `nbdx@${VERSION}`, '-p', 'nbdx-plugin-pattern', 'nbdx', ...args]);
  });

  it('a missing third-party filter with a missing first-party plugin: one command for both, nothing installed', async () => {
    const r = await nbdx(['--filter=nbdx-filter-xor', 'memory', '1M', 'xor=0x5a']);
    expect(r.calls).toEqual([]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("filter package 'nbdx-filter-xor' is not installed");
    expect(r.stderr).toContain("Also missing: plugin 'memory'.");
    expect(r.stderr).toContain(`npx -p nbdx@${VERSION} -p @nbdx/plugin-memory@${VERSION} -p nbdx-filter-xor nbdx --filter=nbdx-filter-xor memory 1M xor=0x5a`);
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
        '(nbdx [OPTIONS] PLUGIN [KEY=VALUE]..., e.g. nbdx --filter=offset memory 1G offset=1M)\n',
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
