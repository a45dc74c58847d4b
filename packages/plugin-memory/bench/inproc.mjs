#!/usr/bin/env node --expose-gc
/**
 * Where the memory of scattered writes goes, in-process: RSS, V8 heap, external memory and
 * ArrayBuffers (process.memoryUsage) before and after, with the SparseArray of a built plugin.
 *
 *   node --expose-gc packages/plugin-memory/bench/inproc.mjs [--piece 4096] [--count 65536]
 *        [--module packages/plugin-memory/dist/index.js]
 */
import * as path from 'node:path';
import { pathToFileURL } from 'node:url';

function option(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
}
const piece = Number(option('piece', '4096'));
const count = Number(option('count', '65536'));
const mod = path.resolve(option('module', new URL('../dist/index.js', import.meta.url).pathname));
const { SparseArray } = await import(pathToFileURL(mod).href);
const MiB = 1024 * 1024;
const size = 2 ** 40;

function rng(s) {
  let x = s >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

const usage = () => {
  globalThis.gc?.();
  return process.memoryUsage();
};
const before = usage();
const a = new SparseArray(size);
const r = rng(1);
const buf = Buffer.alloc(piece, 0x5a);
const slots = Math.floor(size / piece);
for (let i = 0; i < count; i++) a.write(buf, (((r() & 0x1fffff) * 2 ** 32 + r()) % slots) * piece);
const after = usage();
const row = {};
for (const k of ['rss', 'heapUsed', 'external', 'arrayBuffers']) row[k] = +((after[k] - before[k]) / MiB).toFixed(1);
const storedMiB = a.storedBytes === undefined ? null : a.storedBytes / MiB; // older builds did not count
console.log(JSON.stringify({ module: path.relative(process.cwd(), mod), piece, count, growthMiB: row, storedMiB }));
