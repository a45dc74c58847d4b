import { Errno, NbdError, parseBool, parseSize } from '@nbdx/server/api';

export interface Settings {
  url: URL | null;
  cafile: string | null;
  insecure: boolean;
  size: number | null;
  connections: number;
  /** 'auto' (use the advertised socket when it is a path on this host), 'never', or a path. */
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
      const segments = url.pathname.split('/').filter(Boolean);
      if (segments.length === 0) {
        throw invalid(`url: '${value}' has no ticket: expected https://HOST:54322/images/TICKET`);
      }
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
      if (value.startsWith('\0') || value.startsWith('@')) {
        throw invalid('unix-socket: abstract socket names cannot be reached from Node.js; give a filesystem path, auto or never');
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
  'unix-socket=auto     use the server\'s Unix socket when it is a path on this host (default)',
  'unix-socket=never    always use TCP',
  'unix-socket=PATH     use this Unix socket',
  `timeout=SECONDS      each HTTP request must complete within this time (default ${DEFAULT_TIMEOUT_S})`,
].join('\n');
