import type { Duplex } from 'node:stream';
import type * as net from 'node:net';
import { setLogSink, type ThreadModel } from './api/common.js';
import type { Filter, Plugin } from './api/define.js';
import { Backend } from './backend/backend.js';
import { checkMaxPayload } from './backend/block-size.js';
import { Mutex } from './backend/mutex.js';
import { Connection } from './protocol/connection.js';
import { ServerBudget } from './protocol/memory-budget.js';
import { DEFAULT_SETTINGS, type ProtocolSettings, type TlsSettings } from './protocol/settings.js';
import { ServerStats } from './protocol/stats.js';
import { bind, type BoundListener, type ListenTarget } from './listeners/listen.js';
import { loadMetricsExporter, type MetricsEndpoint, type MetricsOptions } from './metrics.js';
import { SEND_BUFFER, loadSocketHelper, type SocketHelper } from './native.js';

export interface ServeOptions {
  plugin: Plugin;
  /** Outermost first, like repeated --filter. */
  filters?: readonly Filter[];
  /** key=value parameters, routed through the filters to the plugin (like the command line). */
  config?: Iterable<readonly [string, string]> | Record<string, string>;
  /** Where to listen; defaults to a private temporary Unix socket. Ignored with `streams`. */
  listen?: ListenTarget;
  readonly?: boolean;
  /** Name shown in URIs (-e). */
  exportName?: string;
  noStructuredReplies?: boolean;
  handshakeMask?: number;
  maxPayload?: number;
  /**
   * At most this many requests of one connection are worked on at once (nbdkit's -t): 1 serves
   * them one by one, in order. Unset or 0: no limit (the memory budget still bounds them).
   */
  threads?: number;
  /** Log a debug line for every request (the CLI's -v). */
  traceRequests?: boolean;
  /**
   * Bytes one connection may hold (requests being served, replies its client has not read yet)
   * before the server stops reading from it until the client catches up. Default 24 MiB.
   */
  maxConnectionMemory?: number;
  /** @deprecated the old name of maxConnectionMemory. */
  maxInFlightBytes?: number;
  /**
   * The same, over all connections together. Default 128 MiB. A connection holding nothing may
   * always take one request, so the bound is this plus one request per connection.
   */
  maxServerMemory?: number;
  /** Options a client may send before choosing an export (default 32, as nbdkit). */
  maxOptions?: number;
  /** Seconds a client has to finish the handshake, TLS included (default 60; 0 = no limit). */
  handshakeTimeout?: number;
  /**
   * Longest an idle connection keeps polling for its next request before the event loop sleeps,
   * in microseconds (default 50; 0 turns polling off). See "Polling" in the README.
   */
  pollMicroseconds?: number;
  tls?: TlsSettings;
  /**
   * Serve Prometheus / OpenMetrics text at http://HOST:PORT/metrics (the CLI's --metrics): requests,
   * bytes, errors and latencies per operation and export, connections. Off by default; when off,
   * nothing is counted and prom-client is not loaded. See "Metrics" in the README.
   */
  metrics?: MetricsOptions;
  /**
   * Send buffer asked for each Unix-socket connection, in bytes (default 4 MiB; the kernel doubles
   * it and caps it at net.core.wmem_max). The system default, about 208 KiB, holds less than one
   * 256 KiB READ reply, which turns bulk reads into a lock-step exchange. 0 keeps the default.
   * Needs the optional @nbdx/native helper; TCP sockets are left to the kernel's auto-tuning.
   */
  unixSendBuffer?: number;
  /** Called with debug lines (-v). */
  debug?: (message: string) => void;
  error?: (message: string) => void;
}

export interface ServerAddress {
  /** nbd:// or nbd+unix:// URI a client can use. */
  uri: string;
  port?: number;
  host?: string;
  path?: string;
}

const DEFAULT_UNIX_SEND_BUFFER = 4 * 1024 * 1024;

/**
 * A running NBD server: the embedding API. Create with `serve()`, stop with `close()`, which lets
 * in-flight requests finish, closes every connection and unloads the plugin and filters.
 */
