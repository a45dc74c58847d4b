import {
  Errno,
  NbdError,
  debug,
  defineFilter,
  parseSize,
  packageVersion,
  type Next,
  type ReadResult,
} from '@nbdx/server/api';

const NAME = 'readahead';
export const DEFAULT_MIN_WINDOW = 64 * 1024;
export const DEFAULT_MAX_WINDOW = 8 * 1024 * 1024;
export const DEFAULT_MEMORY = 64 * 1024 * 1024;
/** Largest single prefetch request: a big window goes below as several of these, in parallel. */
export const PIECE = 2 * 1024 * 1024;

/**
 * How prefetched data is kept:
 * - cache: NBD_CMD_CACHE to the layer below, which keeps it (the cache filter, a plugin with a
 *   native cache such as nbd or file); this filter holds no data.
 * - buffer: this filter reads ahead into memory itself and answers reads from there.
 * - auto: cache when the layer below caches natively, buffer otherwise (its "cache" would only be
 *   a read whose data is thrown away).
 */
export type ReadaheadMode = 'auto' | 'cache' | 'buffer';

export function parseMode(value: string): ReadaheadMode {
  if (value === 'auto' || value === 'cache' || value === 'buffer') return value;
  throw new NbdError(Errno.EINVAL, `readahead-mode: '${value}' is not one of auto, cache, buffer`);
}

/** Counters, for tests and for reading what the filter did (debug output at close). */
export interface ReadaheadStats {
  /** Prefetch requests sent below, and their bytes. */
  prefetches: number;
  prefetchBytes: number;
  /** Prefetches that failed (ignored), and prefetches skipped because the memory bound was reached. */
  prefetchErrors: number;
  overBudget: number;
  /** Reads answered from prefetched memory (buffer mode), and reads sent below. */
  bufferHits: number;
  readsBelow: number;
  /** Times the window was reset by a read that did not follow on. */
  resets: number;
  /** Reads after which nothing was prefetched because the client had more in flight than readahead-max. */
  deepClient: number;
  /** Most bytes ever held or in flight at once. */
  peakBytes: number;
}

/** Data read ahead in buffer mode. */
interface Chunk {
  offset: number;
  length: number;
  buf: Buffer;
  ready: Promise<void>;
  done: boolean;
  ok: boolean;
  /** Cleared when a write overlaps it: its bytes may be older than the write. */
  valid: boolean;
  /** Dropped while its read was still running: its memory is given back when the read ends. */
  dropped: boolean;
}

/** The read pattern of one export, shared by every connection to it (multi-conn copies spread one sequence over several). */
interface Stream {
  size: number;
  refs: number;
  /** End of the furthest read so far in the current sequence. */
  lastEnd: number;
  window: number;
  /** Everything before this has been asked for (by prefetch or by the client). */
  prefetchEnd: number;
  /** Buffer mode: prefetched data, sorted by offset, never overlapping. */
  chunks: Chunk[];
  /** Bytes held by chunks (buffer) or in flight (cache) for this export. */
  bytes: number;
  /** Bytes of client reads in flight right now (every connection to this export). */
  clientBytes: number;
}

interface Handle {
  key: string;
  stream?: Stream;
  mode: 'cache' | 'buffer';
  /** This connection's prefetches still running: awaited before its context below closes. */
  pending: Set<Promise<void>>;
}

function fillZeroSpans(buf: Uint8Array, result: ReadResult): void {
  if (result) for (const z of result) buf.fill(0, z.start, z.start + z.length);
}

/**
 * A fresh `readahead` filter. After each read that follows on from the previous ones, it asks for
 * the data after it in the background, so that it is on its way (or already here) before the
 * client asks. The window doubles with every read that follows on, up to readahead-max, and
 * drops back to readahead-min on a read elsewhere.
 */
