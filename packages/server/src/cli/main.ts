import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as os from 'node:os';
import { NbdError, layerOf, packageVersion, parseSize } from '../api/common.js';
import { checkMaxPayload } from '../backend/block-size.js';
import type { Filter, Plugin } from '../api/define.js';
import { FILTER_API_VERSIONS, PLUGIN_API_VERSIONS } from '../api/define.js';
import { socketActivationFds, type ListenTarget } from '../listeners/listen.js';
import { formatList } from '../loader/names.js';
import { LoadError, load, searchBases } from '../loader/resolve.js';
import { loadSocketHelper } from '../native.js';
import { DEFAULT_SETTINGS } from '../protocol/settings.js';
import { NbdServer, type ServeOptions, type ServerAddress } from '../server.js';
import { WorkerPool, chooseWorkers, type WorkerHost } from './workers.js';
import { openSyslog } from './syslog.js';
import { USAGE, UsageError, applyMagicKey, checkCombination, longOptions, parseArgs, shortOptions, type CliOptions } from './args.js';
import { dumpPlugin } from './dump.js';
import { tlsSettings } from './tls-setup.js';

export const VERSION: string = packageVersion(import.meta.url);

/** Set in the background child so it reports readiness to the parent that spawned it. */
const DAEMON_ENV = 'NBDX_DAEMON_CHILD';

function fail(message: string): never {
  throw new UsageError(message);
}

/** Entry point of the `nbdx` command. Resolves with the exit status. */
export async function main(argv: readonly string[]): Promise<number> {
  // ps and top show "nbdx", not "node" (what operators look for, as with nbdkit).
  process.title = 'nbdx';
  // Node opens its inspector (a debugger port, which is code execution for whoever reaches it)
  // when the process gets SIGUSR1 and nothing listens for that signal. A network server must
  // not: SIGUSR1 is ignored instead.
  process.on('SIGUSR1', () => {});
  let o: CliOptions;
  try {
    o = parseArgs(argv);
    return await run(o);
  } catch (err) {
    // Always one line, naming the layer when one failed; the stack only for -v (for bug reports).
    const e = err as Error;
    const known = err instanceof UsageError || err instanceof LoadError || err instanceof NbdError;
    const layer = layerOf(err);
    let msg = `${layer ? `${layer}: ` : ''}${e?.message ?? String(err)}`;
    if (!known && argv.some((a) => a === '-v' || a === '--verbose') && e?.stack) msg += `\n${e.stack}`;
    reportStartupError(msg);
    return 1;
  }
}

function reportStartupError(msg: string): void {
  if (process.env[DAEMON_ENV] && process.send) process.send({ type: 'error', message: msg });
  else process.stderr.write(`nbdx: ${msg}\n`);
}

