/**
 * @nbdx/testkit: serve a plugin or filter in-process, run the conformance suite against it, and
 * drive the real NBD tools from tests.
 */
export { servePlugin, type TestServer, type TestServerOptions } from './serve.js';
export { describeConformance, type ConformanceSubject, type ConformanceOptions } from './conformance.js';
export {
  TOOL_ENV,
  hasTool,
  needTools,
  run,
  runOk,
  spawnTool,
  nbdsh,
  nbdshOk,
  NBDSH_HELPERS,
  qemuIo,
  qemuImgMap,
  nbdinfoMap,
  exportSize,
  unixUri,
  socketOf,
  exportUri,
  tmpDir,
  removeDir,
  waitFor,
  waitForSocket,
  socketIn,
  startPeer,
  startNbdkit,
  startQemuNbd,
  startCli,
  nbdxBin,
  needNbdx,
  type RunOptions,
  type RunResult,
  type BackgroundTool,
  type BackgroundExit,
  type NbdshOptions,
  type NbdinfoExtent,
  type QemuImgMapEntry,
  type Peer,
  type CliServer,
} from './tools.js';
export { startCeph, hasCeph, needCeph, cephPrograms, cephDaemonPids, type CephCluster, type CephOptions } from './ceph.js';
export { startRangeServer, type RangeServer, type RangeServerOptions, type RangeRequest } from './http-server.js';
export { makeTestCerts, type TestCerts } from './certs.js';
