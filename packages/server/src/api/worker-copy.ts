import { workerData } from 'node:worker_threads';

/** What a worker thread of `nbdx --workers` has as `workerData.role` (cli/workers.ts). */
export const WORKER_ROLE = 'nbdx-worker';

/**
 * True in a worker thread of `nbdx --workers`: this copy of the layer should find the shared
 * state the main thread's copy made (sharedBuffer() by the same names), not make its own. False
 * in the main thread and in a server embedded in a program, where a layer starts fresh.
 */
export function isWorkerCopy(): boolean {
  return (workerData as { role?: unknown } | null)?.role === WORKER_ROLE;
}
