/**
 * The counters the stats filter keeps and the report it writes, in the layout of nbdkit's stats
 * filter (1.32): a `total:` line, then one line per operation that happened, each followed by a
 * request size and alignment breakdown when there is one.
 */

/** Operations in the order nbdkit reports them. */
export const OPERATIONS = ['read', 'write', 'trim', 'zero', 'extents', 'cache', 'flush'] as const;
export type Operation = (typeof OPERATIONS)[number];

/** Size buckets: floor(log2(size)) is below 64 for any size a JS number holds exactly. */
const SIZE_ROWS = 64;
/** Alignment columns: -1 (offset 0, aligned to anything) then 0..63 trailing zero bits. */
const ALIGN_COLUMNS = 65;
const TWO_32 = 2 ** 32;

/** floor(log2(n)) for n >= 1. */
export function sizeBits(n: number): number {
  return n < TWO_32 ? 31 - Math.clz32(n) : 32 + (31 - Math.clz32(Math.floor(n / TWO_32)));
}

function trailingZeros32(n: number): number {
  return 31 - Math.clz32(n & -n);
}

/** Trailing zero bits of an offset; -1 for offset 0 (which is aligned to everything). */
export function alignmentBits(offset: number): number {
  if (offset === 0) return -1;
  const low = offset >>> 0;
  if (low !== 0) return trailingZeros32(low);
  return 32 + trailingZeros32(Math.floor(offset / TWO_32) >>> 0);
}

/**
 * The counters of one operation. Every array is allocated once, up front: recording a request
 * is a few additions into typed arrays, nothing allocated.
 */
export class OperationStats {
  ops = 0;
  bytes = 0;
  /** Time spent in the layers below, milliseconds (fractions kept). */
  ms = 0;
  /** Requests per (size bucket, alignment): index sizeBits * 65 + alignmentBits + 1. */
  readonly counts = new Float64Array(SIZE_ROWS * ALIGN_COLUMNS);
  /** Bytes per size bucket. */
  readonly sizeBytes = new Float64Array(SIZE_ROWS);
  /** Whether any request had a size (so there is a breakdown to print). */
  sized = false;

  constructor(readonly name: Operation) {}

  /** Count one successful request; `histogram` false skips the breakdown (statsthreshold=0). */
  record(count: number, offset: number, ms: number, histogram: boolean): void {
    this.ops++;
    this.bytes += count;
    this.ms += ms;
    if (!histogram || count === 0) return;
    const bits = sizeBits(count);
    this.counts[bits * ALIGN_COLUMNS + alignmentBits(offset) + 1]!++;
    this.sizeBytes[bits]! += count;
    this.sized = true;
  }
}

export type AllStats = Record<Operation, OperationStats>;

