/**
 * `--filter=shared nbd ...`: every client served over one upstream connection, counted on the
 * upstream side (an in-process nbdx upstream whose probe filter counts connections).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterEach, describe, expect, it, afterAll } from 'vitest';
import { NbdClient, NbdRequestError } from '@nbdx/client';
import { Errno } from '@nbdx/server/api';
import { createSharedFilter } from '@nbdx/filter-shared';
import { needTools, runOk, servePlugin, startCli, tmpDir, type CliServer } from '@nbdx/testkit';
import { createNbdPlugin } from './index.js';
import { startProbeUpstream, startRelay, type ProbeUpstream } from './fixtures.test-helper.js';

/** This file's temporary files, removed when it is done (as the other e2e tests do). */
const files = tmpDir();
afterAll(() => fs.rmSync(files, { recursive: true, force: true }));

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
});

async function upstream(size = '8M'): Promise<ProbeUpstream> {
  const u = await startProbeUpstream({ readDelayMs: 2 }, size);
  cleanups.push(() => u.close());
  return u;
}

const patterns = new Map<string, Buffer>();
function pattern(n: number, seed: number): Buffer {
  const key = `${n}/${seed}`;
  let b = patterns.get(key);
  if (!b) {
    b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = (i * 13 + seed) & 255;
    patterns.set(key, b);
  }
  return b;
}

/** Five clients at once: each writes its own stripe, then reads every stripe back. */
async function fiveClients(connect: () => Promise<NbdClient>): Promise<void> {
  const cs = await Promise.all(Array.from({ length: 5 }, () => connect()));
  await Promise.all(cs.map((c, i) => Promise.all(Array.from({ length: 8 }, (_, j) => c.pwrite(pattern(65536, i * 8 + j), (i * 8 + j) * 65536)))));
  await Promise.all(
    cs.map(async (c) => {
      const all = await c.pread(40 * 65536, 0);
      for (let k = 0; k < 40; k++) expect(all.subarray(k * 65536, (k + 1) * 65536).equals(pattern(65536, k))).toBe(true);
    }),
  );
  await Promise.all(cs.map((c) => c.disconnect()));
}

describe('--filter=shared nbd', () => {
  it('five concurrent clients, exactly one upstream connection (in-process)', async () => {
    const up = await upstream();
    const s = await servePlugin(createNbdPlugin(), { filters: [createSharedFilter()], config: [['uri', up.uri]] });
    cleanups.push(() => s.close());
    expect(up.probe.connections).toBe(1); // opened at start-up
    await fiveClients(() => s.connect());
    expect(up.probe.connections).toBe(1);
    expect(up.probe.opens).toBe(1);
    expect(up.probe.maxReadsInFlight).toBeGreaterThan(1); // the clients' requests share the connection
  });

  it('without the filter the same five clients make five upstream connections', async () => {
    const up = await upstream();
    const s = await servePlugin(createNbdPlugin(), { config: [['uri', up.uri]] });
    cleanups.push(() => s.close());
    await fiveClients(() => s.connect());
    expect(up.probe.connections).toBe(5);
  });

  it('as the command line: nbdx --filter=shared nbd URI', async () => {
    const up = await upstream();
    const cli: CliServer = await startCli(['-U', '-', '--filter=shared', 'nbd', up.uri]);
    cleanups.push(() => cli.stop());
    await fiveClients(() => NbdClient.connect(cli.uri));
    if (needTools('nbdinfo')) {
      const info = JSON.parse(await runOk('nbdinfo', ['--json', cli.uri]));
      expect(info.exports[0]['export-size']).toBe(8 * 1024 * 1024);
    }
    expect(up.probe.connections).toBe(1);
  });

  it('losing the shared upstream connection: clients get EIO and are closed; later clients get a new one', async () => {
    const up = await upstream('1M');
    const sock = path.join(files, 'relay.sock');
    const relay = await startRelay(sock, up.server.addresses[0]!.path!);
    cleanups.push(() => relay.close());
    const s = await servePlugin(createNbdPlugin(), {
      filters: [createSharedFilter()],
      config: [['uri', `nbd+unix:///?socket=${sock}`]],
    });
    cleanups.push(() => s.close());
    const cs = await Promise.all([1, 2, 3].map(() => s.connect()));
    await Promise.all(cs.map((c, i) => c.pwrite(pattern(4096, i), i * 4096)));
    const closed = Promise.all(cs.map((c) => new Promise<void>((r) => c.once('close', () => r()))));
    // Keep requests flowing on every client while the upstream goes away.
    const loops = cs.map(async (c) => {
      for (;;) {
        try {
          await c.pread(4096, 0);
        } catch (e) {
          return (e as NbdRequestError).errno;
        }
      }
    });
    await new Promise((r) => setTimeout(r, 50));
    const t0 = Date.now();
    relay.cut();
    expect(await Promise.all(loops)).toEqual([Errno.EIO, Errno.EIO, Errno.EIO]);
    await closed;
    expect(Date.now() - t0).toBeLessThan(1000);
    expect(relay.accepted).toBe(1);
    // The next client: a fresh upstream connection, the data still there.
    const c = await s.connect();
    expect((await c.pread(4096, 4096)).equals(pattern(4096, 1))).toBe(true);
    expect(relay.accepted).toBe(2);
  });
});
