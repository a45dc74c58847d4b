/**
 * TLS for the client, as libnbd does it: X.509 certificates from a directory (`ca-cert.pem`,
 * optionally `client-cert.pem` + `client-key.pem`) or a pre-shared key (psktool's
 * `username:hexkey` file). Reading credentials and turning TLS failures into one-line errors.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { isIP } from 'node:net';
import { NbdTlsError } from './errors.js';
import { parseNbdUri, type ResolvedTarget, type UriTls } from './target.js';

/** `'off'`: never; `'on'`: when the server offers it, else in clear; `'require'`: TLS or nothing. */
export type TlsMode = 'off' | 'on' | 'require';

/** TLS connect options; each overrides what the URI says. */
export interface TlsOptions {
  /** Default: `'require'` for `nbds://` and `nbds+unix://` URIs, else `'off'`. */
  tls?: TlsMode;
  /** Directory with `ca-cert.pem` and optionally `client-cert.pem` + `client-key.pem`. */
  tlsCertificates?: string;
  /** psktool's key file: lines `username:hexkey`. The key of `tlsUsername` is used. */
  tlsPskFile?: string;
  /** A pre-shared key given directly (`key` as bytes or hex). Wins over `tlsPskFile`. */
  tlsPsk?: { identity: string; key: Uint8Array | string };
  /** PSK identity looked up in `tlsPskFile`. Default: the URI's user name, else the local user name. */
  tlsUsername?: string;
  /** Verify the server's certificate (chain, and host name over TCP). Default true. */
  tlsVerifyPeer?: boolean;
  /** The name the server certificate must carry. Default: the TCP host; none over Unix sockets. */
  tlsHostname?: string;
}

/** What connecting with TLS will do, credentials loaded. */
export interface TlsPlan {
  mode: 'on' | 'require';
  kind: 'psk' | 'x509';
  /** PSK identity. */
  identity?: string;
  /** Where the credentials came from, for messages. */
  source: string;
  verifyPeer: boolean;
  hostname?: string;
  options: tls.ConnectionOptions;
}

const MODES: readonly string[] = ['off', 'on', 'require'];

function localUser(): string {
  try {
    return os.userInfo().username;
  } catch {
    return process.env.USER ?? process.env.LOGNAME ?? '';
  }
}

/** psktool's `username:hexkey` lines; the key of `identity`. */
export function readPskKey(file: string, identity: string): Buffer {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new NbdTlsError(`cannot read the TLS PSK file ${file}: ${(e as Error).message}`, 'ENOENT');
  }
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (!t || t.startsWith('#')) continue;
    const i = t.lastIndexOf(':');
    const hex = t.slice(i + 1);
    if (i <= 0 || !/^[0-9a-fA-F]+$/.test(hex) || hex.length % 2 !== 0) {
      throw new NbdTlsError(`bad line in the TLS PSK file ${file} (expected username:hexkey): '${t.slice(0, 40)}'`, 'EINVAL');
    }
    if (t.slice(0, i) === identity) return Buffer.from(hex, 'hex');
  }
  throw new NbdTlsError(`the TLS PSK file ${file} has no key for username '${identity}' (set the username with tls-username=NAME)`, 'ENOKEY');
}

function pskKey(key: Uint8Array | string): Buffer {
  if (typeof key !== 'string') return Buffer.from(key);
  if (!/^[0-9a-fA-F]+$/.test(key) || key.length % 2 !== 0) throw new TypeError('tlsPsk.key must be bytes or a hex string');
  return Buffer.from(key, 'hex');
}

function readPem(dir: string, name: string): Buffer | undefined {
  const p = path.join(dir, name);
  try {
    return fs.readFileSync(p);
  } catch (e) {
    const code = (e as { code?: string }).code;
    if (code === 'ENOENT') return undefined;
    throw new NbdTlsError(`cannot read ${p}: ${(e as Error).message}`, code ?? 'EIO');
  }
}

/**
 * Decide whether and how to use TLS for `target` (an NBD URI, or a resolved target), reading
 * every credential file now so a missing or bad file fails before any connection is made (with
 * an NbdTlsError). Null when TLS is off. `connect()` does this first; call it yourself to check
 * settings early (a proxy at startup).
 */
