/**
 * @nbdx/server: the NBD protocol engine, the backend chain, the loader, the CLI, and the public
 * plugin/filter interfaces (also importable alone from `@nbdx/server/api`).
 */
export * from './api/index.js';
export { serve, NbdServer, type ServeOptions, type ServerAddress } from './server.js';
export type { ListenTarget } from './listeners/listen.js';
export type { TlsSettings, TlsMode } from './protocol/settings.js';
export type { MetricsOptions, MetricsEndpoint, MetricsExporter } from './metrics.js';
// What the protocol counts, for @nbdx/metrics (and any other exporter).
export {
  BUCKET_COUNT,
  COUNTED_OPS,
  ERRNO_COUNT,
  ERRNO_NAMES,
  LATENCY_BOUNDS,
  MAX_EXPORT_LABELS,
  MAX_EXPORT_LABEL_LENGTH,
  OP_COUNT,
  OP_NAMES,
  OTHER_EXPORT,
  type ExportStats,
  type ServerStats,
} from './protocol/stats.js';
export { Backend } from './backend/backend.js';
export { normalizeExtents } from './backend/extents.js';
