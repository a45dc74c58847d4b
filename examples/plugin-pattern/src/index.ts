/**
 * nbdx-plugin-pattern: a read-only disk whose bytes repeat a short pattern from offset 0.
 * An example of a third-party plugin: it depends only on the published core's API module.
 */
import { createRequire } from 'node:module';
import { EXTENT_HOLE, EXTENT_ZERO, Errno, NbdError, definePlugin, parseSize } from '@nbdx/server/api';

/** Our package.json sits one folder up from both src/ and dist/. */
const VERSION: string = createRequire(import.meta.url)('../package.json').version;

/** Longest pattern accepted, in bytes. */
export const MAX_PATTERN = 4096;
/** The tile copied into read buffers: the pattern repeated to at least this many bytes. */
const TILE_TARGET = 64 * 1024;

/** `deadbeef` or `0xDE,AD,BE,EF` → bytes. Throws NbdError(EINVAL) with a message naming the value. */
export function parsePattern(text: string): Buffer {
  const hex = text.trim().replace(/^0x/i, '').replace(/[\s,:]/g, '');
  if (hex === '' || hex.length % 2 !== 0 || !/^[0-9a-f]+$/i.test(hex)) {
    throw new NbdError(Errno.EINVAL, `pattern: '${text}' is not an even number of hex digits (example: pattern=deadbeef)`);
  }
  if (hex.length / 2 > MAX_PATTERN) {
    throw new NbdError(Errno.EINVAL, `pattern: ${hex.length / 2} bytes is longer than the ${MAX_PATTERN} allowed`);
  }
  return Buffer.from(hex, 'hex');
}

/** Fill `buf` with the bytes at `offset` of an endless repetition of `tile` (whose length is a multiple of the pattern's). */
export function fillPattern(buf: Uint8Array, offset: number, tile: Buffer, patternLength: number): void {
  let pos = 0;
  let phase = offset % patternLength;
  while (pos < buf.length) {
    const n = Math.min(buf.length - pos, tile.length - phase);
    buf.set(tile.subarray(phase, phase + n), pos);
    pos += n;
    phase = (phase + n) % patternLength;
  }
}

/** A fresh plugin object with its own configuration (tests make one per server). */
export function createPatternPlugin() {
  let size: number | undefined;
  let pattern: Buffer = Buffer.from([0x55, 0xaa]);
  let tile = pattern;
  let allZero = false;

  return definePlugin({
    apiVersion: 2,
    name: 'pattern',
    version: VERSION,
    longname: 'nbdx pattern plugin (example)',
    description: 'A read-only disk filled with a repeating byte pattern.',
    magicConfigKey: 'size',
    configHelp: [
      'size=SIZE            (required) size of the disk: 1G, 512M, or bytes',
      'pattern=HEX          the bytes to repeat, in hex, up to 4096 bytes (default 55aa)',
    ].join('\n'),
    threadModel: 'parallel',

    config(key, value) {
      if (key === 'size') size = parseSize(value, 'size');
      else if (key === 'pattern') pattern = parsePattern(value);
      else throw new NbdError(Errno.EINVAL, `unknown parameter '${key}' (pattern takes size= and pattern=)`);
    },
    configComplete() {
      if (size === undefined) throw new NbdError(Errno.EINVAL, 'size is required: nbdx pattern SIZE (e.g. 1G)');
    },
    getReady() {
      allZero = pattern.every((b) => b === 0);
      const copies = Math.max(1, Math.ceil(TILE_TARGET / pattern.length));
      tile = Buffer.concat(Array.from({ length: copies }, () => pattern));
    },
    dumpPlugin: () => ({ pattern_max_length: MAX_PATTERN }),

    // Stateless: every connection reads the same bytes, so no handle and any number of clients.
    getSize: () => size!,
    canMultiConn: () => true,
    isRotational: () => false,

    pread(_h, buf, offset) {
      // An all-zero pattern needs no copying: report the whole buffer as zeroes.
      if (allZero) return [{ start: 0, length: buf.length }];
      fillPattern(buf, offset, tile, pattern.length);
    },

    extents(_h, count, offset) {
      return [{ offset, length: count, type: allZero ? EXTENT_HOLE | EXTENT_ZERO : 0 }];
    },
  });
}

export default createPatternPlugin();
