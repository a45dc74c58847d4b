import { Errno, NbdError, debug, logError, tagLayer, type ExportEntry } from '../api/common.js';
import { unsupportedApiVersion, type Filter } from '../api/define.js';
import type { LayerBelow, Next, NextOpener, OpenContextOptions, OwnedContext, ReopenOptions } from '../api/filter/next.js';
import type { FilterV2 } from '../api/filter/v2.js';
import { Context, type ZeroMode } from './context.js';
import { Mutex } from './mutex.js';
import { toExportEntries, type PluginLayer } from './plugin-layer.js';

export type Layer = FilterLayer | PluginLayer;

/**
 * A filter in the chain. Filters of API version 1 know nothing of zero, extents or cache: for
 * them those methods are never passed through (see FilterContext).
 */
export class FilterLayer {
  readonly kind = 'filter';
  readonly filter: FilterV2;
  readonly declaredVersion: number;
  /** Set by the backend once the thread model is known: contexts opened by filters get a lock. */
  ownedContextLock = false;

  constructor(
    readonly original: Filter,
    readonly below: Layer,
  ) {
    const version = original.apiVersion ?? 1;
    const unsupported = unsupportedApiVersion('filter', version);
    if (unsupported) throw new NbdError(Errno.EINVAL, `filter '${original.name}' ${unsupported}`);
    this.declaredVersion = version;
    this.filter = original as FilterV2;
  }

  get name(): string {
    return this.filter.name;
  }

  /** The layer below as seen from outside any connection. */
  readonly belowApi: LayerBelow = {
    listExports: (readonly, isTls) => this.below.listExports(readonly, isTls),
    defaultExport: (readonly, isTls) => this.below.defaultExport(readonly, isTls),
    openContext: (options?: OpenContextOptions) => this.openOwned(options ?? {}),
  };

  private async openOwned(options: OpenContextOptions): Promise<OwnedContext> {
    const readonly = options.readonly ?? false;
    const isTls = options.isTls ?? false;
    const exportName = options.exportName ?? (await this.below.defaultExport(readonly, isTls));
    const ctx = await this.below.open(readonly, exportName, isTls);
    // A context shared by many connections needs its own lock when requests must be serialised.
    if (this.ownedContextLock) ctx.lock = new Mutex();
    return ctx;
  }

  async listExports(readonly: boolean, isTls: boolean): Promise<ExportEntry[]> {
    if (this.filter.listExports) {
      return toExportEntries(await this.filter.listExports(this.belowApi, readonly, isTls));
    }
    return this.below.listExports(readonly, isTls);
  }

  async defaultExport(readonly: boolean, isTls: boolean): Promise<string> {
    if (this.filter.defaultExport) return this.filter.defaultExport(this.belowApi, readonly, isTls);
    return this.below.defaultExport(readonly, isTls);
  }

  async open(readonly: boolean, exportName: string, isTls: boolean, signal?: AbortSignal): Promise<Context> {
    let next: Context | Next | undefined;
    let owned = false;
    // What the context below was opened with, for reopening it the same way (Next.reopen).
    const belowArgs: BelowArgs = { readonly, exportName, isTls, signal };
    const opener: NextOpener = {
      ...this.belowApi,
      signal,
      open: async (ro = readonly, name = exportName) => {
        if (next) throw new NbdError(Errno.EINVAL, `${this.name}: the layer below is already open`);
        next = await this.below.open(ro, name, isTls, signal);
        owned = true;
        belowArgs.readonly = ro;
        belowArgs.exportName = name;
      },
      use: (ctx: Next) => {
        if (next) throw new NbdError(Errno.EINVAL, `${this.name}: the layer below is already open`);
        next = ctx;
      },
    };
    let h: unknown = {};
    try {
      if (this.filter.open) h = await this.filter.open(opener, readonly, exportName, isTls);
      if (!next) await opener.open();
      const ctx = new FilterContext(this, h, next!, owned ? belowArgs : null, readonly, exportName, signal);
      try {
        await this.filter.prepare?.(next!, h, readonly);
        await ctx.prepare();
      } catch (err) {
        await ctx.close();
        throw err;
      }
      return ctx;
    } catch (err) {
      // Closing is idempotent, so this is safe even when the filter context already closed it.
      if (next && owned) await (next as Context).close().catch(() => {});
      // An error from the layers below already carries their name; anything else is this filter's.
      throw tagLayer(err, this.name);
    }
  }
}

