/**
 * Helpers for this package's tests (not shipped): run the real NBD tools asynchronously (the
 * servers under test live in the test process, so nothing here may block the event loop), and
 * make a throw-away CA and server certificate with openssl.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

/** nbdsh is a Python script: /usr/bin must come before any pyenv shims. */
export const TOOL_ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH ?? ''}` };

export function hasTool(name: string): boolean {
  return TOOL_ENV.PATH.split(':').some((d) => {
    try {
      fs.accessSync(path.join(d, name), fs.constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

/** True when every tool is there; under CI=true a missing tool throws (the suite fails). */
export function needTools(...names: string[]): boolean {
  const missing = names.filter((n) => !hasTool(n));
  if (missing.length && process.env.CI === 'true') {
    throw new Error(`required tools missing under CI: ${missing.join(', ')}`);
  }
  return missing.length === 0;
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
  ms: number;
}

export function run(cmd: string, args: string[], timeout = 60_000): Promise<RunResult> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    execFile(cmd, args, { env: TOOL_ENV, timeout, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : 1) : 0;
      resolve({ code, stdout: String(stdout), stderr: String(stderr), ms: Date.now() - t0 });
    });
  });
}

export async function runOk(cmd: string, args: string[], timeout?: number): Promise<string> {
  const r = await run(cmd, args, timeout);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}):\n${r.stderr}${r.stdout}`);
  return r.stdout;
}

/**
 * Run a Python script in nbdsh connected to `uri`. `expect_err(name, f)` checks that f() fails
 * with that errno and returns the error string; `wait_all()` waits for every aio command.
 */
export async function nbdsh(uri: string, body: string): Promise<string> {
  const script = `
import errno
h.connect_uri(${JSON.stringify(uri)})
def expect_err(name, f):
    try:
        f()
    except nbd.Error as ex:
        got = errno.errorcode.get(ex.errno, str(ex.errno))
        assert got == name, "expected %s, got %s (%s)" % (name, got, ex.string)
        return ex.string
    raise AssertionError("expected %s, got success" % name)
def wait_all():
    while h.aio_in_flight() > 0:
        h.poll(-1)
${body}
print("done")
`;
  const r = await run('nbdsh', ['-c', script]);
  if (r.code !== 0 || !r.stdout.includes('done')) {
    throw new Error(`nbdsh script failed (${r.code}):\n${r.stderr}${r.stdout}`);
  }
  return r.stdout;
}

export function tmpDir(prefix = 'nbdx-imageio-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

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
