import { EXTENT_HOLE, EXTENT_ZERO, Errno, NbdError, type Extent } from '@nbdx/server/api';

/**
 * The image's extents as imageio reports them (`GET …/extents`, zero context), turned into NBD
 * types and kept sorted so a lookup is a binary search. imageio cannot answer for part of an image,
 * so the whole list is fetched once and cached; writes and zeroes invalidate it.
 */
export class ExtentMap {
  /** Sorted, non-overlapping, non-empty. */
  readonly starts: Float64Array;
  readonly lengths: Float64Array;
  readonly types: Uint8Array;

  constructor(list: readonly Extent[]) {
    const n = list.length;
    this.starts = new Float64Array(n);
    this.lengths = new Float64Array(n);
    this.types = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      this.starts[i] = list[i]!.offset;
      this.lengths[i] = list[i]!.length;
      this.types[i] = list[i]!.type;
    }
  }

  get count(): number {
    return this.starts.length;
  }

  /** Where the last extent ends: the image size as far as the server knows it. */
  get end(): number {
    const n = this.count;
    return n === 0 ? 0 : this.starts[n - 1]! + this.lengths[n - 1]!;
  }

  /** Index of the first extent that ends after `offset` (count when there is none). */
  private firstEndingAfter(offset: number): number {
    let lo = 0;
    let hi = this.count;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.starts[mid]! + this.lengths[mid]! <= offset) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /** The extents covering [offset, offset+count), clipped to it; only the first with `one`. */
  lookup(offset: number, count: number, one = false): Extent[] {
    const end = offset + count;
    const out: Extent[] = [];
    for (let i = this.firstEndingAfter(offset); i < this.count; i++) {
      const s = this.starts[i]!;
      if (s >= end) break;
      const e = s + this.lengths[i]!;
      const from = Math.max(s, offset);
      out.push({ offset: from, length: Math.min(e, end) - from, type: this.types[i]! });
      if (one) break;
    }
    return out;
  }
}

/** imageio's JSON → NBD extents: `zero` → ZERO, `hole` → HOLE (old servers omit `hole`). */
export function parseExtents(body: string): ExtentMap {
  let json: unknown;
  try {
    json = JSON.parse(body);
  } catch {
    throw new NbdError(Errno.EIO, `extents: the imageio server sent invalid JSON: ${body.slice(0, 100)}`);
  }
  if (!Array.isArray(json)) throw new NbdError(Errno.EIO, 'extents: the imageio server did not send a list');
  const list: Extent[] = [];
  for (const item of json as unknown[]) {
    const e = item as { start?: unknown; length?: unknown; zero?: unknown; hole?: unknown } | null;
    const start = e?.start;
    const length = e?.length;
    if (
      typeof start !== 'number' ||
      typeof length !== 'number' ||
      !Number.isSafeInteger(start) ||
      !Number.isSafeInteger(length) ||
      start < 0 ||
      length < 0
    ) {
      throw new NbdError(Errno.EIO, `extents: invalid extent from the imageio server: ${JSON.stringify(item)}`);
    }
    if (length === 0) continue;
    const type = (e!.zero === true ? EXTENT_ZERO : 0) | (e!.hole === true ? EXTENT_HOLE : 0);
    list.push({ offset: start, length, type });
  }
  list.sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < list.length; i++) {
    const prev = list[i - 1]!;
    if (list[i]!.offset < prev.offset + prev.length) {
      throw new NbdError(Errno.EIO, `extents: the imageio server sent overlapping extents at offset ${list[i]!.offset}`);
    }
  }
  return new ExtentMap(list);
}

/**
 * The cache: one fetch shared by concurrent callers; `invalidate()` (called before and after every
 * write and zero) bumps a generation so that a fetch which raced with a write is used by the
 * callers that asked for it but never stored.
 */
export class ExtentCache {
  private map: ExtentMap | null = null;
  private generation = 0;
  private pending: { generation: number; promise: Promise<ExtentMap> } | null = null;
  /** How many times the list was fetched (for tests and debug output). */
  fetches = 0;

  constructor(private readonly fetch: () => Promise<ExtentMap>) {}

  invalidate(): void {
    this.generation++;
    this.map = null;
  }

  get(): Promise<ExtentMap> {
    if (this.map) return Promise.resolve(this.map);
    if (this.pending && this.pending.generation === this.generation) return this.pending.promise;
    const generation = this.generation;
    this.fetches++;
    const promise = this.fetch().then(
      (map) => {
        if (this.generation === generation) this.map = map;
        if (this.pending?.promise === promise) this.pending = null;
        return map;
      },
      (err: unknown) => {
        if (this.pending?.promise === promise) this.pending = null;
        throw err;
      },
    );
    this.pending = { generation, promise };
    return promise;
  }
}
