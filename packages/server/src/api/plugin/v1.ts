import type { ExtentSource, MaybePromise } from '../common.js';
import type { PluginCommon } from './shared.js';

/**
 * Plugin API version 1: `pread` returns the bytes, data calls take no flags, `zero` takes a
 * may-trim boolean. A plugin without `apiVersion` is version 1. Version-1 plugins never see FUA
 * (the core emulates it with flush) nor fast-zero requests.
 */
export interface PluginV1<H = any> extends PluginCommon<H> {
  apiVersion?: 1;
  pread(h: H, count: number, offset: number): MaybePromise<Uint8Array>;
  pwrite?(h: H, buf: Uint8Array, offset: number): MaybePromise<void>;
  flush?(h: H): MaybePromise<void>;
  trim?(h: H, count: number, offset: number): MaybePromise<void>;
  zero?(h: H, count: number, offset: number, mayTrim: boolean): MaybePromise<void>;
  extents?(h: H, count: number, offset: number, reqOne: boolean): MaybePromise<ExtentSource>;
  cache?(h: H, count: number, offset: number): MaybePromise<void>;
}
