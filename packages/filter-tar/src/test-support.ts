/**
 * Helpers for this package's tests (not part of the published build): a tiny file plugin that
 * counts what it is asked, and a tar header writer for synthetic archives. The real tools are run
 * with @nbdx/testkit.
 */
import * as fsp from 'node:fs/promises';
import { EXTENT_HOLE, EXTENT_ZERO, Errno, NbdError, definePlugin, type Extent } from '@nbdx/server/api';

export interface FilePluginStats {
  opens: { readonly: boolean; exportName: string }[];
  reads: { offset: number; length: number }[];
  writes: { offset: number; length: number }[];
}

/**
 * Serves one real file with pread/pwrite (config `file=PATH`), so GNU tar can check the archive
 * afterwards. Extents report all-zero 512-byte blocks as holes, to check that they are shifted.
 */
export function createTestFilePlugin() {
  let file: string | undefined;
  const stats: FilePluginStats = { opens: [], reads: [], writes: [] };
  const plugin = definePlugin<{ fh: fsp.FileHandle }>({
    apiVersion: 2,
    name: 'testfile',
    threadModel: 'parallel',
    magicConfigKey: 'file',
    config(key, value) {
      if (key !== 'file') throw new NbdError(Errno.EINVAL, `testfile: unknown parameter '${key}'`);
      file = value;
    },
    configComplete() {
      if (!file) throw new NbdError(Errno.EINVAL, 'testfile: file= is required');
    },
    async open(readonly, exportName) {
      stats.opens.push({ readonly, exportName });
      return { fh: await fsp.open(file!, readonly ? 'r' : 'r+') };
    },
    async close(h) {
      await h.fh.close();
    },
    async getSize(h) {
      return (await h.fh.stat()).size;
    },
    async pread(h, buf, offset) {
      stats.reads.push({ offset, length: buf.length });
      let done = 0;
      while (done < buf.length) {
        const { bytesRead } = await h.fh.read(buf, done, buf.length - done, offset + done);
        if (bytesRead === 0) throw new NbdError(Errno.EIO, 'testfile: read past the end of the file');
        done += bytesRead;
      }
    },
    async pwrite(h, buf, offset) {
      stats.writes.push({ offset, length: buf.length });
      let done = 0;
      while (done < buf.length) {
        const { bytesWritten } = await h.fh.write(buf, done, buf.length - done, offset + done);
        done += bytesWritten;
      }
    },
    async flush(h) {
      await h.fh.sync();
    },
    canExtents: () => true,
    async extents(h, count, offset) {
      // One read of the (block-aligned) range, then runs of zero / non-zero 512-byte blocks.
      const start = Math.floor(offset / 512) * 512;
      const end = Math.min(offset + count, start + 4 * 1024 * 1024);
      const buf = Buffer.alloc(Math.ceil((end - start) / 512) * 512);
      const { bytesRead } = await h.fh.read(buf, 0, buf.length, start);
      const out: Extent[] = [];
      for (let o = 0; o < bytesRead; o += 512) {
        const zero = buf.subarray(o, Math.min(o + 512, bytesRead)).every((b) => b === 0);
        const type = zero ? EXTENT_HOLE | EXTENT_ZERO : 0;
        const len = Math.min(512, bytesRead - o);
        const last = out[out.length - 1];
        if (last && last.type === type) last.length += len;
        else out.push({ offset: start + o, length: len, type });
      }
      return out;
    },
  });
  return { plugin, stats };
}

// ---------------------------------------------------------------------------------------------
// Synthetic archives

export interface HeaderSpec {
  name: string | Uint8Array;
  size?: number;
  typeflag?: string;
  linkName?: string;
  format?: 'gnu' | 'ustar' | 'v7';
  prefix?: string;
  /** Write the size in base-256 even when octal would fit. */
  base256?: boolean;
  /** GNU old sparse: real size and whether extension blocks follow. */
  realSize?: number;
  isExtended?: boolean;
  /** Overwrite the stored checksum. */
  checksum?: string;
}

function putString(block: Uint8Array, at: number, len: number, value: string | Uint8Array): void {
  const bytes = typeof value === 'string' ? Buffer.from(value, 'utf8') : value;
  if (bytes.length > len) throw new Error(`field too long: ${bytes.length} > ${len}`);
  block.set(bytes, at);
}

function putOctal(block: Uint8Array, at: number, len: number, value: number): void {
  putString(block, at, len, value.toString(8).padStart(len - 1, '0') + '\0');
}

function putBase256(block: Uint8Array, at: number, len: number, value: number): void {
  let v = BigInt(value);
  for (let i = at + len - 1; i > at; i--) {
    block[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  block[at] = 0x80;
}

/** One 512-byte header block, with a correct checksum unless told otherwise. */
export function tarHeader(spec: HeaderSpec): Buffer {
  const b = Buffer.alloc(512);
  const format = spec.format ?? 'gnu';
  putString(b, 0, 100, spec.name);
  putOctal(b, 100, 8, 0o644);
  putOctal(b, 108, 8, 0);
  putOctal(b, 116, 8, 0);
  const size = spec.size ?? 0;
  if (spec.base256 || size >= 8 ** 11) putBase256(b, 124, 12, size);
  else putOctal(b, 124, 12, size);
  putOctal(b, 136, 12, 1_700_000_000);
  b[156] = (spec.typeflag ?? '0').charCodeAt(0);
  if (spec.linkName) putString(b, 157, 100, spec.linkName);
  if (format === 'gnu') putString(b, 257, 8, 'ustar  \0');
  if (format === 'ustar') putString(b, 257, 8, 'ustar\x0000');
  if (spec.prefix) putString(b, 345, 155, spec.prefix);
  if (spec.realSize !== undefined) putOctal(b, 483, 12, spec.realSize);
  if (spec.isExtended) b[482] = 1;
  b.fill(0x20, 148, 156);
  let sum = 0;
  for (const x of b) sum += x;
  putString(b, 148, 8, spec.checksum ?? sum.toString(8).padStart(6, '0') + '\0 ');
  return b;
}

/** pax records, each `"<len> key=value\n"` with the length counting itself. */
export function paxRecords(records: [string, string][]): Buffer {
  const parts = records.map(([k, v]) => {
    const body = ` ${k}=${v}\n`;
    const bodyLen = Buffer.byteLength(body);
    let len = bodyLen + 1;
    while (String(len).length + bodyLen !== len) len = String(len).length + bodyLen;
    return Buffer.from(`${len}${body}`);
  });
  return Buffer.concat(parts);
}

/** Data padded to whole blocks. */
export function padded(data: Uint8Array): Buffer {
  const out = Buffer.alloc(Math.ceil(data.length / 512) * 512);
  out.set(data);
  return out;
}

/** A member (header + padded data), optionally preceded by a pax extended header. */
export function tarMember(spec: HeaderSpec, data: Uint8Array = new Uint8Array(0), pax?: [string, string][]): Buffer {
  const parts: Buffer[] = [];
  if (pax) {
    const p = paxRecords(pax);
    parts.push(tarHeader({ name: 'PaxHeaders/x', typeflag: 'x', size: p.length, format: 'ustar' }), padded(p));
  }
  parts.push(tarHeader({ ...spec, size: spec.size ?? data.length }), padded(data));
  return Buffer.concat(parts);
}

export const END_OF_ARCHIVE = Buffer.alloc(1024);

/** Reads from a buffer, for scanTar. */
export function bufferReader(buf: Uint8Array) {
  return (offset: number, length: number) => buf.subarray(offset, offset + length);
}
