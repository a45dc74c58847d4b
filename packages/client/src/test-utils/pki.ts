/**
 * Throw-away X.509 and PSK credentials for TLS tests, laid out as nbdkit, qemu-nbd and libnbd
 * expect them. Not part of the package's public API.
 */
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';

function openssl(args: string[]): void {
  const r = spawnSync('openssl', args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`openssl ${args[0]} failed: ${r.stderr}`);
}

function makeCa(dir: string, cn: string): void {
  mkdirSync(dir, { recursive: true });
  openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', path.join(dir, 'ca-key.pem'), '-out', path.join(dir, 'ca-cert.pem'), '-days', '2', '-subj', `/CN=${cn}`]);
}

function issue(caDir: string, outDir: string, name: string, cn: string, ext: string): void {
  const base = path.join(outDir, name);
  openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${base}-key.pem`, '-out', `${base}.csr`, '-subj', `/CN=${cn}`]);
  writeFileSync(`${base}.ext`, ext);
  openssl(['x509', '-req', '-in', `${base}.csr`, '-CA', path.join(caDir, 'ca-cert.pem'), '-CAkey', path.join(caDir, 'ca-key.pem'), '-CAcreateserial', '-out', `${base}-cert.pem`, '-days', '2', '-extfile', `${base}.ext`]);
}

export interface Pki {
  /** Server side: ca-cert.pem, server-cert.pem (for DNS:localhost), server-key.pem. */
  server: string;
  /** Client side: ca-cert.pem, client-cert.pem, client-key.pem. */
  client: string;
  /** ca-cert.pem only (no client certificate). */
  caOnly: string;
  /** ca-cert.pem of another CA (the server's certificate does not verify). */
  otherCa: string;
  /** psktool-style key file with `alice`'s key (and qemu-nbd's directory holding it as keys.psk). */
  pskFile: string;
  pskDir: string;
  pskKey: string;
  /** The same username with another key. */
  wrongPskFile: string;
}

export function makePki(root: string): Pki {
  const server = path.join(root, 'server');
  const client = path.join(root, 'client');
  const caOnly = path.join(root, 'ca-only');
  const otherCa = path.join(root, 'other-ca');
  const pskDir = path.join(root, 'psk');
  makeCa(server, 'nbdx test CA');
  issue(server, server, 'server', 'localhost', 'subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n');
  mkdirSync(client);
  issue(server, client, 'client', 'client', 'extendedKeyUsage=clientAuth\n');
  copyFileSync(path.join(server, 'ca-cert.pem'), path.join(client, 'ca-cert.pem'));
  mkdirSync(caOnly);
  copyFileSync(path.join(server, 'ca-cert.pem'), path.join(caOnly, 'ca-cert.pem'));
  makeCa(otherCa, 'another CA');
  mkdirSync(pskDir);
  const pskKey = randomBytes(32).toString('hex');
  const pskFile = path.join(pskDir, 'keys.psk');
  writeFileSync(pskFile, `alice:${pskKey}\n`);
  const wrongPskFile = path.join(root, 'wrong.psk');
  writeFileSync(wrongPskFile, `alice:${randomBytes(32).toString('hex')}\n`);
  return { server, client, caOnly, otherCa, pskFile, pskDir, pskKey, wrongPskFile };
}
