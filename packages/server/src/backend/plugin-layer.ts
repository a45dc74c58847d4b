import { tagLayer, type ExportEntry, type ThreadModel } from '../api/common.js';
import type { Plugin } from '../api/define.js';
import type { PluginV2 } from '../api/plugin/v2.js';
import { asPluginV2 } from './as-plugin-v2.js';
import { Context, type ZeroMode } from './context.js';

export function toExportEntries(list: readonly (ExportEntry | string)[]): ExportEntry[] {
  return list.map((e) => (typeof e === 'string' ? { name: e } : { name: e.name, description: e.description }));
}

export function threadModelOf(x: { threadModel?: ThreadModel | (() => ThreadModel) }): ThreadModel {
  const t = typeof x.threadModel === 'function' ? x.threadModel() : x.threadModel;
  return t ?? 'parallel';
}

/** The bottom of the chain: a plugin, always seen through the version-2 interface. */
export class PluginLayer {
  readonly kind = 'plugin';
  readonly plugin: PluginV2;
  readonly declaredVersion: number;

  constructor(readonly original: Plugin) {
    this.plugin = asPluginV2(original);
    this.declaredVersion = original.apiVersion ?? 1;
  }

  get name(): string {
    return this.plugin.name;
  }

  async listExports(readonly: boolean, isTls: boolean): Promise<ExportEntry[]> {
    if (this.plugin.listExports) return toExportEntries(await this.plugin.listExports(readonly, isTls));
    return [{ name: await this.defaultExport(readonly, isTls) }];
  }

  async defaultExport(readonly: boolean, isTls: boolean): Promise<string> {
    return this.plugin.defaultExport ? await this.plugin.defaultExport(readonly, isTls) : '';
  }

  async open(readonly: boolean, exportName: string, isTls: boolean, signal?: AbortSignal): Promise<Context> {
    let h: unknown = {};
    try {
      if (this.plugin.open) h = await this.plugin.open(readonly, exportName, isTls);
    } catch (err) {
      throw tagLayer(err, this.plugin.name);
    }
    const ctx = new PluginContext(this.plugin, h, readonly, exportName, signal);
    try {
      await ctx.prepare();
    } catch (err) {
      await ctx.close();
      throw tagLayer(err, this.plugin.name);
    }
    return ctx;
  }
}

export class PluginContext extends Context {
  constructor(
    private readonly p: PluginV2,
    private readonly h: unknown,
    readonly: boolean,
    exportName: string,
    signal?: AbortSignal,
  ) {
    super(p.name, readonly, exportName, signal);
  }

  protected implGetSize() {
    return this.p.getSize(this.h);
  }
  protected implBlockSize() {
    return this.p.blockSize?.(this.h);
  }
  protected implExportDescription() {
    return this.p.exportDescription?.(this.h);
  }
  protected implCanWrite() {
    return this.p.canWrite ? this.p.canWrite(this.h) : !!this.p.pwrite;
  }
  protected implCanFlush() {
    return this.p.canFlush ? this.p.canFlush(this.h) : !!this.p.flush;
  }
  protected implIsRotational() {
    return this.p.isRotational ? this.p.isRotational(this.h) : false;
  }
  protected implCanTrim() {
    return this.p.canTrim ? this.p.canTrim(this.h) : !!this.p.trim;
  }
  protected async implZeroMode(): Promise<ZeroMode> {
    // Zeroing is always possible on a writable export: natively, or by writing zeroes.
    if (!this.p.zero) return 'emulate';
    const can = this.p.canZero ? await this.p.canZero(this.h) : true;
    return can ? 'native' : 'emulate';
  }
  protected implCanFastZero(zeroMode: ZeroMode) {
    // Emulated zeroes are never fast, so a fast-zero request fails at once: that is "fast".
    if (this.p.canFastZero) return this.p.canFastZero(this.h);
    return zeroMode === 'emulate';
  }
  protected implCanExtents() {
    return this.p.canExtents ? this.p.canExtents(this.h) : !!this.p.extents;
  }
  protected implCanFua() {
    return this.p.canFua ? this.p.canFua(this.h) : this.p.flush ? 'emulate' : 'none';
  }
  protected implCanMultiConn() {
    return this.p.canMultiConn ? this.p.canMultiConn(this.h) : false;
  }
  protected implCanCache() {
    return this.p.canCache ? this.p.canCache(this.h) : this.p.cache ? 'native' : 'none';
  }
  protected implPread(buf: Uint8Array, offset: number, flags: number) {
    return this.p.pread(this.h, buf, offset, flags);
  }
  protected override implReadView(count: number, offset: number) {
    return this.p.readView?.(this.h, count, offset);
  }
  protected override implWriteView(count: number, offset: number) {
    return this.p.writeView?.(this.h, count, offset);
  }
  protected override implReleaseView(view: Uint8Array, completed: boolean) {
    this.p.releaseView?.(this.h, view, completed);
  }
  protected implPwrite(buf: Uint8Array, offset: number, flags: number) {
    return this.p.pwrite!(this.h, buf, offset, flags);
  }
  protected implFlush(flags: number) {
    return this.p.flush!(this.h, flags);
  }
  protected implTrim(count: number, offset: number, flags: number) {
    return this.p.trim!(this.h, count, offset, flags);
  }
  protected implZero(count: number, offset: number, flags: number) {
    return this.p.zero!(this.h, count, offset, flags);
  }
  protected implExtents(count: number, offset: number, flags: number) {
    return this.p.extents!(this.h, count, offset, flags);
  }
  protected implCache(count: number, offset: number, flags: number) {
    return this.p.cache!(this.h, count, offset, flags);
  }
  protected async implClose() {
    await this.p.close?.(this.h);
  }
}