async function run(o: CliOptions): Promise<number> {
  if (o.listOptions) {
    process.stdout.write(o.listOptions === 'long' ? longOptions() : shortOptions());
    return 0;
  }
  if (o.list) {
    process.stdout.write(formatList(searchBases()));
    return 0;
  }
  if (!o.help && !o.version) checkCombination(o);
  if (o.dumpConfig) {
    process.stdout.write(dumpConfig());
    return 0;
  }
  if (!o.plugin) {
    if (o.help) {
      process.stdout.write(USAGE);
      return 0;
    }
    if (o.version) {
      process.stdout.write(`nbdx ${VERSION}\n`);
      return 0;
    }
    fail('no plugin given. Usage: nbdx [OPTIONS] PLUGIN [KEY=VALUE]... (see nbdx --help)');
  }

  const { ensureInstalled } = await import('./install.js');
  await ensureInstalled(o, argv());

  const { plugin, filters, loaded } = await loadLayers(o);

  if (o.help) {
    process.stdout.write(pluginHelp(plugin, filters));
    return 0;
  }
  if (o.version) {
    // As nbdkit: the server, then the layers from the client's side down (filters, plugin).
    process.stdout.write(`nbdx ${VERSION}\n`);
    for (const f of filters) process.stdout.write(`${f.name} ${f.version ?? ''}`.trimEnd() + '\n');
    process.stdout.write(`${plugin.name} ${plugin.version ?? ''}`.trimEnd() + '\n');
    return 0;
  }
  if (o.dumpPlugin) {
    process.stdout.write(await dumpPlugin(plugin, filters));
    return 0;
  }

  const config = applyMagicKey(o.params, plugin.magicConfigKey, plugin.name);

  // Socket activation implies the foreground too: the service manager owns the process.
  const background =
    !o.foreground && !o.single && !o.run && !o.exitWithParent && !process.env[DAEMON_ENV] && !socketActivationFds();
  if (background) return detach();

  // As nbdkit: a server that detached logs to syslog unless told otherwise.
  const logTo = o.log ?? (process.env[DAEMON_ENV] ? 'syslog' : 'stderr');
  const log = openLog(logTo);
  const verbose = o.verbose && logTo !== 'null';
  const server = await NbdServer.prepare(serveOptions(o, plugin, filters, config, log, verbose));

  for (const m of loaded) server.settings.debug(`loaded ${m.kind} ${m.name} ${m.version ?? ''} from ${m.file}`);

  let shuttingDown = false;
  let pool: WorkerPool | null = null;
  const cleanups: Array<() => void> = [];
  const shutdown = async (status: number): Promise<number> => {
    if (!shuttingDown) {
      shuttingDown = true;
      await Promise.all([server.close(), pool?.close()]);
      for (const c of cleanups) c();
    }
    return status;
  };

  if (o.single) {
    await server.afterStart();
    await server.serveStreams(process.stdin, process.stdout);
    return shutdown(0);
  }

  let addresses: ServerAddress[];
  try {
    addresses = await server.listen(listenTarget(o));
  } catch (err) {
    await server.close();
    fail(`cannot listen: ${listenError(o, err as NodeJS.ErrnoException)}`);
  }
  try {
    await server.afterStart();
    pool = await startWorkers(o, server, plugin, filters, log);
  } catch (err) {
    await server.close(); // removes the socket, so the next start on the same path works
    throw err;
  }

  if (o.pidfile) {
    try {
      fs.writeFileSync(o.pidfile, `${process.pid}\n`);
    } catch (err) {
      await server.close();
      fail(`-P ${o.pidfile}: cannot write the pidfile: ${(err as Error).message.replace(/^[A-Z]+: /, '')}`);
    }
    const pidfile = o.pidfile;
    cleanups.push(() => fs.rmSync(pidfile, { force: true }));
  }
  let finish: (status: number) => void = () => {};
  const done = new Promise<number>((resolve) => {
    const onSignal = (sig: NodeJS.Signals) => {
      if (shuttingDown) process.exit(1); // a second signal: stop waiting
      server.settings.debug(`${sig}: shutting down`);
      void shutdown(0).then(resolve);
    };
    // As nbdkit: these four end the server cleanly (exit 0, socket and pidfile removed).
    for (const sig of ['SIGINT', 'SIGTERM', 'SIGQUIT', 'SIGHUP'] as const) process.on(sig, onSignal);
    if (o.exitWithParent) watchParent(() => void shutdown(0).then(resolve));
    finish = (status) => void shutdown(status).then(resolve);
  });
  // Only now say we are up: a signal sent as soon as the URI appears finds its handler.
  const uri = nbdkitUri(addresses[0]!, o.exportName ?? '', o.tls);
  for (const a of addresses) server.settings.debug(`listening on ${a.path ?? `${a.host ?? '*'}:${a.port}`} (${a.uri})`);
  if (o.printUri) process.stdout.write(`${uri}\n`);
  if (process.env[DAEMON_ENV] && process.send) {
    process.send({ type: 'ready', uri });
    process.disconnect?.();
  }
  if (o.run) {
    const child = runCaptive(o.run, addresses[0]!, o);
    child.on('exit', (code, signal) => finish(code ?? (signal ? 128 + (os.constants.signals[signal] ?? 0) : 1)));
  }
  return done;
}

