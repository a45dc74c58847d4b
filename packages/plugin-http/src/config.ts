import { Errno, NbdError, parseBool, parseSize } from '@nbdx/server/api';

export interface Settings {
  url: URL | null;
  /**
   * Header lines in order, as `[name, value]` (a null value removes a header we would send), and
   * files of header lines (`headers=+FILE`), read at start-up in their place.
   */
  headers: ([string, string | null] | { file: string })[];
  /** cookie= and password= as given (`+FILE`, `-`, `-FD` or clear): readSecret reads them at start-up. */
  cookie: string | null;
  user: string | null;
  password: string | null;
  /** A password in url=: always the password itself, even when it starts with `+` or `-`. */
  urlPassword: string | null;
  cafile: string | null;
  capath: string | null;
  sslverify: boolean;
  timeoutMs: number;
  connections: number;
  unixSocketPath: string | null;
  userAgent: string | null;
  followLocation: boolean;
  size: number | null;
}

export const DEFAULT_CONNECTIONS = 16;
export const MAX_CONNECTIONS = 256;
export const DEFAULT_TIMEOUT_S = 60;
export const DEFAULT_USER_AGENT = 'nbdx-http';

export function defaultSettings(): Settings {
  return {
    url: null,
    headers: [],
    cookie: null,
    user: null,
    password: null,
    urlPassword: null,
    cafile: null,
    capath: null,
    sslverify: true,
    timeoutMs: DEFAULT_TIMEOUT_S * 1000,
    connections: DEFAULT_CONNECTIONS,
    unixSocketPath: null,
    userAgent: DEFAULT_USER_AGENT,
    followLocation: true,
    size: null,
  };
}

function invalid(message: string): NbdError {
  return new NbdError(Errno.EINVAL, message);
}

/** RFC 9110 token characters: what a header name may contain. */
const TOKEN = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;

/**
 * Headers the plugin owns: sending them from the command line would break the ranged reads or
 * the connection handling (undici refuses several of them anyway).
 */
const RESERVED = new Set(['range', 'content-length', 'transfer-encoding', 'connection', 'keep-alive', 'upgrade', 'expect', 'te', 'trailer', 'accept-encoding']);

/**
 * One header line as curl takes it: `Name: value` adds a header, `Name:` removes one this plugin
 * would send (User-Agent), `Name;` adds a header with an empty value.
 */
export function parseHeaderLine(line: string, what = 'header'): [string, string | null] {
  const colon = line.indexOf(':');
  const semi = line.indexOf(';');
  let name: string;
  let value: string | null;
  if (colon > 0 && (semi < 0 || colon < semi)) {
    name = line.slice(0, colon).trim();
    const rest = line.slice(colon + 1).trim();
    value = rest === '' ? null : rest;
  } else if (semi > 0 && line.slice(semi + 1).trim() === '') {
    name = line.slice(0, semi).trim();
    value = '';
  } else {
    throw invalid(`${what}: '${line}' is not 'Name: value' (or 'Name:' to remove, 'Name;' for an empty value)`);
  }
  if (!TOKEN.test(name)) throw invalid(`${what}: '${name}' is not a valid header name`);
  if (value !== null && /[\r\n\0]/.test(value)) throw invalid(`${what}: the value of '${name}' contains a line break or NUL`);
  if (RESERVED.has(name.toLowerCase())) throw invalid(`${what}: '${name}' is managed by the plugin and cannot be set`);
  return [name, value];
}

