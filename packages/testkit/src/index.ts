/**
 * @nbdx/testkit: serve a plugin or filter in-process, run the conformance suite against it, and
 * drive the real NBD tools from tests.
 */
export { servePlugin, type TestServer, type TestServerOptions } from './serve.js';
export { describeConformance, type ConformanceSubject, type ConformanceOptions } from './conformance.js';
export { hasTool, needTools, run, runOk, nbdsh, tmpDir, startCli, nbdxBin, TOOL_ENV, type RunResult, type CliServer } from './tools.js';
