import { isIP } from 'node:net';

/**
 * nbdkit's command-line grammar: `nbdx [OPTIONS] PLUGIN [KEY=VALUE | VALUE]... [OPTIONS]`.
 * Options may come before or after the plugin; the first bare value after the plugin goes to
 * the plugin's magic key.
 */

export class UsageError extends Error {}

/** More threads than this only add contention (and each holds a copy of the plugin). */
export const MAX_WORKERS = 64;

export interface CliOptions {
  port?: string;
  ipaddr?: string;
  unix?: string;
  single: boolean;
  readonly: boolean;
  exportName?: string;
  foreground: boolean;
  pidfile?: string;
  threads?: number;
  /** --workers: threads serving connections; 'auto' (the default) picks by cores and layers. */
  workers?: number | 'auto';
  verbose: boolean;
  debugFlags: string[];
  run?: string;
  filters: string[];
  tls: 'off' | 'on' | 'require';
  tlsCertificates?: string;
  tlsPsk?: string;
  tlsVerifyPeer: boolean;
  exitWithParent: boolean;
  maskHandshake?: number;
  noSr: boolean;
  /** Unset: stderr in the foreground, syslog once detached (as nbdkit). */
  log?: 'stderr' | 'syslog' | 'null';
  printUri: boolean;
  dumpPlugin: boolean;
  dumpConfig: boolean;
  /** --list: print the plugins and filters available. */
  list?: boolean;
  /** --long-options / --short-options: print the option table (for shell completion), as nbdkit. */
  listOptions?: 'long' | 'short';
  help: boolean;
  version: boolean;
  maxPayload?: string;
  /** --max-connection-memory / --max-server-memory (sizes, parsed later). */
  maxConnectionMemory?: string;
  maxServerMemory?: string;
  maxOptions?: number;
  /** --timeout=SECONDS: handshake time limit. */
  timeout?: number;
  /** --poll=MICROSECONDS (see ServeOptions.pollMicroseconds). */
  poll?: number;
  /** --metrics=[HOST:]PORT: where the metrics endpoint listens (see ServeOptions.metrics). */
  metrics?: { host: string; port: number };
  noInstall: boolean;
  plugin?: string;
  /** key=value pairs in order; bare values arrive as [null, value] until the magic key is known. */
  params: Array<[string | null, string]>;
}

type Spec = { takesValue: boolean; set: (o: CliOptions, v: string) => void };

/** An option whose value is a number in [min, max] (whole, when `integer`). */
function numberOption(
  name: string,
  what: string,
  min: number,
  max: number,
  integer: boolean,
  set: (o: CliOptions, n: number) => void,
): Spec {
  return {
    takesValue: true,
    set: (o, v) => {
      const n = Number(v);
      if (v.trim() === '' || !(integer ? Number.isInteger(n) : Number.isFinite(n)) || n < min || n > max) {
        throw new UsageError(`--${name}: '${v}' is not ${what}`);
      }
      set(o, n);
    },
  };
}

