/**
 * The jobs every scenario runs, in the order of the table in issue 16 (and bench/README.md).
 *
 * A fio job: { id, label, kind: 'fio', rw, bs, qd, numjobs } — fio's nbd engine, one connection
 * per fio job (numjobs > 1 means that many connections, reported together). 256 KiB jobs are
 * measured in MiB/s, 4 KiB jobs in IOPS; both are recorded.
 *
 * An nbdcopy job: { id, label, kind: 'nbdcopy', dir: 'in' | 'out', flags, fresh } — the whole
 * disk copied from a /dev/shm file into the server ('in') or from the server to `null:`
 * ('out'), measured in seconds. `fresh` stops the server, resets its backing store
 * (scenario.reset) and starts it again before the copy; only the copy is timed.
 */

/**
 * "4 connections × 64 requests" as the table states it. --threads=4 is needed too: nbdcopy
 * opens no more connections than it has threads, and its thread count defaults to the number of
 * cores, so on a 2-core machine `--connections=4` alone gives 2 connections.
 */
export const NBDCOPY_4X64 = ['--connections=4', '--threads=4', '--requests=64'];

const fio = (id, label, rw, bs, qd, numjobs = 1) => ({ id, label, kind: 'fio', rw, bs, qd, numjobs });
const nbdcopy = (id, label, dir, flags, fresh = false) => ({ id, label, kind: 'nbdcopy', dir, flags, fresh });

export const JOBS = [
  nbdcopy('nbdcopy-in-4x64', 'nbdcopy in (file → server), 4 conn × 64 req', 'in', NBDCOPY_4X64),
  nbdcopy('nbdcopy-in-default', 'nbdcopy in (file → server), nbdcopy defaults', 'in', []),
  nbdcopy('nbdcopy-out-4x64', 'nbdcopy out (server → null:), 4 conn × 64 req', 'out', NBDCOPY_4X64),
  nbdcopy('nbdcopy-out-default', 'nbdcopy out (server → null:), nbdcopy defaults', 'out', []),
  nbdcopy('nbdcopy-fresh-4x64', 'nbdcopy into a fresh server, 4 conn × 64 req', 'in', NBDCOPY_4X64, true),
  fio('seq-write-256k-4x4', 'seq write 256K, 4 conn × QD4', 'write', '256k', 4, 4),
  fio('seq-read-256k-4x4', 'seq read 256K, 4 conn × QD4', 'read', '256k', 4, 4),
  fio('seq-write-256k-qd16', 'seq write 256K QD16', 'write', '256k', 16),
  fio('seq-read-256k-qd16', 'seq read 256K QD16', 'read', '256k', 16),
  fio('rand-write-4k-qd32', 'rand write 4K QD32', 'randwrite', '4k', 32),
  fio('rand-read-4k-qd32', 'rand read 4K QD32', 'randread', '4k', 32),
  fio('rand-write-4k-qd1', 'rand write 4K QD1', 'randwrite', '4k', 1),
  fio('rand-read-4k-qd1', 'rand read 4K QD1', 'randread', '4k', 1),
  // 4 connections with 8 requests each: 32 in flight, as in the single-connection QD32 jobs.
  fio('rand-write-4k-4x8', 'rand write 4K, 4 conn × QD8', 'randwrite', '4k', 8, 4),
  fio('rand-read-4k-4x8', 'rand read 4K, 4 conn × QD8', 'randread', '4k', 8, 4),
];

/** What a job's main figure is: its unit and whether a higher value is better. */
export function metricOf(job) {
  if (job.kind === 'nbdcopy') return { unit: 's', higherIsBetter: false };
  return job.bs === '4k' ? { unit: 'IOPS', higherIsBetter: true } : { unit: 'MiB/s', higherIsBetter: true };
}

/** Jobs whose id or label contains one of the (case-insensitive) substrings; all if none. */
export function selectJobs(substrings) {
  if (!substrings.length) return JOBS;
  const subs = substrings.map((s) => s.toLowerCase());
  return JOBS.filter((j) => subs.some((s) => j.id.toLowerCase().includes(s) || j.label.toLowerCase().includes(s)));
}
