/**
 * @nbdx/client: an NBD client for Node.js (fixed newstyle handshake, structured replies, extended
 * headers, block status, many requests in flight on one connection).
 */
export { NBD } from '@nbdx/server/wire';
export {
  NbdClient,
  type ConnectOptions,
  type NegotiationOptions,
  type BlockSize,
  type Extent,
  type Span,
  type RawRequest,
  type RawChunk,
  type RawReply,
  type ExportInfo,
  type ExportListEntry,
} from './client.js';
export {
  ERRNO,
  errnoName,
  NbdError,
  NbdOptionError,
  NbdRequestError,
  NbdConnectionError,
  NbdProtocolError,
  NbdTlsError,
  type RequestErrorDetails,
} from './errors.js';
export { parseNbdUri, type NbdTarget, type UriTls } from './target.js';
export { planTls, type TlsMode, type TlsOptions, type TlsPlan } from './tls.js';
