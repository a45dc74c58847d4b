import { Errno, NbdError, debug, type LayerBelow, type ZeroSpan } from '@nbdx/server/api';
import { TarFormatError, scanTar, whyNotServable, findMember, normalizeName, type ScanResult, type TarMember } from './parse.js';

/** The layer below could not open the export said to hold the archive. */
export class ArchiveOpenError extends NbdError {
  constructor(
    readonly exportName: string,
    readonly below: unknown,
  ) {
    super(
      (below as NbdError).errno ?? Errno.EIO,
      `tar: cannot open the archive (export '${exportName}' of the layer below): ${(below as Error).message}`,
    );
  }
}

/** What one scan of one archive found. */
export interface ArchiveIndex {
  /** The export of the layer below that holds the archive. */
  exportName: string;
  archiveSize: number;
  scan: ScanResult;
  /** The first member under each stored name, and under each normalised name. */
  byName: Map<string, TarMember>;
  byNormalName: Map<string, TarMember>;
}

/** Readahead for the scan: headers of small members are read many at a time. */
const SCAN_CHUNK = 64 * 1024;

function buildIndex(exportName: string, archiveSize: number, scan: ScanResult): ArchiveIndex {
  const byName = new Map<string, TarMember>();
  const byNormalName = new Map<string, TarMember>();
  for (const m of scan.members) {
    if (!byName.has(m.name)) byName.set(m.name, m);
    const n = normalizeName(m.name);
    if (n !== '' && !byNormalName.has(n)) byNormalName.set(n, m);
  }
  return { exportName, archiveSize, scan, byName, byNormalName };
}

/** The same answer as findMember(), without walking the whole list. */
export function lookupMember(index: ArchiveIndex, name: string): TarMember | undefined {
  const exact = index.byName.get(name);
  const n = normalizeName(name);
  const normal = n === '' ? undefined : index.byNormalName.get(n);
  if (exact && normal) return exact.headerOffset <= normal.headerOffset ? exact : normal;
  return exact ?? normal;
}

export interface ScannerOptions {
  /** With tar-entry: stop at the first member of that name. */
  entry?: string;
  limit?: number;
}

/** Bytes as a short human figure: 1.5 GiB, 512 KiB, 17 bytes. */
export function humanSize(n: number): string {
  const units = ['KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  if (n < 1024) return `${n} bytes`;
  let v = n;
  let u = -1;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  const text = v >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1);
  return `${text} ${units[u]}`;
}

export function describeMember(m: TarMember): string {
  const bytes = m.size === 1 ? '1 byte' : `${m.size} bytes`;
  return m.size < 1024 ? `${bytes} in tar archive` : `${bytes} (${humanSize(m.size)}) in tar archive`;
}

/** The name a member is listed under: without a leading `./` or `/` (as tar -x would create it). */
export function exportNameOf(m: TarMember): string {
  return normalizeName(m.name) || m.name;
}

/**
 * Scans archives through contexts the filter opens itself, once per export of the layer below,
 * and remembers the result for the life of the server. A failed scan is forgotten so a later
 * connection tries again (the error may have been transient below).
 */
export class ArchiveScanner {
  private readonly cache = new Map<string, Promise<ArchiveIndex>>();
  /** How many scans ran (tests check that it stays at one). */
  scans = 0;

  constructor(private readonly options: ScannerOptions) {}

  index(below: LayerBelow, exportName: string): Promise<ArchiveIndex> {
    let p = this.cache.get(exportName);
    if (!p) {
      p = this.run(below, exportName);
      this.cache.set(exportName, p);
      p.catch(() => {
        if (this.cache.get(exportName) === p) this.cache.delete(exportName);
      });
    }
    return p;
  }

  clear(): void {
    this.cache.clear();
  }

  private async run(below: LayerBelow, exportName: string): Promise<ArchiveIndex> {
    this.scans++;
    let ctx: Awaited<ReturnType<LayerBelow['openContext']>>;
    try {
      ctx = await below.openContext({ readonly: true, exportName });
    } catch (err) {
      throw new ArchiveOpenError(exportName, err);
    }
    try {
      const archiveSize = await ctx.getSize();
      // Read ahead (never past tar-limit), so that runs of small members cost one call below.
      const readEnd = Math.min(archiveSize, this.options.limit ?? Infinity);
      let chunk: Buffer = Buffer.alloc(0);
      let chunkAt = 0;
      const read = async (offset: number, length: number): Promise<Uint8Array> => {
        if (offset >= chunkAt && offset + length <= chunkAt + chunk.length) {
          return chunk.subarray(offset - chunkAt, offset - chunkAt + length);
        }
        const want = Math.max(length, Math.min(SCAN_CHUNK, readEnd - offset));
        const buf = Buffer.allocUnsafe(want);
        const spans = await ctx.pread(buf, offset, 0);
        // Parts the layer below reported as zero are not filled in.
        if (spans) for (const s of spans as readonly ZeroSpan[]) buf.fill(0, s.start, s.start + s.length);
        chunk = buf;
        chunkAt = offset;
        return buf.subarray(0, length);
      };
      const entry = this.options.entry;
      const scan = await scanTar(read, {
        size: archiveSize,
        ...(this.options.limit !== undefined ? { limit: this.options.limit } : {}),
        ...(entry !== undefined ? { stop: (m: TarMember) => findMember([m], entry) !== undefined } : {}),
      });
      debug(
        'tar',
        `scanned ${exportName === '' ? 'the archive' : `archive '${exportName}'`}: ${scan.members.length} members, ` +
          `${scan.headerReads} header blocks read, stopped at offset ${scan.end} (${scan.reason})`,
      );
      return buildIndex(exportName, archiveSize, scan);
    } catch (err) {
      if (err instanceof TarFormatError) throw new NbdError(Errno.EIO, `tar: ${err.message}`);
      throw err;
    } finally {
      await ctx.close();
    }
  }
}

/** The member called `name`, ready to serve, or an NbdError saying why not. */
export function pickMember(index: ArchiveIndex, name: string, limit: number | undefined, what: string): TarMember {
  const m = lookupMember(index, name);
  if (!m) {
    if (index.scan.reason === 'limit') {
      throw new NbdError(
        Errno.EINVAL,
        `tar: ${what} '${name}' was not found within the first ${limit} bytes of the archive ` +
          `(tar-limit=${limit}; the scan stopped at offset ${index.scan.end})`,
      );
    }
    const regular = index.scan.members.filter((x) => x.kind === 'file').map((x) => `'${exportNameOf(x)}'`);
    const shown = regular.slice(0, 8).join(', ') + (regular.length > 8 ? `, … (${regular.length} in all)` : '');
    throw new NbdError(
      Errno.EINVAL,
      `tar: ${what} '${name}' is not in the archive` + (regular.length ? `; its files are ${shown}` : '; it holds no regular files'),
    );
  }
  const why = whyNotServable(m);
  if (why) throw new NbdError(Errno.EINVAL, `tar: ${why}`);
  return m;
}
