import { Errno, NbdError, defineFilter, packageVersion, parseSize, windowDataCalls } from '@nbdx/server/api';

/** Per connection: where the window starts in the layer below, and how long it is. */
interface Handle {
  offset: number;
  size: number;
}

/** The window a configuration asks for, checked against the size of the layer below. */
export function computeWindow(offset: number, range: number | undefined, below: number): Handle {
  if (offset > below) {
    throw new NbdError(
      Errno.EINVAL,
      `offset: offset=${offset} is beyond the end of the underlying export (size ${below})`,
    );
  }
  if (range === undefined) return { offset, size: below - offset };
  if (offset + range > below) {
    throw new NbdError(
      Errno.EINVAL,
      `range: offset=${offset} + range=${range} = ${offset + range} is beyond the end of the underlying ` +
        `export (size ${below}); the largest range possible here is ${below - offset}`,
    );
  }
  return { offset, size: range };
}

/**
 * A fresh offset filter (its own configuration). The default export is one instance for the
 * command line; tests and embedders call this to get independent ones.
 */
export function createOffsetFilter() {
  let offset = 0;
  let range: number | undefined;

  return defineFilter<Handle>({
    apiVersion: 2,
    name: 'offset',
    version: packageVersion(import.meta.url),
    longname: 'nbdx offset filter',
    description: 'Serve a window (offset and length) of the underlying export.',
    configHelp: [
      'offset=SIZE          start of the window in the underlying export (default 0)',
      'range=SIZE           length of the window (default: to the end of the export)',
    ].join('\n'),
    threadModel: 'parallel',
    // No state beyond the configuration: each worker thread may have its own copy.
    workerThreads: true,

    config(next, key, value) {
      if (key === 'offset') offset = parseSize(value, 'offset');
      else if (key === 'range') range = parseSize(value, 'range');
      else return next(key, value);
    },

    dumpPlugin() {
      return { offset_filter_parameters: 'offset,range' };
    },

    open: () => ({ offset: 0, size: 0 }),

    async prepare(next, h) {
      const w = computeWindow(offset, range, await next.getSize());
      h.offset = w.offset;
      h.size = w.size;
    },

    getSize: (_next, h) => h.size,

    // Data calls: one addition each, no allocation; the core has already checked the bounds
    // against this filter's size, and checks them again below.
    ...windowDataCalls<Handle>((h) => h.offset),
  });
}

export default createOffsetFilter();
