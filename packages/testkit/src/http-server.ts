/**
 * A real HTTP(S) server with byte ranges, serving one file, for testing plugins that read disks
 * over HTTP (nbdx http, and anything built like it). Beside correct answers it can misbehave the
 * ways real servers and networks do: refuse HEAD, ignore Range, hide the size, demand headers or
 * credentials, redirect, answer 5xx, and cut connections in the middle of a body.
 */
import { once } from 'node:events';
import { open, type FileHandle } from 'node:fs/promises';
import { rmSync, statSync, createReadStream } from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import type { AddressInfo, Socket } from 'node:net';

export interface RangeServerOptions {
  /** The file served. */
  file: string;
  /** Its path on the server (default `/disk.img`). */
  path?: string;
  /** Serve HTTPS with this key and certificate (PEM). */
  tls?: { key: string | Buffer; cert: string | Buffer };
  /** Listen on this Unix socket instead of a TCP port on 127.0.0.1. */
  unixSocket?: string;
  /** Answer HEAD with 405 Method Not Allowed. */
  headRefused?: boolean;
  /** Answer every GET with 200 and the whole file, as a server without range support does. */
  ignoreRange?: boolean;
  /** Leave Accept-Ranges out of HEAD answers (ranges still work). */
  noAcceptRanges?: boolean;
  /** HEAD without Content-Length, and Content-Range ending in `/*`. */
  hideSize?: boolean;
  /** Answer 403 unless every one of these headers has this value. */
  requireHeaders?: Record<string, string>;
  /** Answer 401 unless HTTP Basic authentication with these credentials is sent. */
  basicAuth?: { user: string; password: string };
  /** A path that answers 302 to the file's path. */
  redirectFrom?: string;
  /** Fraction (0..1) of ranged GETs whose connection is cut half-way through the body. */
  dropRate?: number;
  /** Fraction (0..1) of GETs answered with `errorStatus`. */
  errorRate?: number;
  /** The status of those errors (default 503). */
  errorStatus?: number;
}

export interface RangeRequest {
  method: string;
  url: string;
  range: string | undefined;
  status: number;
  /** What the request's fate was, when it was made to fail on purpose. */
  fault?: 'drop' | 'status';
  headers: http.IncomingHttpHeaders;
}

export interface RangeServer {
  /** URL of the file (for a Unix socket, `http://localhost/PATH`). */
  url: string;
  /** Origin only, e.g. `https://127.0.0.1:PORT`. */
  origin: string;
  requests: RangeRequest[];
  /**
   * Counts: ranged GETs answered 206, connections cut, error statuses sent, body bytes sent,
   * connections accepted, and the most requests being answered at the same time.
   */
  stats: { ranged: number; drops: number; errors: number; bytes: number; connections: number; maxInFlight: number };
  /** Make the next `n` GETs fail this way (in addition to the random faults). */
  failNext(n: number, how: 'drop' | 'status'): void;
  /** Change the random fault rates while running. */
  setFaults(faults: { dropRate?: number; errorRate?: number }): void;
  close(): Promise<void>;
}

function parseRange(value: string | undefined, size: number): { first: number; last: number } | 'unsatisfiable' | null {
  if (!value) return null;
  const m = /^bytes=(\d*)-(\d*)$/.exec(value.trim());
  if (!m || (m[1] === '' && m[2] === '')) return null;
  let first: number;
  let last: number;
  if (m[1] === '') {
    // suffix range: the last N bytes
    const n = Number(m[2]);
    if (n === 0) return 'unsatisfiable';
    first = Math.max(0, size - n);
    last = size - 1;
  } else {
    first = Number(m[1]);
    last = m[2] === '' ? size - 1 : Math.min(Number(m[2]), size - 1);
    if (m[2] !== '' && Number(m[2]) < first) return null;
  }
  if (first >= size) return 'unsatisfiable';
  return { first, last };
}