/** The arguments the core opened a filter's context below with. */
interface BelowArgs {
  readonly: boolean;
  exportName: string;
  isTls: boolean;
  signal: AbortSignal | undefined;
}

export class FilterContext extends Context {
  private readonly f: FilterV2;
  private readonly v2: boolean;
  private readonly ownsNext: boolean;
  /** The context below; replaced by Next.reopen, so every call reads it afresh. */
  next: Next;
  private reopening: Promise<Context> | null = null;
  private shutting = false;

  constructor(
    private readonly layer: FilterLayer,
    private readonly h: unknown,
    next: Next,
    /** Set when the core opened `next` (then this context owns it and may reopen it). */
    private readonly belowArgs: BelowArgs | null,
    readonly: boolean,
    exportName: string,
    signal?: AbortSignal,
  ) {
    super(layer.name, readonly, exportName, signal);
    this.f = layer.filter;
    this.v2 = layer.declaredVersion >= 2;
    this.next = next;
    this.ownsNext = belowArgs !== null;
    if (belowArgs) (next as Context).reopener = this.replaceNext;
  }

  /** Next.reopen for the context below this one (see the interface for the rules). */
  private readonly replaceNext = async (from: Context, options?: ReopenOptions): Promise<Context> => {
    if (this.reopening) return this.reopening;
    if (this.shutting) throw new NbdError(Errno.ESHUTDOWN, `${this.who}: the connection is closing`);
    if (from !== this.next) return this.next as Context;
    const args = this.belowArgs!;
    if (args.signal?.aborted) throw args.signal.reason;
    this.reopening = (async () => {
      const ro = options?.readonly ?? args.readonly;
      const fresh = await this.layer.below.open(ro, args.exportName, args.isTls, args.signal);
      if (fresh.size !== from.size) {
        await fresh.close().catch(() => {});
        throw tagLayer(
          new NbdError(Errno.EIO, `${this.who}: reopened the layer below, but its size changed from ${from.size} to ${fresh.size}`),
          this.who,
        );
      }
      fresh.reopener = this.replaceNext;
      args.readonly = ro;
      this.next = fresh;
      debug(this.who, `reopened the layer below${ro ? ' (read-only)' : ''}`);
      // Requests still in flight on the old context fail as it closes; their callers retry too.
      await from.close().catch((err: unknown) => {
        logError(this.who, `closing the replaced context below: ${(err as Error).message}`);
      });
      return fresh;
    })();
    try {
      return await this.reopening;
    } finally {
      this.reopening = null;
    }
  };

