/**
 * Keeps the protected region intact by construction. After mutation the fuzzer no longer knows
 * where the server will see request headers (a short WRITE payload swallows the next header, a
 * long one shifts everything), so the guard re-frames the final bytes the way a server could and
 * moves every write-class request that would touch the region, unless the request is invalid by
 * construction (beyond the end of the export, or unknown flag bits): a correct server must
 * refuse those, so if the region changes anyway, that is a finding and not a fuzzer accident.
 */
import { CF_KNOWN, CMD, OPT, decodeOptionAt, decodeRequestAt, payloadOf } from './wire.mjs';

const WRITE_CLASS = new Set([CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES]);
const MAX_BRANCHES = 32;

/**
 * Patch `buf` (one TLS epoch of client bytes) in place. Returns a list of patch descriptions.
 * @param {Buffer} buf
 * @param {{ hasClientFlags: boolean, size: bigint, regionOffset: bigint, regionLength: bigint }} o
 */
export function guardEpoch(buf, o) {
  const patches = [];
  const state = { branches: 0 };
  const rStart = o.regionOffset;
  const rEnd = o.regionOffset + o.regionLength;

  const invalidByConstruction = (h, effect) =>
    (effect > 0n && h.offset + effect > o.size) || (h.flags & ~CF_KNOWN) !== 0;

  const touches = (h, effect) => effect > 0n && h.offset < rEnd && h.offset + effect > rStart;

  const relocate = (h, effect) => {
    if (effect <= o.size - rEnd) return rEnd;
    if (effect <= rStart) return 0n;
    return o.size; // beyond the end: invalid by construction
  };

  function transmission(pos, ext) {
    if (++state.branches > MAX_BRANCHES) return;
    for (;;) {
      const h = decodeRequestAt(buf, pos, ext);
      if (!h || !h.magicOk || h.type === CMD.DISC) return;
      const pl = payloadOf(h, ext);
      // What a write-class request changes is `length` bytes from `offset` in every framing
      // (the payload length for WRITE, the effect length for TRIM and WRITE_ZEROES).
      if (WRITE_CLASS.has(h.type) && touches(h, h.length) && !invalidByConstruction(h, h.length)) {
        const to = relocate(h, h.length);
        buf.writeBigUInt64BE(to, pos + 16);
        patches.push(`moved ${ext ? 'extended ' : ''}type ${h.type} at byte ${pos} from offset ${h.offset} to ${to}`);
      }
      const next = pos + h.size;
      if (pl.ambiguous === 'extended WRITE without PAYLOAD_LEN') {
        // a server may read `length` payload bytes or none: follow both framings
        if (h.length <= BigInt(buf.length - next)) transmission(next + Number(h.length), ext);
        pos = next;
        continue;
      }
      if (pl.bytes > BigInt(buf.length - next)) return;
      pos = next + Number(pl.bytes);
    }
  }

  let pos = o.hasClientFlags ? 4 : 0;
  for (;;) {
    const h = decodeOptionAt(buf, pos);
    if (!h || !h.magicOk) break;
    const end = pos + 16 + h.length;
    if (end > buf.length) break;
    if (h.code === OPT.GO || h.code === OPT.EXPORT_NAME) {
      // The server may accept (transmission starts here, in either header style) or refuse.
      transmission(end, false);
      transmission(end, true);
    }
    if (h.code === OPT.ABORT) break;
    pos = end;
  }
  return patches;
}