/** The plugin and filters the command line names, found and imported. */
async function loadLayers(o: CliOptions) {
  const bases = searchBases();
  const pluginMod = await load(o.plugin!, 'plugin', bases);
  const plugin = pluginMod.value as Plugin;
  const filters: Filter[] = [];
  const loaded = [{ kind: 'plugin', name: plugin.name, version: plugin.version, file: pluginMod.file }];
  for (const name of o.filters) {
    const m = await load(name, 'filter', bases);
    filters.push(m.value as Filter);
    loaded.push({ kind: 'filter', name: m.value.name, version: m.value.version, file: m.file });
  }
  return { plugin, filters, loaded };
}

type Log = (severity: 3 | 4 | 6 | 7, message: string) => void;

/** The server's options from the command line (the main thread's and every worker's). */
function serveOptions(
  o: CliOptions,
  plugin: Plugin,
  filters: Filter[],
  config: Array<[string, string]>,
  log: Log,
  verbose: boolean,
  maxServerMemory = memoryLimit(o.maxServerMemory, '--max-server-memory'),
): ServeOptions {
  return {
    plugin,
    filters,
    config,
    readonly: o.readonly,
    exportName: o.exportName ?? '',
    noStructuredReplies: o.noSr,
    handshakeMask: o.maskHandshake,
    maxPayload: o.maxPayload ? checkMaxPayload(parseSize(o.maxPayload, '--max-payload'), '--max-payload') : undefined,
    maxConnectionMemory: memoryLimit(o.maxConnectionMemory, '--max-connection-memory'),
    maxServerMemory,
    maxOptions: o.maxOptions,
    handshakeTimeout: o.timeout,
    pollMicroseconds: o.poll,
    metrics: o.metrics,
    threads: o.threads,
    traceRequests: verbose,
    tls: tlsSettings(o),
    debug: verbose ? (m) => log(7, `debug: ${m}`) : () => {},
    // nbdkit's shape: "nbdx: LAYER: error: ..." (messages that name no layer get "error:" here);
    // warnings (logWarning) keep their own word.
    error: (m) => (/(^|: )warning: /.test(m) ? log(4, m) : log(3, /(^|: )error: /.test(m) ? m : `error: ${m}`)),
  };
}

/**
 * --workers: start the worker threads when every layer allows it (cli/workers.ts), and say how
 * many threads serve, or why one does; a warning when more were asked for than can be had.
 */
async function startWorkers(o: CliOptions, server: NbdServer, plugin: Plugin, filters: Filter[], log: Log): Promise<WorkerPool | null> {
  // Loaded once per thread (NbdServer.prepare already did): this is the cached answer.
  const helper = await loadSocketHelper();
  const choice = chooseWorkers({
    requested: o.workers,
    single: o.single,
    layers: [
      ...filters.map((f) => ({ kind: 'filter' as const, name: f.name, workerThreads: declared(f) })),
      { kind: 'plugin', name: plugin.name, workerThreads: declared(plugin) },
    ],
    threadModel: server.threadModel,
    helper,
    metrics: o.metrics !== undefined,
  });
  if (choice.count <= 1) {
    if (typeof o.workers === 'number' && o.workers > 1) log(4, `warning: --workers=${o.workers}: serving on one thread: ${choice.reason}`);
    server.settings.debug(`serving connections on one thread: ${choice.reason}`);
    return null;
  }
  const entry = new URL('./worker-thread.js', import.meta.resolve('@nbdx/server/cli'));
  const pool = await WorkerPool.start({
    count: choice.count,
    entry,
    argv: argv(),
    maxServerMemory: memoryLimit(o.maxServerMemory, '--max-server-memory') ?? DEFAULT_SETTINGS.maxServerMemory,
    server,
    helper: helper.ops!, // chooseWorkers said more than one thread: the helper is there
    log,
  });
  server.handOff = (socket) => pool.offer(socket);
  server.settings.debug(`serving connections on ${choice.count} threads (this one and ${choice.count - 1} worker${choice.count > 2 ? "s" : ""})`);
  return pool;
}

/** A layer's workerThreads, called as a method when it is one. */
function declared(layer: Plugin | Filter): boolean {
  const w = layer.workerThreads;
  return typeof w === 'function' ? w.call(layer) : w === true;
}

