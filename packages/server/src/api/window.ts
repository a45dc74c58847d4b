import type { Extent } from './common.js';
import type { FilterV2 } from './filter/v2.js';

type WindowCalls<H> = Required<
  Pick<FilterV2<H>, 'pread' | 'pwrite' | 'trim' | 'zero' | 'cache' | 'extents' | 'readView' | 'writeView'>
>;

/**
 * The data calls of a filter that serves a window of the layer below starting at a byte offset
 * (offset, partition): each call is passed on shifted, extents are shifted back. Spread the
 * result into the filter and give it `getSize` for the window's length; the core checks bounds
 * against that size before any of these run.
 */
export function windowDataCalls<H>(offsetOf: (h: H) => number): WindowCalls<H> {
  return {
    pread: (next, h, buf, off, flags) => next.pread(buf, off + offsetOf(h), flags),
    pwrite: (next, h, buf, off, flags) => next.pwrite(buf, off + offsetOf(h), flags),
    trim: (next, h, count, off, flags) => next.trim(count, off + offsetOf(h), flags),
    zero: (next, h, count, off, flags) => next.zero(count, off + offsetOf(h), flags),
    cache: (next, h, count, off, flags) => next.cache(count, off + offsetOf(h), flags),
    // The plugin's views, shifted like everything else (replies sent from its memory).
    readView: (next, h, count, off) => next.readView?.(count, off + offsetOf(h)),
    writeView: (next, h, count, off) => next.writeView?.(count, off + offsetOf(h)),
    async extents(next, h, count, off, flags) {
      const shift = offsetOf(h);
      const list: Extent[] = await next.extents(count, off + shift, flags);
      // The list is a fresh one made for this call (normalised by the core): shift it in place.
      for (const e of list) e.offset -= shift;
      return list;
    },
  };
}
