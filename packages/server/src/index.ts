/**
 * @nbdx/server: the NBD protocol engine, the backend chain, the loader, the CLI, and the public
 * plugin/filter interfaces (also importable alone from `@nbdx/server/api`).
 */
export * from './api/index.js';
export { serve, NbdServer, type ServeOptions, type ServerAddress } from './server.js';
export type { ListenTarget } from './listeners/listen.js';
export type { TlsSettings, TlsMode } from './protocol/settings.js';
export type { MetricsOptions } from './metrics/exporter.js';
export { Backend } from './backend/backend.js';
export { normalizeExtents } from './backend/extents.js';
