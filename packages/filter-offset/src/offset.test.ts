import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import { createOffsetFilter, computeWindow } from './index.js';
import { exportSize, nbdinfoMap, nbdxBin, needNbdx, needTools, qemuIo, run } from '@nbdx/testkit';

const M = 1024 * 1024;
const K = 1024;
const tools = needTools('qemu-io', 'qemu-img', 'nbdinfo');

describe('computeWindow', () => {
  it('defaults the range to the rest of the export', () => {
    expect(computeWindow(M, undefined, 100 * M)).toEqual({ offset: M, size: 99 * M });
    expect(computeWindow(100 * M, undefined, 100 * M)).toEqual({ offset: 100 * M, size: 0 });
  });
  it('rejects windows beyond the end with the numbers in the message', () => {
    expect(() => computeWindow(101 * M, undefined, 100 * M)).toThrow(/offset=105906176 is beyond the end.*size 104857600/);
    expect(() => computeWindow(95 * M, 10 * M, 100 * M)).toThrow(/range=10485760.*beyond the end.*largest range possible here is 5242880/);
    expect(computeWindow(90 * M, 10 * M, 100 * M)).toEqual({ offset: 90 * M, size: 10 * M });
  });
});

describe.skipIf(!tools)('offset filter over memory 100M (offset=1M range=10M)', () => {
  // One memory plugin object served twice: the same disk seen through the filter and plainly.
  const memory = createMemoryPlugin();
  let filtered: Awaited<ReturnType<typeof serve>>;
  let plain: Awaited<ReturnType<typeof serve>>;

  beforeAll(async () => {
    filtered = await serve({
      plugin: memory,
      filters: [createOffsetFilter()],
      config: [['size', '100M'], ['offset', '1M'], ['range', '10M']],
    });
    plain = await serve({ plugin: memory, config: [['size', '100M']] });
  });
  afterAll(async () => {
    await filtered?.close();
    await plain?.close();
  });

  it('has the size of the range', async () => {
    expect(await exportSize(filtered.uri)).toBe(10 * M);
    expect(await exportSize(plain.uri)).toBe(100 * M);
  });

  it('writes through the filter land at offset + 1M', async () => {
    await qemuIo(filtered.uri, 'write -P 0x5a 0 64k', `write -P 0x33 ${10 * M - 64 * K} 64k`);
    await qemuIo(
      plain.uri,
      `read -P 0x5a ${M} 64k`,
      `read -P 0x33 ${11 * M - 64 * K} 64k`,
      // untouched on both sides of the window
      `read -P 0 ${M - 64 * K} 64k`,
      `read -P 0 ${11 * M} 64k`,
      'read -P 0 0 64k',
    );
  });

  it('reads through the filter come from offset + 1M', async () => {
    await qemuIo(plain.uri, `write -P 0x77 ${3 * M} 1M`);
    await qemuIo(filtered.uri, `read -P 0x77 ${2 * M} 1M`, `read -P 0 ${M} 1M`, `read -P 0 ${3 * M} 64k`);
  });

  it('zero and trim are shifted', async () => {
    await qemuIo(plain.uri, `write -P 0x11 ${6 * M} 256k`);
    await qemuIo(filtered.uri, `write -z ${5 * M} 64k`, `discard ${5 * M + 128 * K} 64k`);
    await qemuIo(
      plain.uri,
      `read -P 0 ${6 * M} 64k`,
      `read -P 0x11 ${6 * M + 64 * K} 64k`,
      `read -P 0 ${6 * M + 128 * K} 64k`,
      `read -P 0x11 ${6 * M + 192 * K} 64k`,
    );
  });

  it('extents are shifted into the window', async () => {
    const m = await nbdinfoMap(filtered.uri);
    const data = m.filter((e) => e.type === 0).map((e) => [e.offset, e.length]);
    // Written so far, in window coordinates: [0,64k), [2M,3M), 6M-1M: 5M+64k and 5M+192k, and the last 64k.
    expect(data).toEqual([
      [0, 64 * K],
      [2 * M, M],
      [5 * M + 64 * K, 64 * K],
      [5 * M + 192 * K, 64 * K],
      [10 * M - 64 * K, 64 * K],
    ]);
    // The map covers exactly the window, contiguously.
    let pos = 0;
    for (const e of m) {
      expect(e.offset).toBe(pos);
      pos += e.length;
    }
    expect(pos).toBe(10 * M);
  });

  it('refuses requests past the end of the window and leaves the disk alone', async () => {
    await qemuIo(plain.uri, `write -P 0x44 ${11 * M} 64k`);
    const r = await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x99 ${10 * M} 64k`, filtered.uri]);
    expect(r.stdout + r.stderr).toMatch(/No space left|Invalid argument|error|failed/i);
    await qemuIo(plain.uri, `read -P 0x44 ${11 * M} 64k`);
  });
});

describe.skipIf(!tools)('offset filter errors at connect time', () => {
  it('a range beyond the underlying size fails the connection with a clear message', async () => {
    const s = await serve({
      plugin: createMemoryPlugin(),
      filters: [createOffsetFilter()],
      config: [['size', '100M'], ['offset', '95M'], ['range', '10M']],
      error: () => {},
    });
    try {
      const r = await run('qemu-img', ['info', s.uri]);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/range=10485760 = 110100480 is beyond the end of the underlying export \(size 104857600\)/);
      // The server keeps running; the refused connection is gone.
      expect(s.connectionCount).toBe(0);
    } finally {
      await s.close();
    }
  });

  it('an offset beyond the end fails the same way', async () => {
    const s = await serve({
      plugin: createMemoryPlugin(),
      filters: [createOffsetFilter()],
      config: [['size', '1M'], ['offset', '2M']],
      error: () => {},
    });
    try {
      const r = await run('qemu-img', ['info', s.uri]);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/offset=2097152 is beyond the end/);
    } finally {
      await s.close();
    }
  });

  it('bad sizes are refused at configuration time', async () => {
    await expect(
      serve({ plugin: createMemoryPlugin(), filters: [createOffsetFilter()], config: [['size', '1M'], ['offset', 'lots']] }),
    ).rejects.toThrow(/offset: could not parse 'lots' as a size/);
  });
});

// Found by name from the command line, as `--filter=offset`.
describe.skipIf(!tools || !needNbdx())('offset filter under the nbdx CLI', () => {
  it('--filter=offset memory 100M offset=1M range=10M', async () => {
    const r = await run(process.execPath, [nbdxBin(), '-U', '-', '--filter=offset', 'memory', '100M', 'offset=1M', 'range=10M', '--run', 'nbdinfo --size "$uri"']);
    expect(r.stderr).toBe('');
    expect(r.stdout.trim()).toBe(String(10 * M));
    expect(r.code).toBe(0);
  });
});
