/** Parsing that needs no server: header lines, secrets, Content-Range, status → NBD error. */
import { describe, expect, it } from 'vitest';
import { Errno } from '@nbdx/server/api';
import { applyConfig, defaultSettings, parseHeaderLine } from './config.js';
import { createHttpPlugin } from './index.js';
import { parseContentRange } from './remote.js';
import { statusError } from './errors.js';

describe('header lines (curl conventions)', () => {
  it('adds, removes and empties headers', () => {
    expect(parseHeaderLine('X-Token: abc: def')).toEqual(['X-Token', 'abc: def']);
    expect(parseHeaderLine('User-Agent:')).toEqual(['User-Agent', null]);
    expect(parseHeaderLine('X-Empty;')).toEqual(['X-Empty', '']);
  });
  it('refuses malformed names, line breaks and the headers the plugin owns', () => {
    expect(() => parseHeaderLine('no colon')).toThrow(/is not 'Name: value'/);
    expect(() => parseHeaderLine('Bad Name: x')).toThrow(/not a valid header name/);
    expect(() => parseHeaderLine('X: a\r\nInjected: b')).toThrow(/line break/);
    for (const h of ['Range', 'content-length', 'Transfer-Encoding', 'Connection', 'Accept-Encoding']) {
      expect(() => parseHeaderLine(`${h}: x`)).toThrow(/managed by the plugin/);
    }
  });
  it('headers= takes a list of lines, skipping blanks and comments', () => {
    const s = defaultSettings();
    applyConfig(s, 'headers', 'A: 1\n\n# comment\nB: 2');
    expect(s.headers).toEqual([['A', '1'], ['B', '2']]);
    applyConfig(s, 'headers', '+/etc/h');
    expect(s.headers[2]).toEqual({ file: '/etc/h' });
  });
});

describe('secrets and URLs', () => {
  it('keeps password= and cookie= as given, for readSecret at start-up; - and -FD keep the plugin on one thread', () => {
    const s = defaultSettings();
    applyConfig(s, 'password', '+/run/pw');
    applyConfig(s, 'cookie', '-7');
    expect(s).toMatchObject({ password: '+/run/pw', cookie: '-7' });
    const readOnce = (config: [string, string][]) => {
      const p = createHttpPlugin();
      for (const [k, v] of config) p.config!(k, v);
      return !(p.workerThreads as () => boolean)();
    };
    expect(readOnce([['url', 'https://h/d'], ['password', '+/run/pw'], ['cookie', 'a=1']])).toBe(false);
    expect(readOnce([['url', 'https://h/d'], ['password', '-']])).toBe(true);
    expect(readOnce([['url', 'https://h/d'], ['cookie', '-7']])).toBe(true);
  });
  it('moves credentials out of the URL', () => {
    const s = defaultSettings();
    applyConfig(s, 'url', 'https://al%40ice:p%3Ass@host/disk.img#frag');
    expect(s.url!.href).toBe('https://host/disk.img');
    expect(s.user).toBe('al@ice');
    expect(s.urlPassword).toBe('p:ss');
    expect(s.password).toBeNull();
    // A password in the URL is the password, never a +FILE or -FD form.
    applyConfig(s, 'url', 'https://u:-5@host/disk.img');
    expect(s.urlPassword).toBe('-5');
  });
  it('takes nbdkit\'s cainfo= spelling and refuses bad values', () => {
    const s = defaultSettings();
    applyConfig(s, 'cainfo', '/etc/ca.pem');
    expect(s.cafile).toBe('/etc/ca.pem');
    expect(() => applyConfig(s, 'cookie', 'a=1')).not.toThrow();
    expect(() => applyConfig(s, 'cookie', 'b=2')).toThrow(/only once/);
    expect(() => applyConfig(s, 'unix-socket-path', 'rel/sock')).toThrow(/absolute path/);
    expect(() => applyConfig(s, 'sslverify', 'perhaps')).toThrow(/sslverify/);
  });
});

describe('Content-Range', () => {
  it('parses ranges, unknown sizes and unsatisfied ranges, and refuses nonsense', () => {
    expect(parseContentRange('bytes 0-0/1073741824')).toEqual({ first: 0, last: 0, size: 1073741824 });
    expect(parseContentRange('bytes 100-199/*')).toEqual({ first: 100, last: 199, size: null });
    expect(parseContentRange('bytes */0')).toEqual({ first: null, last: null, size: 0 });
    expect(parseContentRange('bytes 5-4/10')).toBeNull();
    expect(parseContentRange('items 0-1/2')).toBeNull();
    expect(parseContentRange('bytes 0-1/99999999999999999999')).toBeNull();
    expect(parseContentRange(undefined)).toBeNull();
  });
});

describe('HTTP status → NBD error', () => {
  it('maps 404 to ENOENT at open and EIO on reads, 401/403 to EPERM, 416 to EINVAL, 5xx to EIO', () => {
    const open404 = statusError('open', 'HEAD u', 404, 'Not Found', 'gone');
    expect(open404.errno).toBe(Errno.EIO);
    expect((open404 as unknown as { code: string }).code).toBe('ENOENT');
    expect((statusError('read', 'r', 404, '', '') as unknown as { code?: string }).code).toBeUndefined();
    expect(statusError('read', 'r', 403, '', '').errno).toBe(Errno.EPERM);
    expect(statusError('open', 'r', 401, '', '').errno).toBe(Errno.EPERM);
    expect(statusError('read', 'r', 416, '', '').errno).toBe(Errno.EINVAL);
    expect(statusError('read', 'r', 503, 'Service Unavailable', 'busy').message).toMatch(/503 Service Unavailable: busy/);
    expect(statusError('read', 'r', 503, '', '').errno).toBe(Errno.EIO);
  });
});
