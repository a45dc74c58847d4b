/**
 * Serving connections on several threads (`--workers`).
 *
 * One event loop is the ceiling of a bulk copy: nbdcopy opens a connection per core and keeps 64
 * requests in flight on each, and a single thread parses, copies and writes for all of them. So
 * the main thread, which listens, also hands connections to worker threads. Each worker loads,
 * configures and opens its own copy of the plugin and filters from the same command line (which
 * is why only layers declaring `workerThreads` allow it: their copies must behave as one disk)
 * and serves whole connections: handshake, TLS and every request stay on one thread, so nothing
 * about a connection changes but where it runs.
 *
 * The hand-over: the main thread accepts, picks the least busy thread (itself included), and
 * gives a worker a duplicate of the socket's descriptor (libuv closes the descriptor it wraps
 * when the main thread lets go of its handle). This happens inside the accept callback, before
 * the event loop could read anything from the socket, so no byte the client sent is lost.
 */
import * as net from 'node:net';
import * as os from 'node:os';
import { Worker, parentPort, workerData } from 'node:worker_threads';
import { sharedBuffers, type ThreadModel } from '../api/common.js';
import { WORKER_ROLE } from '../api/worker-copy.js';
import type { SocketHelper, SocketHelperLoad } from '../native.js';
import { shareConnectionIds } from '../protocol/connection.js';
import type { NbdServer } from '../server.js';

/** Threads with 'auto': one per core, but no more than this (more only add contention). */
const AUTO_MAX = 4;
/** How long a worker may take to finish its connections at shutdown before it is stopped. */
const CLOSE_TIMEOUT_MS = 30_000;

export interface LayerInfo {
  kind: 'plugin' | 'filter';
  name: string;
  /** A layer's declaration, read after it was configured (a function may depend on parameters). */
  workerThreads?: boolean | (() => boolean);
}

export interface WorkerChoice {
  /** Threads serving connections, the main thread included (1: no workers). */
  count: number;
  /** Why not more, for the debug line (or a warning when more were asked for). */
  reason: string;
}

/** How many threads serve connections, and why not more. */
export function chooseWorkers(args: {
  requested: number | 'auto' | undefined;
  single: boolean;
  layers: readonly LayerInfo[];
  threadModel: ThreadModel;
  /** @nbdx/native as loaded (loadSocketHelper): the hand-over needs its dup(). */
  helper: SocketHelperLoad;
  metrics: boolean;
  cores?: number;
}): WorkerChoice {
  const requested = args.requested ?? 'auto';
  const cores = args.cores ?? os.availableParallelism();
  const want = requested === 'auto' ? Math.min(cores, AUTO_MAX) : requested;
  if (want <= 1) return { count: 1, reason: requested === 'auto' ? `this machine has ${cores} core` : '--workers=1' };
  if (args.single) return { count: 1, reason: '-s serves one connection' };
  const blocker = args.layers.find((l) => !(typeof l.workerThreads === 'function' ? l.workerThreads() : l.workerThreads));
  if (blocker) return { count: 1, reason: `${blocker.kind} ${blocker.name} keeps its state in its own memory (it does not declare workerThreads)` };
  if (args.threadModel === 'serialize_connections' || args.threadModel === 'serialize_all_requests') {
    return { count: 1, reason: `the thread model is ${args.threadModel}` };
  }
  if (args.metrics) return { count: 1, reason: '--metrics counts on one thread' };
  if (!args.helper.ops) return { count: 1, reason: `handing connections to threads needs @nbdx/native (${args.helper.reason})` };
  return { count: want, reason: '' };
}

/** What a worker is started with. */
export interface WorkerData {
  role: typeof WORKER_ROLE;
  /** The command line, as the main thread got it. */
  argv: string[];
  /** 1, 2, ...: the main thread is 0. */
  index: number;
  /** This thread's share of --max-server-memory. */
  maxServerMemory: number;
  /** The connection counter all threads number their connections from. */
  connectionIds: Int32Array;
  /** The layers' shared buffers (sharedBuffer()), made by the main thread's copies. */
  sharedBuffers: Map<string, SharedArrayBuffer>;
}

type ToWorker = { type: 'connection'; fd: number } | { type: 'close' };
type FromWorker =
  | { type: 'ready' }
  | { type: 'failed'; message: string }
  | { type: 'log'; severity: 3 | 4 | 6 | 7; message: string }
  | { type: 'closed' };

interface Slot {
  index: number;
  worker: Worker;
  connections: number;
  alive: boolean;
  exited: Promise<void>;
}

export type LogFn = (severity: 3 | 4 | 6 | 7, message: string) => void;

/** The worker threads of a server and the hand-over of connections to them. */
export class WorkerPool {
  private constructor(
    private readonly slots: Slot[],
    private readonly server: NbdServer,
    private readonly helper: SocketHelper,
  ) {}

