#!/usr/bin/env node
/**
 * Compiles a package's N-API addon (native/NAME.c) into prebuilds/<target>/NAME.node for the
 * common Linux targets. The packages with an addon (@nbdx/plugin-file, @nbdx/native) run it from
 * their `prebuild` script and at `prepack`, so every packed or published tarball carries binaries
 * made from the source it ships. Which addon is named by the package's package.json:
 * `"nbdxAddon": { "name": "file_ops", "exports": ["map", ...] }` (the exports a good build has).
 * N-API is ABI-stable, so one binary per target serves
 * every Node line; each is compiled straight with a C compiler against the running Node's own
 * headers (PREFIX/include/node), no node-gyp and no download.
 *
 *   node prebuild-addon.mjs --package DIR                    every target whose compiler is installed
 *   node prebuild-addon.mjs --package DIR --all              every target; a missing compiler is an error
 *   node prebuild-addon.mjs --package DIR --target linux-x64-glibc [--out DIR]
 *
 * linux-x64-glibc is always required (the packages promise it; check:packages checks it). Each
 * output is checked: an ELF shared object for the right machine, linked against the right C
 * library, needing no newer glibc than Node 22 itself (2.28); the one this machine can load is
 * loaded. NBDX_PREBUILD_ALL=1 is --all; NBDX_PREBUILD_NODE_HEADERS names the headers folder;
 * NBDX_PREBUILD_CFLAGS adds compiler flags (the tests use it for a variant build). The older
 * NBDX_FILE_* names of the three still work.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const env = (name) => process.env[`NBDX_PREBUILD_${name}`] ?? process.env[`NBDX_FILE_PREBUILD_${name}`];

/** Node 22, the oldest supported line, needs glibc 2.28 itself: a prebuild must not ask for more. */
const MAX_GLIBC = [2, 28];
const EM_X86_64 = 62;
const EM_AARCH64 = 183;

/**
 * The targets: ELF machine, C library, and compilers that make it from any host (cc is added
 * for the host's own target). Debian: gcc-aarch64-linux-gnu for arm64, musl-tools for musl.
 */
const TARGETS = {
  'linux-x64-glibc': { arch: 'x64', libc: 'glibc', machine: EM_X86_64, cross: ['x86_64-linux-gnu-gcc'] },
  'linux-arm64-glibc': { arch: 'arm64', libc: 'glibc', machine: EM_AARCH64, cross: ['aarch64-linux-gnu-gcc'] },
  // Debian's musl-gcc is a wrapper for the host's own CPU.
  'linux-x64-musl': { arch: 'x64', libc: 'musl', machine: EM_X86_64, cross: ['x86_64-linux-musl-gcc', ...(os.arch() === 'x64' ? ['musl-gcc'] : [])] },
};
const REQUIRED = 'linux-x64-glibc';

const CFLAGS = ['-shared', '-fPIC', '-O2', '-fvisibility=hidden', '-Wall', '-Wextra', '-Wno-unused-parameter', '-s'];

function usage(message) {
  console.error(`prebuild: ${message}\nusage: node prebuild-addon.mjs --package DIR [--all] [--target NAME]... [--out DIR]`);
  process.exit(2);
}

function parseArgs(argv) {
  const o = { targets: [], out: null, pkg: null, all: env('ALL') === '1' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--all') o.all = true;
    else if (a === '--target' || a === '--out' || a === '--package') {
      const v = argv[++i];
      if (!v) usage(`${a} needs a value`);
      if (a === '--out') o.out = path.resolve(v);
      else if (a === '--package') o.pkg = path.resolve(v);
      else if (!(v in TARGETS)) usage(`unknown target '${v}' (known: ${Object.keys(TARGETS).join(', ')})`);
      else o.targets.push(v);
    } else usage(`unknown argument '${a}'`);
  }
  if (!o.pkg) usage('--package is required');
  const addon = JSON.parse(fs.readFileSync(path.join(o.pkg, 'package.json'), 'utf8')).nbdxAddon;
  if (!addon?.name || !Array.isArray(addon.exports)) usage(`${o.pkg}/package.json has no nbdxAddon { name, exports }`);
  o.addon = addon;
  o.source = path.join(o.pkg, 'native', `${addon.name}.c`);
  o.out ??= path.join(o.pkg, 'prebuilds');
  return o;
}

/** Same rule as src/native.ts detectLibc (the report header names glibc; musl has no field). */
function hostLibc() {
  const report = process.report.getReport();
  if (report.header?.glibcVersionRuntime) return 'glibc';
  if (report.sharedObjects?.some((s) => /(^|\/)(ld-musl-|libc\.musl-)/.test(s))) return 'musl';
  return undefined;
}

