import { Errno, NbdError, parseBool, parseSize } from '@nbdx/server/api';

export interface Settings {
  url: URL | null;
  cafile: string | null;
  insecure: boolean;
  size: number | null;
  connections: number;
  /**
   * 'auto' (use the advertised socket when it answers from here), 'never', a filesystem path, or
   * an abstract name starting with NUL.
   */
  unixSocket: string;
  timeoutMs: number;
}

export const DEFAULT_CONNECTIONS = 4;
export const MAX_CONNECTIONS = 64;
export const DEFAULT_TIMEOUT_S = 120;

export function defaultSettings(): Settings {
  return {
    url: null,
    cafile: null,
    insecure: false,
    size: null,
    connections: DEFAULT_CONNECTIONS,
    unixSocket: 'auto',
    timeoutMs: DEFAULT_TIMEOUT_S * 1000,
  };
}

function invalid(message: string): NbdError {
  return new NbdError(Errno.EINVAL, message);
}

/** What a transfer URL looks like, for error messages. */
export const URL_SHAPE = 'https://HOST:54322/images/TICKET';

/**
 * The path of the ticket: ".../images/TICKET", trailing slashes dropped (imageio routes on the
 * whole path, so "/images/T/" would ask for the ticket "T/"). Anything else does not name a
 * ticket: "/", "/images/", "/images/T/extents" (a sub-resource), "/info/".
 */
export function ticketPath(raw: string, pathname: string): string {
  const trimmed = pathname.replace(/\/+$/, '');
  const segments = trimmed.split('/');
  const ticket = segments[segments.length - 1] ?? '';
  if (segments.length < 3 || segments[segments.length - 2] !== 'images' || ticket === '' || ticket === 'images') {
    throw invalid(`url: '${raw}' does not name an imageio ticket: expected ${URL_SHAPE} (the path must end in /images/TICKET)`);
  }
  return trimmed;
}

/** Apply one key=value from the command line; throws EINVAL with a one-line explanation. */
export function applyConfig(s: Settings, key: string, value: string): void {
  switch (key) {
    case 'url': {
      let url: URL;
      try {
        url = new URL(value);
      } catch {
        throw invalid(`url: '${value}' is not a URL (expected https://HOST:54322/images/TICKET)`);
      }
      if (url.protocol !== 'https:' && url.protocol !== 'http:') {
        throw invalid(`url: '${url.protocol}' is not supported, use https:// (or http://)`);
      }
      url.pathname = ticketPath(value, url.pathname);
      if (url.username || url.password) throw invalid('url: imageio URLs carry no user name or password (the ticket is the credential)');
      url.hash = '';
      s.url = url;
      return;
    }
    case 'cafile':
      if (value === '') throw invalid('cafile: empty path');
      s.cafile = value;
      return;
    case 'insecure':
      s.insecure = parseBool(value, 'insecure');
      return;
    case 'size':
      s.size = parseSize(value, 'size');
      return;
    case 'connections': {
      const n = Number(value);
      if (!/^\s*\d+\s*$/.test(value) || !Number.isSafeInteger(n) || n < 1 || n > MAX_CONNECTIONS) {
        throw invalid(`connections: '${value}' is not a whole number from 1 to ${MAX_CONNECTIONS}`);
      }
      s.connections = n;
      return;
    }
    case 'unix-socket':
      if (value === 'auto' || value === 'never') {
        s.unixSocket = value;
        return;
      }
      // "@NAME" is how ss(8) and socat write an abstract name ("\0NAME"); both are accepted.
      if (value.startsWith('@') || value.startsWith('\0')) {
        if (value.length < 2) throw invalid('unix-socket: an abstract socket name needs at least one character after @');
        s.unixSocket = `\0${value.slice(1)}`;
        return;
      }
      if (!value.startsWith('/')) throw invalid(`unix-socket: '${value}' is not auto, never or an absolute path`);
      s.unixSocket = value;
      return;
    case 'timeout': {
      const t = Number(value.replace(/s$/i, ''));
      if (value.trim() === '' || !Number.isFinite(t) || t <= 0 || t > 86400) {
        throw invalid(`timeout: '${value}' is not a number of seconds above 0 (at most 86400)`);
      }
      s.timeoutMs = Math.round(t * 1000);
      return;
    }
    default:
      throw invalid(`unknown parameter '${key}' (see nbdx imageio --help)`);
  }
}

export const CONFIG_HELP = [
  'url=https://HOST:54322/images/TICKET  (required) the transfer URL (https or http)',
  'cafile=FILE          PEM file with the CA that signed the server certificate',
  'insecure=true        do not verify the server certificate',
  'size=SIZE            image size, needed only when the server cannot tell it',
  `connections=N        at most N HTTP connections (default ${DEFAULT_CONNECTIONS}; also capped by the server)`,
  'unix-socket=auto     use the server\'s advertised Unix socket (also abstract ones) when it answers (default)',
  'unix-socket=never    always use TCP (or TLS)',
  'unix-socket=PATH     use this Unix socket; @NAME is the abstract socket NAME',
  `timeout=SECONDS      each HTTP request must complete within this time (default ${DEFAULT_TIMEOUT_S})`,
].join('\n');
