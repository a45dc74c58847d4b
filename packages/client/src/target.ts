import type { Duplex } from 'node:stream';
import { NBD } from '@nbdx/server/wire';

/** Where to connect: an NBD URI, a TCP address, a Unix socket path, or an already connected stream. */
export type NbdTarget = string | { host: string; port?: number } | { path: string } | { socket: Duplex };

export type ResolvedTarget =
  | { kind: 'tcp'; host: string; port: number; exportName?: string }
  | { kind: 'unix'; path: string; exportName?: string }
  | { kind: 'socket'; socket: Duplex };

/**
 * Parse `nbd://host[:port]/[export]` or `nbd+unix:///[export]?socket=PATH`. The export name is the
 * percent-decoded path after the first slash (empty when absent). TLS URIs (`nbds://`) are refused.
 */
export function parseNbdUri(uri: string): ResolvedTarget & { kind: 'tcp' | 'unix'; exportName: string } {
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    throw new TypeError(`not a valid NBD URI: ${uri}`);
  }
  const scheme = url.protocol.slice(0, -1).toLowerCase();
  if (scheme === 'nbds' || scheme === 'nbds+unix') throw new TypeError(`TLS is not supported by this client: ${uri}`);
  const path = url.pathname;
  const exportName = decodeURIComponent(path.startsWith('/') ? path.slice(1) : path);
  if (scheme === 'nbd') {
    let host = url.hostname;
    if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
    if (!host) throw new TypeError(`NBD URI has no host: ${uri}`);
    const port = url.port ? Number(url.port) : NBD.NBD_DEFAULT_PORT;
    return { kind: 'tcp', host, port, exportName };
  }
  if (scheme === 'nbd+unix') {
    const socket = url.searchParams.get('socket');
    if (!socket) throw new TypeError(`nbd+unix URI needs ?socket=PATH: ${uri}`);
    return { kind: 'unix', path: socket, exportName };
  }
  throw new TypeError(`unsupported NBD URI scheme "${scheme}:" in ${uri}`);
}

export function resolveTarget(target: NbdTarget): ResolvedTarget {
  if (typeof target === 'string') return parseNbdUri(target);
  if (target && typeof target === 'object') {
    if ('socket' in target && target.socket) return { kind: 'socket', socket: target.socket };
    if ('path' in target && typeof target.path === 'string') return { kind: 'unix', path: target.path };
    if ('host' in target && typeof target.host === 'string') {
      return { kind: 'tcp', host: target.host, port: target.port ?? NBD.NBD_DEFAULT_PORT };
    }
  }
  throw new TypeError('target must be an NBD URI, {host, port}, {path} or {socket}');
}