function onPath(cmd) {
  return (process.env.PATH ?? '').split(':').some((d) => {
    try {
      fs.accessSync(path.join(d || '.', cmd), fs.constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

/** The headers of the running Node (official tarballs and Debian's nodejs carry them). */
function nodeHeaders() {
  const prefix = path.join(path.dirname(process.execPath), '..');
  const dirs = [
    process.env.NBDX_PREBUILD_NODE_HEADERS ?? process.env.NBDX_FILE_NODE_HEADERS,
    process.env.npm_config_nodedir && path.join(process.env.npm_config_nodedir, 'include/node'),
    path.join(prefix, 'include/node'),
    '/usr/include/node',
  ].filter(Boolean);
  const found = dirs.find((d) => fs.existsSync(path.join(d, 'node_api.h')));
  if (!found) {
    console.error(`prebuild: no node_api.h in ${dirs.join(', ')}; set NBDX_PREBUILD_NODE_HEADERS to Node's include/node`);
    process.exit(1);
  }
  return found;
}

/**
 * Debian's musl-gcc wrapper (also installed as x86_64-linux-musl-gcc) searches musl's headers
 * only, and musl has no kernel headers. When the compiler cannot find <linux/fs.h> and the target
 * is this machine's CPU, give it the host's linux/ and asm/, searched after everything else so
 * that nothing of glibc's comes in.
 */
function kernelHeadersFor(compiler, t, tmp) {
  const probe = spawnSync(compiler, ['-E', '-x', 'c', '-o', '/dev/null', '-'], { input: '#include <linux/fs.h>\n', encoding: 'utf8' });
  if (probe.status === 0 || t.arch !== os.arch()) return [];
  const triplet = spawnSync('gcc', ['-dumpmachine'], { encoding: 'utf8' }).stdout?.trim();
  const dir = path.join(tmp, 'kernel-headers');
  fs.mkdirSync(dir, { recursive: true });
  for (const [name, from] of [
    ['linux', '/usr/include/linux'],
    ['asm-generic', '/usr/include/asm-generic'],
    ['asm', triplet ? `/usr/include/${triplet}/asm` : '/usr/include/asm'],
  ]) {
    if (fs.existsSync(from) && !fs.existsSync(path.join(dir, name))) fs.symlinkSync(from, path.join(dir, name));
  }
  return ['-idirafter', dir];
}

/** DT_NEEDED names and every string of the dynamic string table of a 64-bit little-endian ELF. */
function readElf(file) {
  const b = fs.readFileSync(file);
  if (b.length < 64 || b.readUInt32BE(0) !== 0x7f454c46) throw new Error('not an ELF file');
  if (b[4] !== 2 || b[5] !== 1) throw new Error('not a 64-bit little-endian ELF');
  const type = b.readUInt16LE(16);
  const machine = b.readUInt16LE(18);
  const shoff = Number(b.readBigUInt64LE(0x28));
  const shentsize = b.readUInt16LE(0x3a);
  const shnum = b.readUInt16LE(0x3c);
  const section = (i) => {
    const o = shoff + i * shentsize;
    return { type: b.readUInt32LE(o + 4), offset: Number(b.readBigUInt64LE(o + 0x18)), size: Number(b.readBigUInt64LE(o + 0x20)), link: b.readUInt32LE(o + 0x28) };
  };
  const needed = [];
  let strings = [];
  for (let i = 0; i < shnum; i++) {
    const s = section(i);
    if (s.type !== 6) continue; // SHT_DYNAMIC
    const str = section(s.link);
    const at = (off) => b.toString('latin1', str.offset + off, b.indexOf(0, str.offset + off));
    strings = b.toString('latin1', str.offset, str.offset + str.size).split('\0');
    for (let o = s.offset; o + 16 <= s.offset + s.size; o += 16) {
      const tag = b.readBigInt64LE(o);
      if (tag === 0n) break;
      if (tag === 1n) needed.push(at(Number(b.readBigUInt64LE(o + 8)))); // DT_NEEDED
    }
  }
  return { type, machine, needed, strings, size: b.length };
}

/** Why a compiled file is wrong for its target, or null; plus a description for the log. */
function checkOutput(file, name, t) {
  const elf = readElf(file);
  const problems = [];
  if (elf.type !== 3) problems.push(`ELF type ${elf.type}, not a shared object`);
  if (elf.machine !== t.machine) problems.push(`ELF machine ${elf.machine}, expected ${t.machine}`);
  const glibcs = elf.strings
    .map((s) => /^GLIBC_(\d+)\.(\d+)/.exec(s))
    .filter(Boolean)
    .map((m) => [Number(m[1]), Number(m[2])])
    .sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const newest = glibcs[glibcs.length - 1];
  if (t.libc === 'glibc') {
    if (!elf.needed.includes('libc.so.6')) problems.push(`does not link glibc (needs ${elf.needed.join(', ') || 'nothing'})`);
    if (newest && (newest[0] > MAX_GLIBC[0] || (newest[0] === MAX_GLIBC[0] && newest[1] > MAX_GLIBC[1]))) {
      problems.push(`needs GLIBC_${newest.join('.')}, newer than ${MAX_GLIBC.join('.')} (what Node 22 needs)`);
    }
  } else {
    if (elf.needed.includes('libc.so.6') || newest) problems.push('links glibc, not musl');
    if (!elf.needed.some((n) => /^libc\.(so|musl-)/.test(n))) problems.push(`does not link musl (needs ${elf.needed.join(', ') || 'nothing'})`);
  }
  const machine = t.machine === EM_X86_64 ? 'x86-64' : 'AArch64';
  const libc = t.libc === 'glibc' ? `glibc${newest ? ` >= ${newest.join('.')}` : ''}` : 'musl';
  return { problems, describe: `ELF ${machine} shared object, ${libc}, ${elf.size} bytes` };
}

/** Load it in a child Node (a crash must not take this script down) when this machine can. */
function loadsHere(file, exports) {
  const check = 'const m = require(process.argv[1]); for (const f of process.argv.slice(2)) if (typeof m[f] !== "function") throw new Error(`no ${f}()`)';
  const r = spawnSync(process.execPath, ['-e', check, file, ...exports], { encoding: 'utf8' });
  return r.status === 0 ? null : (r.stderr.split('\n').find((l) => /Error/.test(l)) ?? `exit ${r.status}`).trim();
}

function main() {
  const o = parseArgs(process.argv.slice(2));
  const { source } = o;
  if (!fs.existsSync(source)) {
    console.error(`prebuild: ${source} is missing`);
    process.exit(1);
  }
  const explicit = o.targets.length > 0;
  const names = explicit ? o.targets : Object.keys(TARGETS);
  const headers = nodeHeaders();
  const host = { arch: os.arch(), libc: process.platform === 'linux' ? hostLibc() : undefined };
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-prebuild-'));
  const extra = (env('CFLAGS') ?? '').split(/\s+/).filter(Boolean);
  let failed = false;
  try {
    // Without --target the whole set is made anew, so no binary from an older source survives.
    if (!explicit) for (const n of Object.keys(TARGETS)) fs.rmSync(path.join(o.out, n), { recursive: true, force: true });
    for (const name of names) {
      const t = TARGETS[name];
      const own = process.platform === 'linux' && t.arch === host.arch && t.libc === host.libc ? ['cc', 'gcc'] : [];
      const compiler = [...own, ...t.cross].find(onPath);
      const required = explicit || o.all || name === REQUIRED;
      if (!compiler) {
        const msg = `${name}: no compiler (${[...own, ...t.cross].join(', ')})`;
        if (required) {
          console.error(`prebuild: ${msg}`);
          failed = true;
        } else console.log(`prebuild: ${msg}, skipped`);
        continue;
      }
      const dir = path.join(o.out, name);
      fs.mkdirSync(dir, { recursive: true });
      const out = path.join(dir, `${o.addon.name}.node`);
      const partial = `${out}.${process.pid}.tmp`;
      const args = [...CFLAGS, ...extra, `-I${headers}`, ...kernelHeadersFor(compiler, t, tmp), '-o', partial, source];
      const cc = spawnSync(compiler, args, { encoding: 'utf8' });
      if (cc.status !== 0) {
        console.error(`prebuild: ${name}: ${compiler} failed:\n${cc.stderr}${cc.error ?? ''}`);
        fs.rmSync(dir, { recursive: true, force: true });
        failed = true;
        continue;
      }
      if (cc.stderr.trim()) console.warn(`prebuild: ${name}: ${compiler} warned:\n${cc.stderr.trimEnd()}`);
      const { problems, describe } = checkOutput(partial, name, t);
      if (problems.length) {
        console.error(`prebuild: ${name}: ${problems.join('; ')}`);
        fs.rmSync(dir, { recursive: true, force: true });
        failed = true;
        continue;
      }
      // Renamed into place whole, so a reader never sees a half-written file.
      fs.renameSync(partial, out);
      let note = '';
      if (process.platform === 'linux' && t.arch === host.arch && t.libc === host.libc) {
        const why = loadsHere(out, o.addon.exports);
        if (why) {
          console.error(`prebuild: ${name}: built but does not load here: ${why}`);
          fs.rmSync(dir, { recursive: true, force: true });
          failed = true;
          continue;
        }
        note = ', loads here';
      }
      const shown = path.relative(process.cwd(), out);
      console.log(`prebuild: ${shown.startsWith('..') ? out : shown}: ${describe} (${compiler}${note})`);
    }
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  if (failed) process.exit(1);
}

main();
