/**
 * The README's set-up, as a new user runs it: a fresh clone of this repository, an empty HOME
 * (no cached pnpm, corepack or npx packages), a PATH with Node.js and the system's programs only,
 * and the README's first command pasted into a shell. It must install, build and serve a disk
 * without a warning about bins. (The second command, `npm test`, is what is running this.)
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { needTools } from '@nbdx/testkit';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const have = needTools('git', 'nbdinfo');

/** The commands of the README's "Set-up in two commands" block, comments removed. */
function readmeCommands(): string[] {
  const readme = fs.readFileSync(path.join(root, 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('## Set-up in two commands'));
  const block = /```sh\n([\s\S]*?)```/.exec(section)?.[1] ?? '';
  return block
    .split('\n')
    .map((l) => l.replace(/\s+#.*$/, '').trim())
    .filter(Boolean);
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

function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

describe.runIf(have)("the README's set-up on a clean machine", () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-setup-'));
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  it('has two commands: set-up-and-serve, and the tests', () => {
    const [serveCmd, testCmd, ...rest] = readmeCommands();
    expect(rest).toEqual([]);
    expect(serveCmd).toBe('npm run setup && npx nbdx -f memory 1G');
    expect(testCmd).toBe('npm test');
  });

  it('the first command, in a fresh clone with an empty HOME: installs, builds and serves a 1 GiB disk, no bin warnings', async () => {
    const repo = path.join(tmp, 'repo');
    const home = path.join(tmp, 'home');
    fs.mkdirSync(home);
    const clone = spawnSync('git', ['clone', '-q', root, repo], { encoding: 'utf8' });
    expect(clone.status, clone.stderr).toBe(0);

    const port = await freePort();
    // The README's command; only the port changes (10809 may be taken on a test machine).
    const command = readmeCommands()[0]!.replace('npx nbdx -f ', `npx nbdx -f -p ${port} `);
    const env: NodeJS.ProcessEnv = Object.fromEntries(
      Object.entries(process.env).filter(([k]) => !/^(npm_|pnpm_|corepack_|NBDX_|INIT_CWD$|VITEST|TURBO_)/i.test(k)),
    );
    env.HOME = home;
    env.PATH = [path.dirname(process.execPath), ...(process.env.PATH ?? '').split(':').filter((d) => !d.includes('node_modules'))].join(':');
    const child = spawn('/bin/sh', ['-c', command], { cwd: repo, env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    let output = '';
    child.stdout.on('data', (d) => (output += d));
    child.stderr.on('data', (d) => (output += d));
    const exited = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
    try {
      const deadline = Date.now() + 8 * 60_000;
      let up = false;
      while (!up && Date.now() < deadline && child.exitCode === null) {
        await new Promise((r) => setTimeout(r, 500));
        up = await accepts(port);
      }
      expect(up, `not serving on port ${port}; output:\n${output}`).toBe(true);
      const info = spawnSync('nbdinfo', ['--size', `nbd://127.0.0.1:${port}`], { encoding: 'utf8', env: { ...process.env, PATH: `/usr/bin:${process.env.PATH}` } });
      expect(info.stdout.trim(), info.stderr).toBe(String(1 << 30));
    } finally {
      if (child.exitCode === null) process.kill(-child.pid!, 'SIGTERM');
      await exited;
    }
    expect(output).not.toMatch(/Failed to create bin/);
    expect(output).not.toMatch(/ERR_PNPM|No compatible signature/);
    // Set-up left the command on the checkout's PATH for npx and pnpm exec.
    expect(fs.existsSync(path.join(repo, 'node_modules', '.bin', 'nbdx'))).toBe(true);
    // Nothing outside the checkout but caches under the empty HOME.
    expect(fs.readdirSync(home).filter((n) => !['.npm', '.cache', '.local', '.config', '.npmrc'].includes(n))).toEqual([]);
  }, 10 * 60_000);
});
