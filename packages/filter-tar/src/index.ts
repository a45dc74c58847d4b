import {
  Errno,
  FLAG_REQ_ONE,
  NbdError,
  debug,
  defineFilter,
  parseSize,
  type Extent,
  type FilterV2,
  type LayerBelow,
  type Next,
  packageVersion,
} from '@nbdx/server/api';
import { ArchiveOpenError, ArchiveScanner, describeMember, exportNameOf, pickMember, type ArchiveIndex } from './archive.js';
import type { TarMember } from './parse.js';

export {
  scanTar,
  parseNumeric,
  parsePaxRecords,
  detectCompression,
  findMember,
  TarFormatError,
  type TarMember,
  type ScanResult,
  type ScanOptions,
  type ReadFn,
} from './parse.js';

interface Handle {
  member: TarMember;
}

export interface TarFilter extends FilterV2<Handle> {
  /** Scans run so far (one per export of the layer below, however many clients connect). */
  readonly scanCount: number;
}

const CONFIG_HELP = [
  'tar-entry=PATH       serve this member of the archive (otherwise every regular file is an export)',
  'tar-default=PATH     without tar-entry: the export a client gets when it names none (default: the first file)',
  'tar-export=NAME      without tar-entry: the export of the layer below holding the archive (default: its default export)',
  'tar-limit=SIZE       read no header at or past SIZE bytes into the archive (default 0: no limit)',
].join('\n');

/** The NBD protocol's limit on export names, in bytes. */
const MAX_EXPORT_NAME = 4096;

