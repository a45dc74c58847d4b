import { describe, expect, it } from 'vitest';
import { parseNbdUri } from './index.js';

describe('parseNbdUri', () => {
  it('parses TCP URIs with and without port and export', () => {
    expect(parseNbdUri('nbd://example.com:1234/disk')).toEqual({ kind: 'tcp', host: 'example.com', port: 1234, exportName: 'disk' });
    expect(parseNbdUri('nbd://example.com')).toEqual({ kind: 'tcp', host: 'example.com', port: 10809, exportName: '' });
    expect(parseNbdUri('nbd://example.com/')).toEqual({ kind: 'tcp', host: 'example.com', port: 10809, exportName: '' });
    expect(parseNbdUri('nbd://[::1]:99/a%20b/c')).toEqual({ kind: 'tcp', host: '::1', port: 99, exportName: 'a b/c' });
  });

  it('parses Unix socket URIs', () => {
    expect(parseNbdUri('nbd+unix:///exp?socket=/tmp/x.sock')).toEqual({ kind: 'unix', path: '/tmp/x.sock', exportName: 'exp' });
    expect(parseNbdUri('nbd+unix:///?socket=/tmp/x.sock')).toEqual({ kind: 'unix', path: '/tmp/x.sock', exportName: '' });
    expect(parseNbdUri('nbd+unix://?socket=/tmp/a+b%20c.sock')).toEqual({ kind: 'unix', path: '/tmp/a+b c.sock', exportName: '' });
  });

  it('nbds URIs require TLS and carry libnbd\'s tls-* query parameters', () => {
    expect(parseNbdUri('nbds://host/x')).toEqual({ kind: 'tcp', host: 'host', port: 10809, exportName: 'x', tls: { mode: 'require' } });
    expect(parseNbdUri('nbds://alice@host:7/x?tls-psk-file=/k.psk')).toEqual({
      kind: 'tcp', host: 'host', port: 7, exportName: 'x', tls: { mode: 'require', pskFile: '/k.psk', username: 'alice' },
    });
    // libnbd's own example: a user name with no host before a Unix socket.
    expect(parseNbdUri('nbds+unix://alice@/?socket=/tmp/nbd.sock&tls-certificates=certs')).toEqual({
      kind: 'unix', path: '/tmp/nbd.sock', exportName: '', tls: { mode: 'require', certificates: 'certs', username: 'alice' },
    });
    expect(parseNbdUri('nbds+unix:///e?socket=/s&tls-username=bob&tls-verify-peer=false&tls-hostname=srv')).toEqual({
      kind: 'unix', path: '/s', exportName: 'e', tls: { mode: 'require', username: 'bob', verifyPeer: false, hostname: 'srv' },
    });
    // tls-* on a plain nbd URI are kept for the tls option; TLS stays off unless asked for.
    expect(parseNbdUri('nbd://h/?tls-certificates=/d').tls).toEqual({ certificates: '/d' });
    expect(() => parseNbdUri('nbds://h/?tls-verify-peer=maybe')).toThrow(/tls-verify-peer=maybe is not a boolean/);
  });

  it('rejects unknown schemes and incomplete URIs', () => {
    expect(() => parseNbdUri('http://host/x')).toThrow(/scheme/);
    expect(() => parseNbdUri('nbd+unix:///x')).toThrow(/socket=/);
    expect(() => parseNbdUri('nbds+unix:///x')).toThrow(/socket=/);
    expect(() => parseNbdUri('nbd:///x')).toThrow(/no host/);
    expect(() => parseNbdUri('nbd://h:99999/')).toThrow(/port/);
    expect(() => parseNbdUri('not a uri')).toThrow(/URI/);
  });
});