export function newStats(): AllStats {
  const s = {} as AllStats;
  for (const op of OPERATIONS) s[op] = new OperationStats(op);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Number formatting as C's printf does it

/**
 * `%.Nf`: like toFixed, except that an exact tie (…5 with nothing after it in the binary value)
 * rounds to even, as glibc does, where toFixed rounds up.
 */
export function fixed(x: number, digits: number): string {
  const plain = x.toFixed(digits);
  if (!Number.isFinite(x) || Math.abs(x) >= 1e20) return plain;
  const exact = Math.abs(x).toFixed(100);
  const dot = exact.indexOf('.');
  const tail = exact.slice(dot + 1 + digits);
  if (tail[0] !== '5' || !/^50*$/.test(tail)) return plain;
  // A tie: toFixed rounded away from zero; step back when that made the last digit odd.
  const lastDigit = plain.charCodeAt(plain.length - 1) - 48;
  if (lastDigit % 2 === 0) return plain;
  const truncated = exact.slice(0, dot + 1 + digits).replace(/\.$/, '');
  return (x < 0 ? '-' : '') + truncated;
}

const pad = (s: string, width: number): string => s.padStart(width);

const KiB = 1024;
const MiB = 1024 * 1024;
const GiB = 1024 * 1024 * 1024;

/** `123 bytes`, `4.00 KiB`, `1.50 MiB`, `25.13 GiB` (nbdkit's humansize). */
export function humanSize(bytes: number): string {
  if (bytes < KiB) return `${bytes} bytes`;
  if (bytes < MiB) return `${fixed(bytes / KiB, 2)} KiB`;
  if (bytes < GiB) return `${fixed(bytes / MiB, 2)} MiB`;
  return `${fixed(bytes / GiB, 2)} GiB`;
}

/** Bytes per second as a size (whole bytes, as nbdkit truncates), or `(n/a)` for no time. */
export function humanRate(bytes: number, ms: number): string {
  return ms > 0 ? humanSize(Math.floor(bytes / (ms / 1000))) : '(n/a)';
}

const seconds = (ms: number): string => fixed(ms / 1000, 6);

// ---------------------------------------------------------------------------------------------
// The report

interface Bucket {
  bits: number;
  requests: number;
  bytes: number;
}

/** The alignment lines of one size bucket: cumulative ("aligned to at least N bits"). */
function alignmentLines(st: OperationStats, bits: number, threshold: number, out: string[]): void {
  const row = bits * ALIGN_COLUMNS;
  const anyAlignment = st.counts[row]!;
  let total = anyAlignment;
  const present: number[] = [];
  for (let a = 0; a < ALIGN_COLUMNS - 1; a++) {
    const n = st.counts[row + a + 1]!;
    if (n > 0) {
      present.push(a);
      total += n;
    }
  }
  // cumulative[i]: requests aligned to at least present[i] bits (offset 0 counts everywhere).
  const cumulative = new Array<number>(present.length);
  let running = anyAlignment;
  for (let i = present.length - 1; i >= 0; i--) {
    running += st.counts[row + present[i]! + 1]!;
    cumulative[i] = running;
  }
  const cutoff = Math.floor((1 - threshold) * total);
  for (let i = 0; i < present.length; i++) {
    const requests = cumulative[i]!;
    const a = present[i]!;
    if (requests < cutoff) {
      out.push(`         ${pad(String(a), 2)}+ bit-aligned: ${pad(fixed((requests / total) * 100, 1), 4)}% (${requests})`);
      return;
    }
    // Only where the count changes: a line per distinct step of the staircase.
    if (i === present.length - 1 || cumulative[i + 1] !== requests) {
      out.push(`         ${pad(String(a), 2)} bit aligned: ${pad(fixed((requests * 100) / total, 1), 5)}% (${requests})`);
    }
  }
}

/**
 * The size buckets, most requests first, until `threshold` of the requests are shown; the rest
 * are summed up as `other sizes`.
 */
function histogramLines(st: OperationStats, threshold: number, out: string[]): void {
  const buckets: Bucket[] = [];
  for (let bits = 0; bits < SIZE_ROWS; bits++) {
    let requests = 0;
    const row = bits * ALIGN_COLUMNS;
    for (let a = 0; a < ALIGN_COLUMNS; a++) requests += st.counts[row + a]!;
    if (requests > 0) buckets.push({ bits, requests, bytes: st.sizeBytes[bits]! });
  }
  buckets.sort((x, y) => y.requests - x.requests || x.bits - y.bits);
  let total = 0;
  for (const b of buckets) total += b.requests;

  const toPrint = Math.floor(threshold * total);
  let printedRequests = 0;
  let printedBytes = 0;
  let bucketBytes = 0;
  for (const b of buckets) bucketBytes += b.bytes;
  for (const b of buckets) {
    if (printedRequests >= toPrint) {
      const requests = total - printedRequests;
      out.push(
        `    other sizes: ${pad(fixed((requests / total) * 100, 1), 4)}% (${requests} reqs, ${humanSize(bucketBytes - printedBytes)} total)`,
      );
      return;
    }
    out.push(
      `    ${pad(String(b.bits), 2)} bits: ${pad(fixed((b.requests / total) * 100, 1), 4)}% (${b.requests} reqs, ${humanSize(b.bytes)} total)`,
    );
    printedRequests += b.requests;
    printedBytes += b.bytes;
    alignmentLines(st, b.bits, threshold, out);
  }
}

/**
 * The whole report. `elapsedMs`: since the server got ready; `threshold`: 0..1, the share of
 * requests the size breakdown covers (0: no breakdown).
 */
export function formatReport(stats: AllStats, elapsedMs: number, threshold: number): string {
  const out: string[] = [];
  // As nbdkit: cache requests are not in the total, and only data-carrying ones count as bytes.
  const ops = stats.read.ops + stats.write.ops + stats.trim.ops + stats.zero.ops + stats.extents.ops + stats.flush.ops;
  const bytes = stats.read.bytes + stats.write.bytes + stats.trim.bytes + stats.zero.bytes;
  out.push(`total: ${ops} ops, ${seconds(elapsedMs)} s, ${humanSize(bytes)}, ${humanRate(bytes, elapsedMs)}/s`);
  for (const name of OPERATIONS) {
    const st = stats[name];
    if (st.ops === 0) continue;
    out.push(
      `${name}: ${st.ops} ops, ${seconds(st.ms)} s, ${humanSize(st.bytes)}, ${humanRate(st.bytes, st.ms)}/s op, ${humanRate(st.bytes, elapsedMs)}/s total`,
    );
    if (threshold !== 0 && st.sized) {
      out.push('  Request size and alignment breakdown:');
      histogramLines(st, threshold, out);
      out.push('');
    }
  }
  return out.join('\n') + '\n';
}
