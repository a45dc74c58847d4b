import { Errno, NbdError, debug, defineFilter, logError, packageVersion, parseSize, windowDataCalls, type Next } from '@nbdx/server/api';
import { SECTOR_SIZES, findPartition, type Partition } from './table.js';

export { findPartition, PartitionError, type Partition, type ReadFn } from './table.js';
export { crc32 } from './crc32.js';

interface Handle {
  /** Byte offset and length of the partition, set by prepare. */
  offset: number;
  size: number;
  part: Partition | null;
}

/** How the partition is named to clients (NBD export description). */
export function describePartition(p: Partition): string {
  const what = p.scheme === 'gpt' ? 'GPT' : p.logical ? 'MBR logical' : 'MBR primary';
  const name = p.name ? ` "${p.name}"` : '';
  return (
    `partition ${p.number}${name} (${what}, type ${p.type}, ` +
    `offset ${p.offset}, ${p.length} bytes, ${p.sectorSize}-byte sectors)`
  );
}

function parsePartitionNumber(value: string): number {
  const t = value.trim();
  const n = /^\d+$/.test(t) ? Number(t) : NaN;
  if (!Number.isSafeInteger(n) || n < 1) {
    throw new NbdError(Errno.EINVAL, `partition: '${value}' is not a partition number (1, 2, ...; logical MBR partitions are 5 and up)`);
  }
  return n;
}

function parseSectorSize(value: string): number {
  let n: number;
  try {
    n = parseSize(value, 'partition-sectorsize'); // so 4k works as well as 4096
  } catch {
    n = NaN;
  }
  if (!(SECTOR_SIZES as readonly number[]).includes(n)) {
    throw new NbdError(Errno.EINVAL, `partition-sectorsize: '${value}' must be 512 or 4096 (4k)`);
  }
  return n;
}

/** The sector size for this connection: the parameter, else the layer's minimum block size, else auto. */
async function sectorSizeFor(next: Next, configured: number | undefined): Promise<number | 'auto'> {
  if (configured) return configured;
  const bs = await next.blockSize();
  if (bs && (SECTOR_SIZES as readonly number[]).includes(bs.minimum)) return bs.minimum;
  return 'auto';
}

/**
 * A fresh partition filter (its own configuration). The default export is one instance for the
 * command line; tests and embedders call this to get independent ones.
 */
export function createPartitionFilter() {
  let partition: number | undefined;
  let sectorSize: number | undefined;

  return defineFilter<Handle>({
    apiVersion: 2,
    name: 'partition',
    version: packageVersion(import.meta.url),
    longname: 'nbdx partition filter',
    description: 'Serve one partition of an MBR or GPT partitioned disk.',
    configHelp: [
      'partition=N              (required) partition to serve: 1-4 primary or 5+ logical (MBR), entry N (GPT)',
      'partition-sectorsize=512|4096  sector size of the table (default: the minimum block size of the',
      '                         layer below when it is 512 or 4096, else 512, probing 4096 for GPT)',
    ].join('\n'),
    threadModel: 'parallel',
    // Per-connection state only: each worker thread may have its own copy.
    workerThreads: true,

    config(next, key, value) {
      if (key === 'partition') partition = parsePartitionNumber(value);
      else if (key === 'partition-sectorsize') sectorSize = parseSectorSize(value);
      else return next(key, value);
    },

    async configComplete(next) {
      if (partition === undefined) {
        throw new NbdError(Errno.EINVAL, 'partition: the partition=N parameter is required (e.g. partition=1)');
      }
      await next();
    },

    dumpPlugin() {
      return { partition_schemes: 'mbr,gpt', partition_sector_sizes: '512,4096' };
    },

    open: () => ({ offset: 0, size: 0, part: null }),

    async prepare(next, h) {
      const size = await next.getSize();
      const read = async (offset: number, length: number) => {
        // Zero-filled, so parts the layer below reports as holes need no filling.
        const buf = Buffer.alloc(length);
        await next.pread(buf, offset, 0);
        return buf;
      };
      const p = await findPartition(read, size, partition!, { sectorSize: await sectorSizeFor(next, sectorSize) });
      if (p.warning) logError('partition', p.warning);
      debug('partition', `serving ${describePartition(p)}`);
      h.part = p;
      h.offset = p.offset;
      h.size = p.length;
    },

    getSize: (_next, h) => h.size,
    exportDescription: (_next, h) => describePartition(h.part!),

    ...windowDataCalls<Handle>((h) => h.offset),
  });
}

export default createPartitionFilter();
