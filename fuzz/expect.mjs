/**
 * What the specification says about one request, given what the negotiation produced: must it
 * fail, must it succeed, or may it do either; and which error values the spec names for the
 * failure (null = any of the spec's). The oracle judges replies against this.
 */
import { CF, CMD, ERRNO, TF, hex } from './wire.mjs';

const setOf = (...xs) => new Set(xs);

/**
 * What the specification says about one request: must it fail, must it succeed, or may it do
 * either; and which error values it names (null = any of the spec's).
 */
export function classifyRequest(h, tx) {
  const f = tx.flags;
  const t = h.type;
  const fail = [];
  const either = [];
  const EINVAL = setOf(ERRNO.EINVAL);
  if (t > CMD.BLOCK_STATUS && !(t === CMD.RESIZE && f & TF.SEND_RESIZE)) {
    fail.push(['unknown command', EINVAL]);
  } else {
    let allowed = f & TF.SEND_FUA ? CF.FUA : 0; // FUA "is valid for all commands" once advertised
    if (t === CMD.READ && f & TF.SEND_DF) allowed |= CF.DF;
    if (t === CMD.WRITE && tx.ext) allowed |= CF.PAYLOAD_LEN;
    if (t === CMD.WRITE_ZEROES) allowed |= CF.NO_HOLE | (f & TF.SEND_FAST_ZERO ? CF.FAST_ZERO : 0);
    if (t === CMD.BLOCK_STATUS) allowed |= CF.REQ_ONE | (tx.ext && f & TF.BLOCK_STATUS_PAYLOAD ? CF.PAYLOAD_LEN : 0);
    const bad = h.flags & ~allowed;
    if (bad) fail.push([`flags ${hex(bad)} not valid or not advertised`, EINVAL]);
    if (t === CMD.FLUSH && !(f & TF.SEND_FLUSH)) fail.push(['FLUSH not advertised', null]);
    if (t === CMD.TRIM && !(f & TF.SEND_TRIM)) fail.push(['TRIM not advertised', null]);
    if (t === CMD.WRITE_ZEROES && !(f & TF.SEND_WRITE_ZEROES)) fail.push(['WRITE_ZEROES not advertised', null]);
    if (t === CMD.CACHE) either.push(['CACHE may fail', null]);
    if (t === CMD.BLOCK_STATUS) {
      if (!tx.contexts) fail.push(['no metadata context selected', EINVAL]);
      else if (!tx.exact) either.push(['contexts were selected for another export name', null]);
    }
    if (f & TF.READ_ONLY && (t === CMD.WRITE || t === CMD.TRIM || t === CMD.WRITE_ZEROES)) fail.push(['read-only export', setOf(ERRNO.EPERM)]);
    if (t === CMD.FLUSH) {
      if (h.offset !== 0n || h.length !== 0n) either.push(['FLUSH offset/length are reserved', null]);
    } else if (h.length === 0n) {
      either.push(['zero length (unspecified)', null]);
      if (h.offset > tx.size) either.push(['offset beyond the end', null]);
    } else {
      if (h.offset + h.length > tx.size) {
        const e = t === CMD.WRITE || t === CMD.WRITE_ZEROES ? setOf(ERRNO.ENOSPC) : t === CMD.CACHE ? null : EINVAL;
        fail.push(['beyond the end of the export', e]);
      }
      if (tx.minBlock > 1n && (h.offset % tx.minBlock || h.length % tx.minBlock)) either.push(['not aligned to the minimum block size', EINVAL]);
      const overMax = h.length > BigInt(tx.maxPayload);
      if (overMax && (t === CMD.READ || t === CMD.WRITE)) either.push(['over the maximum payload', setOf(ERRNO.EINVAL, ERRNO.EOVERFLOW)]);
      else if (overMax) either.push(['effect length over the maximum payload', setOf(ERRNO.EINVAL, ERRNO.EOVERFLOW)]);
      if (t === CMD.READ && h.flags & CF.DF && f & TF.SEND_DF && h.length > 65536n) either.push(['DF read over 64 KiB', setOf(ERRNO.EOVERFLOW)]);
    }
    if (t === CMD.WRITE_ZEROES && h.flags & CF.FAST_ZERO && f & TF.SEND_FAST_ZERO) either.push(['FAST_ZERO may be refused', setOf(ERRNO.ENOTSUP)]);
    if (t === CMD.BLOCK_STATUS && h.flags & CF.PAYLOAD_LEN) either.push(['BLOCK_STATUS payload form', null]);
  }
  const union = (list) => {
    if (list.some(([, e]) => e === null)) return null;
    const s = new Set();
    for (const [, e] of list) for (const x of e) s.add(x);
    return s;
  };
  if (fail.length) return { must: 'fail', reasons: fail.map(([r]) => r), errnos: union([...fail, ...either]) };
  if (either.length) return { must: 'either', reasons: either.map(([r]) => r), errnos: union(either) };
  return { must: 'ok', reasons: [], errnos: null };
}
