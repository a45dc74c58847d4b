/**
 * The pieces of nbdkit's log filter format (1.32): timestamps, quoting, the Connect line's
 * capability numbers, extents and error names.
 */
import { performance } from 'node:perf_hooks';
import { EXTENT_HOLE, EXTENT_ZERO, errnoName, toErrno, type CacheMode, type Extent, type FuaMode } from '@nbdx/server/api';

let cachedSecond = -1;
let cachedPrefix = '';

/**
 * `YYYY-MM-DD HH:MM:SS.uuuuuu` in UTC, as nbdkit writes it. `epochMs` (milliseconds since the
 * epoch, fractions for the microseconds) defaults to now; the date part is reused within a second.
 */
export function timestamp(epochMs: number = performance.timeOrigin + performance.now()): string {
  const second = Math.floor(epochMs / 1000);
  if (second !== cachedSecond) {
    cachedSecond = second;
    cachedPrefix = new Date(second * 1000).toISOString().slice(0, 19).replace('T', ' ');
  }
  // A double holding milliseconds since 1970 resolves about 0.25 µs: round, not truncate.
  const micros = Math.min(999_999, Math.round((epochMs - second * 1000) * 1000));
  return `${cachedPrefix}.${String(micros).padStart(6, '0')}`;
}

const SAFE = /^[A-Za-z0-9.\-_=,:/]+$/;

/** A string as nbdkit's log shows it: bare when only safe characters, else double-quoted. */
export function shellQuote(s: string): string {
  if (SAFE.test(s)) return s;
  return `"${s.replace(/[$`\\"]/g, (c) => `\\${c}`)}"`;
}

/** `0x…` in lower-case hex, as `%x`. */
export const hex = (n: number): string => `0x${n.toString(16)}`;

/** nbdkit's numbers for FUA and cache modes: none 0, emulate 1, native 2. */
export function modeNumber(mode: FuaMode | CacheMode): number {
  return mode === 'native' ? 2 : mode === 'emulate' ? 1 : 0;
}

/** One extent list as the log shows it: `0x0 0x10000 "" 0x10000 0x1000 "hole,zero"`. */
export function formatExtents(list: readonly Extent[]): string {
  let s = '';
  for (let i = 0; i < list.length; i++) {
    const e = list[i]!;
    const kinds = e.type & EXTENT_HOLE ? (e.type & EXTENT_ZERO ? 'hole,zero' : 'hole') : e.type & EXTENT_ZERO ? 'zero' : '';
    s += `${i ? ' ' : ''}${hex(e.offset)} ${hex(e.length)} "${kinds}"`;
  }
  return s;
}

/** `return=-1 error=EIO`: the NBD error the client gets for what a layer below threw. */
export function failure(err: unknown): string {
  return `return=-1 error=${errnoName(toErrno(err))}`;
}