  /**
   * Start `count - 1` workers running `entry` (a module whose top level calls runWorker) and wait
   * until each has its plugin ready. Rejects with the first worker's start-up error.
   */
  static async start(opts: {
    count: number;
    entry: URL;
    argv: string[];
    maxServerMemory: number;
    server: NbdServer;
    helper: SocketHelper;
    log: LogFn;
  }): Promise<WorkerPool> {
    const share = Math.max(1024 * 1024, Math.floor(opts.maxServerMemory / opts.count));
    const slots: Slot[] = [];
    const starts: Promise<void>[] = [];
    const connectionIds = shareConnectionIds();
    for (let index = 1; index < opts.count; index++) {
      const data: WorkerData = { role: WORKER_ROLE, argv: opts.argv, index, maxServerMemory: share, connectionIds, sharedBuffers: sharedBuffers() };
      // stdout/stderr of the worker are the process's; messages come through `log` anyway.
      const worker = new Worker(opts.entry, { workerData: data, name: `nbdx worker ${index}` });
      let exitedResolve!: () => void;
      const slot: Slot = { index, worker, connections: 0, alive: true, exited: new Promise((r) => (exitedResolve = r)) };
      slots.push(slot);
      starts.push(
        new Promise<void>((resolve, reject) => {
          let ready = false;
          worker.on('message', (m: FromWorker) => {
            if (m.type === 'ready') {
              ready = true;
              resolve();
            } else if (m.type === 'failed') reject(new Error(m.message));
            else if (m.type === 'log') opts.log(m.severity, m.message);
            else if (m.type === 'closed') slot.connections--;
          });
          worker.on('error', (err) => {
            // An exception nothing caught: this thread's connections are gone; the others go on.
            slot.alive = false;
            if (!ready) reject(err);
            else opts.log(3, `error: worker ${index} failed, its connections were dropped: ${err.stack ?? err.message}`);
          });
          worker.on('exit', (code) => {
            slot.alive = false;
            exitedResolve();
            if (!ready) reject(new Error(`worker ${index} exited (status ${code}) before it was ready`));
          });
        }),
      );
    }
    const pool = new WorkerPool(slots, opts.server, opts.helper);
    try {
      await Promise.all(starts);
    } catch (err) {
      await pool.close();
      throw err;
    }
    return pool;
  }

  get threads(): number {
    return 1 + this.slots.filter((s) => s.alive).length;
  }

  /**
   * Called for each accepted socket, inside the accept callback: true when a worker took it,
   * false when the main thread should serve it (it is the least busy, or the hand-over failed).
   */
  offer(socket: net.Socket): boolean {
    let best: Slot | null = null;
    let least = this.server.connectionCount;
    for (const s of this.slots) {
      if (s.alive && s.connections < least) {
        best = s;
        least = s.connections;
      }
    }
    if (!best) return false;
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (typeof fd !== 'number' || fd < 0) return false;
    let copy: number;
    try {
      copy = this.helper.dup(fd);
    } catch (err) {
      this.server.settings.debug(`cannot hand a connection to worker ${best.index} (${(err as Error).message}); serving it here`);
      return false;
    }
    // Closes the main thread's descriptor only: the connection lives on in the duplicate.
    socket.destroy();
    best.connections++;
    best.worker.postMessage({ type: 'connection', fd: copy } satisfies ToWorker);
    this.server.settings.debug(`handed a connection to worker ${best.index}`);
    return true;
  }

  /** Ask every worker to finish its connections and unload; stop those that take too long. */
  async close(): Promise<void> {
    for (const s of this.slots) if (s.alive) s.worker.postMessage({ type: 'close' } satisfies ToWorker);
    await Promise.all(
      this.slots.map(async (s) => {
        const timer = setTimeout(() => void s.worker.terminate(), CLOSE_TIMEOUT_MS);
        await s.exited;
        clearTimeout(timer);
      }),
    );
  }
}

/** The worker side: how a worker thread's server is made (by the CLI, which knows the options). */
export interface WorkerHost {
  /** Load the layers and prepare a server from the command line, with this thread's memory share. */
  prepare(argv: string[], maxServerMemory: number, log: LogFn): Promise<NbdServer>;
  /** One line for a start-up error, as the CLI prints it. */
  describe(err: unknown): string;
}

/** Body of a worker thread: serve the connections the main thread hands over until told to close. */
export async function runWorker(host: WorkerHost): Promise<void> {
  const data = workerData as WorkerData;
  const port = parentPort!;
  const send = (m: FromWorker) => port.postMessage(m);
  // Until it is ready, a worker repeats what the main thread already said when it loaded the
  // same layers (their start-up warnings, "loaded plugin ..."): only errors go through then.
  let started = false;
  const log: LogFn = (severity, message) => {
    if (started || severity <= 3) send({ type: 'log', severity, message });
  };
  shareConnectionIds(data.connectionIds);
  for (const [name, buffer] of data.sharedBuffers) sharedBuffers().set(name, buffer);
  let server: NbdServer;
  try {
    server = await host.prepare(data.argv, data.maxServerMemory, log);
    await server.afterStart();
  } catch (err) {
    send({ type: 'failed', message: host.describe(err) });
    port.close();
    return;
  }
  let closing = false;
  port.on('message', (m: ToWorker) => {
    if (m.type === 'connection') {
      const socket = new net.Socket({ fd: m.fd, readable: true, writable: true, allowHalfOpen: true });
      if (closing) {
        socket.destroy();
        send({ type: 'closed' });
        return;
      }
      void server.adopt(socket).finally(() => send({ type: 'closed' }));
    } else if (m.type === 'close' && !closing) {
      closing = true;
      void server.close().finally(() => {
        port.close();
        // Whatever the plugin left open (timers, sockets), this thread is done.
        setImmediate(() => process.exit(0));
      });
    }
  });
  started = true;
  server.settings.debug(`worker ${data.index} ready`);
  send({ type: 'ready' });
}