export class NbdServer {
  readonly backend: Backend;
  readonly settings: ProtocolSettings;
  readonly threadModel: ThreadModel;
  private listeners: BoundListener[] = [];
  private connections = new Set<Connection>();
  private connectionLock: Mutex | null;
  private closing: Promise<void> | null = null;
  private metricsEndpoint: MetricsEndpoint | null = null;
  /** @nbdx/native, when installed (socket buffers; descriptor hand-over for worker threads). */
  socketHelper: SocketHelper | null = null;
  private readonly unixSendBuffer: number;
  private sendBufferLogged = false;
  /**
   * Offered every accepted socket before it is served here (the CLI's worker threads): true when
   * it was handed to another thread.
   */
  handOff: ((socket: net.Socket) => boolean) | null = null;
  exportName = '';

  private constructor(backend: Backend, options: ServeOptions) {
    this.backend = backend;
    this.threadModel = backend.threadModel();
    const serializeAll = this.threadModel === 'serialize_all_requests' || this.threadModel === 'serialize_connections';
    this.connectionLock = this.threadModel === 'serialize_connections' ? new Mutex() : null;
    this.settings = {
      ...DEFAULT_SETTINGS,
      backend,
      readonly: options.readonly ?? false,
      noStructuredReplies: options.noStructuredReplies ?? false,
      handshakeMask: options.handshakeMask ?? DEFAULT_SETTINGS.handshakeMask,
      maxPayload: options.maxPayload !== undefined ? checkMaxPayload(options.maxPayload) : DEFAULT_SETTINGS.maxPayload,
      maxConnectionMemory: options.maxConnectionMemory ?? options.maxInFlightBytes ?? DEFAULT_SETTINGS.maxConnectionMemory,
      serverBudget: new ServerBudget(options.maxServerMemory ?? DEFAULT_SETTINGS.maxServerMemory),
      maxOptions: options.maxOptions ?? DEFAULT_SETTINGS.maxOptions,
      handshakeTimeoutMs:
        options.handshakeTimeout !== undefined ? options.handshakeTimeout * 1000 : DEFAULT_SETTINGS.handshakeTimeoutMs,
      pollMaxNs: options.pollMicroseconds !== undefined ? options.pollMicroseconds * 1000 : DEFAULT_SETTINGS.pollMaxNs,
      tls: options.tls ?? { mode: 'off', socketOptions: {} },
      requestLock: serializeAll ? new Mutex() : null,
      perConnectionLock: this.threadModel !== 'parallel',
      requestsPerConnection: options.threads ?? 0,
      traceRequests: options.traceRequests ?? false,
      debug: options.debug ?? (() => {}),
      error: options.error ?? ((m) => process.stderr.write(`nbdx: ${m}\n`)),
      stats: options.metrics ? new ServerStats() : null,
    };
    this.exportName = options.exportName ?? '';
    this.unixSendBuffer = options.unixSendBuffer ?? DEFAULT_UNIX_SEND_BUFFER;
  }

  /** Load, configure and get the backend ready, without listening (the CLI's first half). */
  static async prepare(options: ServeOptions): Promise<NbdServer> {
    if (options.debug || options.error) {
      const dbg = options.debug;
      const err = options.error ?? ((m: string) => process.stderr.write(`nbdx: ${m}\n`));
      setLogSink((level, source, message) => {
        if (level === 'debug') dbg?.(`${source}: ${message}`);
        else err(`${source}: ${message}`);
      });
    }
    const backend = new Backend(options.plugin, options.filters ?? []);
    await backend.load();
    try {
      const config = options.config ?? [];
      const pairs = Symbol.iterator in Object(config) ? (config as Iterable<[string, string]>) : Object.entries(config);
      for (const [k, v] of pairs) await backend.config(k, v);
      await backend.configComplete();
      await backend.getReady();
    } catch (err) {
      await backend.unload();
      throw err;
    }
    const server = new NbdServer(backend, options);
    const helper = await loadSocketHelper();
    server.socketHelper = helper.ops;
    server.settings.debug(helper.ops ? `native helper: ${helper.path}` : `native helper not used: ${helper.reason}`);
    if (options.metrics) {
      try {
        const { startMetrics } = await loadMetricsExporter();
        server.metricsEndpoint = await startMetrics(server.settings.stats!, options.metrics, server.settings.debug);
      } catch (err) {
        await backend.unload();
        throw err;
      }
    }
    return server;
  }

