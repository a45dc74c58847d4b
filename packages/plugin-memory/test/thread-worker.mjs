/**
 * One thread of threads.test.ts: a SparseArray over the test's shared buffers (from the built
 * package, as the server's worker threads load it), random writes and zeroes of the sub-blocks
 * this thread owns, then a check of each of them against this thread's model. Posts the number of
 * sub-blocks that read back wrong.
 */
import { parentPort, workerData } from 'node:worker_threads';

const { dist, buffers, who, threads, size, ops } = workerData;
const { SparseArray } = await import(dist);
const PAGE_SIZE = 32 * 1024;
const SUB_SIZE = 4 * 1024;

const a = new SparseArray(size, (role) => buffers.get(role));
const model = Buffer.alloc(size);
let x = 1000 + who;
const r = (n) => {
  x ^= x << 13;
  x ^= x >>> 17;
  x ^= x << 5;
  return (x >>> 0) % n;
};
/** A sub-block this thread owns (k % threads === who) in one of 120 pages, so that the
 * threads meet in the same pages all the time. */
const sub = () => {
  const page = r(120) * 17;
  for (;;) {
    const k = page * 8 + r(8);
    if (k % threads === who) return k * SUB_SIZE;
  }
};
for (let i = 0; i < ops; i++) {
  const at = sub();
  const from = r(4) === 0 ? 0 : r(SUB_SIZE);
  const len = from === 0 && r(2) === 0 ? SUB_SIZE : 1 + r(SUB_SIZE - from);
  if (r(3) === 0) {
    a.zero(len, at + from);
    model.fill(0, at + from, at + from + len);
  } else {
    const data = Buffer.alloc(len, 1 + r(255));
    a.write(data, at + from);
    data.copy(model, at + from);
  }
}
let bad = 0;
const got = Buffer.alloc(SUB_SIZE);
for (let k = who; k < size / SUB_SIZE; k += threads) {
  got.fill(0xee);
  for (const h of a.read(got, k * SUB_SIZE) ?? []) got.fill(0, h.start, h.start + h.length);
  if (!got.equals(model.subarray(k * SUB_SIZE, (k + 1) * SUB_SIZE))) bad++;
}
parentPort.postMessage(bad);
