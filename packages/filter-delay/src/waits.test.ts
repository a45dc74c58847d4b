import { getEventListeners } from 'node:events';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { Errno, NbdError, type Next } from '@nbdx/server/api';
import { createDelayFilter } from './index.js';
import { Waits } from './waits.js';

describe('Waits', () => {
  it('sleeps with a timer and resolves', async () => {
    const w = new Waits();
    const t = Date.now();
    await w.sleep(50);
    expect(Date.now() - t).toBeGreaterThanOrEqual(45);
    expect(w.size).toBe(0);
  });

  it('an abort ends every pending wait at once with ESHUTDOWN, and later ones immediately', async () => {
    const ac = new AbortController();
    const w = new Waits(ac.signal);
    const waits = Array.from({ length: 50 }, () => w.sleep(60_000));
    expect(w.size).toBe(50);
    // One listener for the whole connection, however many waits (no MaxListeners warning).
    expect(getEventListeners(ac.signal, 'abort').length).toBe(1);
    const t = Date.now();
    ac.abort(new NbdError(Errno.ESHUTDOWN, 'the client disconnected'));
    const results = await Promise.allSettled(waits);
    expect(Date.now() - t).toBeLessThan(100);
    for (const r of results) {
      expect(r.status).toBe('rejected');
      const err = (r as PromiseRejectedResult).reason as NbdError;
      expect(err.errno).toBe(Errno.ESHUTDOWN);
      expect(err.message).toBe('delay cut short: the client disconnected');
    }
    expect(w.size).toBe(0);
    await expect(w.sleep(10)).rejects.toMatchObject({ errno: Errno.ESHUTDOWN });
  });

  it('cancelAll works without a signal (close/unload)', async () => {
    const w = new Waits();
    const p = w.sleep(60_000);
    w.cancelAll('the server is shutting down');
    await expect(p).rejects.toThrow('delay cut short: the server is shutting down');
  });
});

describe('zero delay: a direct call through', () => {
  afterEach(() => vi.restoreAllMocks());

  it('returns the layer below\'s own promise and starts no timer', async () => {
    const f = createDelayFilter();
    const setTimeoutSpy = vi.spyOn(globalThis, 'setTimeout');
    const below = Promise.resolve(undefined);
    const next = {
      pread: () => below,
      pwrite: () => below,
      zero: () => below,
      trim: () => below,
      cache: () => below,
      extents: () => below,
    } as unknown as Next;
    const h = await f.open!({ signal: new AbortController().signal } as never, false, '', false);
    const buf = new Uint8Array(16);
    expect(f.pread!(next, h, buf, 0, 0)).toBe(below);
    expect(f.pwrite!(next, h, buf, 0, 0)).toBe(below);
    expect(f.zero!(next, h, 16, 0, 0)).toBe(below);
    expect(f.trim!(next, h, 16, 0, 0)).toBe(below);
    expect(f.cache!(next, h, 16, 0, 0)).toBe(below);
    expect(f.extents!(next, h, 16, 0, 0)).toBe(below);
    expect(setTimeoutSpy).not.toHaveBeenCalled();
  });

  it('with a delay, the call below waits for the timer', async () => {
    const f = createDelayFilter();
    await f.config!(async () => {}, 'rdelay', '40ms');
    let called = 0;
    const next = { pread: async () => void called++ } as unknown as Next;
    const h = await f.open!({} as never, false, '', false);
    const t = Date.now();
    const p = f.pread!(next, h, new Uint8Array(1), 0, 0);
    expect(called).toBe(0);
    await p;
    expect(called).toBe(1);
    expect(Date.now() - t).toBeGreaterThanOrEqual(35);
  });

  it('passes unknown keys on and refuses bad values', async () => {
    const f = createDelayFilter();
    const passed: string[] = [];
    await f.config!(async (k) => void passed.push(k), 'size', '1M');
    expect(passed).toEqual(['size']);
    await expect(Promise.resolve().then(() => f.config!(async () => {}, 'delay-fast-zero', 'maybe'))).rejects.toThrow(
      /delay-fast-zero: could not parse 'maybe' as a boolean/,
    );
  });
});
