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
  });

  it('rejects TLS, unknown schemes and incomplete URIs', () => {
    expect(() => parseNbdUri('nbds://host/x')).toThrow(/TLS/);
    expect(() => parseNbdUri('http://host/x')).toThrow(/scheme/);
    expect(() => parseNbdUri('nbd+unix:///x')).toThrow(/socket=/);
    expect(() => parseNbdUri('not a uri')).toThrow(/URI/);
  });
});