/** How a worker thread makes its server: the same command line, its share of the memory limit. */
export const workerHost: WorkerHost = {
  async prepare(args, maxServerMemory, log) {
    const o = parseArgs(args);
    const { plugin, filters } = await loadLayers(o);
    const config = applyMagicKey(o.params, plugin.magicConfigKey, plugin.name);
    return NbdServer.prepare(serveOptions(o, plugin, filters, config, log, o.verbose && o.log !== 'null', maxServerMemory));
  },
  describe: (err) => {
    const layer = layerOf(err);
    return `${layer ? `${layer}: ` : ''}${(err as Error)?.message ?? String(err)}`;
  },
};

/** Why listening failed, in the user's terms (Node says EACCES for a socket in a missing directory). */
function listenError(o: CliOptions, err: NodeJS.ErrnoException): string {
  if (o.unix && o.unix !== '-') {
    const dir = path.dirname(path.resolve(o.unix));
    if (!fs.existsSync(dir)) return `-U ${o.unix}: the directory ${dir} does not exist`;
    if (err.code === 'EADDRINUSE') return `-U ${o.unix}: the socket is in use by another server (or left behind: remove it)`;
    if (err.code === 'EACCES') return `-U ${o.unix}: no permission to create a socket in ${dir}`;
    return `-U ${o.unix}: ${err.message}`;
  }
  if (err.code === 'EADDRINUSE') return `port ${o.port ?? 10809} is in use by another server`;
  if (err.code === 'EACCES') return `port ${o.port ?? 10809}: permission denied (ports below 1024 need privileges)`;
  if (err.code === 'EADDRNOTAVAIL') return `-i ${o.ipaddr}: no such address on this machine`;
  return err.message;
}

/** Where messages go (--log): a function taking a syslog severity and a message. */
function openLog(to: 'stderr' | 'syslog' | 'null'): (severity: 3 | 4 | 6 | 7, message: string) => void {
  if (to === 'null') return () => {};
  if (to === 'syslog') {
    const sink = openSyslog();
    if (typeof sink !== 'string') {
      process.on('exit', () => sink.close());
      return (severity, message) => sink.write(severity, message);
    }
    process.stderr.write(`nbdx: warning: --log=syslog: ${sink}; logging to stderr\n`);
  }
  return (_severity, message) => process.stderr.write(`nbdx: ${message}\n`);
}

/** A memory limit: a size of at least 1 MiB (less would stall every client on one big request). */
function memoryLimit(value: string | undefined, option: string): number | undefined {
  if (value === undefined) return undefined;
  const n = parseSize(value, option);
  if (n < 1024 * 1024) fail(`${option}: '${value}' is below the smallest useful limit of 1M`);
  return n;
}

function argv(): string[] {
  return process.argv.slice(2);
}

function listenTarget(o: CliOptions): ListenTarget {
  const fds = socketActivationFds();
  if (fds) return { kind: 'fds', fds };
  if (o.unix === '-') return { kind: 'unix-temp' };
  if (o.unix) return { kind: 'unix', path: o.unix };
  const port = o.port === undefined ? 10809 : Number(o.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail(`-p: '${o.port}' is not a port number`);
  return { kind: 'tcp', port, host: o.ipaddr };
}

/**
 * The address as nbdkit writes it for --run and --print-uri: `nbd+unix://?socket=PATH` for the
 * default export (no slash), `nbd+unix:///NAME?socket=PATH` otherwise, `nbd://localhost:PORT[/NAME]`
 * for TCP, and `nbds…` when TLS is required.
 */
export function nbdkitUri(addr: ServerAddress, exportName: string, tls: CliOptions['tls']): string {
  const s = tls === 'require' ? 's' : '';
  const name = exportName === '' ? '' : `/${quoteUri(exportName)}`;
  if (addr.path) return `nbd${s}+unix://${name}?socket=${quoteUri(addr.path)}`;
  return `nbd${s}://${uriHost(addr.host)}:${addr.port}${name}`;
}

/**
 * nbdkit always writes localhost; so do we, unless -i bound a single address that localhost
 * does not reach (a URI that cannot connect would help nobody).
 */
function uriHost(host: string | undefined): string {
  if (!host || host === '0.0.0.0' || host === '::' || host === 'localhost' || host.startsWith('127.') || host === '::1') {
    return 'localhost';
  }
  return host.includes(':') ? `[${host}]` : host;
}

/** Percent-encode what may not appear in a URI path or query value ('/' stays). */
function quoteUri(text: string): string {
  return encodeURIComponent(text).replace(/%2F/g, '/');
}

/** --run: the command sees the server's address in its environment, like nbdkit's captive mode. */
function runCaptive(cmd: string, addr: ServerAddress, o: CliOptions): ChildProcess {
  const exportName = o.exportName ?? '';
  const uri = nbdkitUri(addr, exportName, o.tls);
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    uri,
    nbd: uri,
    exportname: exportName,
    tls: o.tls === 'require' ? '2' : o.tls === 'on' ? '1' : '',
    unixsocket: addr.path ?? '',
    port: addr.path ? '' : String(addr.port),
  };
  delete env[DAEMON_ENV];
  return spawn('/bin/sh', ['-c', cmd], { stdio: 'inherit', env });
}