/** A fresh tar filter (no state shared with other instances). */
export function createTarFilter(): TarFilter {
  let entry: string | undefined;
  let tarDefault: string | undefined;
  let tarExport: string | undefined;
  let limit: number | undefined;
  let scanner: ArchiveScanner | undefined;

  const getScanner = (): ArchiveScanner => {
    scanner ??= new ArchiveScanner({ ...(entry !== undefined ? { entry } : {}), ...(limit !== undefined ? { limit } : {}) });
    return scanner;
  };

  /** Without tar-entry: the export of the layer below that holds the archive. */
  const archiveExport = async (below: LayerBelow, readonly: boolean, isTls: boolean): Promise<string> => {
    if (tarExport !== undefined) return tarExport;
    try {
      return await below.defaultExport(readonly, isTls);
    } catch (err) {
      throw new NbdError(
        Errno.EINVAL,
        `tar: the layer below has no default export to read the archive from (${(err as Error).message}); set tar-export=NAME`,
      );
    }
  };

  /** Without tar-entry: the member served to a client that names no export. */
  const defaultMember = (index: ArchiveIndex): string => {
    if (tarDefault !== undefined) return exportNameOf(pickMember(index, tarDefault, limit, 'tar-default'));
    const first = index.scan.members.find((m) => m.kind === 'file');
    if (!first) throw new NbdError(Errno.EINVAL, 'tar: the archive holds no regular files to serve');
    return exportNameOf(first);
  };

  const check = (h: Handle, count: number, offset: number, errno: number, what: string): number => {
    // The core checks bounds already; this keeps the filter safe whoever calls it.
    if (!(offset >= 0 && count >= 0 && offset + count <= h.member.size)) {
      throw new NbdError(errno, `tar: ${what} past the end of member '${h.member.name}' (${h.member.size} bytes)`);
    }
    return offset + h.member.offset;
  };

  const filter = defineFilter<Handle>({
    apiVersion: 2,
    name: 'tar',
    version: packageVersion(import.meta.url),
    longname: 'nbdx tar filter',
    description: 'Serve files inside an uncompressed tar archive, in place.',
    configHelp: CONFIG_HELP,
    threadModel: 'parallel',

    config(next, key, value) {
      switch (key) {
        case 'tar-entry':
          if (value === '') throw new NbdError(Errno.EINVAL, 'tar-entry: the member name must not be empty');
          entry = value;
          return;
        case 'tar-default':
          if (value === '') throw new NbdError(Errno.EINVAL, 'tar-default: the member name must not be empty');
          tarDefault = value;
          return;
        case 'tar-export':
          tarExport = value;
          return;
        case 'tar-limit': {
          const n = parseSize(value, 'tar-limit');
          limit = n === 0 ? undefined : n;
          return;
        }
        default:
          return next(key, value);
      }
    },

    async configComplete(next) {
      if (entry !== undefined && tarDefault !== undefined) {
        throw new NbdError(Errno.EINVAL, 'tar-default applies only without tar-entry (with tar-entry there is one export)');
      }
      if (entry !== undefined && tarExport !== undefined) {
        throw new NbdError(
          Errno.EINVAL,
          'tar-export applies only without tar-entry (with tar-entry, export names are passed to the layer below)',
        );
      }
      await next();
    },

    async afterStart(below) {
      // Scan now so that a missing entry or a broken archive is reported at start-up; every
      // connection then reuses this scan.
      if (entry !== undefined) {
        try {
          const name = await below.defaultExport(false, false).catch((err: Error) => {
            throw new ArchiveOpenError('', err);
          });
          pickMember(await getScanner().index(below, name), entry, limit, 'tar-entry');
        } catch (err) {
          // Some layers cannot open their default export (file dir=): each export the clients
          // ask for is then scanned when first opened.
          if (!(err instanceof ArchiveOpenError)) throw err;
          debug('tar', `no scan at start-up: ${err.message}`);
        }
      } else {
        let index: ArchiveIndex;
        try {
          index = await getScanner().index(below, await archiveExport(below, false, false));
        } catch (err) {
          if (err instanceof ArchiveOpenError && tarExport === undefined) {
            throw new NbdError(err.errno, `${err.message}; set tar-export=NAME to say which export holds the archive`);
          }
          throw err;
        }
        if (tarDefault !== undefined) pickMember(index, tarDefault, limit, 'tar-default');
      }
    },

    unload() {
      scanner?.clear();
    },

    async listExports(below, readonly, isTls) {
      if (entry !== undefined) return below.listExports(readonly, isTls);
      const index = await getScanner().index(below, await archiveExport(below, readonly, isTls));
      const seen = new Set<string>();
      const out: { name: string; description: string }[] = [];
      for (const m of index.scan.members) {
        const name = exportNameOf(m);
        if (m.kind !== 'file' || seen.has(name)) continue;
        if (Buffer.byteLength(name) > MAX_EXPORT_NAME) {
          // NBD export names are at most 4096 bytes: such a member can only be served by tar-entry.
          debug('tar', `not listing a member whose name is longer than ${MAX_EXPORT_NAME} bytes: '${name.slice(0, 60)}…'`);
          continue;
        }
        seen.add(name);
        out.push({ name, description: describeMember(m) });
      }
      return out;
    },

    async defaultExport(below, readonly, isTls) {
      if (entry !== undefined) return below.defaultExport(readonly, isTls);
      return defaultMember(await getScanner().index(below, await archiveExport(below, readonly, isTls)));
    },

    async open(next, readonly, exportName, isTls) {
      if (entry !== undefined) {
        // One member; export names are those of the layer below, each holding an archive.
        const index = await getScanner().index(next, exportName);
        const member = pickMember(index, entry, limit, 'tar-entry');
        await next.open(readonly, exportName);
        return { member };
      }
      const archive = await archiveExport(next, readonly, isTls);
      const index = await getScanner().index(next, archive);
      const name = exportName === '' ? defaultMember(index) : exportName;
      const member = pickMember(index, name, limit, 'export');
      await next.open(readonly, archive);
      return { member };
    },

    async prepare(next, h) {
      const size = await next.getSize();
      const end = h.member.offset + h.member.size;
      if (end > size) {
        throw new NbdError(
          Errno.EIO,
          `tar: member '${h.member.name}' ends at offset ${end} but the archive is only ${size} bytes (it shrank or is truncated)`,
        );
      }
    },

    getSize(_next, h) {
      return h.member.size;
    },

    exportDescription(_next, h) {
      return `${h.member.name}: ${describeMember(h.member)}`;
    },

    async blockSize(next, h) {
      const b = await next.blockSize();
      // Members start on 512-byte boundaries; larger alignment below cannot be promised.
      if (b && h.member.offset % b.minimum !== 0) return undefined;
      if (b && h.member.offset % b.preferred !== 0) return { ...b, preferred: Math.max(b.minimum, 512) };
      return b;
    },

    async pread(next, h, buf, offset, flags) {
      return next.pread(buf, check(h, buf.length, offset, Errno.EINVAL, 'read'), flags);
    },

    async pwrite(next, h, buf, offset, flags) {
      return next.pwrite(buf, check(h, buf.length, offset, Errno.ENOSPC, 'write'), flags);
    },

    async zero(next, h, count, offset, flags) {
      return next.zero(count, check(h, count, offset, Errno.ENOSPC, 'zero'), flags);
    },

    async trim(next, h, count, offset, flags) {
      return next.trim(count, check(h, count, offset, Errno.EINVAL, 'trim'), flags);
    },

    async cache(next, h, count, offset, flags) {
      return next.cache(count, check(h, count, offset, Errno.EINVAL, 'cache'), flags);
    },

    async extents(next: Next, h, count, offset, flags) {
      const base = check(h, count, offset, Errno.EINVAL, 'extents');
      const end = base + count;
      const out: Extent[] = [];
      let pos = base;
      while (pos < end) {
        const list = await next.extents(end - pos, pos, flags);
        if (list.length === 0) break;
        for (const e of list) out.push({ offset: e.offset - h.member.offset, length: e.length, type: e.type });
        const last = list[list.length - 1]!;
        pos = last.offset + last.length;
        if (flags & FLAG_REQ_ONE) break;
      }
      return out;
    },
  });

  return Object.defineProperty(filter, 'scanCount', {
    get: () => scanner?.scans ?? 0,
    enumerable: false,
  }) as TarFilter;
}

export default createTarFilter();
