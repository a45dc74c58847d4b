import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import { nbdshOk, nbdxBin, needNbdx, needTools, removeDir, run, startCli, tmpDir, waitFor } from '@nbdx/testkit';
import { createStatsFilter } from './index.js';

const tools = needTools('nbdsh', 'nbdkit');
const cli = needNbdx();

/**
 * One nbdsh session with a fixed set of requests; bucket counts are all different so that
 * nbdkit 1.32 (which keeps one bucket of several with equal counts) prints every bucket too.
 * Written as a file: it runs under both servers through `--run`.
 */
const WORKLOAD = `
import nbd
for i in range(20): h.pread(4096, i * 4096)
for i in range(5): h.pread(65536, (1 << 20) + i * 65536)
h.pread(512, 512)
for i in range(96): h.pread(4096, (2 * i + 1) * 4096 + (8 << 20))
for i in range(1, 5): h.pread(4096, i << 22)
for i in range(7): h.pwrite(b"x" * 8192, 8192 * i)
h.pwrite(b"y" * 1000, 513, nbd.CMD_FLAG_FUA)
for i in range(3): h.trim(65536, i * 65536)
h.trim(1 << 20, 1 << 20)
h.zero(8192, 4096)
h.flush()
h.cache(4096, 0)
h.block_status(1 << 20, 0, lambda *a: 0)
`;

/** The report with every number that depends on timing (times, sizes of rates) made a placeholder. */
function shape(report: string): string[] {
  return report
    .trimEnd()
    .split('\n')
    .map((l) =>
      l
        .replace(/\d+\.\d{6} s/g, 'T s')
        .replace(/(\d+(\.\d+)? (bytes|KiB|MiB|GiB)|\(n\/a\))\/s/g, 'RATE/s')
        // nbdkit 1.32 prints the bytes of every request as "other sizes" (not just the rest)
        .replace(/(other sizes: .*reqs, ).*( total\))/, '$1SIZE$2'),
    );
}

let dir: string;
beforeAll(() => {
  dir = tmpDir('nbdx-stats-');
  fs.writeFileSync(path.join(dir, 'workload.py'), WORKLOAD);
});
afterAll(() => removeDir(dir));

const nbdshRun = (d: string) => `nbdsh --base-allocation -u "$uri" -c "exec(open('${d}/workload.py').read())"`;

describe.skipIf(!tools || !cli)('stats filter under the nbdx CLI, compared with nbdkit', () => {
  it('writes the same report as nbdkit for the same requests (times and rates aside)', async () => {
    const ours = path.join(dir, 'nbdx.txt');
    const theirs = path.join(dir, 'nbdkit.txt');
    const a = await run(process.execPath, [nbdxBin(), '-U', '-', '--filter=stats', 'memory', '1G', `statsfile=${ours}`, '--run', nbdshRun(dir)]);
    expect(a.stderr).toBe('');
    expect(a.code).toBe(0);
    const b = await run('nbdkit', ['-U', '-', '--filter=stats', 'memory', '1G', `statsfile=${theirs}`, '--run', nbdshRun(dir)]);
    expect(b.code).toBe(0);
    const mine = fs.readFileSync(ours, 'utf8');
    expect(shape(mine)).toEqual(shape(fs.readFileSync(theirs, 'utf8')));
    // and the report has what it should: every operation, the ones with sizes broken down
    for (const op of ['read', 'write', 'trim', 'zero', 'extents', 'cache', 'flush']) expect(mine).toMatch(new RegExp(`^${op}: \\d+ ops, `, 'm'));
    expect(mine).toContain('read: 126 ops, ');
    expect(mine).toMatch(/^ {9}22\+ bit-aligned: {2}4\.2% \(5\)$/m);
  });

  it('statsappend=true keeps what the file held; statsthreshold=0 leaves out the breakdown', async () => {
    const file = path.join(dir, 'append.txt');
    fs.writeFileSync(file, 'earlier run\n');
    const r = await run(process.execPath, [
      nbdxBin(), '-U', '-', '--filter=stats', 'memory', '1G', `statsfile=${file}`, 'statsappend=true', 'statsthreshold=0',
      '--run', nbdshRun(dir),
    ]);
    expect(r.code).toBe(0);
    const text = fs.readFileSync(file, 'utf8');
    expect(text.startsWith('earlier run\ntotal: ')).toBe(true);
    expect(text).not.toContain('breakdown');
    expect(text).toContain('\nflush: 1 ops, ');
  });

  it('statsinterval writes the statistics so far while the server runs', async () => {
    const file = path.join(dir, 'interval.txt');
    const server = await startCli(['-U', path.join(dir, 'interval.sock'), '--filter=stats', 'memory', '1M', `statsfile=${file}`, 'statsinterval=100ms']);
    try {
      await nbdshOk(server.uri, 'h.pread(4096, 0)');
      await waitFor(() => fs.existsSync(file) && fs.readFileSync(file, 'utf8').includes('read: 1 ops'), 5000, 'an intermediate report');
      // Each report replaces the last: one total line.
      expect(fs.readFileSync(file, 'utf8').match(/^total:/gm)).toHaveLength(1);
      await nbdshOk(server.uri, 'h.pread(512, 0); h.flush()');
    } finally {
      expect(await server.stop()).toBe(0);
    }
    const text = fs.readFileSync(file, 'utf8');
    expect(text.match(/^total:/gm)).toHaveLength(1);
    expect(text).toMatch(/^read: 2 ops, /m);
    expect(text).toMatch(/^flush: 1 ops, /m);
  });

  it('statsfile is required, with nbdkit\'s message', async () => {
    const r = await run(process.execPath, [nbdxBin(), '-U', '-', '--filter=stats', 'memory', '1M', '--run', 'true']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/stats filter requires statsfile parameter/);
  });

  it('is found by name (--dump-plugin lists it)', async () => {
    const r = await run(process.execPath, [nbdxBin(), '--filter=stats', 'memory', '1M', `statsfile=${path.join(dir, 'x')}`, '--dump-plugin']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^filter_name=stats$/m);
  });
});

describe('stats filter embedded', () => {
  it('counts only requests that succeed, and reports at close', async () => {
    const file = path.join(dir, 'embedded.txt');
    const server = await serve({
      plugin: createMemoryPlugin(),
      filters: [createStatsFilter()],
      config: [['size', '1M'], ['statsfile', file], ['statsthreshold', '100']],
    });
    const { NbdClient } = await import('@nbdx/client');
    const c = await NbdClient.connect(server.uri);
    await c.pwrite(Buffer.alloc(4096, 1), 8192);
    await c.pread(4096, 8192);
    await c.zero(4096, 0);
    await c.disconnect();
    await server.close();
    const text = fs.readFileSync(file, 'utf8');
    expect(text).toMatch(/^total: 3 ops, /);
    expect(text).toMatch(/^write: 1 ops, \d\.\d{6} s, 4\.00 KiB, /m);
    expect(text).toContain('    12 bits: 100.0% (1 reqs, 4.00 KiB total)\n         13 bit aligned: 100.0% (1)\n');
    expect(text).toMatch(/^zero: 1 ops, /m);
  });
});