/** Node cannot ask the kernel for a parent-death signal, so notice the re-parenting instead. */
function watchParent(onExit: () => void): void {
  const parent = process.ppid;
  const timer = setInterval(() => {
    if (process.ppid !== parent) {
      clearInterval(timer);
      onExit();
    }
  }, 500);
  timer.unref();
}

/**
 * nbdkit's default: detach once listening. Node cannot fork, so we start ourselves again as a
 * detached child, wait until it says it is listening (or why it failed), and exit.
 */
function detach(): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...process.execArgv, process.argv[1]!, ...argv()], {
      detached: true,
      // Like a daemon, the child lets go of the terminal: errors before it is ready come back
      // over the IPC channel and are printed here.
      stdio: ['ignore', 'ignore', 'ignore', 'ipc'],
      env: { ...process.env, [DAEMON_ENV]: '1' },
    });
    let settled = false;
    child.on('message', (m: { type: string; message?: string; uri?: string }) => {
      if (settled) return;
      settled = true;
      if (m.type === 'ready') {
        if (argv().includes('--print-uri')) process.stdout.write(`${m.uri}\n`);
        child.unref();
        child.disconnect();
        resolve(0);
      } else {
        process.stderr.write(`nbdx: ${m.message}\n`);
        resolve(1);
      }
    });
    child.on('exit', (code) => {
      if (!settled) {
        settled = true;
        resolve(code || 1);
      }
    });
  });
}

function pluginHelp(plugin: Plugin, filters: Filter[]): string {
  let out = `${plugin.name}${plugin.version ? ` ${plugin.version}` : ''}: ${plugin.description ?? plugin.longname ?? ''}\n`;
  if (plugin.magicConfigKey) out += `(the first bare value is ${plugin.magicConfigKey}=)\n`;
  out += `${plugin.configHelp ?? '(no parameters)'}\n`;
  for (const f of filters) {
    out += `\nfilter ${f.name}${f.version ? ` ${f.version}` : ''}: ${f.description ?? f.longname ?? ''}\n`;
    out += `${f.configHelp ?? '(no parameters)'}\n`;
  }
  return out;
}

/** --dump-config: key=value lines in nbdkit's format and order (sorted by key). */
function dumpConfig(): string {
  const [major, minor] = VERSION.split('.');
  const binary = process.argv[1] ?? '';
  const entries: Record<string, string> = {
    binary,
    bindir: binary ? path.dirname(binary) : '',
    exit_with_parent: 'yes',
    filter_api_versions: FILTER_API_VERSIONS.join(','),
    host_cpu: process.arch,
    host_os: process.platform,
    name: 'nbdx',
    node_version: process.versions.node,
    plugin_api_versions: PLUGIN_API_VERSIONS.join(','),
    search_paths: searchBases().join(':'),
    tls: 'yes',
    version: VERSION,
    version_major: major ?? '',
    version_minor: minor ?? '',
  };
  return Object.keys(entries)
    .sort()
    .map((k) => `${k}=${entries[k]}\n`)
    .join('');
}
