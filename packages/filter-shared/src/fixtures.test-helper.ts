/**
 * A test plugin that records what happens to it: opens (with their flags), closes, and data calls
 * that overlap in time. Each handle owns a private copy of the disk, like a plugin whose handle is
 * a connection to an upstream: two handles never see each other's writes. So a write being
 * visible from another connection proves both are served from one handle.
 */
import { Errno, NbdError, definePlugin, type ThreadModel } from '@nbdx/server/api';

export interface Recorder {
  opens: Array<{ id: number; readonly: boolean; exportName: string }>;
  closes: number[];
  inFlight: number;
  maxInFlight: number;
  calls: number;
  /** Handles whose data calls fail with this error (set by a test to simulate a dead upstream). */
  broken: Map<number, () => Error>;
  /** Make open fail this many more times. */
  failOpens: number;
  /** open(readonly=false) fails: a source that cannot be opened for writing. */
  refuseReadWrite: boolean;
}

export interface RecordingHandle {
  id: number;
  disk: Buffer;
}
type H = RecordingHandle;

export interface RecordingOptions {
  threadModel?: ThreadModel;
  size?: number;
  exports?: string[];
  /** Milliseconds each data call takes (gives requests the chance to overlap). */
  delayMs?: number;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export function createRecordingPlugin(opts: RecordingOptions = {}) {
  const size = opts.size ?? 1 << 20;
  const rec: Recorder = {
    opens: [],
    closes: [],
    inFlight: 0,
    maxInFlight: 0,
    calls: 0,
    broken: new Map(),
    failOpens: 0,
    refuseReadWrite: false,
  };
  let nextId = 1;

  async function call<T>(h: H, fn: () => T): Promise<T> {
    const broken = rec.broken.get(h.id);
    if (broken) throw broken();
    rec.calls++;
    rec.inFlight++;
    rec.maxInFlight = Math.max(rec.maxInFlight, rec.inFlight);
    try {
      if (opts.delayMs) await sleep(opts.delayMs);
      else await Promise.resolve();
      return fn();
    } finally {
      rec.inFlight--;
    }
  }

  const plugin = definePlugin<H>({
    apiVersion: 2,
    name: 'recording',
    threadModel: opts.threadModel ?? 'parallel',
    listExports: () => opts.exports ?? [''],
    defaultExport: () => (opts.exports ?? [''])[0]!,
    open(readonly, exportName) {
      if (rec.failOpens > 0) {
        rec.failOpens--;
        throw new NbdError(Errno.EIO, 'recording: the upstream is not reachable');
      }
      if (!readonly && rec.refuseReadWrite) throw new NbdError(Errno.EPERM, 'recording: cannot open for writing');
      if (opts.exports && !opts.exports.includes(exportName)) {
        throw new NbdError(Errno.EINVAL, `recording: no export '${exportName}'`);
      }
      const id = nextId++;
      rec.opens.push({ id, readonly, exportName });
      return { id, disk: Buffer.alloc(size) };
    },
    close(h) {
      rec.closes.push(h.id);
    },
    getSize: () => size,
    canWrite: () => true,
    canFlush: () => true,
    canMultiConn: () => false,
    pread: (h, buf, offset) => call(h, () => void h.disk.copy(buf, 0, offset, offset + buf.length)),
    pwrite: (h, buf, offset) => call(h, () => void h.disk.set(buf, offset)),
    flush: (h) => call(h, () => {}),
  });
  return { plugin, rec };
}
