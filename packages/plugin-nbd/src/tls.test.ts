/**
 * `nbdx nbd` in front of an upstream that requires TLS (nbdkit --tls=require, PSK and X.509),
 * configured by nbds URIs and by nbdkit's tls* parameters; checked with nbdinfo, nbdsh and
 * qemu-img against the nbdx server, which itself serves in clear.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { nbdshOk, nbdxBin, needTools, run, runOk, startCli, startNbdkit, tmpDir, type CliServer, type Peer } from '@nbdx/testkit';

const HAVE = needTools('openssl', 'nbdkit', 'nbdinfo', 'nbdsh', 'qemu-img');

describe.skipIf(!HAVE)('TLS to the upstream', () => {
  let dir: string;
  let pki: string; // CA, server certificate and key (nbdkit's --tls-certificates)
  let clientPki: string; // CA, client certificate and key (tls-certificates=)
  let psk: string;
  let wrongPsk: string;
  let pskUp: Peer; // nbdkit --tls=require --tls-psk
  let x509Up: Peer; // nbdkit --tls=require --tls-certificates --tls-verify-peer
  let plainUp: Peer; // nbdkit without TLS
  const peers: Peer[] = [];
  const servers: CliServer[] = [];

  async function issue(name: string, cn: string, ext: string): Promise<void> {
    const base = path.join(pki, name);
    await runOk('openssl', ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${base}-key.pem`, '-out', `${base}.csr`, '-subj', `/CN=${cn}`]);
    fs.writeFileSync(`${base}.ext`, ext);
    await runOk('openssl', ['x509', '-req', '-in', `${base}.csr`, '-CA', path.join(pki, 'ca-cert.pem'), '-CAkey', path.join(pki, 'ca-key.pem'), '-CAcreateserial', '-out', `${base}-cert.pem`, '-days', '2', '-extfile', `${base}.ext`]);
  }

  beforeAll(async () => {
    dir = tmpDir('nbdx-plugin-nbd-tls-');
    pki = path.join(dir, 'pki');
    clientPki = path.join(dir, 'client-pki');
    fs.mkdirSync(pki);
    fs.mkdirSync(clientPki);
    await runOk('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', path.join(pki, 'ca-key.pem'), '-out', path.join(pki, 'ca-cert.pem'), '-days', '2', '-subj', '/CN=upstream CA']);
    await issue('server', 'localhost', 'subjectAltName=DNS:localhost\n');
    await issue('client', 'nbdx proxy', 'extendedKeyUsage=clientAuth\n');
    for (const f of ['ca-cert.pem', 'client-cert.pem', 'client-key.pem']) fs.copyFileSync(path.join(pki, f), path.join(clientPki, f));
    psk = path.join(dir, 'keys.psk');
    wrongPsk = path.join(dir, 'wrong.psk');
    fs.writeFileSync(psk, `alice:${randomBytes(32).toString('hex')}\n`);
    fs.writeFileSync(wrongPsk, `alice:${randomBytes(32).toString('hex')}\n`);
    pskUp = await startNbdkit(dir, ['--tls=require', `--tls-psk=${psk}`, 'memory', '8M']);
    x509Up = await startNbdkit(dir, ['--tls=require', `--tls-certificates=${pki}`, '--tls-verify-peer', 'memory', '8M']);
    plainUp = await startNbdkit(dir, ['memory', '2M']);
    peers.push(pskUp, x509Up, plainUp);
  }, 60_000);

  afterAll(async () => {
    await Promise.all(servers.map((s) => s.stop()));
    await Promise.all(peers.map((p) => p.kill('SIGTERM')));
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  async function proxy(...params: string[]): Promise<CliServer> {
    const s = await startCli(['-U', '-', 'nbd', ...params]);
    servers.push(s);
    return s;
  }

  /** Size with nbdinfo, a write and read-back with nbdsh, and a qemu-img round trip. */
  async function checkThrough(uri: string, size: number): Promise<void> {
    expect((await runOk('nbdinfo', ['--size', uri])).trim()).toBe(String(size));
    const out = await nbdshOk(uri, 'h.pwrite(b"tls!" * 1024, 65536); print(h.pread(8, 65536).decode())');
    expect(out.trim()).toBe('tls!tls!');
    const img = path.join(dir, `img-${randomBytes(4).toString('hex')}.raw`);
    const data = randomBytes(1024 * 1024);
    fs.writeFileSync(img, data);
    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', img, uri]);
    const back = `${img}.back`;
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, back]);
    expect(fs.readFileSync(back).subarray(0, data.length).equals(data)).toBe(true);
  }

  it('PSK: uri=nbds+unix://…?socket=…&tls-psk-file=…', async () => {
    const s = await proxy(`uri=nbds+unix://alice@/?socket=${pskUp.socket}&tls-psk-file=${psk}`);
    await checkThrough(s.uri, 8 * 1024 * 1024);
  });

  it('PSK: socket= tls=require tls-psk=FILE tls-username=NAME', async () => {
    const s = await proxy(`socket=${pskUp.socket}`, 'tls=require', `tls-psk=${psk}`, 'tls-username=alice');
    await checkThrough(s.uri, 8 * 1024 * 1024);
  });

  it('X.509 with a client certificate: uri=nbds+unix://…&tls-certificates=DIR, and socket= tls-certificates=DIR', async () => {
    const viaUri = await proxy(`uri=nbds+unix:///?socket=${x509Up.socket}&tls-certificates=${clientPki}`);
    await checkThrough(viaUri.uri, 8 * 1024 * 1024);
    // Another tls-* parameter alone turns TLS on (as in nbdkit), which this upstream accepts.
    const viaParams = await proxy(`socket=${x509Up.socket}`, `tls-certificates=${clientPki}`);
    expect((await runOk('nbdinfo', ['--size', viaParams.uri])).trim()).toBe(String(8 * 1024 * 1024));
  });

  it('a wrong key: the client of nbdx gets an error at once, and the log says why', async () => {
    const s = await proxy(`socket=${pskUp.socket}`, 'tls=require', `tls-psk=${wrongPsk}`, 'tls-username=alice', 'retry=3');
    const t0 = Date.now();
    const r = await run('nbdinfo', ['--size', s.uri], { timeout: 20_000 });
    expect(r.code).not.toBe(0);
    // Not retried (retry=3 would take 3 s): the same key would be refused again.
    expect(Date.now() - t0).toBeLessThan(2500);
    expect(r.stderr).toMatch(/nbdinfo: /);
    expect(s.stderr()).toMatch(/TLS: the server refused the pre-shared key: wrong key, or unknown username 'alice'/);
    expect(s.child.exitCode).toBeNull();
  });

  it('an upstream that requires TLS, asked without: the log says to turn TLS on', async () => {
    const s = await proxy(`socket=${pskUp.socket}`);
    const r = await run('nbdinfo', ['--size', s.uri], { timeout: 20_000 });
    expect(r.code).not.toBe(0);
    expect(s.stderr()).toMatch(/the upstream server requires TLS: use tls=require \(or an nbds:\/\/ URI\) with tls-psk= or tls-certificates=/);
  });

  it('tls=on in front of an upstream without TLS goes on in clear; tls=require fails clearly', async () => {
    const on = await proxy(`socket=${plainUp.socket}`, 'tls=on', `tls-psk=${psk}`, 'tls-username=alice');
    expect((await runOk('nbdinfo', ['--size', on.uri])).trim()).toBe(String(2 * 1024 * 1024));
    const req = await proxy(`socket=${plainUp.socket}`, 'tls=require', `tls-psk=${psk}`, 'tls-username=alice');
    const r = await run('nbdinfo', ['--size', req.uri], { timeout: 20_000 });
    expect(r.code).not.toBe(0);
    expect(req.stderr()).toMatch(/TLS is required but the server does not offer it \(NBD_OPT_STARTTLS got NBD_REP_ERR_POLICY\)/);
  });

  it('bad TLS parameters stop nbdx at startup with the reason', async () => {
    const missing = path.join(dir, 'missing.psk');
    const r = await run(process.execPath, [nbdxBin(), '-U', '-', 'nbd', `socket=${pskUp.socket}`, `tls-psk=${missing}`, '--run', 'true']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(new RegExp(`cannot read the TLS PSK file ${missing}`));
  });
});
