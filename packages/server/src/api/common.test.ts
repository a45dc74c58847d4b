import { describe, expect, it } from 'vitest';
import { NbdError, parseDuration } from './common.js';

describe('parseDuration (delay and timeout parameters)', () => {
  it('takes seconds and milliseconds', () => {
    expect(parseDuration('10ms')).toBe(10);
    expect(parseDuration('1.5')).toBe(1500);
    expect(parseDuration('2s')).toBe(2000);
    expect(parseDuration('0')).toBe(0);
    expect(parseDuration('.25')).toBe(250);
    expect(parseDuration(' 200MS ')).toBe(200);
    expect(parseDuration('0.5ms')).toBe(0.5);
  });

  it('refuses anything else with a clear message', () => {
    expect(() => parseDuration('-1', 'rdelay')).toThrow(/rdelay: could not parse '-1' as a duration: give seconds/);
    for (const bad of ['abc', '1h', '1e3', '', 'ms', '10 m', '30d']) expect(() => parseDuration(bad)).toThrow(NbdError);
    expect(() => parseDuration('3000000', 'wdelay')).toThrow(/wdelay: '3000000' is longer than the longest wait possible/);
  });
});
