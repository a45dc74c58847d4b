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
}
