/**
 * The module a worker thread of `nbdx --workers` runs (see workers.ts): it serves the connections
 * the main thread hands over, with its own copy of the plugin and filters.
 */
import { workerHost } from './main.js';
import { isWorkerCopy } from '../api/worker-copy.js';
import { runWorker } from './workers.js';

if (isWorkerCopy()) void runWorker(workerHost);
