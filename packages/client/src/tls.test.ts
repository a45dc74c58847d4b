/**
 * TLS against real servers: nbdkit --tls=require and qemu-nbd --tls-creds (PSK and X.509), the
 * nbdkit over TCP (host name checks), and servers without TLS (tls: 'on' and 'require').
 */
import { readFileSync } from 'node:fs';
import { copyFile, mkdir, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { NBD, NbdClient, NbdOptionError, NbdTlsError, type ConnectOptions, type NbdTarget } from './index.js';
import { describeWithTools, makeTempDir, startNbdkit, startPeer, startQemuNbd, type Peer } from './test-utils/peers.js';
import { makePki, type Pki } from './test-utils/pki.js';

const MiB = 1024 * 1024;

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = (i * 13 + seed + (i >> 10)) & 0xff;
  return b;
}

describeWithTools(['openssl', 'nbdkit', 'qemu-nbd'], 'TLS', () => {
  let tmp: { dir: string; cleanup: () => Promise<void> };
  let pki: Pki;
  let nbdkitPsk: Peer;
  let nbdkitX509: Peer;
  let plain: Peer;
  const peers: Peer[] = [];
  const clients: NbdClient[] = [];

  beforeAll(async () => {
    tmp = await makeTempDir();
    pki = makePki(path.join(tmp.dir, 'pki'));
    nbdkitPsk = await startNbdkit(tmp.dir, ['--tls=require', `--tls-psk=${pki.pskFile}`, 'memory', '16M']);
    nbdkitX509 = await startNbdkit(tmp.dir, ['--tls=require', `--tls-certificates=${pki.server}`, 'memory', '16M']);
    plain = await startNbdkit(tmp.dir, ['memory', '1M']);
  }, 60_000);
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    for (const p of peers.splice(0)) await p.stop();
  });
  afterAll(async () => {
    for (const p of [nbdkitPsk, nbdkitX509, plain]) await p?.stop();
    await tmp?.cleanup();
  });

  async function connect(target: NbdTarget, o: ConnectOptions = {}): Promise<NbdClient> {
    const c = await NbdClient.connect(target, { timeout: 10_000, ...o });
    clients.push(c);
    return c;
  }
  async function refusal(target: NbdTarget, o: ConnectOptions = {}): Promise<Error> {
    const e = await NbdClient.connect(target, { timeout: 10_000, ...o }).then(
      (c) => {
        clients.push(c);
        throw new Error('connected, but should have been refused');
      },
      (err: Error) => err,
    );
    // One line, whatever went wrong.
    expect(e.message).not.toMatch(/\n/);
    return e;
  }

  /** Writes and reads back 3 MiB (big requests, several TLS records each) and small pieces. */
  async function roundTrip(c: NbdClient): Promise<void> {
    expect(c.tlsNegotiated).toBe(true);
    // Negotiated again inside TLS: structured replies and block status.
    expect(c.structuredReplies).toBe(true);
    expect(c.metaContexts.has('base:allocation')).toBe(true);
    const data = pattern(3 * MiB, Math.floor(Math.random() * 256));
    await c.pwrite(data, MiB);
    expect((await c.pread(data.length, MiB)).equals(data)).toBe(true);
    const many = await Promise.all([0, 1, 2, 3, 4, 5, 6, 7].map((i) => c.pread(4096, MiB + i * 4096)));
    expect(Buffer.concat(many).equals(data.subarray(0, 8 * 4096))).toBe(true);
    const st = await c.blockStatus(MiB, 0);
    expect(st.get('base:allocation')!.length).toBeGreaterThan(0);
    await c.flush();
  }

  it('PSK with nbdkit: nbds+unix URI with tls-psk-file and the user name in the URI', async () => {
    const c = await connect(`nbds+unix://alice@/?socket=${nbdkitPsk.socket}&tls-psk-file=${pki.pskFile}`);
    await roundTrip(c);
    await c.disconnect();
  });

  it('PSK with nbdkit: tls-username= in the URI, and the programmatic options', async () => {
    const viaQuery = await connect(`nbds+unix:///?socket=${nbdkitPsk.socket}&tls-psk-file=${pki.pskFile}&tls-username=alice`);
    expect(viaQuery.tlsNegotiated).toBe(true);
    const viaFile = await connect({ path: nbdkitPsk.socket }, { tls: 'require', tlsPskFile: pki.pskFile, tlsUsername: 'alice' });
    await roundTrip(viaFile);
    const viaKey = await connect({ path: nbdkitPsk.socket }, { tls: 'require', tlsPsk: { identity: 'alice', key: pki.pskKey } });
    expect(viaKey.size).toBe(16 * MiB);
  });

  it('PSK: a wrong key or an unknown username is refused with a clear message', async () => {
    const wrong = await refusal(`nbds+unix://alice@/?socket=${nbdkitPsk.socket}&tls-psk-file=${pki.wrongPskFile}`);
    expect(wrong).toBeInstanceOf(NbdTlsError);
    expect(wrong.message).toMatch(/^TLS: the server refused the pre-shared key: wrong key, or unknown username 'alice'/);
    const unknown = await refusal({ path: nbdkitPsk.socket }, { tls: 'require', tlsPsk: { identity: 'mallory', key: pki.pskKey } });
    expect(unknown.message).toMatch(/unknown username 'mallory'/);
    // A username the key file does not have fails before connecting.
    const noKey = await refusal(`nbds+unix://bob@/?socket=${nbdkitPsk.socket}&tls-psk-file=${pki.pskFile}`);
    expect(noKey.message).toBe(`the TLS PSK file ${pki.pskFile} has no key for username 'bob' (set the username with tls-username=NAME)`);
  });

  it('X.509 with nbdkit: the server certificate is verified against ca-cert.pem', async () => {
    const c = await connect(`nbds+unix:///?socket=${nbdkitX509.socket}&tls-certificates=${pki.caOnly}`);
    await roundTrip(c);
    // Over a Unix socket no host name is checked unless asked for.
    const named = await connect({ path: nbdkitX509.socket }, { tls: 'require', tlsCertificates: pki.client, tlsHostname: 'localhost' });
    expect(named.tlsNegotiated).toBe(true);
    const misnamed = await refusal({ path: nbdkitX509.socket }, { tls: 'require', tlsCertificates: pki.client, tlsHostname: 'example.com' });
    expect(misnamed.message).toMatch(/^TLS: the server's certificate does not name example\.com \(/);
  });

  it('X.509: a certificate from another CA is refused, unless tls-verify-peer=false', async () => {
    const e = await refusal(`nbds+unix:///?socket=${nbdkitX509.socket}&tls-certificates=${pki.otherCa}`);
    expect(e).toBeInstanceOf(NbdTlsError);
    expect(e.message).toMatch(/^TLS: the server's certificate could not be verified \(.*CA from .*other-ca; tls-verify-peer=false skips the check\)$/);
    const c = await connect(`nbds+unix:///?socket=${nbdkitX509.socket}&tls-certificates=${pki.otherCa}&tls-verify-peer=false`);
    expect(c.tlsNegotiated).toBe(true);
    const noCa = await connect({ path: nbdkitX509.socket }, { tls: 'require', tlsVerifyPeer: false });
    expect(noCa.tlsNegotiated).toBe(true);
  });

  it('lists exports and reads export info over TLS', async () => {
    expect(await NbdClient.list(`nbds+unix://alice@/?socket=${nbdkitPsk.socket}&tls-psk-file=${pki.pskFile}`)).toEqual([{ name: '', description: '' }]);
    const info = await NbdClient.info({ path: nbdkitX509.socket }, '', { tls: 'require', tlsCertificates: pki.caOnly });
    expect(info.size).toBe(16 * MiB);
  });

  it('qemu-nbd with X.509 (it verifies client certificates): data round trip; no client certificate is refused clearly', async () => {
    const img = path.join(tmp.dir, 'x509.img');
    await writeFile(img, Buffer.alloc(8 * MiB));
    const q = await startQemuNbd(tmp.dir, img, {
      extra: ['--object', `tls-creds-x509,id=tls0,dir=${pki.server},endpoint=server,verify-peer=on`, '--tls-creds=tls0'],
    });
    peers.push(q);
    const c = await connect(`nbds+unix:///?socket=${q.socket}&tls-certificates=${pki.client}`);
    await roundTrip(c);
    await c.disconnect();
    const e = await refusal(`nbds+unix:///?socket=${q.socket}&tls-certificates=${pki.caOnly}`);
    expect(e).toBeInstanceOf(NbdTlsError);
    expect(e.message).toMatch(/^TLS: .*client certificate/);
    expect(readFileSync(img).subarray(MiB, MiB + 16).equals(Buffer.alloc(16))).toBe(false);
  });

  it('qemu-nbd with PSK: data round trip; a wrong key is refused clearly', async () => {
    const img = path.join(tmp.dir, 'psk.img');
    await writeFile(img, Buffer.alloc(8 * MiB));
    const q = await startQemuNbd(tmp.dir, img, {
      extra: ['--object', `tls-creds-psk,id=tls0,dir=${pki.pskDir},endpoint=server`, '--tls-creds=tls0'],
    });
    peers.push(q);
    const c = await connect(`nbds+unix:///?socket=${q.socket}&tls-psk-file=${pki.pskFile}&tls-username=alice`);
    await roundTrip(c);
    await c.disconnect();
    const e = await refusal(`nbds+unix://alice@/?socket=${q.socket}&tls-psk-file=${pki.wrongPskFile}`);
    expect(e.message).toMatch(/^TLS: the server refused the pre-shared key/);
    // Without TLS qemu-nbd says TLS is required, and so do we.
    const clear = await refusal({ path: q.socket });
    expect(clear).toBeInstanceOf(NbdOptionError);
    expect((clear as NbdOptionError).replyType).toBe(NBD.REP_ERR_TLS_REQD);
    expect(clear.message).toMatch(/the server requires TLS: use an nbds:\/\/ or nbds\+unix:\/\/ URI/);
  });

  it("tls: 'on' against a server without TLS goes on in clear; 'require' fails clearly", async () => {
    const c = await connect({ path: plain.socket }, { tls: 'on', tlsCertificates: pki.caOnly });
    expect(c.tlsNegotiated).toBe(false);
    await c.pwrite(Buffer.from('clear'), 0);
    expect((await c.pread(5, 0)).toString()).toBe('clear');
    // And with 'on', a TLS server is used with TLS.
    const t = await connect({ path: nbdkitPsk.socket }, { tls: 'on', tlsPskFile: pki.pskFile, tlsUsername: 'alice' });
    expect(t.tlsNegotiated).toBe(true);
    const e = await refusal(`nbds+unix:///?socket=${plain.socket}&tls-certificates=${pki.caOnly}`);
    expect(e).toBeInstanceOf(NbdTlsError);
    expect((e as NbdTlsError).code).toBe('ENOTLS');
    expect(e.message).toBe('TLS is required but the server does not offer it (NBD_OPT_STARTTLS got NBD_REP_ERR_POLICY)');
  });

  it('a TLS-only server without tls says to use nbds://', async () => {
    const e = await refusal({ path: nbdkitX509.socket });
    expect(e).toBeInstanceOf(NbdOptionError);
    expect(e.message).toMatch(/NBD_REP_ERR_TLS_REQD.*\(the server requires TLS: use an nbds:\/\/ or nbds\+unix:\/\/ URI, or tls: 'require'\)$/);
  });

  it('missing or bad credential files fail before connecting, naming the file', async () => {
    const sock = plain.socket;
    const missingDir = path.join(tmp.dir, 'nope');
    expect((await refusal({ path: sock }, { tls: 'require', tlsCertificates: missingDir })).message).toBe(
      `the TLS certificates directory ${missingDir} does not exist`,
    );
    expect((await refusal({ path: sock }, { tls: 'require', tlsCertificates: pki.otherCa + '/..' })).message).toMatch(/ca-cert\.pem is missing/);
    const halfDir = path.join(tmp.dir, 'half');
    await mkdir(halfDir);
    await copyFile(path.join(pki.client, 'ca-cert.pem'), path.join(halfDir, 'ca-cert.pem'));
    await copyFile(path.join(pki.client, 'client-cert.pem'), path.join(halfDir, 'client-cert.pem'));
    expect((await refusal({ path: sock }, { tls: 'require', tlsCertificates: halfDir })).message).toMatch(/client-key\.pem is missing: a client certificate needs both/);
    const missingPsk = path.join(tmp.dir, 'none.psk');
    expect((await refusal({ path: sock }, { tls: 'require', tlsPskFile: missingPsk, tlsUsername: 'alice' })).message).toMatch(
      new RegExp(`^cannot read the TLS PSK file ${missingPsk}: ENOENT`),
    );
    const badPsk = path.join(tmp.dir, 'bad.psk');
    await writeFile(badPsk, 'alice:nothex\n');
    expect((await refusal({ path: sock }, { tls: 'require', tlsPskFile: badPsk, tlsUsername: 'alice' })).message).toMatch(/bad line in the TLS PSK file/);
    await expect(NbdClient.connect(`nbds+unix:///?socket=${sock}`, { tls: 'off' })).rejects.toThrow(/contradicts the nbds:\/\/ URI/);
  });
});