const LONG: Record<string, Spec> = {
  port: { takesValue: true, set: (o, v) => (o.port = v) },
  ipaddr: { takesValue: true, set: (o, v) => (o.ipaddr = v) },
  unix: { takesValue: true, set: (o, v) => (o.unix = v) },
  single: { takesValue: false, set: (o) => (o.single = true) },
  readonly: { takesValue: false, set: (o) => (o.readonly = true) },
  'read-only': { takesValue: false, set: (o) => (o.readonly = true) },
  exportname: { takesValue: true, set: (o, v) => (o.exportName = v) },
  'export-name': { takesValue: true, set: (o, v) => (o.exportName = v) },
  foreground: { takesValue: false, set: (o) => (o.foreground = true) },
  'no-fork': { takesValue: false, set: (o) => (o.foreground = true) },
  pidfile: { takesValue: true, set: (o, v) => (o.pidfile = v) },
  threads: {
    takesValue: true,
    set: (o, v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0) throw new UsageError(`--threads: '${v}' is not a number`);
      o.threads = n;
    },
  },
  workers: {
    takesValue: true,
    set: (o, v) => {
      if (v === 'auto') return void (o.workers = 'auto');
      const n = Number(v);
      if (!/^\d+$/.test(v) || !Number.isInteger(n) || n < 1 || n > MAX_WORKERS) {
        throw new UsageError(`--workers: '${v}' is not 'auto' or a number of threads from 1 to ${MAX_WORKERS}`);
      }
      o.workers = n;
    },
  },
  verbose: { takesValue: false, set: (o) => (o.verbose = true) },
  debug: { takesValue: true, set: (o, v) => o.debugFlags.push(v) },
  run: { takesValue: true, set: (o, v) => (o.run = v) },
  filter: { takesValue: true, set: (o, v) => o.filters.push(v) },
  tls: {
    takesValue: true,
    set: (o, v) => {
      const t = v === 'off' || v === 'on' || v === 'require' ? v : null;
      if (!t) throw new UsageError(`--tls: '${v}' is not one of off, on, require`);
      o.tls = t;
    },
  },
  'tls-certificates': { takesValue: true, set: (o, v) => (o.tlsCertificates = v) },
  'tls-psk': { takesValue: true, set: (o, v) => (o.tlsPsk = v) },
  'tls-verify-peer': { takesValue: false, set: (o) => (o.tlsVerifyPeer = true) },
  'exit-with-parent': { takesValue: false, set: (o) => (o.exitWithParent = true) },
  'mask-handshake': {
    takesValue: true,
    set: (o, v) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 0 || n > 0xffff) throw new UsageError(`--mask-handshake: '${v}' is not a number`);
      o.maskHandshake = n;
    },
  },
  'no-sr': { takesValue: false, set: (o) => (o.noSr = true) },
  'no-structured-replies': { takesValue: false, set: (o) => (o.noSr = true) },
  log: {
    takesValue: true,
    set: (o, v) => {
      if (v !== 'stderr' && v !== 'syslog' && v !== 'null') throw new UsageError(`--log: '${v}' is not one of stderr, syslog, null`);
      o.log = v;
    },
  },
  'print-uri': { takesValue: false, set: (o) => (o.printUri = true) },
  'dump-plugin': { takesValue: false, set: (o) => (o.dumpPlugin = true) },
  'dump-config': { takesValue: false, set: (o) => (o.dumpConfig = true) },
  'long-options': { takesValue: false, set: (o) => (o.listOptions = 'long') },
  list: { takesValue: false, set: (o) => (o.list = true) },
  'short-options': { takesValue: false, set: (o) => (o.listOptions = 'short') },
  help: { takesValue: false, set: (o) => (o.help = true) },
  version: { takesValue: false, set: (o) => (o.version = true) },
  'max-payload': { takesValue: true, set: (o, v) => (o.maxPayload = v) },
  'max-connection-memory': { takesValue: true, set: (o, v) => (o.maxConnectionMemory = v) },
  'max-server-memory': { takesValue: true, set: (o, v) => (o.maxServerMemory = v) },
  'max-options': numberOption('max-options', 'a number from 1 to 65536', 1, 65536, true, (o, n) => (o.maxOptions = n)),
  timeout: numberOption('timeout', 'a number of seconds from 0 to 86400', 0, 86400, false, (o, n) => (o.timeout = n)),
  poll: numberOption('poll', 'a number of microseconds from 0 to 1000000', 0, 1_000_000, true, (o, n) => (o.poll = n)),
  metrics: { takesValue: true, set: (o, v) => (o.metrics = parseMetricsAddress(v)) },
  'no-install': { takesValue: false, set: (o) => (o.noInstall = true) },
  newstyle: { takesValue: false, set: () => {} },
  oldstyle: {
    takesValue: false,
    set: () => {
      throw new UsageError('--oldstyle: the oldstyle protocol is not supported (it is obsolete); use newstyle');
    },
  },
};

const SHORT: Record<string, string> = {
  p: 'port',
  i: 'ipaddr',
  U: 'unix',
  s: 'single',
  r: 'readonly',
  e: 'exportname',
  f: 'foreground',
  P: 'pidfile',
  t: 'threads',
  v: 'verbose',
  D: 'debug',
  n: 'newstyle',
  o: 'oldstyle',
  h: 'help',
  V: 'version',
};

