import type { CacheMode, ExtentSource, MaybePromise } from '../common.js';
import type { Next } from './next.js';
import type { FilterV1 } from './v1.js';

/**
 * Filter API version 2 (current): version 1 plus zero, extents and cache, and their
 * capabilities. Whatever a filter does not implement passes through to the layer below.
 */
export interface FilterV2<H = any> extends Omit<FilterV1<H>, 'apiVersion'> {
  apiVersion: 2;
  canZero?(next: Next, h: H): MaybePromise<boolean>;
  canFastZero?(next: Next, h: H): MaybePromise<boolean>;
  canExtents?(next: Next, h: H): MaybePromise<boolean>;
  canCache?(next: Next, h: H): MaybePromise<CacheMode>;
  zero?(next: Next, h: H, count: number, offset: number, flags: number): MaybePromise<void>;
  extents?(next: Next, h: H, count: number, offset: number, flags: number): MaybePromise<ExtentSource>;
  cache?(next: Next, h: H, count: number, offset: number, flags: number): MaybePromise<void>;
  /**
   * Optional, for filters that only move requests (a window at an offset, a delay of zero): pass
   * the plugin's views through, so READ replies are still sent from the plugin's memory and WRITE
   * payloads received into it (see PluginV2.readView / writeView). Return
   * `next.readView?.(count, shiftedOffset)`, or undefined to have the request go through
   * `pread` (and `pwrite`) as usual. A WRITE received into such a view is still passed to your
   * `pwrite`, with the view as its buffer, so forward it as you would any other. The core gives
   * every view back to the layer below when it is done with it; filters do not see that. Not
   * for filters that change, check or count the bytes: they would be bypassed for READs.
   */
  readView?(next: Next, h: H, count: number, offset: number): Uint8Array | undefined;
  writeView?(next: Next, h: H, count: number, offset: number): Uint8Array | undefined;
}
