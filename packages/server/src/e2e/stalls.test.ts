/**
 * No request stalls the event loop for everyone else: on a 1 TiB sparse memory disk with one
 * byte per GiB, one client sends 300 BLOCK_STATUS requests over 4 GiB (extended headers) and 300
 * TRIMs of 4 GiB while another does 4 KiB reads one at a time; the reader's 99th percentile
 * latency stays under 50 ms.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '@nbdx/client';
import { needNbdx, startCli, tmpDir, type CliServer } from '@nbdx/testkit';

const GiB = 1024 ** 3;
const SIZE = 1024 * GiB;
const SPAN = 4 * GiB;
const have = needNbdx();
const dir = tmpDir();
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((sorted.length * p) / 100))]!;
}

describe.skipIf(!have)('event-loop stalls', () => {
  let srv: CliServer;
  beforeAll(async () => {
    srv = await startCli(['-U', path.join(dir, 'stall.sock'), 'memory', '1T']);
    const c = await NbdClient.connect(srv.uri);
    await Promise.all(Array.from({ length: 1024 }, (_, i) => c.pwrite(Buffer.from([i & 0xff || 1]), i * GiB + 12345)));
    await c.disconnect();
  }, 60_000);
  afterAll(() => srv?.stop());

  it('a reader stays fast while another client asks about and trims 4 GiB ranges', async () => {
    const attacker = await NbdClient.connect(srv.uri);
    expect(attacker.extendedHeaders).toBe(true);
    const reader = await NbdClient.connect(srv.uri);
    const latencies: number[] = [];
    let attacking = true;
    const reading = (async () => {
      while (attacking) {
        const t0 = performance.now();
        await reader.pread(4096, 4096);
        latencies.push(performance.now() - t0);
      }
    })();
    // 16 requests in flight at a time, block status and trims over every part of the disk.
    const jobs: Array<() => Promise<unknown>> = [];
    for (let i = 0; i < 300; i++) {
      const off = ((i * 37) % (SIZE / SPAN)) * SPAN;
      jobs.push(() => attacker.blockStatus(SPAN, off));
      jobs.push(() => attacker.trim(SPAN, ((i * 53) % (SIZE / SPAN)) * SPAN));
    }
    let answered = 0;
    const t0 = Date.now();
    await Promise.all(
      Array.from({ length: 16 }, async () => {
        for (let job = jobs.shift(); job; job = jobs.shift()) {
          await job();
          answered++;
        }
      }),
    );
    const attackMs = Date.now() - t0;
    attacking = false;
    await reading;
    await attacker.disconnect();
    await reader.disconnect();
    const sorted = latencies.sort((a, b) => a - b);
    const p99 = percentile(sorted, 99);
    console.log(
      `stalls: ${answered} requests over 4 GiB in ${attackMs} ms; reader ${sorted.length} reads, ` +
        `p50 ${percentile(sorted, 50).toFixed(2)} ms, p99 ${p99.toFixed(2)} ms, max ${sorted[sorted.length - 1]!.toFixed(2)} ms`,
    );
    expect(answered).toBe(600);
    expect(sorted.length).toBeGreaterThan(10);
    expect(p99).toBeLessThan(50);
  }, 120_000);
});
