import type { Duplex } from 'node:stream';
import { NBD } from '@nbdx/server/wire';

/** Where to connect: an NBD URI, a TCP address, a Unix socket path, or an already connected stream. */
export type NbdTarget = string | { host: string; port?: number } | { path: string } | { socket: Duplex };

/** TLS settings a URI carries (scheme `nbds`/`nbds+unix`, user name, `tls-*` query parameters). */
export interface UriTls {
  /** `'require'` for `nbds://` and `nbds+unix://`; absent for `nbd://` (TLS off unless asked for). */
  mode?: 'require';
  /** `tls-certificates=DIR` */
  certificates?: string;
  /** `tls-psk-file=FILE` */
  pskFile?: string;
  /** `tls-username=NAME`, or the user part of the URI (`nbds://alice@host/`). */
  username?: string;
  /** `tls-verify-peer=false` */
  verifyPeer?: boolean;
  /** `tls-hostname=NAME`: the name the server certificate must carry. */
  hostname?: string;
}

export type ResolvedTarget =
  | { kind: 'tcp'; host: string; port: number; exportName?: string; tls?: UriTls }
  | { kind: 'unix'; path: string; exportName?: string; tls?: UriTls }
  | { kind: 'socket'; socket: Duplex };

/** libnbd's spellings of a boolean in a URI query. */
function uriBool(value: string, key: string, uri: string): boolean {
  const v = value.trim().toLowerCase();
  if (['1', 'true', 'yes', 'on'].includes(v)) return true;
  if (['0', 'false', 'no', 'off'].includes(v)) return false;
  throw new TypeError(`${key}=${value} is not a boolean (true or false) in ${uri}`);
}

function decode(s: string, uri: string): string {
  try {
    return decodeURIComponent(s);
  } catch {
    throw new TypeError(`bad percent-encoding in NBD URI: ${uri}`);
  }
}

function uriTls(user: string | undefined, q: Map<string, string>, secure: boolean, uri: string): UriTls | undefined {
  const t: UriTls = {};
  if (secure) t.mode = 'require';
  const certs = q.get('tls-certificates');
  if (certs !== undefined) t.certificates = certs;
  const psk = q.get('tls-psk-file');
  if (psk !== undefined) t.pskFile = psk;
  const username = q.get('tls-username') ?? user;
  if (username !== undefined) t.username = username;
  const verify = q.get('tls-verify-peer');
  if (verify !== undefined) t.verifyPeer = uriBool(verify, 'tls-verify-peer', uri);
  const hostname = q.get('tls-hostname');
  if (hostname !== undefined) t.hostname = hostname;
  return Object.keys(t).length > 0 ? t : undefined;
}

// scheme://[user@]authority/path?query#fragment. Parsed by hand: WHATWG URL refuses
// `nbds+unix://alice@/...` (a user without a host), which libnbd documents.
const URI_RE = /^([A-Za-z][A-Za-z0-9+.-]*):\/\/(?:([^@/?#]*)@)?([^/?#]*)([^?#]*)(?:\?([^#]*))?(?:#.*)?$/;

/**
 * Parse `nbd[s]://[user@]host[:port]/[export]` or `nbd[s]+unix://[user@]/[export]?socket=PATH`.
 * The export name is the percent-decoded path after the first slash (empty when absent). `nbds`
 * schemes require TLS; the query parameters `tls-certificates`, `tls-psk-file`, `tls-username`,
 * `tls-verify-peer` and `tls-hostname` (and the user name, the PSK username) are returned in
 * `tls`, as libnbd reads them. Other query parameters are ignored.
 */
export function parseNbdUri(uri: string): ResolvedTarget & { kind: 'tcp' | 'unix'; exportName: string } {
  const m = URI_RE.exec(uri);
  if (!m) throw new TypeError(`not a valid NBD URI: ${uri}`);
  const scheme = m[1]!.toLowerCase();
  const user = m[2] !== undefined && m[2] !== '' ? decode(m[2], uri) : undefined;
  const authority = m[3]!;
  const path = m[4]!;
  const query = new Map<string, string>();
  for (const part of (m[5] ?? '').split('&')) {
    if (!part) continue;
    const eq = part.indexOf('=');
    query.set(decode(eq < 0 ? part : part.slice(0, eq), uri), eq < 0 ? '' : decode(part.slice(eq + 1), uri));
  }
  const secure = scheme === 'nbds' || scheme === 'nbds+unix';
  const exportName = decode(path.startsWith('/') ? path.slice(1) : path, uri);
  if (scheme === 'nbd' || scheme === 'nbds') {
    const hp = /^(?:\[([^\]]*)\]|([^:[\]]*))(?::(\d*))?$/.exec(authority);
    if (!hp) throw new TypeError(`not a valid NBD URI: ${uri}`);
    const host = decode(hp[1] ?? hp[2] ?? '', uri);
    if (!host) throw new TypeError(`NBD URI has no host: ${uri}`);
    const port = hp[3] ? Number(hp[3]) : NBD.NBD_DEFAULT_PORT;
    if (!(port > 0 && port < 65536)) throw new TypeError(`bad port in NBD URI: ${uri}`);
    const tls = uriTls(user, query, secure, uri);
    return { kind: 'tcp', host, port, exportName, ...(tls ? { tls } : {}) };
  }
  if (scheme === 'nbd+unix' || scheme === 'nbds+unix') {
    const socket = query.get('socket');
    if (!socket) throw new TypeError(`${scheme} URI needs ?socket=PATH: ${uri}`);
    const tls = uriTls(user, query, secure, uri);
    return { kind: 'unix', path: socket, exportName, ...(tls ? { tls } : {}) };
  }
  throw new TypeError(`unsupported NBD URI scheme "${scheme}:" in ${uri}`);
}

export function resolveTarget(target: NbdTarget): ResolvedTarget {
  if (typeof target === 'string') return parseNbdUri(target);
  if (target && typeof target === 'object') {
    if ('socket' in target && target.socket) return { kind: 'socket', socket: target.socket };
    if ('path' in target && typeof target.path === 'string') return { kind: 'unix', path: target.path };
    if ('host' in target && typeof target.host === 'string') {
      return { kind: 'tcp', host: target.host, port: target.port ?? NBD.NBD_DEFAULT_PORT };
    }
  }
  throw new TypeError('target must be an NBD URI, {host, port}, {path} or {socket}');
}
