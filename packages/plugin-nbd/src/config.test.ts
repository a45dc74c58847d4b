import { describe, expect, it } from 'vitest';
import { NbdConnectionError, NbdOptionError, NbdProtocolError, NbdRequestError, NBD } from '@nbdx/client';
import { Errno, NbdError, isFatalError, toErrno } from '@nbdx/server/api';
import { applyParam, completeConfig, describeAddress, type RawParams } from './config.js';
import { translateError, upstreamLost, withRetry } from './upstream.js';
import { createNbdPlugin } from './index.js';

function configure(pairs: Array<[string, string]>) {
  const p: RawParams = {};
  for (const [k, v] of pairs) applyParam(p, k, v);
  return completeConfig(p);
}

describe('parameters', () => {
  it('takes nbd+unix:// and nbd:// URIs with the export in the path', () => {
    expect(configure([['uri', 'nbd+unix:///disk?socket=/run/u.sock']])).toEqual({
      address: { kind: 'unix', path: '/run/u.sock' },
      exportName: 'disk',
      dynamicExport: false,
      retry: 0,
      timeoutMs: 30_000,
      requestTimeoutMs: 0,
    });
    const c = configure([['uri', 'nbd://example.com:10810/a%20b']]);
    expect(c.address).toEqual({ kind: 'tcp', host: 'example.com', port: 10810 });
    expect(c.exportName).toBe('a b');
    expect(configure([['uri', 'nbd://[::1]/']]).address).toEqual({ kind: 'tcp', host: '::1', port: 10809 });
  });

  it('takes socket=, hostname=/port= and export=', () => {
    expect(configure([['socket', '/tmp/s'], ['export', 'x']])).toMatchObject({ address: { kind: 'unix', path: '/tmp/s' }, exportName: 'x' });
    expect(configure([['hostname', 'h'], ['port', '1234']]).address).toEqual({ kind: 'tcp', host: 'h', port: 1234 });
    expect(configure([['hostname', 'h']]).address).toEqual({ kind: 'tcp', host: 'h', port: 10809 });
  });

  it('takes dynamic-export, retry and timeout', () => {
    const c = configure([['socket', '/s'], ['dynamic-export', 'true'], ['retry', '3'], ['timeout', '2.5'], ['request-timeout', '60']]);
    expect(c).toMatchObject({ dynamicExport: true, retry: 3, timeoutMs: 2500, requestTimeoutMs: 60_000 });
    expect(configure([['socket', '/s'], ['timeout', '500ms'], ['request-timeout', '0']])).toMatchObject({ timeoutMs: 500, requestTimeoutMs: 0 });
  });

  it('refuses TLS URIs and tls=on with a message that says why', () => {
    expect(() => configure([['uri', 'nbds://host/x']])).toThrow(/TLS to the upstream server is not supported yet/);
    expect(() => configure([['uri', 'nbds+unix:///?socket=/s']])).toThrow(/nbd:\/\/ or nbd\+unix:\/\//);
    expect(() => configure([['socket', '/s'], ['tls', 'require']])).toThrow(/TLS to the upstream server is not supported yet/);
    expect(configure([['socket', '/s'], ['tls', 'off']]).address.kind).toBe('unix');
  });

  it('gives clear errors for bad or conflicting parameters', () => {
    const cases: Array<[Array<[string, string]>, RegExp]> = [
      [[], /no upstream server: give uri=URI, socket=PATH or hostname=HOST/],
      [[['uri', 'http://x/']], /uri=http:\/\/x\/: unsupported NBD URI scheme/],
      [[['uri', 'nbd+unix:///x']], /needs \?socket=PATH/],
      [[['uri', 'nbd://h/'], ['socket', '/s']], /give only one of uri=, socket=/],
      [[['socket', '/s'], ['port', '10']], /port= goes with hostname=/],
      [[['hostname', 'h'], ['port', '70000']], /port=70000: not a TCP port number/],
      [[['uri', 'nbd://h/a'], ['export', 'b']], /export= does not go with uri=/],
      [[['uri', 'nbd://h/a'], ['dynamic-export', 'true']], /no export may be named \(got 'a' from the URI\)/],
      [[['socket', '/s'], ['export', 'a'], ['dynamic-export', 'yes']], /got 'a' from export=/],
      [[['socket', '/s'], ['retry', '-1']], /retry=-1: not a whole number/],
      [[['socket', '/s'], ['timeout', 'soon']], /timeout: could not parse 'soon' as a duration/],
      [[['socket', '/s'], ['request-timeout', '-5']], /request-timeout: could not parse '-5' as a duration/],
      [[['socket', '/s'], ['dynamic-export', 'maybe']], /dynamic-export: could not parse 'maybe'/],
      [[['socket', '/s'], ['shared', 'true']], /nbdx --filter=shared nbd \.\.\./],
      [[['socket', '/s'], ['vsock', '3']], /unknown parameter 'vsock'/],
      [[['socket', '']], /socket= needs the path/],
    ];
    for (const [pairs, re] of cases) {
      let err: unknown;
      try {
        configure(pairs);
      } catch (e) {
        err = e;
      }
      expect(err, JSON.stringify(pairs)).toBeInstanceOf(NbdError);
      expect((err as Error).message, JSON.stringify(pairs)).toMatch(re);
    }
  });

  it('describes addresses as URIs', () => {
    expect(describeAddress({ kind: 'unix', path: '/s' }, 'a b')).toBe('nbd+unix:///a%20b?socket=/s');
    expect(describeAddress({ kind: 'tcp', host: '::1', port: 5 })).toBe('nbd://[::1]:5/');
  });

  it('the plugin refuses to start without a complete configuration', async () => {
    const p = createNbdPlugin();
    await p.load?.();
    expect(() => p.configComplete!()).toThrow(/no upstream server/);
    expect(() => p.config!('bogus', '1')).toThrow(/unknown parameter 'bogus'/);
    expect(p.magicConfigKey).toBe('uri');
    expect(p.configHelp).toMatch(/dynamic-export=true/);
  });
});

describe('retry', () => {
  const base = { address: { kind: 'unix' as const, path: '/nonexistent' }, exportName: '', dynamicExport: false, timeoutMs: 1000, requestTimeoutMs: 0 };

  it('tries retry+1 times, one second apart, then says how often it tried', async () => {
    const sleeps: number[] = [];
    let calls = 0;
    const err = await withRetry({ ...base, retry: 3 }, 'connecting to X', async () => {
      calls++;
      throw Object.assign(new Error('connect ECONNREFUSED /x'), { code: 'ECONNREFUSED' });
    }, async (ms) => {
      sleeps.push(ms);
    }).catch((e) => e);
    expect(calls).toBe(4);
    expect(sleeps).toEqual([1000, 1000, 1000]);
    expect(err).toBeInstanceOf(NbdError);
    expect(err.message).toBe('connecting to X: cannot connect to the upstream server (tried 4 times, 1 s apart): connect ECONNREFUSED /x');
  });

  it('stops retrying once it connects', async () => {
    let calls = 0;
    const r = await withRetry({ ...base, retry: 5 }, 'x', async () => {
      if (++calls < 3) throw new Error('not yet');
      return 'ok';
    }, async () => {});
    expect(r).toBe('ok');
    expect(calls).toBe(3);
  });

  it('does not retry a refusal from a server that answered', async () => {
    let calls = 0;
    const err = await withRetry({ ...base, retry: 5 }, 'connecting to Y', async () => {
      calls++;
      throw new NbdOptionError(NBD.OPT_GO, NBD.REP_ERR_UNKNOWN, 'no such export');
    }, async () => {}).catch((e) => e);
    expect(calls).toBe(1);
    expect(err.message).toBe('connecting to Y: the upstream server refused: no such export');
  });
});

describe('errors', () => {
  it('passes the upstream errno and message on', () => {
    const e = (() => {
      try {
        translateError(new NbdRequestError(Errno.ENOSPC, 'disk full', { command: NBD.CMD_WRITE, serverMessage: 'disk full' }));
      } catch (x) {
        return x;
      }
    })();
    expect(e).toBeInstanceOf(NbdError);
    expect(toErrno(e)).toBe(Errno.ENOSPC);
    expect((e as Error).message).toBe('upstream: disk full');
    expect(isFatalError(e)).toBe(false);
  });

  it('a broken reply is EIO for that request only; a lost connection is a fatal EIO', () => {
    const catchIt = (err: unknown) => {
      try {
        translateError(err);
      } catch (x) {
        return x;
      }
    };
    const proto = catchIt(new NbdProtocolError('overlapping chunks'));
    expect(toErrno(proto)).toBe(Errno.EIO);
    expect(isFatalError(proto)).toBe(false);
    const gone = catchIt(new NbdConnectionError('server closed the connection'));
    expect(toErrno(gone)).toBe(Errno.EIO);
    expect(isFatalError(gone)).toBe(true);
    expect((gone as Error).message).toBe('upstream connection lost: server closed the connection');
    expect((gone as { code?: string }).code).toBe('ENOTCONN');
    expect(isFatalError(upstreamLost('x'))).toBe(true);
    const other = new TypeError('bug');
    expect(catchIt(other)).toBe(other);
  });
});