/** Apply one key=value from the command line; throws EINVAL with a one-line explanation. */
export function applyConfig(s: Settings, key: string, value: string): void {
  switch (key) {
    case 'url': {
      let url: URL;
      try {
        url = new URL(value);
      } catch {
        throw invalid(`url: '${value}' is not a URL (expected https://HOST/PATH or http://HOST/PATH)`);
      }
      if (url.protocol !== 'https:' && url.protocol !== 'http:') {
        throw invalid(`url: '${url.protocol}' is not supported, use https:// or http://`);
      }
      // Credentials in the URL are used as user= and password= (which win when also given), and
      // are never sent as part of the URL.
      if (url.username) s.user ??= decodeURIComponent(url.username);
      if (url.password) s.urlPassword = decodeURIComponent(url.password);
      url.username = '';
      url.password = '';
      url.hash = '';
      s.url = url;
      return;
    }
    case 'header':
      s.headers.push(parseHeaderLine(value));
      return;
    case 'headers':
      // Many headers at once: +FILE (one per line) is read at start-up, anything else is a list
      // of lines. Blank lines and lines starting with # are ignored.
      if (value.startsWith('+')) {
        if (value.length === 1) throw invalid("headers: '+' must be followed by a file name");
        s.headers.push({ file: value.slice(1) });
        return;
      }
      for (const line of splitHeaderLines(value)) s.headers.push(parseHeaderLine(line, 'headers'));
      return;
    case 'cookie':
      if (s.cookie !== null) throw invalid('cookie: may be given only once (join several cookies with "; ")');
      s.cookie = value;
      return;
    case 'user':
      s.user = value;
      return;
    case 'password':
      s.password = value;
      return;
    case 'cafile':
    case 'cainfo':
      if (value === '') throw invalid(`${key}: empty path`);
      s.cafile = value;
      return;
    case 'capath':
      if (value === '') throw invalid('capath: empty path');
      s.capath = value;
      return;
    case 'sslverify':
      s.sslverify = parseBool(value, 'sslverify');
      return;
    case 'followlocation':
      s.followLocation = parseBool(value, 'followlocation');
      return;
    case 'timeout': {
      const t = Number(value.replace(/s$/i, ''));
      if (value.trim() === '' || !Number.isFinite(t) || t < 0 || t > 86400) {
        throw invalid(`timeout: '${value}' is not a number of seconds from 0 to 86400`);
      }
      // 0 means "no timeout of ours", as in nbdkit (curl's default).
      s.timeoutMs = Math.round(t * 1000);
      return;
    }
    case 'connections': {
      const n = Number(value);
      if (!/^\s*\d+\s*$/.test(value) || !Number.isSafeInteger(n) || n < 1 || n > MAX_CONNECTIONS) {
        throw invalid(`connections: '${value}' is not a whole number from 1 to ${MAX_CONNECTIONS}`);
      }
      s.connections = n;
      return;
    }
    case 'unix-socket-path':
      if (!value.startsWith('/')) throw invalid(`unix-socket-path: '${value}' is not an absolute path`);
      s.unixSocketPath = value;
      return;
    case 'user-agent':
      if (/[\r\n\0]/.test(value)) throw invalid('user-agent: contains a line break or NUL');
      s.userAgent = value === '' ? null : value;
      return;
    case 'size':
      s.size = parseSize(value, 'size');
      return;
    default:
      throw invalid(`unknown parameter '${key}' (see nbdx http --help)`);
  }
}

export function splitHeaderLines(text: string): string[] {
  return text
    .split(/\r?\n/)
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'));
}

export const CONFIG_HELP = [
  'url=URL              (required) http:// or https:// URL of the disk image',
  'header=NAME: VALUE   send this header with every request (repeatable; NAME: removes one)',
  'headers=+FILE        headers from a file, one per line (also headers=LINES)',
  'cookie=COOKIE        Cookie header; also +FILE, - (ask) or -FD',
  'user=USER            user name for HTTP Basic authentication',
  'password=+FILE       password from a file (or - to ask, -FD; a clear password is accepted)',
  'cafile=FILE          PEM bundle of the CAs to trust instead of the system ones (alias cainfo)',
  'capath=DIR           directory of PEM CA certificates to trust',
  'sslverify=false      do not verify the server certificate',
  `timeout=SECONDS      fail a request making no progress for this long (default ${DEFAULT_TIMEOUT_S}; 0 = never)`,
  `connections=N        at most N HTTP connections (default ${DEFAULT_CONNECTIONS})`,
  'unix-socket-path=P   connect to this Unix socket instead of the URL\'s host',
  `user-agent=UA        User-Agent header (default ${DEFAULT_USER_AGENT}; empty: none)`,
  'followlocation=false do not follow redirects at start-up',
  'size=SIZE            do not ask the server: use this size (reads past the end of the resource fail)',
].join('\n');