export function createReadaheadFilter() {
  let mode: ReadaheadMode = 'auto';
  let minWindow = DEFAULT_MIN_WINDOW;
  let maxWindow = DEFAULT_MAX_WINDOW;
  let memory = DEFAULT_MEMORY;
  const streams = new Map<string, Stream>();
  /** Bytes held or in flight across every export: never above readahead-memory. */
  let totalBytes = 0;
  const stats: ReadaheadStats = {
    prefetches: 0,
    prefetchBytes: 0,
    prefetchErrors: 0,
    overBudget: 0,
    bufferHits: 0,
    readsBelow: 0,
    resets: 0,
    deepClient: 0,
    peakBytes: 0,
  };

  function take(st: Stream, n: number): void {
    st.bytes += n;
    totalBytes += n;
    if (totalBytes > stats.peakBytes) stats.peakBytes = totalBytes;
  }
  function give(st: Stream, n: number): void {
    st.bytes -= n;
    totalBytes -= n;
  }

  function dropChunk(st: Stream, i: number): void {
    const c = st.chunks[i]!;
    st.chunks.splice(i, 1);
    c.valid = false;
    // A read still filling the buffer holds on to it: it counts until that read ends.
    if (c.done) give(st, c.length);
    else c.dropped = true;
  }

  /** Buffer mode: drop what the reads have left far behind, then, if still over, the oldest. */
  function evict(st: Stream, need: number): void {
    const behind = st.lastEnd - maxWindow;
    for (let i = 0; i < st.chunks.length; ) {
      const c = st.chunks[i]!;
      if (c.done && c.offset + c.length <= behind) dropChunk(st, i);
      else i++;
    }
    while (totalBytes + need > memory && st.chunks.length > 0 && st.chunks[0]!.done && st.chunks[0]!.offset < st.lastEnd) {
      dropChunk(st, 0);
    }
  }

  /** Chunks that together hold [offset, end), in order; undefined when any byte is missing. */
  function lookup(st: Stream, offset: number, end: number): Chunk[] | undefined {
    let at = offset;
    let found: Chunk[] | undefined;
    for (const c of st.chunks) {
      if (c.offset + c.length <= at) continue;
      if (c.offset > at || !c.valid) return undefined;
      (found ??= []).push(c);
      at = c.offset + c.length;
      if (at >= end) return found;
    }
    return undefined;
  }

  async function serve(next: Next, found: Chunk[], buf: Uint8Array, offset: number, flags: number): Promise<ReadResult> {
    for (const c of found) if (!c.done) await c.ready;
    if (found.every((c) => c.ok && c.valid)) {
      const end = offset + buf.length;
      for (const c of found) {
        const from = Math.max(offset, c.offset);
        const to = Math.min(end, c.offset + c.length);
        buf.set(c.buf.subarray(from - c.offset, to - c.offset), from - offset);
      }
      stats.bufferHits++;
      return;
    }
    // The prefetch failed or a write overtook it: read as if it had never been.
    stats.readsBelow++;
    return next.pread(buf, offset, flags);
  }

  /** Remove prefetched data a write is changing (buffer mode), so no read can see older bytes. */
  function invalidate(st: Stream, offset: number, end: number): void {
    for (let i = 0; i < st.chunks.length; ) {
      const c = st.chunks[i]!;
      if (c.offset < end && c.offset + c.length > offset) dropChunk(st, i);
      else i++;
    }
    // Whatever was prefetched past this point may hold old bytes: ask again next time.
    if (st.prefetchEnd > offset) st.prefetchEnd = Math.max(offset, st.lastEnd);
  }

  function issue(next: Next, h: Handle, st: Stream, from: number, length: number): void {
    stats.prefetches++;
    stats.prefetchBytes += length;
    let p: Promise<void>;
    if (h.mode === 'cache') {
      take(st, length);
      p = next
        .cache(length, from, 0)
        .catch((err: unknown) => {
          stats.prefetchErrors++;
          debug(NAME, `prefetch of ${length} bytes at ${from} failed (ignored): ${(err as Error).message}`);
        })
        .finally(() => give(st, length));
    } else {
      const chunk: Chunk = { offset: from, length, buf: Buffer.allocUnsafe(length), ready: undefined!, done: false, ok: false, valid: true, dropped: false };
      take(st, length);
      p = chunk.ready = next
        .pread(chunk.buf, from, 0)
        .then(
          (r) => {
            fillZeroSpans(chunk.buf, r);
            chunk.ok = true;
          },
          (err: unknown) => {
            stats.prefetchErrors++;
            debug(NAME, `prefetch of ${length} bytes at ${from} failed (ignored): ${(err as Error).message}`);
          },
        )
        .finally(() => {
          chunk.done = true;
          if (chunk.dropped) {
            give(st, length);
          } else if (!chunk.ok) {
            const i = st.chunks.indexOf(chunk);
            if (i >= 0) dropChunk(st, i);
          }
        });
      // Chunks are made in ascending order nearly always: insert from the end.
      let i = st.chunks.length;
      while (i > 0 && st.chunks[i - 1]!.offset > from) i--;
      st.chunks.splice(i, 0, chunk);
    }
    h.pending.add(p);
    void p.finally(() => h.pending.delete(p));
  }

  /** After a read of [offset, end): grow or reset the window, and prefetch what it now covers. */
  function plan(next: Next, h: Handle, st: Stream, offset: number, end: number): void {
    // "Follows on": starts at most one window past what was already asked for (a copy that skips
    // holes leaves gaps), and ends at most readahead-max behind the furthest read (requests in
    // flight arrive out of order, and the connections of one multi-conn copy interleave).
    const follows = offset <= Math.max(st.lastEnd, st.prefetchEnd) + st.window && end >= st.lastEnd - maxWindow;
    if (!follows) {
      if (st.window !== minWindow || st.lastEnd !== 0) stats.resets++;
      st.window = minWindow;
      st.lastEnd = end;
      st.prefetchEnd = end;
      return;
    }
    if (end > st.lastEnd) {
      st.lastEnd = end;
      st.window = Math.min(st.window * 2, maxWindow);
    }
    // A client with more reads in flight than the largest window reads ahead by itself (nbdcopy,
    // qemu-img convert): prefetching would only put fewer, bigger requests in place of its own,
    // in flight together, and slow it down. Stand aside for as long as it does.
    if (st.clientBytes > maxWindow) {
      stats.deepClient++;
      return;
    }
    // Top up only once less than half a window is left ahead: prefetches then go below in pieces
    // of half a window or more, not one small piece per client read.
    if (st.prefetchEnd - st.lastEnd >= st.window / 2) return;
    const target = Math.min(st.size, st.lastEnd + st.window);
    let from = Math.max(st.prefetchEnd, st.lastEnd);
    if (h.mode === 'buffer') evict(st, target - from);
    while (from < target) {
      let length = Math.min(PIECE, target - from);
      if (h.mode === 'buffer') {
        // Never fetch the same bytes twice: skip held chunks, stop short of the next one.
        const c = st.chunks.find((k) => k.offset + k.length > from);
        if (c && c.offset <= from) {
          from = c.offset + c.length;
          continue;
        }
        if (c) length = Math.min(length, c.offset - from);
      }
      if (totalBytes + length > memory) {
        stats.overBudget++;
        break;
      }
      issue(next, h, st, from, length);
      from += length;
    }
    st.prefetchEnd = Math.max(st.prefetchEnd, from);
  }

  const filter = defineFilter<Handle>({
    apiVersion: 2,
    name: NAME,
    version: packageVersion(import.meta.url),
    longname: 'nbdx readahead filter',
    description: 'Prefetch the data after sequential reads, through the layer below\'s cache or into memory.',
    configHelp: [
      'readahead-mode=auto|cache|buffer  prefetch with NBD_CMD_CACHE below, into memory here, or pick (default auto)',
      'readahead-min=SIZE                first window after a read elsewhere (default 64K)',
      'readahead-max=SIZE                largest window (default 8M)',
      'readahead-memory=SIZE             most bytes held or in flight for every export together (default 64M)',
    ].join('\n'),
    threadModel: 'parallel',

    load() {
      mode = 'auto';
      minWindow = DEFAULT_MIN_WINDOW;
      maxWindow = DEFAULT_MAX_WINDOW;
      memory = DEFAULT_MEMORY;
    },

    config(next, key, value) {
      switch (key) {
        case 'readahead-mode':
          mode = parseMode(value);
          return;
        case 'readahead-min':
          minWindow = parseSize(value, key);
          if (minWindow < 512) throw new NbdError(Errno.EINVAL, `${key}: '${value}' is less than 512 bytes`);
          return;
        case 'readahead-max':
          maxWindow = parseSize(value, key);
          if (maxWindow < 512) throw new NbdError(Errno.EINVAL, `${key}: '${value}' is less than 512 bytes`);
          return;
        case 'readahead-memory':
          memory = parseSize(value, key);
          if (memory < 512) throw new NbdError(Errno.EINVAL, `${key}: '${value}' is less than 512 bytes`);
          return;
        default:
          return next(key, value);
      }
    },

    configComplete(next) {
      if (minWindow > maxWindow) {
        throw new NbdError(Errno.EINVAL, `readahead-min (${minWindow}) is larger than readahead-max (${maxWindow})`);
      }
      return next();
    },

    dumpPlugin() {
      return { readahead_modes: 'auto,cache,buffer', readahead_max_default: DEFAULT_MAX_WINDOW };
    },

    async open(next, readonly, exportName, isTls) {
      await next.open(readonly, exportName);
      const key = exportName === '' ? await next.defaultExport(readonly, isTls).catch(() => '') : exportName;
      return { key, mode: 'buffer', pending: new Set() };
    },

    async prepare(next, h) {
      const below = await next.canCache();
      h.mode = mode === 'auto' ? (below === 'native' ? 'cache' : 'buffer') : mode;
      if (h.mode === 'cache' && below !== 'native') {
        debug(NAME, `readahead-mode=cache, but the layer below caches by '${below}': prefetches may do nothing or read twice`);
      }
      let st = streams.get(h.key);
      if (!st) {
        st = { size: await next.getSize(), refs: 0, lastEnd: 0, window: minWindow, prefetchEnd: 0, chunks: [], bytes: 0, clientBytes: 0 };
        streams.set(h.key, st);
      }
      st.refs++;
      h.stream = st;
    },

    async finalize(_next, h) {
      // No prefetch may reach the layer below after this connection's context there is closed.
      while (h.pending.size > 0) await Promise.allSettled([...h.pending]);
      const st = h.stream;
      if (st && --st.refs === 0) {
        streams.delete(h.key);
        while (st.chunks.length > 0) dropChunk(st, 0);
        debug(
          NAME,
          `export '${h.key}': ${stats.prefetches} prefetches (${stats.prefetchBytes} bytes), ${stats.bufferHits} reads from memory, ` +
            `${stats.resets} window resets, ${stats.deepClient} reads with the client reading ahead itself, ${stats.prefetchErrors} failed prefetches`,
        );
      }
    },

    pread(next, h, buf, offset, flags) {
      const st = h.stream!;
      const end = offset + buf.length;
      const found = h.mode === 'buffer' ? lookup(st, offset, end) : undefined;
      let p: Promise<ReadResult>;
      if (found) {
        p = serve(next, found, buf, offset, flags);
      } else {
        // The client's own read goes below first, before any prefetch this read leads to.
        stats.readsBelow++;
        p = next.pread(buf, offset, flags);
      }
      const n = buf.length;
      st.clientBytes += n;
      plan(next, h, st, offset, end);
      return p.then(
        (r) => {
          st.clientBytes -= n;
          return r;
        },
        (err: unknown) => {
          st.clientBytes -= n;
          throw err;
        },
      );
    },

    async pwrite(next, h, buf, offset, flags) {
      const st = h.stream!;
      if (h.mode !== 'buffer') return next.pwrite(buf, offset, flags);
      // Before and after: a prefetch that started while the write was on its way may hold either.
      invalidate(st, offset, offset + buf.length);
      try {
        await next.pwrite(buf, offset, flags);
      } finally {
        invalidate(st, offset, offset + buf.length);
      }
    },
    async zero(next, h, count, offset, flags) {
      const st = h.stream!;
      if (h.mode !== 'buffer') return next.zero(count, offset, flags);
      invalidate(st, offset, offset + count);
      try {
        await next.zero(count, offset, flags);
      } finally {
        invalidate(st, offset, offset + count);
      }
    },
    async trim(next, h, count, offset, flags) {
      const st = h.stream!;
      if (h.mode !== 'buffer') return next.trim(count, offset, flags);
      invalidate(st, offset, offset + count);
      try {
        await next.trim(count, offset, flags);
      } finally {
        invalidate(st, offset, offset + count);
      }
    },
  });
  return Object.assign(filter, {
    /** What the filter has done so far (all exports together). */
    stats,
    /** Bytes held or in flight right now. */
    heldBytes: () => totalBytes,
  });
}

export default createReadaheadFilter();
