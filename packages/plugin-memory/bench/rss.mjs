#!/usr/bin/env node
/**
 * RSS of the memory plugin under scattered writes, measured on a real server process.
 *
 *   node packages/plugin-memory/bench/rss.mjs [--piece 4096] [--count 65536] [--size 1T]
 *        [--align PIECE] [--depth 64] [--seed 1] [--args 'allocator=sparse'] [--plugin memory]
 *
 * Starts `nbdx -f -U SOCKET memory SIZE`, writes COUNT pieces of PIECE bytes at distinct random
 * offsets (multiples of --align, default the piece size) with DEPTH requests in flight, reads
 * 1024 of them back and checks them, and prints VmRSS of the server before and after (and its
 * peak, VmHWM) as one JSON line. Build the plugin first: the CLI loads its dist (or --plugin, a
 * path to another build of it, to compare).
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { NbdClient } from '@nbdx/client';

const here = path.dirname(fileURLToPath(import.meta.url));
const bin = path.resolve(here, '../../nbdx/bin/nbdx.js');
const MiB = 1024 * 1024;

function option(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : dflt;
}
function bytes(s) {
  const m = /^(\d+)([kKMGT]?)$/.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  return Number(m[1]) * 1024 ** ' KMGT'.indexOf(m[2].toUpperCase() || ' ');
}

const piece = bytes(option('piece', '4096'));
const count = Number(option('count', '65536'));
const sizeArg = option('size', '1T');
const size = bytes(sizeArg);
const align = bytes(option('align', String(piece)));
const depth = Number(option('depth', '64'));
const seed = Number(option('seed', '1'));
const plugin = option('plugin', 'memory');
const extra = option('args', '').split(' ').filter(Boolean);

/** xorshift32: the same offsets every run for a seed. */
function rng(s) {
  let x = s >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

/** Distinct offsets, multiples of `align`, with room for a whole piece before the end. */
function offsets() {
  const r = rng(seed);
  const slots = Math.floor((size - piece) / align) + 1;
  const seen = new Set();
  const out = [];
  while (out.length < count) {
    const slot = ((r() & 0x1fffff) * 2 ** 32 + r()) % slots;
    const off = slot * align;
    // Overlapping pieces would make the read-back check depend on order: skip them.
    const key = Math.floor(off / piece);
    if (seen.has(key) || seen.has(key + 1) || seen.has(key - 1)) continue;
    seen.add(key);
    out.push(off);
  }
  return out;
}

/** Piece contents: every 8 bytes name the offset they were written at, so misplaced data shows. */
function fill(buf, off) {
  for (let i = 0; i < buf.length; i += 8) {
    buf.writeUInt32LE((off + i) % 2 ** 32, i);
    buf.writeUInt32LE(Math.floor((off + i) / 2 ** 32) ^ 0x5a5a5a5a, i + 4);
  }
}

function status(pid, field) {
  const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m[1]) * 1024;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function measure() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-mem-rss-'));
  const sock = path.join(dir, 'sock');
  const child = spawn(process.execPath, [bin, '-f', '--print-uri', '-U', sock, plugin, sizeArg, ...extra], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  try {
    const uri = await new Promise((resolve, reject) => {
      let out = '';
      child.stdout.on('data', (d) => {
        out += d;
        if (out.includes('\n')) resolve(out.split('\n')[0].trim());
      });
      child.on('exit', (code) => reject(new Error(`nbdx exited (${code})`)));
    });
    const pid = child.pid;
    const c = await NbdClient.connect(uri);
    // One small write and read first, so the baseline includes a served connection.
    await c.pwrite(Buffer.alloc(4096, 1), 0);
    await c.pread(4096, 0);
    await sleep(300);
    const before = status(pid, 'VmRSS');
    fs.writeFileSync(`/proc/${pid}/clear_refs`, '5'); // restart VmHWM
    const offs = offsets();
    const t0 = process.hrtime.bigint();
    let next = 0;
    const worker = async () => {
      const buf = Buffer.allocUnsafe(piece);
      while (next < offs.length) {
        const off = offs[next++];
        fill(buf, off);
        await c.pwrite(buf, off);
      }
    };
    await Promise.all(Array.from({ length: depth }, worker));
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    await sleep(500);
    const after = status(pid, 'VmRSS');
    const peak = status(pid, 'VmHWM');
    // Read a sample back.
    const want = Buffer.allocUnsafe(piece);
    let bad = 0;
    const sample = offs.filter((_, i) => i % Math.max(1, Math.floor(offs.length / 1024)) === 0);
    for (const off of sample) {
      const got = await c.pread(piece, off);
      fill(want, off);
      if (!got.equals(want)) bad++;
    }
    await c.disconnect();
    return {
      piece,
      count,
      size: sizeArg,
      align,
      plugin,
      args: extra.join(' '),
      dataMiB: (piece * count) / MiB,
      rssBeforeMiB: +(before / MiB).toFixed(1),
      rssAfterMiB: +(after / MiB).toFixed(1),
      growthMiB: +((after - before) / MiB).toFixed(1),
      peakGrowthMiB: +((peak - before) / MiB).toFixed(1),
      writeSeconds: +seconds.toFixed(2),
      sampled: sample.length,
      bad,
    };
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => (child.exitCode !== null ? r() : child.on('exit', r)));
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  console.log(JSON.stringify(await measure()));
}
