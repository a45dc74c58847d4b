import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  NBDSH_HELPERS,
  exportUri,
  nbdshOk,
  nbdxBin,
  needNbdx,
  qemuIo,
  run,
  runOk,
  startCeph,
  startCli,
  type CephCluster,
} from '@nbdx/testkit';
import { MiB, needRbd, rbdCli, serveRbd } from './test-support.js';

const ready = needRbd('qemu-io', 'nbdinfo', 'nbdsh') && needNbdx();

/** `nbdx ARGS` run to completion (for start-up failures). */
function nbdx(...args: string[]) {
  return run(process.execPath, [nbdxBin(), ...args], { timeout: 60_000 });
}

describe.runIf(ready)('cephx: keys, users and their caps', () => {
  let c: CephCluster;
  let roKeyring: string;
  let otherKeyring: string;
  let badKeyring: string;

  beforeAll(async () => {
    c = await startCeph({ auth: 'cephx', pools: ['rbd'] });
    roKeyring = join(c.dir, 'ro.keyring');
    otherKeyring = join(c.dir, 'other.keyring');
    badKeyring = join(c.dir, 'bad.keyring');
    await Promise.all([
      rbdCli(c, 'create', '--size', '16M', 'rbd/vm1'),
      runOk('ceph', ['--conf', c.conf, 'auth', 'get-or-create', 'client.ro', 'mon', 'profile rbd', 'osd', 'profile rbd-read-only pool=rbd', '-o', roKeyring]),
      runOk('ceph', ['--conf', c.conf, 'auth', 'get-or-create', 'client.other', 'mon', 'profile rbd', 'osd', 'profile rbd pool=elsewhere', '-o', otherKeyring]),
    ]);
    // A well-formed key that is not client.admin's.
    writeFileSync(badKeyring, '[client.admin]\n\tkey = AQBNx1BnAAAAABAAeKkYRjuoKNYvdwm6GDcK2A==\n');
    const s = await serveRbd([['image', 'rbd/vm1'], ['conf', c.conf]]);
    try {
      await qemuIo(s.uri, 'write -P 0x42 0 1M');
    } finally {
      await s.close();
    }
    await rbdCli(c, 'snap', 'create', 'rbd/vm1@golden');
  });

  afterAll(async () => {
    await c?.stop();
  });

  it('mon_host=, id= and keyring= reach the cluster without a conf file, as the Ceph tools take them', async () => {
    const s = await serveRbd([
      ['image', 'rbd/vm1'],
      ['mon_host', c.monHost],
      ['id', 'admin'],
      ['keyring', c.keyring],
    ]);
    try {
      await qemuIo(s.uri, 'write -P 0x42 0 1M', 'read -P 0x42 0 1M');
    } finally {
      await s.close();
    }
  });

  it("a user whose caps only allow reading gets a read-only export; writes fail with EPERM", async () => {
    const s = await serveRbd([['image', 'rbd/vm1'], ['mon_host', c.monHost], ['id', 'client.ro'], ['keyring', roKeyring]]);
    try {
      const out = await nbdshOk(
        s.uri,
        NBDSH_HELPERS +
          `
print(h.is_read_only(), h.pread(4, 0))
expect_err("EPERM", lambda: h.pwrite(b"x" * 512, 0))
`,
      );
      expect(out).toContain("True bytearray(b'BBBB')");
      expect(out).toContain('ok EPERM');
    } finally {
      await s.close();
    }
  });

  it('a user without access to the pool: one clear line at start (permission denied)', async () => {
    await expect(
      serveRbd([['image', 'rbd/vm1'], ['mon_host', c.monHost], ['id', 'other'], ['keyring', otherKeyring]]),
    ).rejects.toThrow(/^image rbd\/vm1: permission denied for client\.other \(its cephx caps\)$/);
  });

  it('a wrong key and unreachable monitors fail at start within connect-timeout, saying so', async () => {
    const t0 = Date.now();
    await expect(
      serveRbd([['image', 'rbd/vm1'], ['mon_host', c.monHost], ['keyring', badKeyring], ['connect-timeout', '2']]),
    ).rejects.toThrow(/cannot connect to the Ceph cluster \(monitors 127\.0\.0\.1:\d+\): no authenticated session within 2 s/);
    await expect(serveRbd([['image', 'rbd/vm1'], ['mon_host', '127.0.0.1:9'], ['keyring', c.keyring], ['connect-timeout', '1']])).rejects.toThrow(
      /no authenticated session within 1 s \(are the monitors up, and is client\.admin's key right\?\)/,
    );
    expect(Date.now() - t0).toBeLessThan(10_000);
  });

  it('the command line: bad parameters and start-up failures are one line and exit 1', async () => {
    const cases: [string[], RegExp][] = [
      [['rbd'], /image= is required/],
      [['rbd', 'image=a/b/c/d'], /is not IMAGE, POOL\/IMAGE or POOL\/NAMESPACE\/IMAGE/],
      [['rbd', 'rbd/vm1', 'pool=other'], /names pool 'rbd' but pool=other/],
      [['rbd', 'rbd/vm1', 'colour=blue'], /unknown parameter 'colour'/],
      [['rbd', 'rbd/vm1', `conf=${c.dir}/missing.conf`], /^nbdx: Ceph configuration: cannot read conf=.*missing\.conf: No such file or directory$/],
      [['rbd', 'rbd/nope', `conf=${c.conf}`], /image rbd\/nope does not exist/],
      // With the conf file the client insists on cephx and is told no at once; with mon_host=
      // alone it also offers auth none and librados keeps trying until the timeout (above).
      [['rbd', 'rbd/vm1', `conf=${c.conf}`, 'connect-timeout=1', `keyring=${badKeyring}`], /authentication refused for client\.admin|no authenticated session within 1 s/],
    ];
    await Promise.all(
      cases.map(async ([args, message]) => {
        const r = await nbdx('-f', ...args);
        expect(r.code, r.stderr).toBe(1);
        const lines = r.stderr.trim().split('\n');
        expect(lines, r.stderr).toHaveLength(1);
        expect(lines[0]).toMatch(message);
      }),
    );
  });

  it('nbdx --filter=cow rbd POOL/IMAGE@SNAP: a writable overlay over a snapshot that stays untouched', async () => {
    const srv = await startCli(['--filter=cow', 'rbd', 'rbd/vm1@golden', `conf=${c.conf}`, '-U', join(c.dir, 'cow.sock')]);
    try {
      await qemuIo(srv.uri, 'read -P 0x42 0 1M', 'write -P 0x77 0 64k', 'read -P 0x77 0 64k', 'read -P 0x42 64k 960k');
    } finally {
      await srv.stop();
    }
    const snapshot = await runOk('rbd', ['--conf', c.conf, 'export', 'rbd/vm1@golden', '-'], { encoding: 'buffer' });
    expect(snapshot.subarray(0, 4).toString()).toBe('BBBB');
  });

  it('nbdx rbd pool=rbd dynamic-export=true: nbdinfo --list shows the images', async () => {
    await rbdCli(c, 'create', '--size', '4M', 'rbd/second');
    const srv = await startCli(['rbd', 'pool=rbd', 'dynamic-export=true', `conf=${c.conf}`, '-U', join(c.dir, 'dyn.sock')]);
    try {
      const out = await runOk('nbdinfo', ['--list', srv.uri]);
      expect(out).toMatch(/export="vm1"/);
      expect(out).toMatch(/export="second"/);
      expect(await runOk('nbdinfo', ['--size', exportUri(srv.uri, 'second')])).toBe(`${4 * MiB}\n`);
    } finally {
      await srv.stop();
    }
  });
});
