/**
 * The bench's https range server, in its own process: testkit's startRangeServer (bundled from
 * source into bench/.build, since testkit's entry also loads vitest).
 *   node .build/range-server-main.js FILE KEYFILE CERTFILE  → prints the URL; stops when stdin closes.
 */
import { readFileSync } from 'node:fs';
import { startRangeServer } from '../../testkit/src/http-server.js';

const [file, key, cert] = process.argv.slice(2);
const srv = await startRangeServer({ file: file!, tls: { key: readFileSync(key!), cert: readFileSync(cert!) } });
process.stdout.write(`${srv.url}\n`);
process.stdin.resume();
process.stdin.on('end', () => {
  process.stderr.write(`range server: ${srv.stats.ranged} ranged GETs on ${srv.stats.connections} connections, ${(srv.stats.bytes / 1048576).toFixed(0)} MiB sent\n`);
  void srv.close().then(() => process.exit(0));
});
