import type { SecureContextOptions, TLSSocket } from 'node:tls';
import type { Backend } from '../backend/backend.js';
import type { Mutex } from '../backend/mutex.js';
import { DEFAULT_MAX_PAYLOAD } from '../wire/constants.js';
import { DEFAULT_CONNECTION_MEMORY, DEFAULT_SERVER_MEMORY, ServerBudget } from './memory-budget.js';
import type { ServerStats } from './stats.js';

export type TlsMode = 'off' | 'on' | 'require';

export interface TlsSettings {
  mode: TlsMode;
  /** Options for tls.createSecureContext / new TLSSocket: cert, key, ca, pskCallback, ... */
  socketOptions: SecureContextOptions & {
    requestCert?: boolean;
    rejectUnauthorized?: boolean;
    pskCallback?: (socket: TLSSocket, identity: string) => Buffer | null;
    ciphers?: string;
  };
}

/** Everything the protocol engine needs to know about the server it is part of. */
export interface ProtocolSettings {
  backend: Backend;
  readonly: boolean;
  /** --no-sr: refuse structured replies (and extended headers, which imply them). */
  noStructuredReplies: boolean;
  /** --mask-handshake: handshake flags to offer (bits of FIXED_NEWSTYLE | NO_ZEROES). */
  handshakeMask: number;
  /** Largest READ/WRITE payload accepted (advertised as the maximum block size). */
  maxPayload: number;
  /**
   * Bytes a connection may hold (requests being served, replies the client has not taken) before
   * we stop reading from it (memory-budget.ts).
   */
  maxConnectionMemory: number;
  /** The same, summed over every connection of the server; shared by all of them. */
  serverBudget: ServerBudget;
  /** Longest option payload accepted during the handshake. */
  maxOptionLength: number;
  /** Options a client may send before choosing an export; one more ends the connection. */
  maxOptions: number;
  /** Milliseconds a client has from connecting to choosing an export (TLS included); 0 = no limit. */
  handshakeTimeoutMs: number;
  /** Longest an idle connection polls for its next request before sleeping, in ns (poller.ts); 0 = never. */
  pollMaxNs: number;
  tls: TlsSettings;
  /** Held around every request (serialize_all_requests and stricter). */
  requestLock: Mutex | null;
  /** One request at a time per connection (serialize_requests and stricter). */
  perConnectionLock: boolean;
  /** Log a debug line per request (-v); off, it costs nothing on the hot path. */
  traceRequests: boolean;
  /** At most this many requests of one connection worked on at once (-t N); 0 = no limit. */
  requestsPerConnection: number;
  debug: (message: string) => void;
  error: (message: string) => void;
  /** Where connections and requests are counted for --metrics; unset or null: nowhere, at no cost. */
  stats?: ServerStats | null;
  /** Per connection (set by Connection): whether the server is shutting down (not the client leaving). */
  shuttingDown?: () => boolean;
  /** Per connection (set by Connection): aborted when the client vanishes or the server shuts down. */
  abort?: AbortController;
}

export const DEFAULT_SETTINGS = {
  readonly: false,
  noStructuredReplies: false,
  handshakeMask: 3,
  maxPayload: DEFAULT_MAX_PAYLOAD,
  maxConnectionMemory: DEFAULT_CONNECTION_MEMORY,
  maxServerMemory: DEFAULT_SERVER_MEMORY,
  maxOptionLength: 64 * 1024,
  maxOptions: 32,
  handshakeTimeoutMs: 60_000,
  pollMaxNs: 50_000,
  requestsPerConnection: 0,
  traceRequests: false,
};
