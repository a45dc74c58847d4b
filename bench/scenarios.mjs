/**
 * Benchmark scenarios: each names what nbdx runs and what it is compared with, in the same run.
 * Every scenario runs every job of jobs.mjs.
 *
 * `nbdx(ctx)` / `reference(ctx)` return { kind: 'nbdx' | 'nbdkit', args, env? }, where ctx has
 * `size` (the disk size in bytes), `dir` (a private temporary directory), `env`, and whatever
 * `setup` returned.
 * `setup(ctx)` may start helpers or make files and returns extra context; it lists what it made
 * in `tempPaths` (removed at the end, even after an error or Ctrl-C) and `helpers` (child
 * processes, killed likewise). `teardown(ctx)` may undo more.
 * `reset(ctx, side)` runs while a side's server is stopped for the "fresh server" job (side 0 is
 * nbdx, 1 the reference) and makes its backing store empty again; memory needs nothing.
 */
import { spawn, execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

function waitForSocket(p) {
  const t0 = Date.now();
  while (!fs.existsSync(p)) {
    if (Date.now() - t0 > 10000) throw new Error(`${p} never appeared`);
    execFileSync('sleep', ['0.05']);
  }
}

/** An empty (sparse) file of the disk's size. */
function emptyFile(file, size) {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
}

export const scenarios = {
  memory: {
    labels: ['nbdx memory', 'nbdkit memory'],
    nbdx: ({ size }) => ({ kind: 'nbdx', args: ['memory', String(size)] }),
    reference: ({ size }) => ({ kind: 'nbdkit', args: ['memory', String(size)] }),
  },

  // The flat allocator on both sides; nbdx keeps it in shared memory and serves it on a thread
  // per core (--workers=auto), nbdkit on its own threads.
  'memory-malloc': {
    labels: ['nbdx memory malloc', 'nbdkit memory malloc'],
    nbdx: ({ size }) => ({ kind: 'nbdx', args: ['memory', String(size), 'allocator=malloc'] }),
    reference: ({ size }) => ({ kind: 'nbdkit', args: ['memory', String(size), 'allocator=malloc'] }),
  },

  // What worker threads bring: the same file served on a thread per core and on one thread.
  workers: {
    labels: ['nbdx file --workers=auto', 'nbdx file --workers=1'],
    setup: ({ size }) => {
      const imgs = [0, 1].map((i) => path.join('/dev/shm', `nbdx-bench-${process.pid}-workers-${i}.img`));
      for (const img of imgs) emptyFile(img, size);
      return { imgs, tempPaths: imgs };
    },
    reset: ({ imgs, size }, side) => emptyFile(imgs[side], size),
    nbdx: ({ imgs }) => ({ kind: 'nbdx', args: ['--workers=auto', 'file', imgs[0]] }),
    reference: ({ imgs }) => ({ kind: 'nbdx', args: ['--workers=1', 'file', imgs[1]] }),
  },

  // One file per side on tmpfs, so neither server sees the other's writes or page cache state.
  file: {
    labels: ['nbdx file', 'nbdkit file'],
    setup: ({ size }) => {
      const imgs = [0, 1].map((i) => path.join('/dev/shm', `nbdx-bench-${process.pid}-file-${i}.img`));
      for (const img of imgs) emptyFile(img, size);
      return { imgs, tempPaths: imgs };
    },
    reset: ({ imgs, size }, side) => emptyFile(imgs[side], size),
    nbdx: ({ imgs }) => ({ kind: 'nbdx', args: ['file', imgs[0]] }),
    reference: ({ imgs }) => ({ kind: 'nbdkit', args: ['file', imgs[1]] }),
  },

  // Both sides forward to one nbdkit memory server. A "fresh" server here is a restarted nbd
  // server in front of the same upstream, which keeps its data.
  nbd: {
    labels: ['nbdx nbd', 'nbdkit nbd'],
    setup: ({ dir, env, size }) => {
      const up = path.join(dir, 'upstream.sock');
      const child = spawn('nbdkit', ['-f', '-U', up, 'memory', String(size)], { env, stdio: 'ignore' });
      waitForSocket(up);
      return { up, helpers: [child] };
    },
    nbdx: ({ up }) => ({ kind: 'nbdx', args: ['nbd', `nbd+unix:///?socket=${up}`] }),
    reference: ({ up }) => ({ kind: 'nbdkit', args: ['nbd', `socket=${up}`] }),
  },

  filters: {
    labels: ['nbdx offset+delay', 'nbdx memory'],
    nbdx: ({ size }) => ({
      kind: 'nbdx',
      args: ['--filter=offset', '--filter=delay', 'memory', String(size + 1048576), 'offset=1M', 'rdelay=0', 'wdelay=0'],
    }),
    reference: ({ size }) => ({ kind: 'nbdx', args: ['memory', String(size)] }),
  },

  // What counting every request for --metrics costs: the same memory disk with and without it.
  metrics: {
    labels: ['nbdx --metrics', 'nbdx memory'],
    nbdx: ({ size }) => ({ kind: 'nbdx', args: ['--metrics=127.0.0.1:0', 'memory', String(size)] }),
    reference: ({ size }) => ({ kind: 'nbdx', args: ['memory', String(size)] }),
  },

  cow: {
    labels: ['nbdx cow+memory', 'nbdx memory'],
    // The overlay on tmpfs, as a RAM-backed plugin deserves. A restart starts a new overlay.
    nbdx: ({ size }) => ({ kind: 'nbdx', args: ['--filter=cow', 'memory', String(size)], env: { TMPDIR: '/dev/shm' } }),
    reference: ({ size }) => ({ kind: 'nbdx', args: ['memory', String(size)] }),
  },
};
