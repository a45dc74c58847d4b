/**
 * @nbdx/metrics: the metrics endpoint of nbdx (`--metrics=[HOST:]PORT`, serve()'s `metrics`
 * option): an HTTP server whose `GET /metrics` answers with the protocol's counters in the
 * Prometheus text format, or in OpenMetrics when the scraper asks for it. prom-client builds the
 * text and adds the usual process metrics. The server loads this package only when metrics are
 * asked for, so prom-client is installed and loaded only then.
 */
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import type * as Prom from 'prom-client';
import {
  BUCKET_COUNT,
  COUNTED_OPS,
  ERRNO_COUNT,
  ERRNO_NAMES,
  LATENCY_BOUNDS,
  OP_COUNT,
  OP_NAMES,
  type ExportStats,
  type ServerStats,
  type MetricsEndpoint,
  type MetricsOptions,
} from '@nbdx/server';

export const DEFAULT_METRICS_HOST = '127.0.0.1';

/** Scrapes served at once; more wait for a free connection slot (the kernel's backlog). */
const MAX_SCRAPERS = 16;
/** A scraper must send its request within this time. */
const REQUEST_TIMEOUT_MS = 10_000;

/** Start the endpoint; rejects with a one-line reason when it cannot listen. */
export async function startMetrics(
  stats: ServerStats,
  options: MetricsOptions,
  debug: (message: string) => void,
): Promise<MetricsEndpoint> {
  const prom = await loadPromClient();
  const processMetrics = options.processMetrics ?? true;
  // One registry per format: prom-client renames a registry's counters while writing
  // OpenMetrics, so the same metric objects cannot serve both.
  const text = buildRegistry(prom, stats, prom.Registry.PROMETHEUS_CONTENT_TYPE, processMetrics);
  const openMetrics = buildRegistry(prom, stats, prom.Registry.OPENMETRICS_CONTENT_TYPE, processMetrics);

  const server = http.createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (path !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain; charset=utf-8' }).end('not found: the metrics are at /metrics\n');
      return;
    }
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405, { allow: 'GET, HEAD', 'content-type': 'text/plain; charset=utf-8' }).end('only GET and HEAD\n');
      return;
    }
    const registry = wantsOpenMetrics(req.headers.accept) ? openMetrics : text;
    registry.metrics().then(
      (body) => {
        res.writeHead(200, { 'content-type': registry.contentType, 'content-length': Buffer.byteLength(body) });
        res.end(req.method === 'HEAD' ? undefined : body);
      },
      (err: unknown) => {
        debug(`metrics: scrape failed: ${(err as Error).message}`);
        res.writeHead(500, { 'content-type': 'text/plain; charset=utf-8' }).end('the metrics could not be collected\n');
      },
    );
  });
  server.maxConnections = MAX_SCRAPERS;
  server.requestTimeout = REQUEST_TIMEOUT_MS;
  server.headersTimeout = REQUEST_TIMEOUT_MS;

  const host = options.host ?? DEFAULT_METRICS_HOST;
  await new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => reject(new Error(`metrics: cannot listen on ${hostPort(host, options.port)}: ${listenReason(err)}`)));
    server.listen({ host, port: options.port }, resolve);
  });
  server.on('error', (err) => debug(`metrics: ${err.message}`));
  const port = (server.address() as AddressInfo).port;
  const url = `http://${hostPort(host, port)}/metrics`;
  debug(`metrics: serving ${url}`);
  return {
    host,
    port,
    url,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}

async function loadPromClient(): Promise<typeof Prom> {
  const m = (await import('prom-client')) as typeof Prom & { default?: typeof Prom };
  // A CommonJS module: Node gives its exports as the default export (named ones too, when it
  // can see them).
  return m.Registry ? m : m.default!;
}

function hostPort(host: string, port: number): string {
  return `${host.includes(':') ? `[${host}]` : host}:${port}`;
}

function listenReason(err: NodeJS.ErrnoException): string {
  if (err.code === 'EADDRINUSE') return 'the port is in use';
  if (err.code === 'EACCES') return 'permission denied (ports below 1024 need privileges)';
  if (err.code === 'EADDRNOTAVAIL') return 'no such address on this machine';
  if (err.code === 'ENOTFOUND' || err.code === 'EAI_AGAIN') return 'unknown host name';
  return err.message;
}

/**
 * Whether the Accept header prefers OpenMetrics to the plain text format (Prometheus asks for
 * both, OpenMetrics first; curl sends `*\/*` and gets plain text).
 */
export function wantsOpenMetrics(accept: string | undefined): boolean {
  if (!accept) return false;
  let openMetrics = 0;
  let plain = 0;
  for (const part of accept.split(',')) {
    const [type = '', ...params] = part.split(';').map((s) => s.trim().toLowerCase());
    const qParam = params.find((p) => p.startsWith('q='));
    const q = qParam ? Number(qParam.slice(2)) : 1;
    if (!Number.isFinite(q)) continue;
    if (type === 'application/openmetrics-text') openMetrics = Math.max(openMetrics, q);
    else if (type === 'text/plain' || type === 'text/*' || type === '*/*') plain = Math.max(plain, q);
  }
  return openMetrics > 0 && openMetrics >= plain;
}

type Labels<T extends string> = Partial<Record<T, string>>;

