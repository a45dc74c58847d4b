import { parseNbdUri, planTls, type TlsMode, type TlsOptions, type UriTls } from '@nbdx/client';
import { Errno, NbdError, parseBool, parseDuration } from '@nbdx/server/api';

/** Where the upstream server listens. */
export type UpstreamAddress = { kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number };

/** Everything the parameters say, checked and complete. */
export interface ProxyConfig {
  address: UpstreamAddress;
  /** The export opened upstream when dynamic-export is off. */
  exportName: string;
  /** Pass each client's export name upstream; list the upstream's exports. */
  dynamicExport: boolean;
  /** Extra connection attempts after the first one fails, one second apart. */
  retry: number;
  /** Milliseconds allowed for each connection attempt (connect plus handshake); 0 = no limit. */
  timeoutMs: number;
  /** Milliseconds the upstream may leave a request unanswered before it is taken for gone; 0 = for ever. */
  requestTimeoutMs: number;
  /** TLS to the upstream, as @nbdx/client's connect options (`tls: 'off'` when not used). */
  tls: TlsOptions & { tls: TlsMode };
}

/** Parameters as given, before configComplete() checks that they fit together. */
export interface RawParams {
  uri?: string;
  socket?: string;
  hostname?: string;
  port?: number;
  export?: string;
  dynamicExport?: boolean;
  retry?: number;
  timeoutMs?: number;
  requestTimeoutMs?: number;
  tls?: TlsMode;
  tlsCertificates?: string;
  tlsPsk?: string;
  tlsUsername?: string;
  tlsVerify?: boolean;
}

export const DEFAULT_TIMEOUT_MS = 30_000;
export const DEFAULT_PORT = 10809;
/** The most retries accepted: a bit over a day of one-second waits. */
const MAX_RETRY = 100_000;

export const CONFIG_HELP = [
  '[uri=]URI               upstream server: nbd[s]://HOST[:PORT]/[EXPORT] or nbd[s]+unix:///[EXPORT]?socket=PATH',
  'socket=PATH             upstream Unix socket (instead of uri=)',
  'hostname=HOST           upstream TCP host (instead of uri=)',
  'port=PORT               upstream TCP port with hostname= (default 10809)',
  'export=NAME             export to open upstream with socket=/hostname= (default "")',
  'dynamic-export=true     open the export each client asks for, list the upstream\'s exports',
  'retry=N                 retry a failed upstream connection N times, 1 s apart (default 0)',
  'timeout=SECONDS         time allowed to connect to the upstream, per attempt (default 30; 0 = none)',
  'request-timeout=SECONDS an upstream that leaves a request unanswered this long is taken for gone (default 0 = wait)',
  'tls=off|on|require      TLS to the upstream (default off; on when another tls-* is given; require for nbds URIs)',
  'tls-certificates=DIR    X.509: DIR holds ca-cert.pem (and client-cert.pem + client-key.pem to present one)',
  'tls-psk=FILE            pre-shared key file (psktool format, lines username:hexkey)',
  'tls-username=NAME       PSK username (default: the local user name)',
  'tls-verify=false        do not verify the upstream\'s certificate (default true)',
].join('\n');

function bad(message: string): NbdError {
  return new NbdError(Errno.EINVAL, message);
}

/** nbdkit's spellings: off/on as booleans, require (also required, force). */
function parseTlsMode(value: string): TlsMode {
  const v = value.trim().toLowerCase();
  if (v === 'require' || v === 'required' || v === 'force') return 'require';
  try {
    return parseBool(v, 'tls') ? 'on' : 'off';
  } catch {
    throw bad(`tls=${value}: expected off, on or require`);
  }
}

/** Take one key=value into `p`. Throws a clear error for anything unknown or malformed. */
export function applyParam(p: RawParams, key: string, value: string): void {
  switch (key) {
    case 'uri': {
      try {
        parseNbdUri(value);
      } catch (e) {
        throw bad(`uri=${value}: ${(e as Error).message} (expected nbd[s]://HOST[:PORT]/[EXPORT] or nbd[s]+unix:///[EXPORT]?socket=PATH)`);
      }
      p.uri = value;
      return;
    }
    case 'socket':
      if (value === '') throw bad('socket= needs the path of a Unix socket');
      p.socket = value;
      return;
    case 'hostname':
      if (value === '') throw bad('hostname= needs a host name or address');
      p.hostname = value;
      return;
    case 'port': {
      const n = /^\d+$/.test(value.trim()) ? Number(value) : NaN;
      if (!Number.isInteger(n) || n < 1 || n > 65535) throw bad(`port=${value}: not a TCP port number (1 to 65535)`);
      p.port = n;
      return;
    }
    case 'export':
      p.export = value;
      return;
    case 'dynamic-export':
      p.dynamicExport = parseBool(value, 'dynamic-export');
      return;
    case 'retry': {
      const n = /^\d+$/.test(value.trim()) ? Number(value) : NaN;
      if (!Number.isSafeInteger(n) || n > MAX_RETRY) throw bad(`retry=${value}: not a whole number of retries (0 to ${MAX_RETRY})`);
      p.retry = n;
      return;
    }
    case 'timeout':
      p.timeoutMs = Math.round(parseDuration(value, 'timeout'));
      return;
    case 'request-timeout':
      p.requestTimeoutMs = Math.round(parseDuration(value, 'request-timeout'));
      return;
    case 'tls':
      p.tls = parseTlsMode(value);
      return;
    case 'tls-certificates':
      if (value === '') throw bad('tls-certificates= needs a directory');
      p.tlsCertificates = value;
      return;
    case 'tls-psk':
      if (value === '') throw bad('tls-psk= needs the path of a key file');
      p.tlsPsk = value;
      return;
    case 'tls-username':
      if (value === '') throw bad('tls-username= needs a name');
      p.tlsUsername = value;
      return;
    case 'tls-verify':
      p.tlsVerify = parseBool(value, 'tls-verify');
      return;
    case 'shared':
      throw bad(`shared=${value}: nbdx shares one upstream connection with a filter instead: nbdx --filter=shared nbd ...`);
    default:
      throw bad(`unknown parameter '${key}' (see nbdx nbd --help)`);
  }
}

