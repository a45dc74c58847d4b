/**
 * The contract between the server and the metrics endpoint (`--metrics`, the `metrics` option of
 * serve()). The protocol counts into protocol/stats.ts; the HTTP endpoint that turns those
 * counts into Prometheus / OpenMetrics text lives in its own package, @nbdx/metrics, so that
 * its dependency (prom-client) is installed only by those who ask for metrics. The CLI installs
 * it on demand like a first-party plugin; an embedding program adds it to its dependencies.
 */
import { pathToFileURL } from 'node:url';
import { LoadError, NBDX_VERSION, findPackageDir, packageEntry, searchBases } from './loader/resolve.js';
import type { ServerStats } from './protocol/stats.js';

export interface MetricsOptions {
  /** TCP port; 0 picks a free one (see NbdServer.metricsAddress). */
  port: number;
  /** Address to listen on; default 127.0.0.1, so metrics are not exposed unless asked for. */
  host?: string;
  /** Add prom-client's process and Node.js metrics (CPU, memory, event loop, GC); default true. */
  processMetrics?: boolean;
}

export interface MetricsEndpoint {
  readonly host: string;
  readonly port: number;
  /** http://HOST:PORT/metrics */
  readonly url: string;
  close(): Promise<void>;
}

/** What @nbdx/metrics exports. */
export interface MetricsExporter {
  startMetrics(stats: ServerStats, options: MetricsOptions, debug: (message: string) => void): Promise<MetricsEndpoint>;
}

export const METRICS_PACKAGE = '@nbdx/metrics';

/** Import @nbdx/metrics from where the loader finds plugins (the project, nbdx's own place, its cache). */
export async function loadMetricsExporter(bases: readonly string[] = searchBases()): Promise<MetricsExporter> {
  for (const base of bases) {
    const dir = findPackageDir(METRICS_PACKAGE, base);
    if (!dir) continue;
    const mod = (await import(pathToFileURL(packageEntry(dir)).href)) as Partial<MetricsExporter>;
    if (typeof mod.startMetrics !== 'function') throw new LoadError(`${METRICS_PACKAGE} in ${dir} has no startMetrics()`);
    return mod as MetricsExporter;
  }
  throw new LoadError(
    `metrics need the ${METRICS_PACKAGE} package, which is not installed (looked in ${bases.join(', ')}). ` +
      `Install it with: npm install ${METRICS_PACKAGE}@${NBDX_VERSION}`,
  );
}
