import { describe, expect, it } from 'vitest';
import { alignmentBits, fixed, formatReport, humanRate, humanSize, newStats, sizeBits } from './report.js';
import { parseThreshold } from './index.js';

const K = 1024;
const M = 1024 * 1024;

describe('bucketing', () => {
  it('size bucket is floor(log2(size))', () => {
    expect(sizeBits(1)).toBe(0);
    expect(sizeBits(512)).toBe(9);
    expect(sizeBits(1000)).toBe(9);
    expect(sizeBits(4095)).toBe(11);
    expect(sizeBits(4096)).toBe(12);
    expect(sizeBits(2 ** 32 - 1)).toBe(31);
    expect(sizeBits(2 ** 32)).toBe(32);
    expect(sizeBits(3 * 2 ** 40)).toBe(41);
  });
  it('alignment is the trailing zero bits of the offset, -1 for offset 0', () => {
    expect(alignmentBits(0)).toBe(-1);
    expect(alignmentBits(1)).toBe(0);
    expect(alignmentBits(513)).toBe(0);
    expect(alignmentBits(4096)).toBe(12);
    expect(alignmentBits(3 * 4096)).toBe(12);
    expect(alignmentBits(2 ** 31)).toBe(31);
    expect(alignmentBits(2 ** 32)).toBe(32);
    expect(alignmentBits(5 * 2 ** 40)).toBe(40);
    expect(alignmentBits(2 ** 52 + 2 ** 33)).toBe(33);
  });
});

describe('number formatting as printf', () => {
  it('%.Nf rounds exact ties to even, like glibc', () => {
    expect(fixed(0.25, 1)).toBe('0.2');
    expect(fixed(0.75, 1)).toBe('0.8');
    expect(fixed(12.25, 1)).toBe('12.2');
    expect(fixed(2.5, 0)).toBe('2');
    expect(fixed(3.5, 0)).toBe('4');
    expect(fixed(9.5, 0)).toBe('10');
    // 0.15 is really 0.1499999…: not a tie.
    expect(fixed(0.15, 1)).toBe('0.1');
    expect(fixed(100, 1)).toBe('100.0');
    // 0.0000125 is really 0.0000125000000000000006…: above the tie.
    expect(fixed(0.0000125, 6)).toBe('0.000013');
  });
  it('sizes and rates as nbdkit prints them', () => {
    expect(humanSize(0)).toBe('0 bytes');
    expect(humanSize(1000)).toBe('1000 bytes');
    expect(humanSize(1024)).toBe('1.00 KiB');
    expect(humanSize(400.5 * K)).toBe('400.50 KiB');
    expect(humanSize(1.5 * M)).toBe('1.50 MiB');
    expect(humanSize(25.13 * 1024 * M)).toBe('25.13 GiB');
    expect(humanRate(4096, 0)).toBe('(n/a)');
    expect(humanRate(4096, 1000)).toBe('4.00 KiB');
    // bytes per second are truncated to whole bytes first
    expect(humanRate(1000, 3000)).toBe('333 bytes');
  });
  it('statsthreshold takes a whole percentage from 0 to 100', () => {
    expect(parseThreshold('95')).toBe(0.95);
    expect(parseThreshold('0')).toBe(0);
    expect(parseThreshold('100')).toBe(1);
    expect(() => parseThreshold('101')).toThrow('statsthreshold must be between 0 and 100 (percent)');
    expect(() => parseThreshold('9.5')).toThrow(/could not parse '9.5'/);
    expect(() => parseThreshold('-1')).toThrow(/could not parse/);
  });
});

/** The workload of the end-to-end test, recorded directly. */
function sampleStats() {
  const s = newStats();
  for (let i = 0; i < 20; i++) s.read.record(4 * K, i * 4 * K, 0.001, true);
  for (let i = 0; i < 5; i++) s.read.record(64 * K, M + i * 64 * K, 0.001, true);
  s.read.record(512, 512, 0.001, true);
  for (let i = 0; i < 7; i++) s.write.record(8 * K, i * 8 * K, 0.002, true);
  s.write.record(1000, 513, 0.002, true);
  s.flush.record(0, 0, 0.001, true);
  return s;
}

