import {
  Errno,
  FLAG_FAST_ZERO,
  FLAG_FUA,
  FLAG_MAY_TRIM,
  FLAG_REQ_ONE,
  NbdError,
  isNotSupported,
  tagLayer,
  type BlockSize,
  type CacheMode,
  type Extent,
  type ExtentSource,
  type FuaMode,
  type ReadResult,
} from '../api/common.js';
import type { Next, OwnedContext, ReopenOptions } from '../api/filter/next.js';
import { checkBlockSize } from './block-size.js';
import { normalizeExtents } from './extents.js';
import { yieldIfBusy } from './fair-turns.js';
import type { Mutex } from './mutex.js';

/** Zeroes written when a layer cannot zero natively. Never handed to anything that writes into it. */
const ZERO_CHUNK_SIZE = 1024 * 1024;
let zeroChunk: Buffer | undefined;
function zeroes(n: number): Buffer {
  zeroChunk ??= Buffer.alloc(ZERO_CHUNK_SIZE);
  return zeroChunk.subarray(0, n);
}

export type ZeroMode = 'none' | 'emulate' | 'native';

const NEVER_ABORTED = new AbortController().signal;

/**
 * One open context of one layer (plugin or filter). This is where the core's rules live, so every
 * layer gets them whether a client or a filter above is calling: bounds checks, read-only
 * enforcement, capabilities computed once, FUA emulated by flush, zero emulated by writes, cache
 * emulated by reads, extents normalised, and the thread-model lock for contexts shared between
 * connections.
 */
export abstract class Context implements OwnedContext {
  /** Size in bytes, fetched once when the context is opened. */
  size = 0;
  /** Set for contexts shared between connections when the thread model serialises requests. */
  lock: Mutex | null = null;
  private caps = new Map<string, Promise<unknown>>();
  private closed = false;
  /**
   * Set by the filter context above when the core opened this context for it: replaces this
   * context below that filter by a fresh one (see Next.reopen).
   */
  reopener: ((from: Context, options?: ReopenOptions) => Promise<Context>) | null = null;

  constructor(
    readonly who: string,
    readonly readonly: boolean,
    readonly exportName: string,
    /** The connection's abort signal (see Next.signal); contexts outside connections get one never aborted. */
    readonly signal: AbortSignal = NEVER_ABORTED,
  ) {}

  // ---- what each kind of layer provides ------------------------------------------------------
  protected abstract implGetSize(): Promise<number | bigint> | number | bigint;
  protected abstract implBlockSize(): Promise<BlockSize | undefined> | BlockSize | undefined;
  protected abstract implExportDescription(): Promise<string | undefined> | string | undefined;
  protected abstract implCanWrite(): Promise<boolean> | boolean;
  protected abstract implCanFlush(): Promise<boolean> | boolean;
  protected abstract implIsRotational(): Promise<boolean> | boolean;
  protected abstract implCanTrim(): Promise<boolean> | boolean;
  /** Whether zero requests may be sent at all, and whether this layer does them itself. */
  protected abstract implZeroMode(): Promise<ZeroMode> | ZeroMode;
  protected abstract implCanFastZero(zeroMode: ZeroMode): Promise<boolean> | boolean;
  protected abstract implCanExtents(): Promise<boolean> | boolean;
  protected abstract implCanFua(): Promise<FuaMode> | FuaMode;
  protected abstract implCanMultiConn(): Promise<boolean> | boolean;
  protected abstract implCanCache(): Promise<CacheMode> | CacheMode;
  protected abstract implPread(buf: Uint8Array, offset: number, flags: number): Promise<ReadResult> | ReadResult;
  /** A view of this layer's own memory for a READ reply or a WRITE payload (plugins only, see PluginV2.readView). */
  protected implReadView(_count: number, _offset: number): Uint8Array | undefined {
    return undefined;
  }
  protected implWriteView(_count: number, _offset: number): Uint8Array | undefined {
    return undefined;
  }
  protected implReleaseView(_view: Uint8Array, _completed: boolean): void {}
  protected abstract implPwrite(buf: Uint8Array, offset: number, flags: number): Promise<void> | void;
  protected abstract implFlush(flags: number): Promise<void> | void;
  protected abstract implTrim(count: number, offset: number, flags: number): Promise<void> | void;
  protected abstract implZero(count: number, offset: number, flags: number): Promise<void> | void;
  protected abstract implExtents(count: number, offset: number, flags: number): Promise<ExtentSource> | ExtentSource;
  protected abstract implCache(count: number, offset: number, flags: number): Promise<void> | void;
  protected abstract implClose(): Promise<void>;

