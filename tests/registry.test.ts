/**
 * The packages as users get them: a real npm registry (verdaccio) on loopback, the built
 * workspace packed with pnpm and published to it with npm, then npx in empty directories.
 *
 * Nothing reaches the internet: verdaccio has no uplinks, and every package the runs below
 * install is in the workspace (the only third-party runtime dependency, undici, belongs to
 * @nbdx/plugin-imageio, which no run installs — had one tried, npx would have failed). Each run
 * gets its own npm cache and HOME in a temporary directory, so what npx installed can be read in
 * `<cache>/_npx/<hash>/node_modules` and nothing leaks in from the user's npm set-up.
 *
 * The two example packages are `private` in the workspace (so a release never publishes them to
 * npm); here they are published without that flag, as their authors would publish them.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import { NbdClient } from '@nbdx/client';
import { needTools } from '@nbdx/testkit';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
/**
 * @nbdx/native, the core's optional dependency (a small prebuilt addon), comes with it wherever
 * npm installs the core, except on a Node below its `engines` (npm skips such optional packages).
 */
const NATIVE = Number(process.versions.node.split('.')[0]) >= 22 ? ['@nbdx/native'] : [];
const VERSION: string = JSON.parse(fs.readFileSync(path.join(root, 'packages/server/package.json'), 'utf8')).version;
const have = needTools('nbdinfo', 'nbdcopy');

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function exec(cmd: string, args: string[], opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeout?: number } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: opts.cwd, env: opts.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), opts.timeout ?? 60_000);
    child.on('error', reject);
    child.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

