#!/usr/bin/env node
/**
 * A/B of the readahead and cache filters over a slow layer (not a test, not published):
 *
 *   node packages/filter-readahead/bench/readahead-ab.mjs IMAGE [1x1|default|qemu] [ROUNDS] [RDELAY]
 *
 * Serves IMAGE with the file plugin under `delay rdelay=RDELAY` (default 5ms: every read below
 * waits that long, whatever its size, like a remote store's round trip), in this process, with
 * four stacks above it, alternating them round by round so that a busy moment hits all alike;
 * copies it out with nbdcopy (one request in flight, or nbdcopy's defaults) or qemu-img convert;
 * prints the median time and, per round, [ms, reads that reached the slow layer].
 * READAHEAD_MAX=SIZE sets readahead-max. Needs built packages.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { promisify } from 'node:util';
import { serve } from '@nbdx/server';
import { createFilePlugin } from '@nbdx/plugin-file';
import { createDelayFilter } from '@nbdx/filter-delay';
import { createCacheFilter } from '@nbdx/filter-cache';
import { createReadaheadFilter } from '../dist/index.js';

const run = promisify(execFile);
const [image, client = '1x1', rounds = '3', rdelay = '5ms'] = process.argv.slice(2);
if (!image) {
  console.error('usage: readahead-ab.mjs IMAGE [1x1|default|qemu] [ROUNDS] [RDELAY]');
  process.exit(1);
}
const work = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-readahead-ab-'));
const out = path.join(work, 'copy.img');
const stacks = {
  none: { filters: () => [], config: [] },
  'readahead (buffer)': { filters: () => [createReadaheadFilter()], config: [['readahead-mode', 'buffer']] },
  'readahead + cache': { filters: () => [createReadaheadFilter(), createCacheFilter()], config: [] },
  'readahead + cache, cache-on-read': {
    filters: () => [createReadaheadFilter(), createCacheFilter()],
    config: [['cache-on-read', 'true']],
  },
};
const results = {};
try {
  for (let round = 0; round < Number(rounds); round++) {
    for (const [name, stack] of Object.entries(stacks)) {
      let reads = 0;
      // Counts what reaches the slow layer: the lowest filter, under the delay.
      const count = { apiVersion: 2, name: 'count', pread: (next, _h, buf, off, fl) => (reads++, next.pread(buf, off, fl)) };
      const config = [['file', image], ['rdelay', rdelay], ...stack.config];
      if (process.env.READAHEAD_MAX && name !== 'none') config.push(['readahead-max', process.env.READAHEAD_MAX]);
      const s = await serve({ plugin: createFilePlugin(), filters: [...stack.filters(), createDelayFilter(), count], config, error: () => {} });
      const t = performance.now();
      if (client === 'qemu') await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', s.uri, out]);
      else await run('nbdcopy', [...(client === '1x1' ? ['--connections=1', '--requests=1'] : []), s.uri, out]);
      const ms = Math.round(performance.now() - t);
      await s.close();
      (results[name] ??= []).push([ms, reads]);
    }
  }
} finally {
  fs.rmSync(work, { recursive: true, force: true });
}
const size = fs.statSync(image).size;
for (const [name, runs] of Object.entries(results)) {
  const ms = runs.map((r) => r[0]).sort((a, b) => a - b)[Math.floor(runs.length / 2)];
  const mibs = (size / 1048576 / (ms / 1000)).toFixed(0);
  console.log(`${name.padEnd(34)} median ${String(ms).padStart(5)} ms  ${mibs.padStart(5)} MiB/s  rounds ${JSON.stringify(runs)}`);
}
