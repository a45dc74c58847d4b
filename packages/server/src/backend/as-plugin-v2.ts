import { FLAG_MAY_TRIM, FLAG_REQ_ONE, NbdError, Errno } from '../api/common.js';
import { unsupportedApiVersion, type Plugin } from '../api/define.js';
import type { PluginV1 } from '../api/plugin/v1.js';
import type { PluginV2 } from '../api/plugin/v2.js';

/**
 * The one place where older plugin API versions are adapted upward: the rest of the core only
 * ever sees a PluginV2.
 */
export function asPluginV2(plugin: Plugin): PluginV2 {
  const version = plugin.apiVersion ?? 1;
  const unsupported = unsupportedApiVersion('plugin', version);
  if (unsupported) throw new NbdError(Errno.EINVAL, `plugin '${plugin.name}' ${unsupported}`);
  if (version === 2) return plugin as PluginV2;
  return fromV1(plugin as PluginV1);
}

function fromV1(p: PluginV1): PluginV2 {
  // Only the lifecycle and capability callbacks carry over as they are.
  const { pread: _r, pwrite: _w, flush: _f, trim: _t, zero: _z, extents: _e, cache: _c, apiVersion: _v, ...common } = p;
  const v2: PluginV2 = {
    ...common,
    apiVersion: 2,
    async pread(h, buf, offset) {
      const data = await p.pread(h, buf.length, offset);
      if (data.length < buf.length) {
        throw new NbdError(Errno.EIO, `${p.name}: pread returned ${data.length} bytes, expected ${buf.length}`);
      }
      buf.set(data.length === buf.length ? data : data.subarray(0, buf.length));
    },
    // Version 1 knows no FUA: never native, emulated by flush when the plugin can flush.
    canFua: async (h) => {
      const mode = p.canFua ? await p.canFua(h) : p.flush ? 'emulate' : 'none';
      return mode === 'native' ? 'emulate' : mode;
    },
    // Version 1 never sees fast-zero requests; without a zero callback the core's emulation
    // fails fast, so that case can still be advertised.
    canFastZero: async () => !p.zero,
  };
  v2.pwrite = p.pwrite ? (h, buf, offset) => p.pwrite!(h, buf, offset) : undefined;
  v2.flush = p.flush ? (h) => p.flush!(h) : undefined;
  v2.trim = p.trim ? (h, count, offset) => p.trim!(h, count, offset) : undefined;
  v2.zero = p.zero ? (h, count, offset, flags) => p.zero!(h, count, offset, (flags & FLAG_MAY_TRIM) !== 0) : undefined;
  v2.extents = p.extents
    ? (h, count, offset, flags) => p.extents!(h, count, offset, (flags & FLAG_REQ_ONE) !== 0)
    : undefined;
  v2.cache = p.cache ? (h, count, offset) => p.cache!(h, count, offset) : undefined;
  return v2;
}
