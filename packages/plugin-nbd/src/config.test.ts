import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { NbdConnectionError, NbdOptionError, NbdProtocolError, NbdRequestError, NbdTlsError, NBD } from '@nbdx/client';
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
      tls: { tls: 'off' },
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

  describe('TLS (nbdkit\'s tls, tls-certificates, tls-psk, tls-username, tls-verify)', () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'nbdx-plugin-nbd-config-'));
    const psk = path.join(dir, 'keys.psk');
    writeFileSync(psk, 'alice:00112233\n');
    writeFileSync(path.join(dir, 'ca-cert.pem'), 'not read until connecting');
    afterAll(() => rmSync(dir, { recursive: true, force: true }));

    it('nbds URIs require TLS and bring their tls-* query parameters', () => {
      expect(configure([['uri', `nbds+unix://alice@/e?socket=/s&tls-psk-file=${psk}`]])).toMatchObject({
        address: { kind: 'unix', path: '/s' },
        exportName: 'e',
        tls: { tls: 'require', tlsPskFile: psk, tlsUsername: 'alice' },
      });
      expect(configure([['uri', `nbds://h:7/?tls-certificates=${dir}&tls-verify-peer=false`]]).tls).toEqual({
        tls: 'require', tlsCertificates: dir, tlsVerifyPeer: false,
      });
      // Parameters win over the URI's query.
      expect(configure([['uri', `nbds+unix:///?socket=/s&tls-username=bob&tls-psk-file=${psk}`], ['tls-username', 'alice']]).tls.tlsUsername).toBe('alice');
    });

    it('tls= defaults to off, to on with another tls-* parameter; takes nbdkit\'s spellings', () => {
      expect(configure([['socket', '/s']]).tls).toEqual({ tls: 'off' });
      expect(configure([['socket', '/s'], ['tls-psk', psk], ['tls-username', 'alice']]).tls).toEqual({ tls: 'on', tlsPskFile: psk, tlsUsername: 'alice' });
      expect(configure([['socket', '/s'], ['tls', 'require'], ['tls-certificates', dir], ['tls-verify', 'false']]).tls).toEqual({
        tls: 'require', tlsCertificates: dir, tlsVerifyPeer: false,
      });
      for (const [v, mode] of [['on', 'on'], ['true', 'on'], ['1', 'on'], ['off', 'off'], ['false', 'off'], ['require', 'require'], ['required', 'require'], ['force', 'require']]) {
        const pairs: Array<[string, string]> = [['socket', '/s'], ['tls', v!]];
        if (mode !== 'off') pairs.push(['tls-certificates', dir]);
        expect(configure(pairs).tls.tls).toBe(mode);
      }
    });

    it('refuses contradictions and unreadable credentials at startup', () => {
      expect(() => configure([['socket', '/s'], ['tls', 'maybe']])).toThrow(/tls=maybe: expected off, on or require/);
      expect(() => configure([['uri', 'nbds://h/'], ['tls', 'off']])).toThrow(/tls=off does not go with an nbds:\/\/ URI/);
      expect(() => configure([['socket', '/s'], ['tls', 'off'], ['tls-psk', psk]])).toThrow(/tls-psk= needs TLS: drop tls=off/);
      expect(() => configure([['socket', '/s'], ['tls-psk', path.join(dir, 'none.psk')]])).toThrow(/cannot read the TLS PSK file .*none\.psk/);
      expect(() => configure([['socket', '/s'], ['tls-psk', psk], ['tls-username', 'bob']])).toThrow(/has no key for username 'bob'/);
      expect(() => configure([['socket', '/s'], ['tls', 'on'], ['tls-certificates', path.join(dir, 'nope')]])).toThrow(/certificates directory .*nope does not exist/);
      expect(() => configure([['socket', '/s'], ['tls-verify', 'perhaps']])).toThrow(/tls-verify/);
    });
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
    expect(describeAddress({ kind: 'tcp', host: 'h', port: 5 }, 'x', 'require')).toBe('nbds://h:5/x');
    expect(describeAddress({ kind: 'unix', path: '/s' }, '', 'require')).toBe('nbds+unix:///?socket=/s');
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
  const base = {
    address: { kind: 'unix' as const, path: '/nonexistent' },
    exportName: '',
    dynamicExport: false,
    timeoutMs: 1000,
    requestTimeoutMs: 0,
    tls: { tls: 'off' as const },
  };

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

  it('does not retry TLS failures, and says how to turn TLS on when the upstream requires it', async () => {
    let calls = 0;
    const wrongKey = await withRetry({ ...base, retry: 5 }, 'connecting to Z', async () => {
      calls++;
      throw new NbdTlsError("TLS: the server refused the pre-shared key: wrong key, or unknown username 'alice'", 'ECONNRESET');
    }, async () => {}).catch((e) => e);
    expect(calls).toBe(1);
    expect(wrongKey).toBeInstanceOf(NbdError);
    expect(wrongKey.message).toBe("connecting to Z: TLS: the server refused the pre-shared key: wrong key, or unknown username 'alice'");
    const reqd = await withRetry({ ...base, retry: 5 }, 'connecting to Z', async () => {
      throw new NbdOptionError(NBD.OPT_GO, NBD.REP_ERR_TLS_REQD, 'TLS required');
    }, async () => {}).catch((e) => e);
    expect(reqd.message).toBe('connecting to Z: the upstream server requires TLS: use tls=require (or an nbds:// URI) with tls-psk= or tls-certificates=');
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
