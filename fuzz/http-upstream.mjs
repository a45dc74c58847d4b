#!/usr/bin/env node
/**
 * The http stack's upstream: the HTTP range server the http plugin's own tests use
 * (@nbdx/testkit's startRangeServer, no faults switched on), serving one file on a Unix socket,
 * in a process of its own so that its work does not share the fuzzer's event loop and its RSS
 * and exit are watched like any upstream's.
 *
 *   node fuzz/http-upstream.mjs FILE SOCKET [FAULTS]
 *
 * FAULTS (JSON, optional) switches on the server's own misbehaviour, e.g.
 * `{"errorRate":0.02,"dropRate":0.02}`: that fraction of GETs answered 503, or cut half-way.
 *
 * It ends on SIGTERM, and by itself once its parent (the fuzzer) is gone.
 */
import { startRangeServer } from '@nbdx/testkit/http-server';

const [file, unixSocket, faults] = process.argv.slice(2);
if (!file || !unixSocket) {
  console.error('usage: http-upstream.mjs FILE SOCKET [FAULTS]');
  process.exit(2);
}
const server = await startRangeServer({ file, unixSocket, ...(faults ? JSON.parse(faults) : {}) });
const parent = process.ppid;
const stop = async () => {
  clearInterval(watch);
  await server.close();
  process.exit(0);
};
// No --exit-with-parent in Node: a changed parent pid means the fuzzer died without stopping us.
const watch = setInterval(() => process.ppid !== parent && void stop(), 1000);
process.once('SIGTERM', () => void stop());
process.once('SIGINT', () => void stop());
