import { createHash, createHmac } from 'node:crypto';
import * as fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { cephDaemonPids, needCeph, startCeph, type CephCluster } from './ceph.js';
import { run, runOk } from './tools.js';

const sha256 = (b: string | Buffer) => createHash('sha256').update(b).digest('hex');
const hmac = (k: string | Buffer, s: string) => createHmac('sha256', k).update(s).digest();

/** One S3 request signed with AWS signature version 4 (no SDK: this checks the bring-up alone). */
async function s3(c: NonNullable<CephCluster['s3']>, method: string, key: string, body?: Buffer): Promise<Response> {
  const url = new URL(`${c.endpoint}/${key}`);
  const amzDate = new Date().toISOString().replace(/[-:]/g, '').replace(/\.\d+/, '');
  const day = amzDate.slice(0, 8);
  const payload = sha256(body ?? '');
  const headers: Record<string, string> = { host: url.host, 'x-amz-content-sha256': payload, 'x-amz-date': amzDate };
  const names = Object.keys(headers).sort();
  const canonical = [method, url.pathname, '', ...names.map((n) => `${n}:${headers[n]}`), '', names.join(';'), payload].join('\n');
  const scope = `${day}/${c.region}/s3/aws4_request`;
  const toSign = ['AWS4-HMAC-SHA256', amzDate, scope, sha256(canonical)].join('\n');
  const signingKey = hmac(hmac(hmac(hmac(`AWS4${c.secretKey}`, day), c.region), 's3'), 'aws4_request');
  const signature = createHmac('sha256', signingKey).update(toSign).digest('hex');
  const authorization = `AWS4-HMAC-SHA256 Credential=${c.accessKey}/${scope}, SignedHeaders=${names.join(';')}, Signature=${signature}`;
  return fetch(url, { method, headers: { ...headers, authorization }, body });
}

/** Pids of every process on the machine whose command line names this cluster's ceph.conf. */
function processesUsing(conf: string): number[] {
  const pids: number[] = [];
  for (const p of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      if (fs.readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(conf)) pids.push(Number(p));
    } catch {
      // gone already
    }
  }
  return pids;
}

describe.runIf(needCeph({ rgw: true }))('startCeph', () => {
  it('brings up mon, memstore OSD, an RBD pool and radosgw; S3 and RADOS work; stop leaves nothing behind', async () => {
    const c = await startCeph({ rgw: true, pools: ['rbd'], memstoreBytes: 256 * 1024 ** 2 });
    let pids: number[] = [];
    try {
      expect(fs.existsSync(c.conf) && fs.existsSync(c.keyring)).toBe(true);
      expect(c.monHost).toMatch(/^127\.0\.0\.1:\d+$/);
      pids = cephDaemonPids(c);
      expect(pids).toHaveLength(3);

      // S3 through radosgw with the created user's keys.
      const s3c = c.s3!;
      expect((await s3(s3c, 'PUT', 'bucket')).status).toBe(200);
      const body = Buffer.from('hello from nbdx\n'.repeat(1000));
      const put = await s3(s3c, 'PUT', 'bucket/obj', body);
      expect(put.status).toBe(200);
      const got = await s3(s3c, 'GET', 'bucket/obj');
      expect(got.status).toBe(200);
      expect(Buffer.from(await got.arrayBuffer()).equals(body)).toBe(true);

      // RBD on the initialised pool, reached through the monitor address alone (as mon_host=).
      const cli = ['-m', c.monHost, '--keyring', c.keyring, '--id', 'admin'];
      await runOk('rbd', [...cli, 'create', '--size', '16M', 'rbd/img']);
      expect((await runOk('rbd', [...cli, 'ls', 'rbd'])).trim()).toBe('img');
      await runOk('rados', ['--conf', c.conf, '-p', 'rbd', 'put', 'raw', c.conf]);
      expect(await runOk('rados', ['--conf', c.conf, '-p', 'rbd', 'get', 'raw', '-'])).toBe(fs.readFileSync(c.conf, 'utf8'));
    } finally {
      await c.stop();
    }
    for (const pid of pids) expect(() => process.kill(pid, 0)).toThrow(/ESRCH/);
    expect(processesUsing(c.conf)).toEqual([]);
    expect(fs.existsSync(c.dir)).toBe(false);
  });

  it('with cephx: the admin key works, a wrong key is refused', async () => {
    const c = await startCeph({ auth: 'cephx', pools: ['p'] });
    try {
      await runOk('rbd', ['--conf', c.conf, 'create', '--size', '1M', 'p/x']);
      const bad = `${c.dir}/bad.keyring`;
      fs.writeFileSync(bad, '[client.admin]\n\tkey = AQBNx1BnAAAAABAAeKkYRjuoKNYvdwm6GDcK2A==\n');
      const r = await run('rbd', ['-m', c.monHost, '--keyring', bad, '--id', 'admin', '--client_mount_timeout', '3', 'ls', 'p']);
      expect(r.code, r.stderr).not.toBe(0);
      // librados reports a rejected key as an authentication timeout (it keeps hunting), not EACCES.
      expect(r.stderr).toMatch(/authenticate timed out|Permission denied/);
    } finally {
      await c.stop();
    }
    expect(fs.existsSync(c.dir)).toBe(false);
  });

  it('several clusters start at once, each on its own ports and directory', async () => {
    const cs = await Promise.all([startCeph({ pools: ['a'] }), startCeph({ pools: ['b'] }), startCeph({ rgw: true })]);
    try {
      expect(new Set(cs.map((c) => c.monHost)).size).toBe(3);
      expect(new Set(cs.map((c) => c.dir)).size).toBe(3);
      expect((await runOk('ceph', ['--conf', cs[0]!.conf, 'osd', 'pool', 'ls'])).trim()).toBe('a');
      expect((await runOk('ceph', ['--conf', cs[1]!.conf, 'osd', 'pool', 'ls'])).trim()).toBe('b');
      expect((await fetch(cs[2]!.s3!.endpoint)).status).toBe(200);
    } finally {
      await Promise.all(cs.map((c) => c.stop()));
    }
    for (const c of cs) expect(fs.existsSync(c.dir)).toBe(false);
  });
});
