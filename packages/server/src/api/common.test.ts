import { describe, expect, it } from 'vitest';
import { Errno, NbdError, debug, logError, logWarning, parseDuration, setLogSink, toErrno } from './common.js';

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

describe('a plugin with its own copy of @nbdx/server', () => {
  // npm installs a second copy beside a plugin whose peer range the running core's version does
  // not satisfy (or in nbdx's install cache): that copy's errors and log calls must still work.
  const otherCopy = (errno: number) => Object.assign(new Error('from another copy'), { [Symbol.for('nbdx.NbdError')]: true, errno });

  it('its NbdErrors are NbdErrors here, with their errno', () => {
    const err = otherCopy(Errno.ENOSPC);
    expect(err instanceof NbdError).toBe(true);
    expect(toErrno(err)).toBe(Errno.ENOSPC);
    expect(new Error('plain') instanceof NbdError).toBe(false);
    expect(toErrno(new Error('plain'))).toBe(Errno.EIO);
  });

  it('subclasses keep the prototype check', () => {
    class Special extends NbdError {}
    expect(new Special(Errno.EIO) instanceof Special).toBe(true);
    expect(new NbdError(Errno.EIO) instanceof Special).toBe(false);
    expect(new Special(Errno.EIO) instanceof NbdError).toBe(true);
  });

  it('its log calls reach the sink the server installed (a process-wide slot)', () => {
    const seen: string[] = [];
    setLogSink((level, source, message) => seen.push(`${level} ${source}: ${message}`));
    try {
      const slot = (globalThis as unknown as Record<symbol, (l: string, s: string, m: string) => void>)[Symbol.for('nbdx.logSink')]!;
      slot('error', 'copy', 'from the other copy');
      logError('here', 'x');
      logWarning('file', 'no helper');
      debug('here', 'y');
      expect(seen).toEqual(['error copy: from the other copy', 'error here: x', 'info file: warning: no helper', 'debug here: y']);
    } finally {
      delete (globalThis as unknown as Record<symbol, unknown>)[Symbol.for('nbdx.logSink')];
    }
  });
});
