/**
 * CRC-32 as used by GPT (and zlib, PNG, Ethernet): reflected polynomial 0xEDB88320, initial value
 * and final XOR 0xFFFFFFFF. Table-driven, one byte at a time; Node 20 has no zlib.crc32.
 */

const TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32 of `data` (optionally continuing from an earlier result `crc`). Unsigned 32-bit. */
export function crc32(data: Uint8Array, crc = 0): number {
  let c = (crc ^ 0xffffffff) >>> 0;
  for (let i = 0; i < data.length; i++) c = TABLE[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