/** Check that the parameters fit together and resolve the upstream address. */
export function completeConfig(p: RawParams): ProxyConfig {
  const given = [p.uri !== undefined && 'uri=', p.socket !== undefined && 'socket=', p.hostname !== undefined && 'hostname='].filter(
    (x): x is string => typeof x === 'string',
  );
  if (given.length === 0) {
    throw bad('no upstream server: give uri=URI, socket=PATH or hostname=HOST (e.g. nbdx nbd nbd://host/export)');
  }
  if (given.length > 1) throw bad(`give only one of ${given.join(', ')}: they all name the upstream server`);
  if (p.port !== undefined && p.hostname === undefined) throw bad('port= goes with hostname= (put the port in the URI with uri=)');

  let address: UpstreamAddress;
  let exportName = p.export ?? '';
  let uriTls: UriTls = {};
  if (p.uri !== undefined) {
    const u = parseNbdUri(p.uri);
    address = u.kind === 'unix' ? { kind: 'unix', path: u.path } : { kind: 'tcp', host: u.host, port: u.port };
    if (p.export !== undefined) throw bad('export= does not go with uri=: put the export name in the URI (nbd://host/EXPORT)');
    exportName = u.exportName;
    uriTls = u.tls ?? {};
  } else if (p.socket !== undefined) {
    address = { kind: 'unix', path: p.socket };
  } else {
    address = { kind: 'tcp', host: p.hostname!, port: p.port ?? DEFAULT_PORT };
  }
  const dynamicExport = p.dynamicExport ?? false;
  if (dynamicExport && exportName !== '') {
    throw bad(
      `dynamic-export=true passes each client's export name upstream, so no export may be named ` +
        `(got '${exportName}' from ${p.uri !== undefined ? 'the URI' : 'export='})`,
    );
  }
  return {
    address,
    exportName,
    dynamicExport,
    retry: p.retry ?? 0,
    timeoutMs: p.timeoutMs ?? DEFAULT_TIMEOUT_MS,
    requestTimeoutMs: p.requestTimeoutMs ?? 0,
    tls: tlsConfig(p, uriTls, address),
  };
}

/**
 * The TLS settings, as nbdkit's nbd plugin reads them: tls= defaults to off, to on when another
 * tls-* parameter is given, to require for an nbds URI. Parameters win over the URI's query.
 * Credential files are read now, so a typo fails at startup rather than at the first client.
 */
function tlsConfig(p: RawParams, uri: UriTls, address: UpstreamAddress): TlsOptions & { tls: TlsMode } {
  const others = [
    p.tlsCertificates !== undefined && 'tls-certificates=',
    p.tlsPsk !== undefined && 'tls-psk=',
    p.tlsUsername !== undefined && 'tls-username=',
    p.tlsVerify !== undefined && 'tls-verify=',
  ].filter((x): x is string => typeof x === 'string');
  if (p.tls === 'off' && uri.mode === 'require') throw bad('tls=off does not go with an nbds:// URI, which requires TLS');
  if (p.tls === 'off' && others.length > 0) throw bad(`${others.join(', ')} ${others.length > 1 ? 'need' : 'needs'} TLS: drop tls=off`);
  const mode: TlsMode = p.tls ?? uri.mode ?? (others.length > 0 ? 'on' : 'off');
  if (mode === 'off') return { tls: 'off' };
  const o: TlsOptions & { tls: TlsMode } = { tls: mode };
  const certificates = p.tlsCertificates ?? uri.certificates;
  const psk = p.tlsPsk ?? uri.pskFile;
  const username = p.tlsUsername ?? uri.username;
  const verify = p.tlsVerify ?? uri.verifyPeer;
  if (certificates !== undefined) o.tlsCertificates = certificates;
  if (psk !== undefined) o.tlsPskFile = psk;
  if (username !== undefined) o.tlsUsername = username;
  if (verify !== undefined) o.tlsVerifyPeer = verify;
  if (uri.hostname !== undefined) o.tlsHostname = uri.hostname;
  try {
    planTls(o, address.kind === 'unix' ? { kind: 'unix', path: address.path } : { kind: 'tcp', host: address.host, port: address.port });
  } catch (e) {
    throw bad((e as Error).message);
  }
  return o;
}

/** The upstream as a URI, for messages (`nbds` when TLS is required). */
export function describeAddress(a: UpstreamAddress, exportName?: string, tls?: TlsMode): string {
  const name = exportName ? encodeURIComponent(exportName) : '';
  const s = tls === 'require' ? 's' : '';
  if (a.kind === 'unix') return `nbd${s}+unix:///${name}?socket=${a.path}`;
  const host = a.host.includes(':') ? `[${a.host}]` : a.host;
  return `nbd${s}://${host}:${a.port}/${name}`;
}
