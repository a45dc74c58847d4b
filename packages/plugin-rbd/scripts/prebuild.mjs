#!/usr/bin/env node
/**
 * Compiles native/rbd_ops.c into prebuilds/linux-<arch>-glibc/rbd_ops.node for this machine (the
 * package's `build:prebuilds` script, and `prepack`, so a packed or published tarball carries a
 * binary made from the source it ships). N-API is ABI-stable: one binary serves every Node line.
 * It links librbd.so.1 and librados.so.2 dynamically, so users need librbd1 installed but not its
 * headers. Only the host's target is made: cross builds would need librbd for the other CPU.
 *
 * Needs a C compiler, Node's headers (PREFIX/include/node, or NBDX_RBD_NODE_HEADERS) and librbd's
 * (librbd-dev). The result is loaded once in a child Node before it is put in place.
 *
 *   node scripts/prebuild.mjs [--out DIR]     (default DIR: prebuilds/)
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const packageRoot = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const source = path.join(packageRoot, 'native/rbd_ops.c');

function fail(message) {
  console.error(`prebuild: ${message}`);
  process.exit(1);
}

if (process.platform !== 'linux') fail('the librbd addon is built on Linux only');
if (!process.report.getReport().header?.glibcVersionRuntime) fail('only glibc systems are supported (Ceph ships for glibc)');

const prefix = path.join(path.dirname(process.execPath), '..');
const headers = [process.env.NBDX_RBD_NODE_HEADERS, path.join(prefix, 'include/node'), '/usr/include/node'].find(
  (d) => d && fs.existsSync(path.join(d, 'node_api.h')),
);
if (!headers) fail("no node_api.h found; set NBDX_RBD_NODE_HEADERS to Node's include/node");
const compiler = ['cc', 'gcc'].find((c) => spawnSync(c, ['--version'], { stdio: 'ignore' }).status === 0);
if (!compiler) fail('no C compiler (cc, gcc)');

const target = `linux-${process.arch}-glibc`;
// --out DIR puts it in DIR/<target>/ instead of prebuilds/ (the tests build a copy there).
const outAt = process.argv.indexOf('--out');
if (outAt >= 0 && !process.argv[outAt + 1]) fail('--out needs a directory');
const dir = path.join(outAt >= 0 ? path.resolve(process.argv[outAt + 1]) : path.join(packageRoot, 'prebuilds'), target);
fs.mkdirSync(dir, { recursive: true });
const out = path.join(dir, 'rbd_ops.node');
// Ends in .node: require() picks the loader by extension.
const partial = path.join(dir, `rbd_ops.${process.pid}.tmp.node`);
const cc = spawnSync(
  compiler,
  ['-shared', '-fPIC', '-O2', '-fvisibility=hidden', '-Wall', '-Wextra', '-Wno-unused-parameter', '-s', `-I${headers}`, '-o', partial, source, '-lrbd', '-lrados'],
  { encoding: 'utf8' },
);
if (cc.status !== 0) {
  fs.rmSync(partial, { force: true });
  fail(`${compiler} failed${/librbd\.h/.test(cc.stderr) ? ' (install librbd-dev)' : ''}:\n${cc.stderr}`);
}
const load = spawnSync(process.execPath, ['-e', "if (typeof require(process.argv[1]).open !== 'function') throw new Error('no open()')", partial], {
  encoding: 'utf8',
});
if (load.status !== 0) {
  fs.rmSync(partial, { force: true });
  fail(`built but does not load: ${load.stderr.split('\n').find((l) => /Error/.test(l)) ?? load.status}`);
}
// Renamed into place whole, so a reader never sees a half-written file.
fs.renameSync(partial, out);
console.log(`prebuild: ${path.relative(process.cwd(), out)}: ${fs.statSync(out).size} bytes (${compiler}, loads here)`);