  protected implGetSize() {
    return this.f.getSize ? this.f.getSize(this.next, this.h) : this.next.getSize();
  }
  protected implBlockSize() {
    return this.f.blockSize ? this.f.blockSize(this.next, this.h) : this.next.blockSize();
  }
  protected implExportDescription() {
    return this.f.exportDescription ? this.f.exportDescription(this.next, this.h) : this.next.exportDescription();
  }
  protected implCanWrite() {
    return this.f.canWrite ? this.f.canWrite(this.next, this.h) : this.next.canWrite();
  }
  protected implCanFlush() {
    return this.f.canFlush ? this.f.canFlush(this.next, this.h) : this.next.canFlush();
  }
  protected implIsRotational() {
    return this.f.isRotational ? this.f.isRotational(this.next, this.h) : this.next.isRotational();
  }
  protected implCanTrim() {
    return this.f.canTrim ? this.f.canTrim(this.next, this.h) : this.next.canTrim();
  }
  protected async implZeroMode(): Promise<ZeroMode> {
    // A version-1 filter does not know zero: emulate it with writes through the filter.
    if (!this.v2) return 'emulate';
    const can = this.f.canZero ? await this.f.canZero(this.next, this.h) : await this.next.canZero();
    if (!can) return 'none';
    return 'native';
  }
  protected implCanFastZero(zeroMode: ZeroMode) {
    if (zeroMode === 'emulate') return true;
    return this.f.canFastZero ? this.f.canFastZero(this.next, this.h) : this.next.canFastZero();
  }
  protected implCanExtents() {
    // Masked for version-1 filters: extents passed through unshifted would describe other bytes.
    if (!this.v2) return false;
    return this.f.canExtents ? this.f.canExtents(this.next, this.h) : this.next.canExtents();
  }
  protected implCanFua() {
    return this.f.canFua ? this.f.canFua(this.next, this.h) : this.next.canFua();
  }
  protected implCanMultiConn() {
    return this.f.canMultiConn ? this.f.canMultiConn(this.next, this.h) : this.next.canMultiConn();
  }
  protected async implCanCache() {
    if (this.v2 && this.f.canCache) return this.f.canCache(this.next, this.h);
    const below = await this.next.canCache();
    // A version-1 filter would pass cache through unshifted: read through it instead.
    if (!this.v2 && below !== 'none') return 'emulate';
    return below;
  }
  protected implPread(buf: Uint8Array, offset: number, flags: number) {
    return this.f.pread ? this.f.pread(this.next, this.h, buf, offset, flags) : this.next.pread(buf, offset, flags);
  }
  // Views only where the filter passes them through on purpose (FilterV2.readView).
  protected override implReadView(count: number, offset: number) {
    return this.v2 && this.f.readView ? this.f.readView(this.next, this.h, count, offset) : undefined;
  }
  protected override implWriteView(count: number, offset: number) {
    return this.v2 && this.f.writeView ? this.f.writeView(this.next, this.h, count, offset) : undefined;
  }
  protected override implReleaseView(view: Uint8Array, completed: boolean) {
    this.next.releaseView?.(view, completed);
  }
  protected implPwrite(buf: Uint8Array, offset: number, flags: number) {
    return this.f.pwrite ? this.f.pwrite(this.next, this.h, buf, offset, flags) : this.next.pwrite(buf, offset, flags);
  }
  protected implFlush(flags: number) {
    return this.f.flush ? this.f.flush(this.next, this.h, flags) : this.next.flush(flags);
  }
  protected implTrim(count: number, offset: number, flags: number) {
    return this.f.trim ? this.f.trim(this.next, this.h, count, offset, flags) : this.next.trim(count, offset, flags);
  }
  protected implZero(count: number, offset: number, flags: number) {
    return this.f.zero ? this.f.zero(this.next, this.h, count, offset, flags) : this.next.zero(count, offset, flags);
  }
  protected implExtents(count: number, offset: number, flags: number) {
    return this.f.extents ? this.f.extents(this.next, this.h, count, offset, flags) : this.next.extents(count, offset, flags);
  }
  protected implCache(count: number, offset: number, flags: number) {
    return this.f.cache ? this.f.cache(this.next, this.h, count, offset, flags) : this.next.cache(count, offset, flags);
  }
  protected async implClose() {
    try {
      await this.f.finalize?.(this.next, this.h);
    } finally {
      try {
        await this.f.close?.(this.h);
      } finally {
        if (this.ownsNext) {
          // A reopen under way finishes first, so the context it opens is the one closed here.
          this.shutting = true;
          await this.reopening?.catch(() => {});
          await (this.next as Context).close();
        }
      }
    }
  }
}
