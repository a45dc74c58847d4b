/** The NBD wire format, shared by @nbdx/server and @nbdx/client. */
export * as NBD from './constants.js';
export * from './codec.js';
export { ChunkQueue, readU64, writeU64 } from './bytes.js';
