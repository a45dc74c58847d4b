/**
 * The public, versioned interfaces for plugin and filter authors. Importable as
 * `@nbdx/server/api` without loading the server.
 */
export * from './common.js';
export type { PluginCommon } from './plugin/shared.js';
export type { PluginV1 } from './plugin/v1.js';
export type { PluginV2 } from './plugin/v2.js';
export type { FilterCommon, ConfigNext } from './filter/shared.js';
export type { FilterV1 } from './filter/v1.js';
export type { FilterV2 } from './filter/v2.js';
export type { Next, OwnedContext, LayerBelow, NextOpener, OpenContextOptions, ReopenOptions } from './filter/next.js';
export * from './define.js';
export { windowDataCalls } from './window.js';
export { TempFile } from './temp-file.js';
export { isWorkerCopy } from './worker-copy.js';
export { readSecret, secretReadsOnce, type ReadSecretOptions, type SecretInput } from './secret.js';