export async function startRangeServer(options: RangeServerOptions): Promise<RangeServer> {
  const filePath = options.path ?? '/disk.img';
  const size = statSync(options.file).size;
  const fh: FileHandle = await open(options.file, 'r');
  const requests: RangeRequest[] = [];
  const stats = { ranged: 0, drops: 0, errors: 0, bytes: 0, connections: 0, maxInFlight: 0 };
  let inFlight = 0;
  let dropRate = options.dropRate ?? 0;
  let errorRate = options.errorRate ?? 0;
  const forced: ('drop' | 'status')[] = [];
  const sockets = new Set<Socket>();

  const handler = (req: http.IncomingMessage, res: http.ServerResponse): void => {
    const rec: RangeRequest = { method: req.method ?? '', url: req.url ?? '', range: req.headers.range, status: 0, headers: req.headers };
    requests.push(rec);
    inFlight++;
    stats.maxInFlight = Math.max(stats.maxInFlight, inFlight);
    res.on('close', () => inFlight--);
    const reply = (status: number, headers: Record<string, string | number> = {}, body = ''): void => {
      rec.status = status;
      res.writeHead(status, { 'content-length': Buffer.byteLength(body), ...headers });
      res.end(req.method === 'HEAD' ? undefined : body);
    };
    const url = new URL(req.url ?? '/', 'http://x');
    if (options.redirectFrom && url.pathname === options.redirectFrom) {
      return reply(302, { location: filePath + url.search }, 'moved\n');
    }
    if (options.basicAuth) {
      const want = `Basic ${Buffer.from(`${options.basicAuth.user}:${options.basicAuth.password}`).toString('base64')}`;
      if (req.headers.authorization !== want) return reply(401, { 'www-authenticate': 'Basic realm="disk"' }, 'who are you?\n');
    }
    for (const [name, value] of Object.entries(options.requireHeaders ?? {})) {
      if (req.headers[name.toLowerCase()] !== value) return reply(403, {}, `missing or wrong header ${name}\n`);
    }
    if (url.pathname !== filePath) return reply(404, {}, 'no such file\n');
    if (req.method === 'HEAD') {
      if (options.headRefused) return reply(405, { allow: 'GET' }, '');
      const headers: Record<string, string | number> = {};
      if (!options.noAcceptRanges && !options.ignoreRange) headers['accept-ranges'] = 'bytes';
      rec.status = 200;
      if (options.hideSize) headers['transfer-encoding'] = 'chunked';
      else headers['content-length'] = size;
      res.writeHead(200, headers);
      res.end();
      return;
    }
    if (req.method !== 'GET') return reply(405, { allow: 'GET, HEAD' }, 'read only\n');

    const fault = forced.shift() ?? (Math.random() < errorRate ? 'status' : null);
    if (fault === 'status') {
      stats.errors++;
      rec.fault = 'status';
      return reply(options.errorStatus ?? 503, { 'retry-after': '0' }, 'try again later\n');
    }
    if (options.ignoreRange || req.headers.range === undefined) {
      rec.status = 200;
      res.writeHead(200, { 'content-length': size });
      createReadStream(options.file).pipe(res);
      return;
    }
    const range = parseRange(req.headers.range, size);
    if (range === 'unsatisfiable') return reply(416, { 'content-range': `bytes */${size}` }, 'outside the file\n');
    if (range === null) return reply(400, {}, 'bad range\n');
    const length = range.last - range.first + 1;
    const drop = fault === 'drop' || (fault === null && Math.random() < dropRate);
    void (async () => {
      const buf = Buffer.allocUnsafe(length);
      let got = 0;
      while (got < length) {
        const { bytesRead } = await fh.read(buf, got, length - got, range.first + got);
        if (bytesRead === 0) break;
        got += bytesRead;
      }
      rec.status = 206;
      res.writeHead(206, {
        'content-length': length,
        'content-range': `bytes ${range.first}-${range.last}/${options.hideSize ? '*' : size}`,
        'accept-ranges': 'bytes',
      });
      if (drop) {
        // Half the body, then the connection goes away as if the network broke.
        stats.drops++;
        rec.fault = 'drop';
        const half = Math.floor(length / 2);
        stats.bytes += half;
        res.write(buf.subarray(0, half), () => req.socket.destroy());
        return;
      }
      stats.ranged++;
      stats.bytes += length;
      res.end(buf);
    })().catch((err: Error) => {
      req.socket.destroy(err);
    });
  };

  const server = options.tls ? https.createServer({ key: options.tls.key, cert: options.tls.cert }, handler) : http.createServer(handler);
  server.keepAliveTimeout = 30_000;
  server.on('connection', (s: Socket) => {
    stats.connections++;
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  if (options.unixSocket) server.listen(options.unixSocket);
  else server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const scheme = options.tls ? 'https' : 'http';
  const origin = options.unixSocket ? `${scheme}://localhost` : `${scheme}://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return {
    url: origin + filePath,
    origin,
    requests,
    stats,
    failNext(n, how) {
      for (let i = 0; i < n; i++) forced.push(how);
    },
    setFaults(f) {
      if (f.dropRate !== undefined) dropRate = f.dropRate;
      if (f.errorRate !== undefined) errorRate = f.errorRate;
    },
    async close() {
      const closed = new Promise<void>((r) => server.close(() => r()));
      for (const s of sockets) s.destroy();
      await closed;
      await fh.close();
      if (options.unixSocket) rmSync(options.unixSocket, { force: true });
    },
  };
}
