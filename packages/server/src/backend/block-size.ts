import { Errno, NbdError, type BlockSize } from '../api/common.js';

/** The largest minimum block size the NBD specification allows. */
export const MAX_MINIMUM_BLOCK_SIZE = 64 * 1024;
/** The largest preferred block size we accept from a layer (nbdkit's limit too). */
const MAX_PREFERRED_BLOCK_SIZE = 32 * 1024 * 1024;
/** A maximum of this value means "no limit" (the server's payload limit then applies). */
export const NO_MAXIMUM = 0xffffffff;

const isPowerOfTwo = (n: number) => Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;

/**
 * Check a layer's declared block sizes against the specification's rules, so a bad declaration
 * is an error naming the layer at open, never a value passed on to clients:
 * minimum a power of two up to 64 KiB, preferred a power of two from 512 to 32 MiB, at least the
 * minimum, maximum at least the preferred size and a multiple of the minimum (or 0xffffffff).
 */
export function checkBlockSize(who: string, b: BlockSize | undefined): BlockSize | undefined {
  if (b === undefined || b === null) return undefined;
  const { minimum, preferred, maximum } = b;
  const bad = (why: string) =>
    new NbdError(Errno.EINVAL, `${who} declares block sizes minimum ${minimum}, preferred ${preferred}, maximum ${maximum}, which are not valid: ${why}`);
  if (![minimum, preferred, maximum].every((n) => Number.isInteger(n) && n > 0 && n <= NO_MAXIMUM)) {
    throw bad('each must be a whole number from 1 to 2^32-1');
  }
  if (!isPowerOfTwo(minimum) || minimum > MAX_MINIMUM_BLOCK_SIZE) throw bad('the minimum must be a power of two up to 64 KiB');
  if (!isPowerOfTwo(preferred) || preferred < 512 || preferred > MAX_PREFERRED_BLOCK_SIZE) {
    throw bad('the preferred size must be a power of two from 512 to 32 MiB');
  }
  if (preferred < minimum) throw bad('the preferred size must be at least the minimum');
  if (maximum !== NO_MAXIMUM) {
    if (maximum < preferred) throw bad('the maximum must be at least the preferred size');
    if (maximum % minimum !== 0) throw bad('the maximum must be a multiple of the minimum');
  }
  return { minimum, preferred, maximum };
}

/**
 * What the server advertises and enforces: the top layer's sizes with the maximum capped by the
 * server's payload limit (rounded down to a multiple of the minimum), and the preferred size no
 * larger than that maximum. `maxPayload` is at least 64 KiB (see checkMaxPayload), so the
 * result is always a valid triple.
 */
export function advertisedBlockSize(b: BlockSize | undefined, maxPayload: number): BlockSize {
  const minimum = b?.minimum ?? 1;
  let maximum = Math.min(b?.maximum ?? NO_MAXIMUM, maxPayload);
  maximum -= maximum % minimum;
  let preferred = b?.preferred ?? Math.max(4096, minimum);
  while (preferred > maximum && preferred > minimum) preferred /= 2;
  return { minimum, preferred, maximum };
}

/** The smallest and largest --max-payload: every valid layer declaration still fits. */
export const MIN_MAX_PAYLOAD = MAX_MINIMUM_BLOCK_SIZE;
export const MAX_MAX_PAYLOAD = 1024 * 1024 * 1024;

/** Throws unless `n` is a usable payload limit (the message names the option). */
export function checkMaxPayload(n: number, what = 'maxPayload'): number {
  if (!Number.isInteger(n) || n < MIN_MAX_PAYLOAD || n > MAX_MAX_PAYLOAD) {
    throw new NbdError(Errno.EINVAL, `${what}: ${n} is not between 64K and 1G (the largest minimum block size a plugin may declare is 64K)`);
  }
  return n;
}