async function execOk(cmd: string, args: string[], opts: Parameters<typeof exec>[2] = {}): Promise<Run> {
  const r = await exec(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}):\n${r.stdout}\n${r.stderr}`);
  return r;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

async function pool<T>(items: T[], n: number, fn: (item: T) => Promise<void>): Promise<void> {
  const queue = [...items];
  await Promise.all(Array.from({ length: n }, async () => {
    while (queue.length) await fn(queue.shift()!);
  }));
}

describe.runIf(have)('published to a registry on loopback, run with npx', () => {
  let tmp: string;
  let registry: string;
  let verdaccio: ReturnType<typeof spawn> | undefined;
  let verdaccioLog = '';
  /** The environment of the user's shell: no npm or pnpm settings from the test runner. */
  let baseEnv: NodeJS.ProcessEnv;

  /** A fresh empty directory, npm cache and HOME for one user's runs. */
  function user(name: string) {
    const dir = path.join(tmp, name);
    const home = path.join(dir, 'home');
    const cwd = path.join(dir, 'work');
    const cache = path.join(dir, 'npm-cache');
    fs.mkdirSync(home, { recursive: true });
    fs.mkdirSync(cwd);
    const env: NodeJS.ProcessEnv = {
      ...baseEnv,
      HOME: home,
      npm_config_cache: cache,
      npm_config_userconfig: path.join(home, '.npmrc'),
    };
    const npx = (args: string[], extra: NodeJS.ProcessEnv = {}) => exec('npx', args, { cwd, env: { ...env, ...extra }, timeout: 90_000 });
    const sh = (command: string) => exec('/bin/sh', ['-c', command], { cwd, env, timeout: 90_000 });
    /** Every package npx installed for this user, one list per npx cache entry. */
    const installed = (): string[][] => {
      const base = path.join(cache, '_npx');
      if (!fs.existsSync(base)) return [];
      return fs.readdirSync(base).map((h) => {
        const nm = path.join(base, h, 'node_modules');
        const names: string[] = [];
        for (const e of fs.readdirSync(nm)) {
          if (e.startsWith('.')) continue;
          if (e.startsWith('@')) for (const s of fs.readdirSync(path.join(nm, e))) names.push(`${e}/${s}`);
          else names.push(e);
        }
        return names.sort();
      });
    };
    return { cwd, env, npx, sh, installed };
  }

  /** The plugins and filters among installed packages (first- and third-party). */
  const layers = (names: string[]) => names.filter((n) => /^(@nbdx\/|nbdx-)(plugin|filter)-/.test(n));

  beforeAll(async () => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-registry-'));
    baseEnv = Object.fromEntries(
      Object.entries(process.env).filter(([k]) => !/^(npm_|pnpm_|NBDX_)/i.test(k) && k !== 'INIT_CWD'),
    );
    // No node_modules/.bin of the workspace (the test runner adds them): nbdx searches those
    // folders (npx puts packages there), and a user's shell has none.
    const userPath = (process.env.PATH ?? '').split(':').filter((d) => !d.endsWith('/node_modules/.bin'));
    baseEnv.PATH = [path.dirname(process.execPath), '/usr/bin', ...userPath].join(':');

    // 1. verdaccio, storing in tmp, no uplinks: it serves only what is published to it.
    const port = await freePort();
    registry = `http://127.0.0.1:${port}/`;
    const config = path.join(tmp, 'verdaccio.yaml');
    fs.writeFileSync(
      config,
      [
        `storage: ${path.join(tmp, 'storage')}`,
        'auth:',
        '  htpasswd:',
        `    file: ${path.join(tmp, 'htpasswd')}`,
        'uplinks: {}',
        'packages:',
        "  '**':",
        '    access: $all',
        '    publish: $authenticated',
        'web:',
        '  enable: false',
        'log: { type: stdout, format: pretty, level: warn }',
        '',
      ].join('\n'),
    );
    const require = createRequire(path.join(root, 'package.json'));
    const vdir = path.dirname(require.resolve('verdaccio/package.json'));
    const vbinField = JSON.parse(fs.readFileSync(path.join(vdir, 'package.json'), 'utf8')).bin;
    const vbin = path.join(vdir, typeof vbinField === 'string' ? vbinField : vbinField.verdaccio);
    verdaccio = spawn(process.execPath, [vbin, '--config', config, '--listen', `127.0.0.1:${port}`], {
      env: baseEnv,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    verdaccio.stdout!.on('data', (d) => (verdaccioLog += d));
    verdaccio.stderr!.on('data', (d) => (verdaccioLog += d));

    // 2. Meanwhile, pack every workspace package as pnpm publishes it (workspace: ranges resolved).
    const tgz = path.join(tmp, 'tgz');
    await execOk('pnpm', ['-r', '--filter', './packages/*', '--filter', './examples/*', 'pack', '--pack-destination', tgz], {
      cwd: root,
    });

    for (let i = 0; ; i++) {
      const ok = await fetch(`${registry}-/ping`).then((r) => r.ok, () => false);
      if (ok) break;
      if (i > 150 || verdaccio.exitCode !== null) throw new Error(`verdaccio did not start:\n${verdaccioLog}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    const res = await fetch(`${registry}-/user/org.couchdb.user:publisher`, {
      method: 'PUT',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ name: 'publisher', password: 'publisher-password' }),
    });
    const { token } = (await res.json()) as { token: string };
    expect(token).toBeTruthy();

    // 3. Publish with npm, as a release would.
    const publisher = path.join(tmp, 'publisher');
    fs.mkdirSync(publisher);
    fs.writeFileSync(path.join(publisher, '.npmrc'), `//127.0.0.1:${port}/:_authToken=${token}\n`);
    const env = {
      ...baseEnv,
      HOME: publisher,
      npm_config_userconfig: path.join(publisher, '.npmrc'),
      npm_config_cache: path.join(publisher, 'cache'),
      npm_config_registry: registry,
      npm_config_update_notifier: 'false',
    };
    const tarballs = fs.readdirSync(tgz).filter((f) => f.endsWith('.tgz'));
    expect(tarballs.length).toBeGreaterThanOrEqual(16);
    await pool(tarballs, 4, async (file) => {
      let target = path.join(tgz, file);
      const out = path.join(tgz, file.replace(/\.tgz$/, ''));
      fs.mkdirSync(out);
      await execOk('tar', ['-xzf', target, '-C', out]);
      const pj = path.join(out, 'package', 'package.json');
      const manifest = JSON.parse(fs.readFileSync(pj, 'utf8'));
      if (manifest.private) {
        delete manifest.private;
        fs.writeFileSync(pj, JSON.stringify(manifest, null, 2));
        target = path.join(out, 'package');
      }
      await execOk('npm', ['publish', target, '--registry', registry, '--ignore-scripts'], { env, cwd: publisher });
    });
    baseEnv.npm_config_registry = registry;
    baseEnv.npm_config_update_notifier = 'false';
    baseEnv.npm_config_audit = 'false';
    baseEnv.npm_config_fund = 'false';
  }, 150_000);

  afterAll(async () => {
    if (verdaccio && verdaccio.exitCode === null) {
      const gone = new Promise((r) => verdaccio!.once('exit', r));
      verdaccio.kill('SIGTERM');
      await gone;
    }
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  it('serves every package it was given, and nothing else', async () => {
    const pkg = async (name: string) => (await fetch(`${registry}${name.replace('/', '%2f')}`)).status;
    expect(await pkg('nbdx')).toBe(200);
    expect(await pkg('@nbdx/plugin-memory')).toBe(200);
    expect(await pkg('nbdx-plugin-pattern')).toBe(200);
    expect(await pkg('undici')).toBe(404); // no uplink: nothing comes from the internet
  });

  it('npx -p nbdx -p @nbdx/plugin-nbd -p @nbdx/filter-shared nbdx --filter=shared nbd ...: installs those and nothing else', async () => {
    const upstream = await serve({ plugin: createMemoryPlugin(), config: [['size', '1M']] });
    try {
      const data = Buffer.alloc(1 << 20);
      for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 12)) & 0xff;
      const c = await NbdClient.connect(upstream.uri);
      await c.pwrite(data, 0);
      await c.disconnect();

      const u = user('p-form');
      const r = await u.npx([
        '-y', '-p', 'nbdx', '-p', '@nbdx/plugin-nbd', '-p', '@nbdx/filter-shared',
        'nbdx', '-U', '-', '--filter=shared', 'nbd', `uri=${upstream.uri}`,
        '--run', 'nbdinfo "$uri" && nbdcopy "$uri" copy.img',
      ]);
      expect(r.stderr).not.toContain('installing');
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout).toMatch(/export-size: 1048576\b/);
      expect(Buffer.compare(fs.readFileSync(path.join(u.cwd, 'copy.img')), data)).toBe(0);

      const sets = u.installed();
      expect(sets).toHaveLength(1);
      expect(sets[0]).toEqual(['@nbdx/client', '@nbdx/filter-shared', ...NATIVE, '@nbdx/plugin-nbd', '@nbdx/server', 'nbdx']);
      expect(fs.readdirSync(u.cwd)).toEqual(['copy.img']); // nothing installed in the working directory
    } finally {
      await upstream.close();
    }
  });

  /** What nbdx installed on demand for this user: its install cache under HOME/.cache. */
  const cached = (u: ReturnType<typeof user>): string[] => {
    const nm = path.join(u.env.HOME!, '.cache', 'nbdx', VERSION, 'node_modules', '@nbdx');
    return fs.existsSync(nm) ? fs.readdirSync(nm).map((n) => `@nbdx/${n}`).sort() : [];
  };

  it('npx nbdx memory 1M --run ...: from an empty directory, nbdx fetches the memory plugin and only it, once', async () => {
    const u = user('one-command');
    const r = await u.npx(['-y', 'nbdx', '-U', '-', 'memory', '1M', '--run', 'nbdinfo "$uri"']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain(`nbdx: installing @nbdx/plugin-memory@${VERSION} into ~/.cache/nbdx/${VERSION} (--no-install or NBDX_NO_INSTALL=1 turns this off)`);
    expect(r.stdout).toMatch(/export-size: 1048576\b/);
    // npx installed nbdx alone; nbdx put the plugin (and the core it takes as a peer) in its cache.
    expect(u.installed()).toEqual([[...NATIVE, '@nbdx/server', 'nbdx']]);
    expect(cached(u)).toEqual([...NATIVE, '@nbdx/plugin-memory', '@nbdx/server']);
    expect(fs.readdirSync(u.cwd)).toEqual([]);

    // The next start: nothing installed, nothing said, nothing spawned but the server.
    const again = await u.npx(['-y', 'nbdx', '-U', '-', 'memory', '1M', '--run', 'nbdinfo --size "$uri"']);
    expect(again.code, again.stderr).toBe(0);
    expect(again.stderr).toBe('');
    expect(again.stdout).toBe('1048576\n');

    // Told not to install: the commands to run instead, nothing new anywhere.
    const blocked = await u.npx(['-y', 'nbdx', '-U', '-', '--filter=offset', 'memory', '1M', 'range=4k', '--run', 'nbdinfo "$uri"'], {
      NBDX_NO_INSTALL: '1',
    });
    expect(blocked.code).toBe(1);
    expect(blocked.stderr).toContain("nbdx: filter 'offset' is not installed");
    expect(blocked.stderr).toContain('Not installing it (NBDX_NO_INSTALL=1).');
    expect(blocked.stderr).toContain(`Install it with: npm install @nbdx/filter-offset@${VERSION}`);
    expect(u.installed()).toHaveLength(1);
    expect(cached(u)).toEqual([...NATIVE, '@nbdx/plugin-memory', '@nbdx/server']);
  });

  it('inside a project that has nbdx installed: npx nbdx memory installs the plugin beside, not into, the project', async () => {
    const u = user('project');
    fs.writeFileSync(path.join(u.cwd, 'package.json'), JSON.stringify({ name: 'my-app', private: true }));
    await execOk('npm', ['install', 'nbdx'], { cwd: u.cwd, env: u.env, timeout: 90_000 });
    const manifest = fs.readFileSync(path.join(u.cwd, 'package.json'), 'utf8');

    const r = await u.npx(['nbdx', '-U', '-', 'memory', '1M', '--run', 'nbdinfo --size "$uri"']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toContain(`nbdx: installing @nbdx/plugin-memory@${VERSION} into ~/.cache/nbdx/${VERSION}`);
    expect(r.stdout).toBe('1048576\n');
    expect(fs.readFileSync(path.join(u.cwd, 'package.json'), 'utf8')).toBe(manifest); // the project is untouched
    expect(u.installed()).toEqual([]); // npx ran the project's own nbdx

    // Started again, as fast as nbdx started directly: no install step, no re-spawn.
    const timed = async (run: () => Promise<Run>) => {
      const t0 = performance.now();
      const x = await run();
      expect(x.code, x.stderr).toBe(0);
      expect(x.stderr).toBe('');
      return performance.now() - t0;
    };
    const direct = path.join(u.cwd, 'node_modules', 'nbdx', 'bin', 'nbdx.js');
    const viaNpx: number[] = [];
    const plain: number[] = [];
    for (let i = 0; i < 3; i++) {
      viaNpx.push(await timed(() => u.npx(['nbdx', '-U', '-', 'memory', '1M', '--run', 'true'])));
      plain.push(await timed(() => exec(process.execPath, [direct, '-U', '-', 'memory', '1M', '--run', 'true'], { cwd: u.cwd, env: u.env })));
    }
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[1]!;
    // npx itself costs a few hundred ms (it starts npm); a re-spawn through npx would double it.
    console.log(`start-up with memory 1M --run true: npx nbdx ${median(viaNpx).toFixed(0)} ms, node bin.js ${median(plain).toFixed(0)} ms`);
    expect(median(viaNpx)).toBeLessThan(median(plain) + 1500);
  });

  it('third-party packages found by name: nbdx --filter=xor pattern ..., after the error says how', async () => {
    const u = user('third-party');
    // By their package names: a short name that is not nbdx's own is never turned into a package
    // name to install (see tests/install.test.ts).
    const args = ['-U', '-', '--filter=nbdx-filter-xor', 'nbdx-plugin-pattern', '1M', 'pattern=c0ffee', 'xor=0xff', '--run', 'nbdinfo "$uri" && nbdcopy "$uri" out.img'];
    // Not installed: nbdx will not fetch third-party code by itself, and says what to run.
    const refused = await u.npx(['-y', 'nbdx', ...args]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).not.toContain('installing');
    expect(refused.stderr).toContain("nbdx: plugin package 'nbdx-plugin-pattern' is not installed");
    expect(refused.stderr).toContain("Also missing: filter 'nbdx-filter-xor'.");
    const command = /To run it: (npx .*)\n/.exec(refused.stderr)?.[1];
    expect(command).toBe(`npx -p nbdx@${VERSION} -p nbdx-plugin-pattern -p nbdx-filter-xor nbdx ${args.slice(0, -1).join(' ')} 'nbdinfo "$uri" && nbdcopy "$uri" out.img'`);
    expect(u.installed().flatMap(layers)).toEqual([]);

    // The command it gave, run as given.
    const r = await u.sh(command!);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/export-size: 1048576\b/);
    const got = fs.readFileSync(path.join(u.cwd, 'out.img'));
    const want = Buffer.alloc(1 << 20);
    for (let i = 0; i < want.length; i++) want[i] = [0xc0, 0xff, 0xee][i % 3]! ^ 0xff;
    expect(Buffer.compare(got, want)).toBe(0);
    expect(u.installed().flatMap(layers).sort()).toEqual(['nbdx-filter-xor', 'nbdx-plugin-pattern']);
  });

  it('an unknown short name: no package is named or installed', async () => {
    const u = user('unknown');
    const r = await u.npx(['-y', 'nbdx', 'nosuchdisk', '1M']);
    expect(r.code).toBe(1);
    expect(r.stderr).not.toContain('installing');
    // No package name is invented for a name nobody checked exists (typosquatting bait).
    expect(r.stderr).toContain("nbdx: plugin 'nosuchdisk' not found. 'nbdx --list' shows the plugins and filters available");
    expect(r.stderr).not.toMatch(/npm install|npx -p/);
    expect(u.installed()).toEqual([[...NATIVE, '@nbdx/server', 'nbdx']]);
    expect(cached(u)).toEqual([]);
  });
});