/** A free TCP port on 127.0.0.1 (bound, then released for the server to take). */
async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((resolve) => srv.close(() => resolve()));
  return port;
}

describeWithTools(['openssl', 'nbdkit'], 'TLS over TCP', () => {
  let tmp: { dir: string; cleanup: () => Promise<void> };
  let pki: Pki;
  let server: Peer;
  let port: number;

  beforeAll(async () => {
    tmp = await makeTempDir();
    pki = makePki(path.join(tmp.dir, 'pki'));
    port = await freePort();
    // nbdkit writes its pid file once it listens: wait for that file.
    const pidFile = path.join(tmp.dir, 'nbdkit.pid');
    server = await startPeer(
      'nbdkit',
      ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), '-P', pidFile, '--tls=require', `--tls-certificates=${pki.server}`, 'memory', '1M'],
      pidFile,
    );
  }, 60_000);
  afterAll(async () => {
    await server?.stop();
    await tmp?.cleanup();
  });

  it('checks the URI host against the certificate: localhost is named, 127.0.0.1 is not', async () => {
    const c = await NbdClient.connect(`nbds://localhost:${port}/?tls-certificates=${pki.caOnly}`);
    expect(c.tlsNegotiated).toBe(true);
    await c.pwrite(Buffer.from('tcp'), 0);
    expect((await c.pread(3, 0)).toString()).toBe('tcp');
    await c.disconnect();
    const e = await NbdClient.connect(`nbds://127.0.0.1:${port}/?tls-certificates=${pki.caOnly}`).catch((err: Error) => err);
    expect(e).toBeInstanceOf(NbdTlsError);
    expect((e as NbdTlsError).code).toBe('ERR_TLS_CERT_ALTNAME_INVALID');
    expect((e as Error).message).toMatch(/^TLS: the server's certificate does not name 127\.0\.0\.1 /);
    // tls-hostname names what the certificate must say, whatever address was dialled.
    const named = await NbdClient.connect(`nbds://127.0.0.1:${port}/?tls-certificates=${pki.caOnly}&tls-hostname=localhost`);
    expect(named.tlsNegotiated).toBe(true);
    await named.disconnect();
    // And tls-verify-peer=false skips the check.
    const unchecked = await NbdClient.connect(`nbds://127.0.0.1:${port}/?tls-verify-peer=false`);
    expect(unchecked.size).toBe(1024 * 1024);
    await unchecked.disconnect();
  });
});