export function planTls(o: TlsOptions, where: ResolvedTarget | string): TlsPlan | null {
  const target: ResolvedTarget = typeof where === 'string' ? parseNbdUri(where) : where;
  const uri: UriTls = target.kind === 'socket' ? {} : (target.tls ?? {});
  if (o.tls !== undefined && !MODES.includes(o.tls)) throw new TypeError(`tls must be 'off', 'on' or 'require', got ${String(o.tls)}`);
  if (o.tls === 'off' && uri.mode === 'require') throw new TypeError("tls: 'off' contradicts the nbds:// URI (which requires TLS)");
  const mode = o.tls ?? uri.mode ?? 'off';
  if (mode === 'off') return null;
  const verifyPeer = o.tlsVerifyPeer ?? uri.verifyPeer ?? true;
  const base: tls.ConnectionOptions = { minVersion: 'TLSv1.2' };

  const pskFile = o.tlsPskFile ?? uri.pskFile;
  if (o.tlsPsk || pskFile !== undefined) {
    let identity: string;
    let key: Buffer;
    let source: string;
    if (o.tlsPsk) {
      identity = o.tlsPsk.identity;
      key = pskKey(o.tlsPsk.key);
      source = 'the key given';
    } else {
      identity = o.tlsUsername ?? uri.username ?? localUser();
      key = readPskKey(pskFile!, identity);
      source = pskFile!;
    }
    if (key.length === 0) throw new NbdTlsError(`the pre-shared key for '${identity}' is empty`, 'EINVAL');
    return {
      mode,
      kind: 'psk',
      identity,
      source,
      verifyPeer,
      options: {
        ...base,
        // Node (OpenSSL) does PSK with TLS 1.2 cipher suites only, as the nbdx server does. Suites
        // with forward secrecy first: AES-GCM with DHE when the server has it (faster than ChaCha20
        // with AES-NI), then ECDHE with ChaCha20 (all nbdkit 1.32 offers with forward secrecy);
        // plain PSK suites last.
        ciphers: 'DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:ECDHE-PSK-CHACHA20-POLY1305:PSK',
        maxVersion: 'TLSv1.2',
        pskCallback: () => ({ psk: key, identity }),
        checkServerIdentity: () => undefined,
      },
    };
  }

  const hostname = o.tlsHostname ?? uri.hostname ?? (target.kind === 'tcp' ? target.host : undefined);
  const dir = o.tlsCertificates ?? uri.certificates;
  const options: tls.ConnectionOptions = { ...base, rejectUnauthorized: verifyPeer };
  if (hostname !== undefined && isIP(hostname) === 0) options.servername = hostname;
  // Over a Unix socket (and no tlsHostname) the chain is checked but no name, as libnbd does.
  options.checkServerIdentity = (_h, cert) => (hostname === undefined ? undefined : tls.checkServerIdentity(hostname, cert));
  let source = 'the system CA store';
  if (dir !== undefined) {
    if (!fs.existsSync(dir)) throw new NbdTlsError(`the TLS certificates directory ${dir} does not exist`, 'ENOENT');
    const ca = readPem(dir, 'ca-cert.pem');
    if (ca === undefined && verifyPeer) {
      throw new NbdTlsError(`${path.join(dir, 'ca-cert.pem')} is missing: it is needed to verify the server (or set tls-verify-peer=false)`, 'ENOENT');
    }
    const cert = readPem(dir, 'client-cert.pem');
    const key = readPem(dir, 'client-key.pem');
    if ((cert === undefined) !== (key === undefined)) {
      const missing = cert === undefined ? 'client-cert.pem' : 'client-key.pem';
      throw new NbdTlsError(`${path.join(dir, missing)} is missing: a client certificate needs both client-cert.pem and client-key.pem`, 'ENOENT');
    }
    if (ca) options.ca = ca;
    if (cert && key) {
      options.cert = cert;
      options.key = key;
    }
    source = dir;
  }
  return { mode, kind: 'x509', source, verifyPeer, ...(hostname !== undefined ? { hostname } : {}), options };
}

const CERT_CODES = new Set([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'CERT_HAS_EXPIRED',
  'CERT_NOT_YET_VALID',
  'CERT_SIGNATURE_FAILURE',
  'CERT_UNTRUSTED',
  'CERT_REJECTED',
  'INVALID_CA',
  'INVALID_PURPOSE',
  'HOSTNAME_MISMATCH',
  'ERR_TLS_CERT_ALTNAME_INVALID',
]);

/** A TLS handshake failure as one line that says what is most likely wrong. */
export function tlsFailure(err: Error | null, plan: TlsPlan): NbdTlsError {
  const code = (err as { code?: string } | null)?.code ?? 'ECONNRESET';
  // Node's words for a peer that hung up mid-handshake say little; say who did what.
  const detail = err && code !== 'ECONNRESET' ? err.message : 'the server closed the connection during the TLS handshake';
  if (CERT_CODES.has(code)) {
    const what = code === 'ERR_TLS_CERT_ALTNAME_INVALID' ? `does not name ${plan.hostname ?? 'the host'}` : 'could not be verified';
    return new NbdTlsError(
      `TLS: the server's certificate ${what} (${detail}; CA from ${plan.source}; tls-verify-peer=false skips the check)`,
      code,
      err,
    );
  }
  if (plan.kind === 'psk') {
    return new NbdTlsError(
      `TLS: the server refused the pre-shared key: wrong key, or unknown username '${plan.identity}' (${detail})`,
      code,
      err,
    );
  }
  if (/CERTIFICATE|UNKNOWN_CA|ACCESS_DENIED/.test(code)) {
    return new NbdTlsError(`TLS: the server refused our client certificate (from ${plan.source}) (${detail})`, code, err);
  }
  return new NbdTlsError(`TLS handshake with the server failed (${detail})`, code, err);
}
