/**
 * STARTTLS with X.509 certificates (optionally verifying the client's) and with pre-shared keys,
 * checked with libnbd's nbdinfo/nbdsh.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { nbdxBin, needTools, run, runOk, tmpDir } from '@nbdx/testkit';

const have = needTools('openssl', 'nbdinfo', 'nbdsh');
const dir = tmpDir();
const pki = path.join(dir, 'pki');
const clientPki = path.join(dir, 'client-pki');
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

async function cert(dirName: string, name: string, cn: string, ext: string): Promise<void> {
  const base = path.join(dirName, name);
  await runOk('openssl', ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${base}-key.pem`, '-out', `${base}.csr`, '-subj', `/CN=${cn}`]);
  fs.writeFileSync(`${base}.ext`, ext);
  await runOk('openssl', ['x509', '-req', '-in', `${base}.csr`, '-CA', path.join(pki, 'ca-cert.pem'), '-CAkey', path.join(pki, 'ca-key.pem'), '-CAcreateserial', '-out', `${base}-cert.pem`, '-days', '2', '-extfile', `${base}.ext`]);
}

const nbdx = (args: string[]) => run(process.execPath, [nbdxBin(), '-U', '-', ...args]);

describe.skipIf(!have)('TLS', () => {
  beforeAll(async () => {
    fs.mkdirSync(pki);
    fs.mkdirSync(clientPki);
    await runOk('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', path.join(pki, 'ca-key.pem'), '-out', path.join(pki, 'ca-cert.pem'), '-days', '2', '-subj', '/CN=nbdx test CA']);
    await cert(pki, 'server', 'localhost', 'subjectAltName=DNS:localhost\n');
    // libnbd looks for ca-cert.pem, client-cert.pem, client-key.pem in its directory
    fs.copyFileSync(path.join(pki, 'ca-cert.pem'), path.join(clientPki, 'ca-cert.pem'));
    await cert(pki, 'client', 'client', 'extendedKeyUsage=clientAuth\n');
    fs.copyFileSync(path.join(pki, 'client-cert.pem'), path.join(clientPki, 'client-cert.pem'));
    fs.copyFileSync(path.join(pki, 'client-key.pem'), path.join(clientPki, 'client-key.pem'));
  }, 60_000);

  it('--tls=require with certificates: TLS clients are served, plain ones refused', async () => {
    const r = await nbdx(['--tls=require', `--tls-certificates=${pki}`, 'memory', '1M', '--run',
      `nbdinfo "nbds+unix:///?socket=$unixsocket&tls-certificates=${clientPki}" | head -1; echo "$uri"; nbdinfo --size "nbd+unix:///?socket=$unixsocket" 2>&1 || echo refused`]);
    expect(r.stdout).toMatch(/^protocol: newstyle-fixed with TLS/);
    // $uri says TLS is required, as nbdkit's does.
    expect(r.stdout).toMatch(/\nnbds\+unix:\/\/\?socket=\S+\n/);
    expect(r.stdout).toMatch(/refused\n$/);
  });

  it('--tls=on serves both, and data survives the trip', async () => {
    const r = await nbdx(['--tls=on', `--tls-certificates=${pki}`, 'memory', '1M', '--run',
      `nbdsh -c 'h.set_uri_allow_local_file(True)' -c "h.connect_uri('nbds+unix:///?socket=$unixsocket&tls-certificates=${clientPki}')" -c 'h.pwrite(b"t"*4096, 0); print(h.get_tls_negotiated(), h.pread(3, 0))' && nbdinfo --size "$uri"`]);
    expect(r.stdout).toBe("True bytearray(b'ttt')\n1048576\n");
  });

  it('--tls-verify-peer requires a client certificate from the CA', async () => {
    const noClientCert = path.join(dir, 'ca-only');
    fs.mkdirSync(noClientCert, { recursive: true });
    fs.copyFileSync(path.join(pki, 'ca-cert.pem'), path.join(noClientCert, 'ca-cert.pem'));
    const r = await nbdx(['--tls=require', `--tls-certificates=${pki}`, '--tls-verify-peer', 'memory', '1M', '--run',
      `nbdinfo --size "nbds+unix:///?socket=$unixsocket&tls-certificates=${clientPki}"; nbdinfo --size "nbds+unix:///?socket=$unixsocket&tls-certificates=${noClientCert}" 2>/dev/null || echo refused`]);
    expect(r.stdout).toBe('1048576\nrefused\n');
  });

  it('--tls-psk serves clients with the right key only', async () => {
    const keys = path.join(dir, 'keys.psk');
    const wrong = path.join(dir, 'wrong.psk');
    fs.writeFileSync(keys, `alice:${randomBytes(32).toString('hex')}\n`);
    fs.writeFileSync(wrong, `alice:${randomBytes(32).toString('hex')}\n`);
    const r = await nbdx(['--tls=require', `--tls-psk=${keys}`, 'memory', '1M', '--run',
      `nbdinfo --size "nbds+unix://alice@/?socket=$unixsocket&tls-psk-file=${keys}"; nbdinfo --size "nbds+unix://alice@/?socket=$unixsocket&tls-psk-file=${wrong}" 2>/dev/null || echo refused`]);
    expect(r.stdout).toBe('1048576\nrefused\n');
  });

  it('refuses TLS options without --tls, and --tls without keys', async () => {
    expect((await nbdx([`--tls-certificates=${pki}`, 'memory', '1M'])).stderr).toMatch(/need --tls=on or --tls=require/);
    expect((await nbdx(['--tls=on', 'memory', '1M'])).stderr).toMatch(/needs --tls-certificates=DIR or --tls-psk=FILE/);
  });
});
