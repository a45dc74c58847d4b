import { readdir, readFile } from 'node:fs/promises';
import * as path from 'node:path';
import { Errno, NbdError, debug, definePlugin, logWarning, packageVersion, readSecret, secretReadsOnce } from '@nbdx/server/api';
import { CONFIG_HELP, applyConfig, defaultSettings, parseHeaderLine, splitHeaderLines, type Settings } from './config.js';
import { Remote } from './remote.js';

const NAME = 'http';
const VERSION = packageVersion(import.meta.url);

async function readText(file: string, what: string): Promise<string> {
  try {
    return await readFile(file, 'utf8');
  } catch (err) {
    throw new NbdError(Errno.EINVAL, `${what}: cannot read '${file}': ${(err as Error).message}`);
  }
}

/**
 * The CA certificates of capath=DIR: every PEM certificate in the directory's files (OpenSSL's
 * hashed links and plain .pem/.crt files alike; other files are skipped).
 */
async function readCaDir(dir: string): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (err) {
    throw new NbdError(Errno.EINVAL, `capath: cannot read '${dir}': ${(err as Error).message}`);
  }
  const certs: string[] = [];
  for (const name of names.sort()) {
    let text: string;
    try {
      text = await readFile(path.join(dir, name), 'utf8');
    } catch {
      continue; // a subdirectory or an unreadable file: not a certificate
    }
    certs.push(...(text.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g) ?? []));
  }
  if (certs.length === 0) throw new NbdError(Errno.EINVAL, `capath: no PEM certificates in '${dir}'`);
  return certs;
}

/** The headers sent with every request, in order, as undici's flat list. */
async function buildHeaders(s: Settings): Promise<string[]> {
  const lines: [string, string | null][] = [];
  for (const h of s.headers) {
    if (Array.isArray(h)) lines.push(h);
    else for (const line of splitHeaderLines(await readText(h.file, 'headers'))) lines.push(parseHeaderLine(line, `headers (${h.file})`));
  }
  const out = new Map<string, [string, string]>();
  const set = (name: string, value: string) => out.set(name.toLowerCase(), [name, value]);
  if (s.userAgent !== null) set('User-Agent', s.userAgent);
  if (s.user !== null) {
    let password = '';
    if (s.password !== null) password = await readSecret('password', s.password, { plugin: NAME });
    else if (s.urlPassword !== null) {
      password = s.urlPassword;
      logWarning(NAME, 'the password in url= is on the command line in clear, where other users can read it in the process list: use password=+FILE, password=- or password=-FD');
    }
    set('Authorization', `Basic ${Buffer.from(`${s.user}:${password}`).toString('base64')}`);
  } else if (s.password !== null) {
    throw new NbdError(Errno.EINVAL, 'password: given without user=');
  }
  if (s.cookie !== null) {
    const cookie = await readSecret('cookie', s.cookie, { plugin: NAME });
    if (/[\r\n\0]/.test(cookie)) throw new NbdError(Errno.EINVAL, 'cookie: contains a line break or NUL');
    set('Cookie', cookie);
  }
  // header= lines come last, so they can replace or remove (Name:) what the plugin would send.
  for (const [name, value] of lines) {
    if (value === null) out.delete(name.toLowerCase());
    else set(name, value);
  }
  return [...out.values()].flat();
}

/** A fresh http plugin (all state lives in this closure; use one per server). */
export function createHttpPlugin() {
  const settings: Settings = defaultSettings();
  let remote: Remote | null = null;
  let size = 0;

  const r = (): Remote => {
    if (!remote) throw new NbdError(Errno.EIO, 'http: not connected to the server (start-up did not finish)');
    return remote;
  };

  async function start(): Promise<void> {
    const url = settings.url!;
    let ca: string[] | undefined;
    if (settings.cafile !== null) ca = [await readText(settings.cafile, 'cafile')];
    if (settings.capath !== null) ca = [...(ca ?? []), ...(await readCaDir(settings.capath))];
    const headers = await buildHeaders(settings);
    const rem = new Remote({
      ca,
      sslverify: settings.sslverify,
      socketPath: settings.unixSocketPath ?? undefined,
      timeoutMs: settings.timeoutMs,
      connections: settings.connections,
      headers,
      followLocation: settings.followLocation,
    });
    try {
      const found = await rem.probe(url, settings.size);
      size = found.size ?? 0;
      debug(NAME, `${found.url.href}: size ${size} from ${found.how}; up to ${settings.connections} connections`);
    } catch (err) {
      await rem.close();
      throw err;
    }
    remote = rem;
  }

  return definePlugin({
    apiVersion: 2,
    name: NAME,
    version: VERSION,
    longname: 'nbdx HTTP(S) plugin',
    description: 'Serve a file on an HTTP or HTTPS server as a read-only disk, read with ranged GETs.',
    magicConfigKey: 'url',
    configHelp: CONFIG_HELP,
    threadModel: 'parallel',
    // Read-only, and the data lives on the web server: each worker thread may have its own copy,
    // which reads its configuration again. Not when a secret is typed at the terminal or read
    // from a descriptor: those can be read once only (the worker would ask again, or find the
    // descriptor closed).
    workerThreads: () => ![settings.password, settings.cookie].some((v) => v !== null && secretReadsOnce(v)),

    config(key, value) {
      applyConfig(settings, key, value);
    },
    configComplete() {
      if (!settings.url) throw new NbdError(Errno.EINVAL, 'url is required: nbdx http https://HOST/PATH');
    },
    getReady: start,
    async unload() {
      const rem = remote;
      remote = null;
      await rem?.close();
    },

    // Nothing per connection: the connection pool is shared. A reopen (retry filter) is cheap and
    // the pool replaces broken sockets by itself.
    open: () => ({}),
    getSize: () => size,
    canWrite: () => false,
    canFlush: () => false,
    canTrim: () => false,
    canZero: () => false,
    canExtents: () => false,
    canCache: () => 'none',
    // Read-only and the same resource for everyone: every connection sees the same bytes.
    canMultiConn: () => true,
    isRotational: () => false,

    pread(_h, buf, offset) {
      if (buf.length === 0) return;
      return r().read(buf, offset);
    },
  });
}

export default createHttpPlugin();
export { parseContentRange } from './remote.js';
export { parseHeaderLine } from './config.js';
export { statusError } from './errors.js';
