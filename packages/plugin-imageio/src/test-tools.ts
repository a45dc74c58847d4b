/**
 * Helpers for this package's tests (not shipped): a throw-away CA and server certificate made with
 * openssl, for the test imageio server's HTTPS. Running the tools comes from @nbdx/testkit.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { runOk } from '@nbdx/testkit';

export interface TestCerts {
  caFile: string;
  key: string;
  cert: string;
}

/** A self-signed CA and a server certificate for 127.0.0.1/localhost signed by it. */
export async function makeCerts(dir: string): Promise<TestCerts> {
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
  return { caFile: f('ca.pem'), key: fs.readFileSync(f('server.key'), 'utf8'), cert: fs.readFileSync(f('server.pem'), 'utf8') };
}
