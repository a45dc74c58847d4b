/**
 * Run the test imageio server as its own process (for the bench): prints the transfer URL on
 * stdout, serves until killed. Options: --size SIZE (default 1G), --max-writers N,
 * --max-readers N, --unix PATH|@NAME (also serve and advertise a Unix socket; @NAME is the
 * abstract socket NAME: a NUL cannot go through argv),
 * --tls KEY.pem,CERT.pem.
 */
import { readFileSync } from 'node:fs';
import { parseSize } from '@nbdx/server/api';
import { TestImageioServer } from '../src/test-server.js';

const args = process.argv.slice(2);
const opt = (name: string): string | undefined => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : undefined;
};
const tls = opt('--tls')?.split(',');
const srv = await TestImageioServer.start({
  size: parseSize(opt('--size') ?? '1G'),
  maxReaders: Number(opt('--max-readers') ?? 8),
  maxWriters: Number(opt('--max-writers') ?? 8),
  unixSocket: opt('--unix')?.replace(/^@/, '\0'),
  tls: tls ? { key: readFileSync(tls[0]!), cert: readFileSync(tls[1]!) } : undefined,
  keepRequests: false,
});
process.stdout.write(`${srv.url}\n`);
const stop = () => {
  const puts = srv.counts.get('PUT') ?? 0;
  const flushes = srv.counts.get('PATCH') ?? 0;
  const used = srv.connections.filter((c) => c.writes > 0).length;
  process.stderr.write(`test imageio server: ${puts} PUTs, ${flushes} PATCHes, ${used} connections wrote\n`);
  void srv.close().then(() => process.exit(0));
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