export function parseArgs(argv: readonly string[]): CliOptions {
  const o: CliOptions = {
    single: false,
    readonly: false,
    foreground: false,
    verbose: false,
    debugFlags: [],
    filters: [],
    tls: 'off',
    tlsVerifyPeer: false,
    exitWithParent: false,
    noSr: false,
    printUri: false,
    dumpPlugin: false,
    dumpConfig: false,
    help: false,
    version: false,
    noInstall: false,
    params: [],
  };
  let onlyParams = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (!onlyParams && a === '--') {
      onlyParams = true;
      continue;
    }
    if (!onlyParams && a.startsWith('--')) {
      const eq = a.indexOf('=');
      const name = eq < 0 ? a.slice(2) : a.slice(2, eq);
      const spec = LONG[name];
      if (!spec) throw new UsageError(`unknown option '--${name}' (see nbdx --help)`);
      if (spec.takesValue) {
        let v: string | undefined = eq < 0 ? argv[++i] : a.slice(eq + 1);
        if (v === undefined) throw new UsageError(`option '--${name}' needs a value`);
        spec.set(o, v);
      } else {
        if (eq >= 0) throw new UsageError(`option '--${name}' takes no value`);
        spec.set(o, '');
      }
      continue;
    }
    if (!onlyParams && a.startsWith('-') && a.length > 1) {
      // Short options, bundled like getopt: -fv, -p10809, -p 10809, -U -.
      for (let j = 1; j < a.length; j++) {
        const long = SHORT[a[j]!];
        if (!long) throw new UsageError(`unknown option '-${a[j]}' (see nbdx --help)`);
        const spec = LONG[long]!;
        if (spec.takesValue) {
          const rest = a.slice(j + 1);
          const v = rest !== '' ? rest : argv[++i];
          if (v === undefined) throw new UsageError(`option '-${a[j]}' needs a value`);
          spec.set(o, v);
          break;
        }
        spec.set(o, '');
      }
      continue;
    }
    if (o.plugin === undefined) {
      o.plugin = a;
      continue;
    }
    // Like nbdkit, only a word before '=' makes a key: `nbd+unix:///?socket=/s` is a bare value.
    const eq = a.indexOf('=');
    if (eq > 0 && CONFIG_KEY.test(a.slice(0, eq))) o.params.push([a.slice(0, eq), a.slice(eq + 1)]);
    else o.params.push([null, a]);
  }
  return o;
}

/** Where metrics are served when --metrics names only a port: this machine only. */
export const METRICS_DEFAULT_HOST = '127.0.0.1';

/**
 * --metrics=[HOST:]PORT: `9100`, `0.0.0.0:9100`, `localhost:9100`, `[::1]:9100`. Port 0 picks a
 * free port (-v logs it). An IPv6 address goes in brackets, as in URLs.
 */
export function parseMetricsAddress(value: string): { host: string; port: number } {
  const bad = (why: string): never => {
    throw new UsageError(`--metrics: '${value}' ${why} (expected [HOST:]PORT, e.g. 9100, 0.0.0.0:9100, [::1]:9100)`);
  };
  let host = METRICS_DEFAULT_HOST;
  let port = value;
  if (value.startsWith('[')) {
    const end = value.indexOf(']');
    if (end < 0 || value[end + 1] !== ':') bad('is not [IPV6]:PORT');
    host = value.slice(1, end);
    if (isIP(host) !== 6) bad(`has '${host}' in brackets, which is not an IPv6 address`);
    port = value.slice(end + 2);
  } else {
    const colon = value.lastIndexOf(':');
    if (colon >= 0) {
      host = value.slice(0, colon);
      port = value.slice(colon + 1);
      if (host.includes(':')) bad('has an IPv6 address without brackets');
      if (!HOST_NAME.test(host)) bad(host === '' ? 'has no host before the colon' : `has '${host}', which is not a host name or address`);
    }
  }
  if (!/^[0-9]{1,5}$/.test(port) || Number(port) > 65535) bad(port === '' ? 'has no port' : `has '${port}', which is not a port number (0 to 65535)`);
  return { host, port: Number(port) };
}

/** A host name or IPv4 address (letters, digits, dots and hyphens). */
const HOST_NAME = /^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$/;

/** What may stand before '=' in KEY=VALUE (nbdkit's rule); anything else is a bare value. */
const CONFIG_KEY = /^[A-Za-z][A-Za-z0-9_.-]*$/;

/** Give bare values to the plugin's magic key: only the first bare value may be bare. */
export function applyMagicKey(params: CliOptions['params'], magicKey: string | undefined, plugin: string): Array<[string, string]> {
  let used = false;
  return params.map(([k, v]) => {
    if (k !== null) return [k, v];
    if (!magicKey) throw new UsageError(`plugin '${plugin}' needs key=value parameters; '${v}' has no key`);
    if (used) throw new UsageError(`only the first parameter may leave out '${magicKey}='; '${v}' has no key`);
    used = true;
    return [magicKey, v];
  });
}

