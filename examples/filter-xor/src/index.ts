/**
 * nbdx-filter-xor: every byte read or written is XORed with a one-byte key. An example of a
 * third-party filter that transforms data, and of what such a filter must take care of: zeroes
 * below it no longer read as zeroes, so it implements zero itself and hides the extents map.
 */
import { createRequire } from 'node:module';
import { Errno, FLAG_FUA, NbdError, defineFilter } from '@nbdx/server/api';

/** Our package.json sits one folder up from both src/ and dist/. */
const VERSION: string = createRequire(import.meta.url)('../package.json').version;

/** Largest write used to zero a range (zero is turned into writes of the key). */
const ZERO_CHUNK = 1 << 20;

/** `0x5a`, `5a` with a 0x, `90` → a byte. Throws NbdError(EINVAL) otherwise. */
export function parseKey(text: string): number {
  const t = text.trim();
  const n = /^0x[0-9a-f]{1,2}$/i.test(t) ? parseInt(t.slice(2), 16) : /^\d{1,3}$/.test(t) ? Number(t) : NaN;
  if (!Number.isInteger(n) || n < 0 || n > 255) {
    throw new NbdError(Errno.EINVAL, `xor: '${text}' is not a byte (0-255, or hex like 0x5a)`);
  }
  return n;
}

/** `dst[i] = src[i] ^ key` for every byte of `src` (`dst` may be `src`). */
export function xorInto(dst: Uint8Array, src: Uint8Array, key: number): void {
  for (let i = 0; i < src.length; i++) dst[i] = src[i]! ^ key;
}

/** A fresh filter object with its own configuration (tests make one per server). */
export function createXorFilter() {
  let key = 0xff;

  return defineFilter({
    apiVersion: 2,
    name: 'xor',
    version: VERSION,
    longname: 'nbdx xor filter (example)',
    description: 'XOR every byte read and written with a one-byte key.',
    configHelp: 'xor=BYTE             the key: 0-255 or hex such as 0x5a (default 0xff)',
    threadModel: 'parallel',

    // Take our key; every other key=value goes on to the layers below.
    config(next, k, value) {
      if (k === 'xor') key = parseKey(value);
      else return next(k, value);
    },
    dumpPlugin: () => ({ xor_key: key }),

    async pread(next, _h, buf, offset, flags) {
      const zeroSpans = await next.pread(buf, offset, flags);
      // Below may leave parts unfilled because they read as zero: they are zero bytes to us,
      // which become key bytes after the XOR. So fill them, then transform the whole buffer.
      if (zeroSpans) for (const s of zeroSpans) buf.fill(0, s.start, s.start + s.length);
      if (key !== 0) xorInto(buf, buf, key);
    },

    pwrite(next, _h, buf, offset, flags) {
      if (key === 0) return next.pwrite(buf, offset, flags);
      // Never change the caller's buffer: the core may still own it.
      const out = Buffer.allocUnsafe(buf.length);
      xorInto(out, buf, key);
      return next.pwrite(out, offset, flags);
    },

    // Zero below would read back as key bytes, so a zero becomes a write of the key.
    // Such a zero is never fast, so fast zero is not offered.
    canZero: (next) => next.canWrite(),
    canFastZero: () => false,
    async zero(next, _h, count, offset, flags) {
      if (key === 0) return next.zero(count, offset, flags);
      const chunk = Buffer.alloc(Math.min(count, ZERO_CHUNK), key);
      for (let done = 0; done < count; ) {
        const n = Math.min(chunk.length, count - done);
        await next.pwrite(n === chunk.length ? chunk : chunk.subarray(0, n), offset + done, flags & FLAG_FUA);
        done += n;
      }
    },

    // Holes and zero ranges below are not zero after the XOR: describe everything as data.
    canExtents: () => false,
  });
}

export default createXorFilter();
