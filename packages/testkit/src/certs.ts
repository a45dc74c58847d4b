/**
 * A throw-away CA and a server certificate it signed, made with openssl, for tests that need a
 * real TLS server (https, NBD over TLS) and a client that verifies it (cafile=).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { runOk } from './tools.js';

export interface TestCerts {
  /** PEM file of the CA: what a client trusts. */
  caFile: string;
  /** The server's key and certificate (PEM text). */
  key: string;
  cert: string;
  /** The same, as files in the directory. */
  keyFile: string;
  certFile: string;
}

/** A CA and a certificate for 127.0.0.1 and localhost signed by it, written into `dir`. */
export async function makeTestCerts(dir: string): Promise<TestCerts> {
  const f = (n: string) => path.join(dir, n);
  fs.writeFileSync(f('ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n');
  await runOk('openssl', [
    'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', '/CN=nbdx test CA',
    '-keyout', f('ca.key'), '-out', f('ca.pem'),
  ]);
  await runOk('openssl', [
    'req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=localhost', '-keyout', f('server.key'), '-out', f('server.csr'),
  ]);
  await runOk('openssl', [
    'x509', '-req', '-in', f('server.csr'), '-CA', f('ca.pem'), '-CAkey', f('ca.key'), '-CAcreateserial',
    '-days', '2', '-extfile', f('ext.cnf'), '-out', f('server.pem'),
  ]);
  return {
    caFile: f('ca.pem'),
    key: fs.readFileSync(f('server.key'), 'utf8'),
    cert: fs.readFileSync(f('server.pem'), 'utf8'),
    keyFile: f('server.key'),
    certFile: f('server.pem'),
  };
}
