/**
 * What the protocol counts for the metrics endpoint (`--metrics`; the endpoint is the @nbdx/metrics package): requests,
 * bytes, errors, latencies and connections, per export. Recording a request is a few additions
 * into typed arrays and allocates nothing; prom-client reads the totals only when scraped. A
 * server without metrics has no ServerStats at all and the protocol skips all of this on a null
 * check.
 */

/**
 * The `op` label of each command number (NBD_CMD_*), and `other` for numbers the spec does not
 * define (such requests are rejected, but still counted). DISC (2) is never counted.
 */
export const OP_NAMES = ['read', 'write', 'disc', 'flush', 'trim', 'cache', 'zero', 'block_status', 'other'] as const;
export const OP_COUNT = OP_NAMES.length;
/** The operations shown in every export's request and byte counters, even at zero. */
export const COUNTED_OPS: readonly number[] = [0, 1, 3, 4, 5, 6, 7];

/** Index into the per-op arrays for a command number. */
export function opIndex(type: number): number {
  return type >= 0 && type < 8 ? type : 8;
}

/** The `errno` label: the errors NBD carries, and `other` for anything else a layer sent. */
export const ERRNO_NAMES = ['EPERM', 'EIO', 'ENOMEM', 'EINVAL', 'ENOSPC', 'EOVERFLOW', 'ENOTSUP', 'ESHUTDOWN', 'other'] as const;
export const ERRNO_COUNT = ERRNO_NAMES.length;
const ERRNO_VALUES = [1, 5, 12, 22, 28, 75, 95, 108];

/** Index into ERRNO_NAMES for an NBD error number. */
export function errnoIndex(errno: number): number {
  const i = ERRNO_VALUES.indexOf(errno);
  return i < 0 ? ERRNO_COUNT - 1 : i;
}

/**
 * Upper bounds of the latency buckets, in seconds: steps of 1, 2.5 and 5 from 10 µs (a request
 * a synchronous plugin answers from memory) to 10 s (a stalled remote backend). One more bucket
 * after these counts everything slower (+Inf).
 */
export const LATENCY_BOUNDS: readonly number[] = [
  0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
  2.5, 5, 10,
];
export const BUCKET_COUNT = LATENCY_BOUNDS.length + 1;

/**
 * Export names are chosen by clients, and many plugins accept any name: each distinct name costs
 * memory and lines in every scrape. The first MAX_EXPORT_LABELS names the layers accepted get a
 * label of their own; later ones, and names longer than MAX_EXPORT_LABEL_LENGTH, are counted
 * together under OTHER_EXPORT.
 */
export const MAX_EXPORT_LABELS = 32;
export const MAX_EXPORT_LABEL_LENGTH = 128;
export const OTHER_EXPORT = '(other)';

/** The counters of one export (or of OTHER_EXPORT), shared by every connection to it. */
export class ExportStats {
  /** Requests by op: every request, including those rejected without reaching the layers. */
  readonly requests = new Float64Array(OP_COUNT);
  /** Bytes by op of the requests that succeeded (data for read and write, the range otherwise). */
  readonly bytes = new Float64Array(OP_COUNT);
  /** Failed requests, at [op * ERRNO_COUNT + errno index]. */
  readonly errors = new Float64Array(OP_COUNT * ERRNO_COUNT);
  /** Requests per latency bucket (not cumulative), at [op * BUCKET_COUNT + bucket]. */
  readonly latency = new Float64Array(OP_COUNT * BUCKET_COUNT);
  /** Seconds spent by op, over the requests in `latency`. */
  readonly latencySum = new Float64Array(OP_COUNT);
  /** Requests being worked on now. */
  inFlight = 0;
  /** Connections in transmission on this export now, and since the start. */
  connectionsOpen = 0;
  connections = 0;

  constructor(readonly name: string) {}

  /** A request of op index `op` took `seconds` from being started to its reply. */
  observe(op: number, seconds: number): void {
    let b = 0;
    while (b < LATENCY_BOUNDS.length && seconds > LATENCY_BOUNDS[b]!) b++;
    this.latency[op * BUCKET_COUNT + b]++;
    this.latencySum[op] += seconds;
  }
}

/** The counters of one server. */
export class ServerStats {
  /** Connections accepted since the start, and open now (handshake or transmission). */
  connectionsAccepted = 0;
  connectionsOpen = 0;
  /** Connections that ended before choosing an export, other than by the client's ABORT. */
  handshakeFailures = 0;
  private readonly named = new Map<string, ExportStats>();
  private other: ExportStats | null = null;

  /** The counters for an export the layers accepted (see MAX_EXPORT_LABELS). */
  forExport(name: string): ExportStats {
    const known = this.named.get(name);
    if (known) return known;
    if (this.named.size < MAX_EXPORT_LABELS && name.length <= MAX_EXPORT_LABEL_LENGTH && name !== OTHER_EXPORT) {
      const s = new ExportStats(name);
      this.named.set(name, s);
      return s;
    }
    return (this.other ??= new ExportStats(OTHER_EXPORT));
  }

  /** Every export seen so far, in order of first use, OTHER_EXPORT last. */
  exports(): ExportStats[] {
    const all = [...this.named.values()];
    if (this.other) all.push(this.other);
    return all;
  }
}
