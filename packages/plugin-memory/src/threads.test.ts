/**
 * One SparseArray over the same shared buffers in three threads at once (as `nbdx --workers`
 * serves it): each thread writes and zeroes its own sub-blocks, which are interleaved with the
 * others' in the same pages, so pages are made, filled, made dense, cleared, made sparse and freed
 * under the feet of the other threads. Afterwards every thread's bytes must be exactly its own
 * model's. The workers load the built package (dist), as the server's worker threads do.
 */
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { SUB_SIZE, SparseArray, type SharedMemory } from './sparse.js';

const DIST = new URL('../dist/index.js', import.meta.url).href;
const WORKER = new URL('../test/thread-worker.mjs', import.meta.url);
const SIZE = 64 * 1024 * 1024;
const THREADS = 3;

describe('SparseArray shared by threads', () => {
  it('three threads writing and zeroing interleaved sub-blocks of the same pages: each reads back exactly its own data', async () => {
    const buffers = new Map<string, SharedArrayBuffer>();
    const share: SharedMemory = (role, bytes, max) => {
      let b = buffers.get(role);
      if (!b) buffers.set(role, (b = max === undefined ? new SharedArrayBuffer(bytes) : new SharedArrayBuffer(bytes, { maxByteLength: max })));
      return b;
    };
    // Made here first, as the main thread does before the workers start.
    const main = new SparseArray(SIZE, share);
    const results = await Promise.all(
      Array.from({ length: THREADS }, (_, who) =>
        new Promise<unknown>((resolve, reject) => {
          const w = new Worker(WORKER, { workerData: { dist: DIST, buffers, who, threads: THREADS, size: SIZE, ops: 30_000 } });
          w.once('message', (m) => {
            resolve(m);
            void w.terminate();
          });
          w.once('error', reject);
        }),
      ),
    );
    expect(results).toEqual([0, 0, 0]);
    // The counters are the threads' combined work: what is stored fits what is held.
    expect(main.storedBytes).toBeGreaterThan(0);
    expect(main.storedBytes % SUB_SIZE).toBe(0);
    main.zero(SIZE, 0);
    expect(main.storedBytes).toBe(0);
    expect(main.allocatedPages).toBe(0);
  }, 60_000);
});