  /** Where the metrics endpoint listens (its port, when 0 was asked for); null without metrics. */
  get metricsAddress(): { host: string; port: number; url: string } | null {
    const m = this.metricsEndpoint;
    return m ? { host: m.host, port: m.port, url: m.url } : null;
  }

  /** Start listening on a target; may be called more than once. */
  async listen(target: ListenTarget): Promise<ServerAddress[]> {
    const bound = await bind(target, (s) => this.accept(s));
    this.listeners.push(...bound);
    return bound.map((b) => this.addressOf(b));
  }

  private addressOf(b: BoundListener): ServerAddress {
    const name = encodeURIComponent(this.exportName).replace(/%2F/g, '/');
    if (b.path) return { uri: `nbd+unix:///${name}?socket=${encodeURI(b.path)}`, path: b.path };
    const host = b.host && b.host !== '::' && b.host !== '0.0.0.0' ? b.host : 'localhost';
    const h = host.includes(':') ? `[${host}]` : host;
    return { uri: `nbd://${h}:${b.port}/${name}`, port: b.port, host };
  }

  get addresses(): ServerAddress[] {
    return this.listeners.map((b) => this.addressOf(b));
  }

  /** Serve one connection on a pair of streams (-s uses stdin and stdout). */
  serveStreams(input: Duplex, output: Duplex = input): Promise<void> {
    return this.track(() => new Connection(this.settings, input, output));
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    socket.setNoDelay(true);
    this.raiseSendBuffer(socket);
    if (this.handOff?.(socket)) return;
    void this.track(() => new Connection(this.settings, socket));
  }

  /** Serve a connection accepted elsewhere (handed over by another thread). */
  adopt(socket: net.Socket): Promise<void> {
    if (this.closing) {
      socket.destroy();
      return Promise.resolve();
    }
    return this.track(() => new Connection(this.settings, socket));
  }

  /** A Unix socket's send buffer, raised so that READ replies do not go out in lock-step. */
  private raiseSendBuffer(socket: net.Socket): void {
    const helper = this.socketHelper;
    if (!helper || this.unixSendBuffer <= 0 || socket.remotePort !== undefined) return;
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (typeof fd !== 'number' || fd < 0) return;
    try {
      const granted = helper.setBuffer(fd, SEND_BUFFER, this.unixSendBuffer);
      if (!this.sendBufferLogged) {
        this.sendBufferLogged = true;
        this.settings.debug(`Unix socket send buffer: ${granted} bytes (asked for ${this.unixSendBuffer})`);
      }
    } catch (err) {
      this.settings.debug(`cannot raise the send buffer: ${(err as Error).message}`);
    }
  }

  private async track(make: () => Connection): Promise<void> {
    const go = async () => {
      const c = make();
      this.connections.add(c);
      try {
        await c.closed;
      } finally {
        this.connections.delete(c);
      }
    };
    return this.connectionLock ? this.connectionLock.run(go) : go();
  }

  async afterStart(): Promise<void> {
    await this.backend.afterStart();
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  /** Stop listening, let in-flight requests finish, close connections, unload. Idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      // Stop accepting now; net.Server's close callback would wait for every connection to end,
      // and idle clients only go once we shut their connections down below.
      for (const l of this.listeners) l.server.close();
      for (const l of this.listeners) l.cleanup();
      for (const c of this.connections) c.shutdown();
      await Promise.all([...this.connections].map((c) => c.closed));
      await this.backend.unload();
      await this.metricsEndpoint?.close();
    })();
    return this.closing;
  }
}

/** Embedding API: load, configure and serve a plugin (and filters) from inside a Node program. */
export async function serve(options: ServeOptions): Promise<NbdServer & { uri: string }> {
  const server = await NbdServer.prepare(options);
  try {
    await server.listen(options.listen ?? { kind: 'unix-temp' });
    await server.afterStart();
  } catch (err) {
    await server.close();
    throw err;
  }
  return Object.assign(server, { uri: server.addresses[0]!.uri });
}
