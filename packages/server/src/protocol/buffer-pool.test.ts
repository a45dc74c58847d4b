import { describe, expect, it } from 'vitest';
import { bufferPool } from './buffer-pool.js';

const MiB = 1024 * 1024;

describe('buffer pool: big buffers', () => {
  it('a smaller big request reuses a pooled bigger buffer, as a view of its start', () => {
    const a = bufferPool.get(8 * MiB);
    bufferPool.put(a);
    const b = bufferPool.get(5 * MiB + 17);
    expect(b.length).toBe(5 * MiB + 17);
    expect(b.buffer).toBe(a.buffer);
    expect(b.byteOffset).toBe(0);
    // Handed back as a view, it is pooled whole again.
    bufferPool.put(b);
    const c = bufferPool.get(8 * MiB);
    expect(c.buffer).toBe(a.buffer);
    expect(c.length).toBe(8 * MiB);
  });

  it('keeps at most two, preferring the biggest', () => {
    const bufs = [4, 6, 12].map((n) => bufferPool.get(n * MiB));
    for (const b of bufs) bufferPool.put(b);
    const x = bufferPool.get(4 * MiB);
    const y = bufferPool.get(4 * MiB);
    const got = [x.buffer, y.buffer];
    expect(got).toContain(bufs[1]!.buffer);
    expect(got).toContain(bufs[2]!.buffer);
    // The 6 MiB one is the best fit for the first request.
    expect(x.buffer).toBe(bufs[1]!.buffer);
    expect(bufferPool.get(4 * MiB).buffer).not.toBe(bufs[0]!.buffer);
  });

  it('never takes buffers it did not make', () => {
    const foreign = Buffer.allocUnsafeSlow(8 * MiB);
    bufferPool.put(foreign);
    expect(bufferPool.get(8 * MiB).buffer).not.toBe(foreign.buffer);
  });
});
