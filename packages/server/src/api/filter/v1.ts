import type { BlockSize, FuaMode, MaybePromise, ReadResult } from '../common.js';
import type { FilterCommon } from './shared.js';
import type { Next } from './next.js';

/**
 * Filter API version 1: read, write, flush and trim, with flags. A version-1 filter knows nothing
 * of zero, extents or cache, so the core never passes those through it: zero is emulated by
 * writes through the filter, extents are masked (the whole range reads as data) and cache is
 * emulated by reads through the filter. That keeps an old offset-shifting filter from zeroing or
 * describing the wrong bytes.
 */
export interface FilterV1<H = any> extends FilterCommon<H> {
  apiVersion?: 1;
  getSize?(next: Next, h: H): MaybePromise<number | bigint>;
  blockSize?(next: Next, h: H): MaybePromise<BlockSize | undefined>;
  exportDescription?(next: Next, h: H): MaybePromise<string | undefined>;
  canWrite?(next: Next, h: H): MaybePromise<boolean>;
  canFlush?(next: Next, h: H): MaybePromise<boolean>;
  isRotational?(next: Next, h: H): MaybePromise<boolean>;
  canTrim?(next: Next, h: H): MaybePromise<boolean>;
  canFua?(next: Next, h: H): MaybePromise<FuaMode>;
  canMultiConn?(next: Next, h: H): MaybePromise<boolean>;
  pread?(next: Next, h: H, buf: Uint8Array, offset: number, flags: number): MaybePromise<ReadResult>;
  pwrite?(next: Next, h: H, buf: Uint8Array, offset: number, flags: number): MaybePromise<void>;
  flush?(next: Next, h: H, flags: number): MaybePromise<void>;
  trim?(next: Next, h: H, count: number, offset: number, flags: number): MaybePromise<void>;
}
