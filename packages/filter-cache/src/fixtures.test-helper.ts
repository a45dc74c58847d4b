/**
 * A test plugin for the cache filter (not built): a disk in memory that counts what reaches it,
 * can be slow, can fail reads in a range, and whose bytes the test reads directly to see what
 * the cache has written below.
 */
import { Errno, NbdError, definePlugin } from '@nbdx/server/api';

export interface BelowStats {
  reads: number;
  bytesRead: number;
  writes: number;
  bytesWritten: number;
  flushes: number;
  /** [offset, length] of every read, in the order they arrived. */
  readLog: Array<[number, number]>;
}

export interface CountingOptions {
  /** Milliseconds every read waits before answering. */
  readDelay?: number;
  /** Reads touching [failFrom, failTo) fail with EIO. */
  failFrom?: number;
  failTo?: number;
}

export function createCountingPlugin(bytes: Buffer, options: CountingOptions = {}) {
  const stats: BelowStats = { reads: 0, bytesRead: 0, writes: 0, bytesWritten: 0, flushes: 0, readLog: [] };
  const plugin = definePlugin({
    apiVersion: 2,
    name: 'counting',
    threadModel: 'parallel',
    open: () => ({}),
    getSize: () => bytes.length,
    canWrite: () => true,
    canFlush: () => true,
    canTrim: () => true,
    canZero: () => true,
    canMultiConn: () => true,
    async pread(_h, buf, offset) {
      stats.reads++;
      stats.bytesRead += buf.length;
      stats.readLog.push([offset, buf.length]);
      if (options.readDelay) await new Promise((r) => setTimeout(r, options.readDelay));
      const { failFrom, failTo } = options;
      if (failFrom !== undefined && failTo !== undefined && offset < failTo && offset + buf.length > failFrom) {
        throw new NbdError(Errno.EIO, `injected read error at ${offset}`);
      }
      buf.set(bytes.subarray(offset, offset + buf.length));
    },
    pwrite(_h, buf, offset) {
      stats.writes++;
      stats.bytesWritten += buf.length;
      bytes.set(buf, offset);
    },
    flush() {
      stats.flushes++;
    },
    trim(_h, count, offset) {
      bytes.fill(0, offset, offset + count);
    },
    zero(_h, count, offset) {
      bytes.fill(0, offset, offset + count);
    },
  });
  return { plugin, stats, bytes };
}
