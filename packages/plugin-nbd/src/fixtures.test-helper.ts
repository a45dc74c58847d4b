/**
 * An nbdx upstream for the tests: the memory plugin under a "probe" filter that counts
 * connections, records the flags every data call arrives with, can answer capabilities of its
 * choosing, and can make the next call of a kind fail.
 */
import { NbdError, defineFilter, type BlockSize, type CacheMode, type FuaMode } from '@nbdx/server/api';
import { serve, type NbdServer, type ServeOptions } from '@nbdx/server';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import * as net from 'node:net';

export interface Call {
  op: string;
  offset: number;
  count: number;
  flags: number;
}

export interface ProbeOptions {
  blockSize?: BlockSize;
  description?: string;
  rotational?: boolean;
  multiConn?: boolean;
  fua?: FuaMode;
  cache?: CacheMode;
  fastZero?: boolean;
  zero?: boolean;
  trim?: boolean;
  extents?: boolean;
  /** Delay every read by this many ms (to keep requests in flight). */
  readDelayMs?: number;
}

export interface Probe {
  /** Connections that reached preconnect (every TCP/Unix connection). */
  connections: number;
  /** Contexts opened (GO/EXPORT_NAME/INFO). */
  opens: number;
  /** Export names opened. */
  exportNames: string[];
  calls: Call[];
  /** The next call of this op throws this error. */
  failNext: Map<string, NbdError>;
  /** Reads running now, and the most that ever ran at once. */
  readsInFlight: number;
  maxReadsInFlight: number;
}

export function createProbeFilter(options: ProbeOptions, probe: Probe) {
  const record = (op: string, offset: number, count: number, flags: number) => {
    probe.calls.push({ op, offset, count, flags });
    const e = probe.failNext.get(op);
    if (e) {
      probe.failNext.delete(op);
      throw e;
    }
  };
  const o = options;
  return defineFilter({
    apiVersion: 2,
    name: 'probe',
    preconnect() {
      probe.connections++;
    },
    open(next, _ro, exportName) {
      probe.opens++;
      probe.exportNames.push(exportName);
      return {};
    },
    ...(o.blockSize ? { blockSize: () => o.blockSize } : {}),
    ...(o.description !== undefined ? { exportDescription: () => o.description } : {}),
    ...(o.rotational !== undefined ? { isRotational: () => o.rotational! } : {}),
    ...(o.multiConn !== undefined ? { canMultiConn: () => o.multiConn! } : {}),
    ...(o.fua !== undefined ? { canFua: () => o.fua! } : {}),
    ...(o.cache !== undefined ? { canCache: () => o.cache! } : {}),
    ...(o.fastZero !== undefined ? { canFastZero: () => o.fastZero! } : {}),
    ...(o.zero !== undefined ? { canZero: () => o.zero! } : {}),
    ...(o.trim !== undefined ? { canTrim: () => o.trim! } : {}),
    ...(o.extents !== undefined ? { canExtents: () => o.extents! } : {}),
    async pread(next, _h, buf, offset, flags) {
      record('pread', offset, buf.length, flags);
      probe.maxReadsInFlight = Math.max(probe.maxReadsInFlight, ++probe.readsInFlight);
      try {
        if (o.readDelayMs) await new Promise((r) => setTimeout(r, o.readDelayMs));
        return await next.pread(buf, offset, flags);
      } finally {
        probe.readsInFlight--;
      }
    },
    pwrite(next, _h, buf, offset, flags) {
      record('pwrite', offset, buf.length, flags);
      return next.pwrite(buf, offset, flags);
    },
    flush(next, _h, flags) {
      record('flush', 0, 0, flags);
      return next.flush(flags);
    },
    trim(next, _h, count, offset, flags) {
      record('trim', offset, count, flags);
      return next.trim(count, offset, flags);
    },
    zero(next, _h, count, offset, flags) {
      record('zero', offset, count, flags);
      return next.zero(count, offset, flags);
    },
    extents(next, _h, count, offset, flags) {
      record('extents', offset, count, flags);
      return next.extents(count, offset, flags);
    },
    cache(next, _h, count, offset, flags) {
      record('cache', offset, count, flags);
      return next.cache(count, offset, flags);
    },
  });
}

export interface ProbeUpstream {
  server: NbdServer & { uri: string };
  uri: string;
  probe: Probe;
  close(): Promise<void>;
}

/** An in-process nbdx upstream: memory (size `size`) under the probe filter. */
export async function startProbeUpstream(
  options: ProbeOptions = {},
  size = '4M',
  extra: Partial<Pick<ServeOptions, 'noStructuredReplies' | 'readonly' | 'listen'>> = {},
): Promise<ProbeUpstream> {
  const probe: Probe = { connections: 0, opens: 0, exportNames: [], calls: [], failNext: new Map(), readsInFlight: 0, maxReadsInFlight: 0 };
  const server = (await serve({
    plugin: createMemoryPlugin(),
    filters: [createProbeFilter(options, probe)],
    config: [['size', size]],
    ...extra,
  })) as NbdServer & { uri: string };
  return { server, uri: server.uri, probe, close: () => server.close() };
}

export interface Relay {
  /** Connections accepted so far. */
  accepted: number;
  /** Reset every connection now (what a crashed upstream looks like). */
  cut(): void;
  close(): Promise<void>;
}

/** A Unix-socket relay to `target`: lets a test cut connections to an upstream at will. */
export async function startRelay(listenPath: string, target: string): Promise<Relay> {
  const pairs = new Set<[net.Socket, net.Socket]>();
  const relay: Relay = {
    accepted: 0,
    cut() {
      for (const [a, b] of pairs) {
        a.destroy();
        b.destroy();
      }
      pairs.clear();
    },
    close: () =>
      new Promise<void>((resolve) => {
        relay.cut();
        server.close(() => resolve());
      }),
  };
  const server = net.createServer((down) => {
    relay.accepted++;
    const up = net.connect(target);
    const pair: [net.Socket, net.Socket] = [down, up];
    pairs.add(pair);
    const drop = () => {
      pairs.delete(pair);
      down.destroy();
      up.destroy();
    };
    down.on('error', drop).on('close', drop);
    up.on('error', drop).on('close', drop);
    down.pipe(up);
    up.pipe(down);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(listenPath, () => resolve());
  });
  return relay;
}