/** Every metric of the README's "Metrics" table, reading `stats` when scraped. */
function buildRegistry(
  prom: typeof Prom,
  stats: ServerStats,
  contentType: Prom.RegistryContentType,
  processMetrics: boolean,
): Prom.Registry<Prom.RegistryContentType> {
  const registry = new prom.Registry<Prom.RegistryContentType>();
  registry.setContentType(contentType);
  const registers = [registry];

  // Counters are set to the protocol's totals at each scrape (reset, then one inc per series).
  const counter = <T extends string>(
    name: string,
    help: string,
    labelNames: readonly T[],
    fill: (add: (labels: Labels<T>, value: number) => void) => void,
  ) =>
    new prom.Counter<T>({
      name,
      help,
      labelNames,
      registers,
      collect() {
        this.reset();
        fill((labels, value) => this.inc(labels, value));
      },
    });
  const gauge = <T extends string>(
    name: string,
    help: string,
    labelNames: readonly T[],
    fill: (set: (labels: Labels<T>, value: number) => void) => void,
  ) =>
    new prom.Gauge<T>({
      name,
      help,
      labelNames,
      registers,
      collect() {
        this.reset();
        fill((labels, value) => this.set(labels, value));
      },
    });
  /** Per export and op: the usual ops always, `other` once it happened. */
  const perOp = (pick: (e: ExportStats) => Float64Array) => (add: (labels: Labels<'op' | 'export'>, v: number) => void) => {
    for (const e of stats.exports()) {
      const values = pick(e);
      for (const op of COUNTED_OPS) add({ op: OP_NAMES[op], export: e.name }, values[op]!);
      if (values[OP_COUNT - 1]! > 0) add({ op: OP_NAMES[OP_COUNT - 1], export: e.name }, values[OP_COUNT - 1]!);
    }
  };

  counter('nbdx_requests_total', 'Requests received, including those rejected before reaching the plugin.', ['op', 'export'], perOp((e) => e.requests));
  counter(
    'nbdx_bytes_total',
    'Bytes of the requests that succeeded: data read or written; for zero, trim, cache and block_status the range covered.',
    ['op', 'export'],
    perOp((e) => e.bytes),
  );
  counter('nbdx_errors_total', 'Requests that failed, by the errno sent to the client.', ['op', 'errno', 'export'], (add) => {
    for (const e of stats.exports()) {
      for (let op = 0; op < OP_COUNT; op++) {
        for (let k = 0; k < ERRNO_COUNT; k++) {
          const n = e.errors[op * ERRNO_COUNT + k]!;
          if (n > 0) add({ op: OP_NAMES[op], errno: ERRNO_NAMES[k], export: e.name }, n);
        }
      }
    }
  });
  gauge('nbdx_requests_in_flight', 'Requests being worked on (started, not yet answered).', ['export'], (set) => {
    for (const e of stats.exports()) set({ export: e.name }, e.inFlight);
  });
  counter('nbdx_connections_accepted_total', 'Client connections accepted.', [], (add) => add({}, stats.connectionsAccepted));
  gauge('nbdx_connections_open', 'Client connections open, in the handshake or in transmission.', [], (set) => set({}, stats.connectionsOpen));
  counter('nbdx_handshake_failures_total', 'Connections that ended before choosing an export, other than by the client aborting.', [], (add) =>
    add({}, stats.handshakeFailures),
  );
  counter('nbdx_export_connections_total', 'Connections that entered transmission, by export.', ['export'], (add) => {
    for (const e of stats.exports()) add({ export: e.name }, e.connections);
  });
  gauge('nbdx_export_connections_open', 'Connections in transmission, by export.', ['export'], (set) => {
    for (const e of stats.exports()) set({ export: e.name }, e.connectionsOpen);
  });
  registerLatencyHistogram(registry, stats);
  if (processMetrics) prom.collectDefaultMetrics({ register: registry });
  return registry;
}

/**
 * `nbdx_request_duration_seconds`. prom-client's own Histogram looks up each observation's labels
 * through a string key and an object made per call: too much for the request path. The protocol
 * counts into typed arrays instead (ExportStats.observe), and this metric hands the registry
 * their totals in the shape prom-client's histograms give (`get()`), so prom-client still writes
 * both text formats.
 */
function registerLatencyHistogram(registry: Prom.Registry<Prom.RegistryContentType>, stats: ServerStats): void {
  const name = 'nbdx_request_duration_seconds';
  const metric = {
    name,
    help: 'Time from a request being started (its data received) to its reply being queued.',
    type: 'histogram',
    aggregator: 'sum',
    reset() {},
    async get() {
      const values: Array<{ labels: Record<string, string | number>; value: number; metricName: string }> = [];
      for (const e of stats.exports()) {
        for (let op = 0; op < OP_COUNT; op++) {
          const at = op * BUCKET_COUNT;
          let count = 0;
          for (let b = 0; b < BUCKET_COUNT; b++) count += e.latency[at + b]!;
          if (count === 0) continue;
          let cumulative = 0;
          for (let b = 0; b < LATENCY_BOUNDS.length; b++) {
            cumulative += e.latency[at + b]!;
            values.push({ labels: { op: OP_NAMES[op], export: e.name, le: LATENCY_BOUNDS[b]! }, value: cumulative, metricName: `${name}_bucket` });
          }
          values.push({ labels: { op: OP_NAMES[op], export: e.name, le: '+Inf' }, value: count, metricName: `${name}_bucket` });
          values.push({ labels: { op: OP_NAMES[op], export: e.name }, value: e.latencySum[op]!, metricName: `${name}_sum` });
          values.push({ labels: { op: OP_NAMES[op], export: e.name }, value: count, metricName: `${name}_count` });
        }
      }
      return { name, help: metric.help, type: 'histogram', aggregator: 'sum', values };
    },
  };
  registry.registerMetric(metric as unknown as Prom.Metric);
}
