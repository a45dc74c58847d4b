import { describe, expect, it } from 'vitest';
import { USAGE, UsageError, longOptions, parseArgs, parseMetricsAddress } from './args.js';

describe('--metrics=[HOST:]PORT', () => {
  it('a port alone listens on 127.0.0.1, so metrics are not exposed by default', () => {
    expect(parseMetricsAddress('9100')).toEqual({ host: '127.0.0.1', port: 9100 });
    expect(parseMetricsAddress('0')).toEqual({ host: '127.0.0.1', port: 0 });
  });

  it('takes a host name, an IPv4 address, or an IPv6 address in brackets', () => {
    expect(parseMetricsAddress('localhost:9100')).toEqual({ host: 'localhost', port: 9100 });
    expect(parseMetricsAddress('0.0.0.0:9100')).toEqual({ host: '0.0.0.0', port: 9100 });
    expect(parseMetricsAddress('metrics-host.example:65535')).toEqual({ host: 'metrics-host.example', port: 65535 });
    expect(parseMetricsAddress('[::1]:9100')).toEqual({ host: '::1', port: 9100 });
    expect(parseMetricsAddress('[::]:0')).toEqual({ host: '::', port: 0 });
    expect(parseMetricsAddress('[fe80::1:2]:9100')).toEqual({ host: 'fe80::1:2', port: 9100 });
  });

  it.each([
    ['', /has no port/],
    ['abc', /'abc', which is not a port number/],
    ['65536', /not a port number \(0 to 65535\)/],
    ['-1', /not a port number/],
    ['9100.5', /not a port number/],
    [' 9100', /not a port number/],
    ['127.0.0.1:', /has no port/],
    [':9100', /has no host before the colon/],
    ['::1:9100', /IPv6 address without brackets/],
    ['[::1]9100', /is not \[IPV6\]:PORT/],
    ['[::1', /is not \[IPV6\]:PORT/],
    ['[127.0.0.1]:9100', /not an IPv6 address/],
    ['host name:9100', /not a host name or address/],
    ['-host:9100', /not a host name or address/],
  ])('refuses %j with one line naming the option and the expected form', (value, why) => {
    let err: unknown;
    try {
      parseMetricsAddress(value);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(UsageError);
    const message = (err as Error).message;
    expect(message).toMatch(/^--metrics: /);
    expect(message).toMatch(why);
    expect(message).toContain('expected [HOST:]PORT');
    expect(message).not.toContain('\n');
  });

  it('is parsed as --metrics=V and --metrics V, before or after the plugin', () => {
    expect(parseArgs(['--metrics=9100', 'memory', '1G']).metrics).toEqual({ host: '127.0.0.1', port: 9100 });
    expect(parseArgs(['memory', '1G', '--metrics', '[::1]:0']).metrics).toEqual({ host: '::1', port: 0 });
    expect(parseArgs(['memory', '1G']).metrics).toBeUndefined();
    expect(() => parseArgs(['--metrics'])).toThrow(/needs a value/);
  });

  it('is in --help and --long-options', () => {
    expect(USAGE).toMatch(/--metrics=\[HOST:\]PORT/);
    expect(USAGE).toMatch(/127\.0\.0\.1/);
    expect(longOptions().split('\n')).toContain('--metrics');
  });
});
