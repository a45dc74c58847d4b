import type { ExtentSource, MaybePromise, ReadResult } from '../common.js';
import type { PluginCommon } from './shared.js';

/**
 * Plugin API version 2 (current). `pread` fills the caller's buffer (and may instead report
 * parts of it as zero, see ZeroSpan); every data call takes flags (FLAG_FUA, FLAG_MAY_TRIM,
 * FLAG_FAST_ZERO, FLAG_REQ_ONE).
 *
 * A `zero` that cannot honour the request throws NbdError(ENOTSUP): without FLAG_FAST_ZERO the
 * core then writes zeroes itself; with it the client gets ENOTSUP.
 *
 * Buffers passed to `pread` and `pwrite` belong to the core and are reused once the call has
 * returned (or its promise settled): copy what must outlive the call.
 */
export interface PluginV2<H = any> extends PluginCommon<H> {
  apiVersion: 2;
  pread(h: H, buf: Uint8Array, offset: number, flags: number): MaybePromise<ReadResult>;
  pwrite?(h: H, buf: Uint8Array, offset: number, flags: number): MaybePromise<void>;
  flush?(h: H, flags: number): MaybePromise<void>;
  trim?(h: H, count: number, offset: number, flags: number): MaybePromise<void>;
  zero?(h: H, count: number, offset: number, flags: number): MaybePromise<void>;
  extents?(h: H, count: number, offset: number, flags: number): MaybePromise<ExtentSource>;
  cache?(h: H, count: number, offset: number, flags: number): MaybePromise<void>;
}