describe('the report', () => {
  it('has nbdkit 1.32 layout: totals, per-operation lines, size and alignment breakdowns', () => {
    const text = formatReport(sampleStats(), 2000, 0.95);
    expect(text).toBe(
      [
        'total: 35 ops, 2.000000 s, 457.48 KiB, 228.74 KiB/s',
        'read: 26 ops, 0.000026 s, 400.50 KiB, 14.69 GiB/s op, 200.25 KiB/s total',
        '  Request size and alignment breakdown:',
        '    12 bits: 76.9% (20 reqs, 80.00 KiB total)',
        '         12 bit aligned: 100.0% (20)',
        '         13 bit aligned:  50.0% (10)',
        '         14 bit aligned:  25.0% (5)',
        '         15 bit aligned:  15.0% (3)',
        '         16 bit aligned:  10.0% (2)',
        '    16 bits: 19.2% (5 reqs, 320.00 KiB total)',
        '         16 bit aligned: 100.0% (5)',
        '         17 bit aligned:  60.0% (3)',
        '         18 bit aligned:  40.0% (2)',
        '         20 bit aligned:  20.0% (1)',
        '    other sizes:  3.8% (1 reqs, 512 bytes total)',
        '',
        'write: 8 ops, 0.000016 s, 56.98 KiB, 3.40 GiB/s op, 28.49 KiB/s total',
        '  Request size and alignment breakdown:',
        '    13 bits: 87.5% (7 reqs, 56.00 KiB total)',
        '         13 bit aligned: 100.0% (7)',
        '         14 bit aligned:  57.1% (4)',
        '         15 bit aligned:  28.6% (2)',
        '    other sizes: 12.5% (1 reqs, 1000 bytes total)',
        '',
        'flush: 1 ops, 0.000001 s, 0 bytes, 0 bytes/s op, 0 bytes/s total',
        '',
      ].join('\n'),
    );
  });

  it('statsthreshold=100 lists every size; 0 lists none', () => {
    const all = formatReport(sampleStats(), 1000, 1);
    expect(all).toContain('     9 bits:  3.8% (1 reqs, 512 bytes total)');
    expect(all).toContain('         9 bit aligned: 100.0% (1)');
    expect(all).not.toContain('other sizes');
    const none = formatReport(sampleStats(), 1000, 0);
    expect(none).not.toContain('breakdown');
    expect(none.split('\n').filter(Boolean)).toHaveLength(4);
  });

  it('alignments below the threshold end with an N+ line', () => {
    const s = newStats();
    for (let i = 0; i < 96; i++) s.read.record(4 * K, (2 * i + 1) * 4 * K, 0, true);
    for (let i = 1; i <= 4; i++) s.read.record(4 * K, i * M, 0, true);
    const lines = formatReport(s, 1000, 0.95).split('\n');
    expect(lines.slice(3, 7)).toEqual([
      '    12 bits: 100.0% (100 reqs, 400.00 KiB total)',
      '         12 bit aligned: 100.0% (100)',
      '         20+ bit-aligned:  4.0% (4)',
      '',
    ]);
  });

  it('offset 0 counts as aligned to everything', () => {
    const s = newStats();
    s.zero.record(8 * K, 0, 0, true);
    s.zero.record(8 * K, 8 * K, 0, true);
    const text = formatReport(s, 1000, 1);
    expect(text).toContain('    13 bits: 100.0% (2 reqs, 16.00 KiB total)\n         13 bit aligned: 100.0% (2)\n');
  });

  it('equal-sized buckets are all shown (nbdkit 1.32 keeps only one of buckets with equal counts)', () => {
    const s = newStats();
    s.trim.record(64 * K, 0, 0, true);
    s.trim.record(M, M, 0, true);
    const text = formatReport(s, 1000, 1);
    expect(text).toContain('    16 bits: 50.0% (1 reqs, 64.00 KiB total)');
    expect(text).toContain('    20 bits: 50.0% (1 reqs, 1.00 MiB total)');
  });

  it('cache requests are not in the total (as nbdkit)', () => {
    const s = newStats();
    s.cache.record(4 * K, 0, 0, true);
    expect(formatReport(s, 1000, 0.95).split('\n')[0]).toBe('total: 0 ops, 1.000000 s, 0 bytes, 0 bytes/s');
  });
});
