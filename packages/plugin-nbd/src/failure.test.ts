/**
 * Killing the upstream (nbdkit, SIGKILL) while clients are transferring through the `nbdx nbd`
 * command: clients get errors within a second, the nbdx process stays up, and it serves new
 * clients once the upstream is back. Also retry= and timeout= against upstreams that are not there
 * (yet) or never answer.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { NbdClient, NbdRequestError } from '@nbdx/client';
import { Errno } from '@nbdx/server/api';
import {
  nbdxBin,
  needTools,
  run,
  runOk,
  spawnTool,
  startCli,
  startNbdkit,
  tmpDir,
  unixUri,
  type BackgroundTool,
  type CliServer,
  type Peer,
} from '@nbdx/testkit';

const HAVE = needTools('nbdkit', 'nbdcopy', 'nbdinfo');

const cleanups: Array<() => Promise<unknown> | unknown> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await Promise.resolve(c()).catch(() => {});
});

async function nbdkitAt(dir: string, socket: string, args: string[]): Promise<Peer> {
  fs.rmSync(socket, { force: true }); // a killed nbdkit leaves its socket behind
  const p = await startNbdkit(dir, args, socket);
  cleanups.push(() => p.kill());
  return p;
}

async function cli(args: string[]): Promise<CliServer> {
  const c = await startCli(['-U', '-', ...args]);
  cleanups.push(() => c.stop());
  return c;
}

/** nbdcopy from `uri` to null: (a slow upstream makes it take seconds). `done` has its exit time. */
function nbdcopyOut(uri: string): BackgroundTool {
  const copy = spawnTool('nbdcopy', ['--requests=16', uri, 'null:']);
  cleanups.push(() => copy.kill());
  return copy;
}

/** Reads, 16 in flight, until one fails; resolves with that failure's errno and time. */
async function readUntilError(c: NbdClient): Promise<{ errno: number; at: number }> {
  let failed: { errno: number; at: number } | null = null;
  const worker = async (k: number) => {
    for (let i = 0; !failed; i++) {
      try {
        await c.pread(65536, ((k * 131 + i * 17) % 512) * 65536);
      } catch (e) {
        failed ??= { errno: (e as NbdRequestError).errno, at: Date.now() };
      }
    }
  };
  await Promise.all(Array.from({ length: 16 }, (_, k) => worker(k)));
  return failed!;
}

describe.skipIf(!HAVE)('killing the upstream mid-transfer', () => {
  for (const shared of [false, true]) {
    it(`nbdx ${shared ? '--filter=shared ' : ''}nbd: errors within a second, process stays up, serves again once the upstream is back`, async () => {
      const dir = tmpDir('nbdx-plugin-nbd-');
      cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
      const sock = path.join(dir, 'upstream.sock');
      // Data everywhere (so nbdcopy has to read it all), slowly: the transfer takes seconds.
      const slow = ['--filter=delay', 'pattern', '256M', 'delay-read=100ms'];
      const up = await nbdkitAt(dir, sock, slow);
      const nbdx = await cli([...(shared ? ['--filter=shared'] : []), 'nbd', unixUri(sock)]);

      const copy = nbdcopyOut(nbdx.uri);
      const c = await NbdClient.connect(nbdx.uri);
      const clientClosed = new Promise<number>((r) => c.once('close', () => r(Date.now())));
      const reads = readUntilError(c);
      await new Promise((r) => setTimeout(r, 400));
      const killedAt = Date.now();
      await up.kill('SIGKILL');

      const r = await reads;
      expect(r.errno).toBe(Errno.EIO);
      expect(r.at - killedAt).toBeLessThan(1000);
      expect((await clientClosed) - killedAt).toBeLessThan(1000);
      const cp = await copy.done;
      expect(cp.code).not.toBe(0);
      expect(cp.at - killedAt).toBeLessThan(1000);

      // The nbdx process is still there; while the upstream is down new clients get a clear refusal.
      expect(nbdx.child.exitCode).toBeNull();
      const down = await NbdClient.connect(nbdx.uri).then(
        (x) => x.disconnect().then(() => 'connected'),
        (e: Error) => e.message,
      );
      expect(down).toMatch(/cannot connect to the upstream server: connect (ECONNREFUSED|ENOENT)/);

      // Upstream back: the next client is served (a fresh nbdkit memory disk, so write then read).
      await nbdkitAt(dir, sock, ['memory', '32M']);
      const d = await NbdClient.connect(nbdx.uri);
      await d.pwrite(Buffer.alloc(4096, 0x5a), 0);
      expect((await d.pread(4096, 0)).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
      await d.disconnect();
      await runOk('nbdinfo', ['--size', nbdx.uri]);
      expect(nbdx.child.exitCode).toBeNull();
    });
  }
});

describe.skipIf(!HAVE)('retry= and timeout=', () => {
  it('retry=5: a client connecting before the upstream exists gets through once it appears', async () => {
    const dir = tmpDir('nbdx-plugin-nbd-');
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const sock = path.join(dir, 'late.sock');
    const nbdx = await cli(['nbd', unixUri(sock), 'retry=5']);
    const t0 = Date.now();
    const pending = run('nbdinfo', ['--size', nbdx.uri]);
    await new Promise((r) => setTimeout(r, 1500));
    await nbdkitAt(dir, sock, ['memory', '5M']);
    const r = await pending;
    expect(r.stdout.trim()).toBe(String(5 * 1024 * 1024));
    expect(Date.now() - t0).toBeGreaterThanOrEqual(1500);
  });

  it('retry=1 with no upstream: a clear final error after two attempts', async () => {
    const nbdx = await cli(['nbd', 'socket=/nonexistent/nbdx-test.sock', 'retry=1']);
    const err = await NbdClient.connect(nbdx.uri).then(
      () => '',
      (e: Error) => e.message,
    );
    expect(err).toMatch(/connecting to nbd\+unix:\/\/\/\?socket=\/nonexistent\/nbdx-test.sock: cannot connect to the upstream server \(tried 2 times, 1 s apart\): connect ENOENT/);
    expect(nbdx.child.exitCode).toBeNull();
  });

  it('timeout= bounds a connection attempt to an upstream that never answers', async () => {
    const dir = tmpDir('nbdx-plugin-nbd-');
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const sock = path.join(dir, 'mute.sock');
    // Accepts connections and never says a word.
    const held: net.Socket[] = [];
    const mute = net.createServer((s) => held.push(s));
    await new Promise<void>((r) => mute.listen(sock, () => r()));
    cleanups.push(() => {
      for (const s of held) s.destroy();
      return new Promise((r) => mute.close(() => r(undefined)));
    });
    const nbdx = await cli(['nbd', `socket=${sock}`, 'timeout=300ms']);
    const t0 = Date.now();
    const err = await NbdClient.connect(nbdx.uri).then(
      () => '',
      (e: Error) => e.message,
    );
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(err).toMatch(/cannot connect to the upstream server: .*timed out after 300 ms/);
  });

  it('bad parameters: one clear line and exit status 1', async () => {
    const r = await run(process.execPath, [nbdxBin(), '-f', '-U', '-', 'nbd', 'nbds://example.com/x', 'tls=off']);
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/tls=off does not go with an nbds:\/\/ URI, which requires TLS/);
  });
});