export const USAGE = `Usage: nbdx [OPTIONS] PLUGIN [KEY=VALUE | VALUE]... [OPTIONS]

Serve PLUGIN over the Network Block Device protocol. The first bare VALUE goes to the plugin's
magic key (nbdx memory 1G = nbdx memory size=1G). Options may also follow the plugin.

  -p, --port=PORT           TCP port (default 10809)
  -i, --ipaddr=ADDR         listen on this address only (default: every IPv4 and IPv6 address)
  -U, --unix=PATH           listen on a Unix socket; '-U -' makes a private one, removed at exit
  -s, --single              serve one connection on stdin/stdout, then exit
  -r, --readonly            refuse writes
  -e, --exportname=NAME     export name shown in URIs
  -f, --foreground          stay in the foreground (default: detach once listening)
  -P, --pidfile=FILE        write the server's PID here once listening
  -t, --threads=N           at most N requests of one connection worked on at once (-t 1: in order)
      --workers=N|auto      threads serving connections (default auto: one per core, up to 4,
                            when every layer supports it; see README "Worker threads")
  -v, --verbose             debug messages on stderr
  -D, --debug=NAME.FLAG=N   accepted for nbdkit compatibility; no debug flags are defined yet
      --run=CMD             serve while CMD runs ($uri $nbd $port $unixsocket $exportname set),
                            then exit with CMD's status
      --filter=NAME         add a filter (the first is outermost); repeatable
      --tls=off|on|require  TLS: off, optional, or required
      --tls-certificates=DIR  ca-cert.pem, server-cert.pem, server-key.pem in DIR
      --tls-psk=FILE        pre-shared keys, one 'identity:hexkey' per line
      --tls-verify-peer     require a client certificate signed by the CA
      --exit-with-parent    exit when the parent process exits
      --mask-handshake=MASK handshake flags to offer (bits: 1 fixed newstyle, 2 no zeroes)
      --no-sr               no structured replies (nor extended headers)
      --max-payload=SIZE    largest read/write request (default 32M)
      --poll=MICROSECONDS   poll an idle connection this long before sleeping (default 50, 0 = off)
      --metrics=[HOST:]PORT serve Prometheus/OpenMetrics at http://HOST:PORT/metrics; HOST
                            defaults to 127.0.0.1 (this machine only): 0.0.0.0:PORT or [::]:PORT
                            exposes them; port 0 picks a free one (-v shows it)
      --timeout=SECONDS     a client must finish the handshake (TLS included) in this time
                            (default 60, 0 = no limit)
      --max-options=N       options a client may send before choosing an export (default 32)
      --max-connection-memory=SIZE  memory one client can make the server hold (requests being
                            served, replies it has not read); beyond it the client is not read
                            until it catches up (default 24M)
      --max-server-memory=SIZE  the same over all clients together (default 128M)
      --log=stderr|syslog|null  where messages go (default: stderr, syslog once detached)
      --print-uri           print the URI clients can use
      --no-install          never install missing first-party plugins (also NBDX_NO_INSTALL=1)
      --dump-plugin         print information about PLUGIN and exit
      --dump-config         print information about nbdx and exit
      --list                list the plugins and filters installed, and nbdx's own ones
      --long-options, --short-options  list the options (for shell completion) and exit
      --help                this text; 'nbdx PLUGIN --help' shows PLUGIN's parameters
      --version             print the version of nbdx (and of PLUGIN and filters)

Plugins and filters are npm packages found by name: PLUGIN 'x' is @nbdx/plugin-x or nbdx-plugin-x,
--filter=y is @nbdx/filter-y or nbdx-filter-y; a path (./my-plugin.js) is loaded directly.
`;

/** Every long option, one per line, as `nbdx --long-options` prints them (nbdkit's format). */
export function longOptions(): string {
  return Object.keys(LONG)
    .filter((name) => name !== 'long-options' && name !== 'short-options' && name !== 'list')
    .sort()
    .map((name) => `--${name}\n`)
    .join('');
}

/** Every short option, one per line (`nbdx --short-options`). */
export function shortOptions(): string {
  return Object.keys(SHORT)
    .sort((a, b) => a.toLowerCase().localeCompare(b.toLowerCase()) || (a < b ? 1 : -1))
    .map((c) => `-${c}\n`)
    .join('');
}

/**
 * Options that cannot go together, checked before anything else runs (nothing is loaded and
 * nothing printed first), with nbdkit's rules: one of -s, -U, -p at most; --run not with -s;
 * --dump-plugin not with -s.
 */
export function checkCombination(o: CliOptions): void {
  const pairs: Array<[unknown, unknown]> = [
    [o.single, o.unix],
    [o.single, o.port],
    [o.unix, o.port],
    [o.single, o.run],
    [o.dumpPlugin, o.single],
  ];
  if (pairs.some(([a, b]) => a && b)) {
    throw new UsageError('--dump-plugin, -p, --run, -s and -U cannot be used in this combination');
  }
}