  /** Called once after open: fetch and check the size. */
  async prepare(): Promise<void> {
    const raw = await this.implGetSize();
    const size = typeof raw === 'bigint' ? Number(raw) : raw;
    if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) {
      throw new NbdError(
        Errno.EIO,
        `${this.who}: get_size returned ${String(raw)}; sizes must be whole numbers from 0 to 2^53-1`,
      );
    }
    this.size = size;
    // A bad block size declaration fails the open, naming the layer (block-size.ts).
    await this.blockSize();
    // What the hot paths need, resolved once so that reads and writes take no extra turns.
    this.writable = await this.canWrite();
    this.fuaMode = await this.canFua();
  }

  /** Set by prepare(): whether writes are allowed, and how FUA is done. */
  private writable = false;
  private fuaMode: FuaMode = 'none';

  reopen(options?: ReopenOptions): Promise<Next> {
    if (!this.reopener) {
      return Promise.reject(
        new NbdError(Errno.ENOTSUP, `${this.who}: only the context the core opened below a filter can be reopened`),
      );
    }
    return this.reopener(this, options);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.implClose();
  }

  // ---- capabilities, each computed once per context ----------------------------------------
  private cap<T>(key: string, compute: () => Promise<T> | T): Promise<T> {
    let p = this.caps.get(key) as Promise<T> | undefined;
    if (!p) {
      p = Promise.resolve().then(compute);
      this.caps.set(key, p);
    }
    return p;
  }

  getSize(): Promise<number> {
    return Promise.resolve(this.size);
  }
  blockSize(): Promise<BlockSize | undefined> {
    return this.cap('blockSize', async () => checkBlockSize(this.who, await this.implBlockSize()));
  }
  exportDescription(): Promise<string | undefined> {
    return this.cap('description', () => this.implExportDescription());
  }
  canWrite(): Promise<boolean> {
    return this.cap('write', async () => !this.readonly && !!(await this.implCanWrite()));
  }
  canFlush(): Promise<boolean> {
    return this.cap('flush', async () => !!(await this.implCanFlush()));
  }
  isRotational(): Promise<boolean> {
    return this.cap('rotational', async () => !!(await this.implIsRotational()));
  }
  canTrim(): Promise<boolean> {
    return this.cap('trim', async () => (await this.canWrite()) && !!(await this.implCanTrim()));
  }
  zeroMode(): Promise<ZeroMode> {
    return this.cap('zeroMode', async () => ((await this.canWrite()) ? await this.implZeroMode() : 'none'));
  }
  async canZero(): Promise<boolean> {
    return (await this.zeroMode()) !== 'none';
  }
  canFastZero(): Promise<boolean> {
    return this.cap('fastZero', async () => {
      const mode = await this.zeroMode();
      return mode !== 'none' && !!(await this.implCanFastZero(mode));
    });
  }
  canExtents(): Promise<boolean> {
    return this.cap('extents', async () => !!(await this.implCanExtents()));
  }
  canFua(): Promise<FuaMode> {
    return this.cap('fua', async () => {
      if (!(await this.canWrite())) return 'none';
      const mode = await this.implCanFua();
      if (mode === 'emulate' && !(await this.canFlush())) return 'none';
      return mode;
    });
  }
  canMultiConn(): Promise<boolean> {
    return this.cap('multiConn', async () => !!(await this.implCanMultiConn()));
  }
  canCache(): Promise<CacheMode> {
    return this.cap('cache', () => this.implCanCache());
  }

  // ---- data calls ------------------------------------------------------------------------------
  private locked<T>(fn: () => Promise<T>): Promise<T> {
    // Not a hot path (flush, trim, zero, extents, cache, FUA writes): the errors it passes get
    // this layer's name unless a layer below named them first.
    return (this.lock ? this.lock.run(fn) : fn()).catch((err: unknown) => {
      throw tagLayer(err, this.who);
    });
  }

  /**
   * For calls that may work a while without I/O (extents, trim, zero, cache over big ranges):
   * once the event loop has been busy long enough in this turn, wait for the next one, so that
   * many of them in a row do not keep other connections waiting (fair-turns.ts).
   */
  private lockedCostly<T>(fn: () => Promise<T>): Promise<T> {
    return this.locked(async () => {
      const turn = yieldIfBusy();
      if (turn) await turn;
      return fn();
    });
  }

  private checkRange(count: number, offset: number, errno: number, what: string): void {
    if (!(offset >= 0 && count >= 0 && offset + count <= this.size)) {
      throw new NbdError(errno, `${what} beyond the end: offset ${offset} + ${count} > size ${this.size}`);
    }
  }

  /** Uses the answer prepare() cached, so it costs no promise. */
  private checkWritable(what: string): void {
    if (!this.writable) throw new NbdError(Errno.EPERM, `${what}: the export is read-only`);
  }

  // pread and pwrite are the hot paths: no async wrappers, checks done inline. The *Now forms
  // answer without any promise when the layer below answered at once (a synchronous plugin), so
  // a request to an in-memory disk is parsed, served and answered in one go; they may throw.
  // Errors thrown at once are named after this layer; a promise that fails later is not wrapped
  // (that would cost a promise per request): the connection names the plugin for those.
  preadNow(buf: Uint8Array, offset: number, flags = 0): ReadResult | Promise<ReadResult> {
    this.checkRange(buf.length, offset, Errno.EINVAL, 'read');
    if (this.lock) return this.locked(async () => this.implPread(buf, offset, flags));
    try {
      return this.implPread(buf, offset, flags);
    } catch (err) {
      throw tagLayer(err, this.who);
    }
  }

  /**
   * The bytes of a READ as a view of the layer's own memory, sent without a copy; undefined when
   * the layer has none to give (then preadNow). Never under a lock: the bytes are read when the
   * socket sends them, which a lock could not cover.
   */
  readView(count: number, offset: number): Uint8Array | undefined {
    if (this.lock) return undefined;
    this.checkRange(count, offset, Errno.EINVAL, 'read');
    const v = this.implReadView(count, offset);
    return v && v.byteLength === count ? v : undefined;
  }

  /** Where a WRITE's payload belongs in the layer's own memory (then pwriteNow with it), or undefined. */
  writeView(count: number, offset: number): Uint8Array | undefined {
    if (this.lock) return undefined;
    this.checkWritable('write');
    this.checkRange(count, offset, Errno.ENOSPC, 'write');
    const v = this.implWriteView(count, offset);
    return v && v.byteLength === count ? v : undefined;
  }

  /** The core is done with a view from readView/writeView (see PluginV2.releaseView). */
  releaseView(view: Uint8Array, completed: boolean): void {
    try {
      this.implReleaseView(view, completed);
    } catch (err) {
      throw tagLayer(err, this.who);
    }
  }

  pwriteNow(buf: Uint8Array, offset: number, flags = 0): void | Promise<void> {
    this.checkWritable('write');
    this.checkRange(buf.length, offset, Errno.ENOSPC, 'write');
    if (this.lock || (flags & FLAG_FUA && this.fuaMode !== 'native')) {
      return this.locked(() => this.pwriteUnlocked(buf, offset, flags));
    }
    try {
      return this.implPwrite(buf, offset, flags);
    } catch (err) {
      throw tagLayer(err, this.who);
    }
  }

  pread(buf: Uint8Array, offset: number, flags = 0): Promise<ReadResult> {
    try {
      return Promise.resolve(this.preadNow(buf, offset, flags));
    } catch (err) {
      return Promise.reject(err);
    }
  }

  pwrite(buf: Uint8Array, offset: number, flags = 0): Promise<void> {
    try {
      return Promise.resolve(this.pwriteNow(buf, offset, flags));
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private async pwriteUnlocked(buf: Uint8Array, offset: number, flags: number): Promise<void> {
    const fua = await this.splitFua(flags);
    await this.implPwrite(buf, offset, fua.flags);
    if (fua.flushAfter) await this.implFlush(0);
  }

  /** FUA is passed on where the layer does it natively, otherwise replaced by a flush after. */
  private async splitFua(flags: number): Promise<{ flags: number; flushAfter: boolean }> {
    if (!(flags & FLAG_FUA)) return { flags, flushAfter: false };
    const mode = await this.canFua();
    if (mode === 'native') return { flags, flushAfter: false };
    return { flags: flags & ~FLAG_FUA, flushAfter: mode === 'emulate' };
  }

  async flush(flags = 0): Promise<void> {
    if (!(await this.canFlush())) throw new NbdError(Errno.EINVAL, 'flush: not supported by this export');
    return this.locked(async () => this.implFlush(flags));
  }

  async trim(count: number, offset: number, flags = 0): Promise<void> {
    this.checkWritable('trim');
    if (!(await this.canTrim())) throw new NbdError(Errno.EINVAL, 'trim: not supported by this export');
    this.checkRange(count, offset, Errno.EINVAL, 'trim');
    return this.lockedCostly(async () => {
      const fua = await this.splitFua(flags);
      await this.implTrim(count, offset, fua.flags);
      if (fua.flushAfter) await this.implFlush(0);
    });
  }

  async zero(count: number, offset: number, flags = 0): Promise<void> {
    this.checkWritable('zero');
    const mode = await this.zeroMode();
    if (mode === 'none') throw new NbdError(Errno.EINVAL, 'zero: not supported by this export');
    this.checkRange(count, offset, Errno.ENOSPC, 'zero');
    const fast = (flags & FLAG_FAST_ZERO) !== 0;
    if (fast && !(await this.canFastZero())) {
      throw new NbdError(Errno.ENOTSUP, 'zero: a fast zero is not possible here');
    }
    return this.lockedCostly(async () => {
      const fua = await this.splitFua(flags);
      if (mode === 'native') {
        try {
          await this.implZero(count, offset, fua.flags);
          if (fua.flushAfter) await this.implFlush(0);
          return;
        } catch (err) {
          if (!isNotSupported(err) || fast) throw err;
        }
      }
      // Emulation by writes is never fast.
      if (fast) throw new NbdError(Errno.ENOTSUP, 'zero: a fast zero is not possible here');
      const writeFlags = fua.flags & ~(FLAG_MAY_TRIM | FLAG_FAST_ZERO | FLAG_FUA);
      for (let done = 0; done < count; ) {
        const n = Math.min(ZERO_CHUNK_SIZE, count - done);
        await this.implPwrite(zeroes(n), offset + done, writeFlags);
        done += n;
      }
      if ((flags & FLAG_FUA) && (await this.canFlush())) await this.implFlush(0);
    });
  }

  async extents(count: number, offset: number, flags = 0): Promise<Extent[]> {
    this.checkRange(count, offset, Errno.EINVAL, 'extents');
    const reqOne = (flags & FLAG_REQ_ONE) !== 0;
    if (count === 0) return [];
    if (!(await this.canExtents())) return [{ offset, length: count, type: 0 }];
    return this.lockedCostly(async () =>
      normalizeExtents(await this.implExtents(count, offset, flags), offset, count, reqOne, this.who),
    );
  }

  async cache(count: number, offset: number, flags = 0): Promise<void> {
    this.checkRange(count, offset, Errno.EINVAL, 'cache');
    const mode = await this.canCache();
    if (mode === 'none') return;
    return this.lockedCostly(async () => {
      if (mode === 'native') return this.implCache(count, offset, flags);
      // Emulate by reading and discarding, in bounded pieces.
      const scratch = Buffer.allocUnsafe(Math.min(count, 4 * 1024 * 1024));
      for (let done = 0; done < count; ) {
        const n = Math.min(scratch.length, count - done);
        await this.implPread(scratch.subarray(0, n), offset + done, 0);
        done += n;
      }
    });
  }
}
