/**
 * Benchmark scenarios: each names what nbdx runs and what it is compared with, in the same run.
 * `nbdx(ctx)` / `reference(ctx)` return { kind: 'nbdx' | 'nbdkit', args, env? }.
 * `setup(dir, env)` may start helpers (an upstream server) or make files; `teardown(ctx)` undoes it.
 * `prepare(uri, env)` runs against each side before its fio jobs.
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

/** Write the whole disk once, so reads see data and later writes overwrite. */
function fill(uri, env) {
  execFileSync('fio', ['--name=fill', '--ioengine=nbd', `--uri=${uri}`, '--rw=write', '--bs=1m', '--iodepth=8', '--size=1g'], {
    env,
    stdio: 'ignore',
  });
}

export const scenarios = {
  memory: {
    labels: ['nbdx memory', 'nbdkit memory'],
    size: '1g',
    nbdx: () => ({ kind: 'nbdx', args: ['memory', '1G'] }),
    reference: () => ({ kind: 'nbdkit', args: ['memory', '1G'] }),
  },

  file: {
    labels: ['nbdx file', 'nbdkit file'],
    size: '1g',
    setup: (dir) => {
      const img = path.join('/dev/shm', `nbdx-bench-file-${process.pid}.img`);
      execFileSync('truncate', ['-s', '1G', img]);
      return { img };
    },
    teardown: ({ img }) => fs.rmSync(img, { force: true }),
    nbdx: ({ img }) => ({ kind: 'nbdx', args: ['file', img] }),
    reference: ({ img }) => ({ kind: 'nbdkit', args: ['file', img] }),
  },

  nbd: {
    labels: ['nbdx nbd', 'nbdkit nbd'],
    size: '1g',
    setup: (dir, env) => {
      const up = path.join(dir, 'upstream.sock');
      const child = spawn('nbdkit', ['-f', '-U', up, 'memory', '1G'], { env, stdio: 'ignore' });
      waitForSocket(up);
      return { up, child };
    },
    teardown: ({ child }) => child.kill(),
    nbdx: ({ up }) => ({ kind: 'nbdx', args: ['nbd', `nbd+unix:///?socket=${up}`] }),
    reference: ({ up }) => ({ kind: 'nbdkit', args: ['nbd', `socket=${up}`] }),
  },

  filters: {
    labels: ['nbdx offset+delay', 'nbdx memory'],
    size: '1g',
    nbdx: () => ({ kind: 'nbdx', args: ['--filter=offset', '--filter=delay', 'memory', '1025M', 'offset=1M', 'rdelay=0', 'wdelay=0'] }),
    reference: () => ({ kind: 'nbdx', args: ['memory', '1G'] }),
  },

  // What counting every request for --metrics costs: the same memory disk with and without it.
  metrics: {
    labels: ['nbdx --metrics', 'nbdx memory'],
    size: '1g',
    nbdx: () => ({ kind: 'nbdx', args: ['--metrics=127.0.0.1:0', 'memory', '1G'] }),
    reference: () => ({ kind: 'nbdx', args: ['memory', '1G'] }),
  },

  cow: {
    labels: ['nbdx cow+memory', 'nbdx memory'],
    size: '1g',
    // The overlay on tmpfs, as a RAM-backed plugin deserves; written once before measuring.
    nbdx: () => ({ kind: 'nbdx', args: ['--filter=cow', 'memory', '1G'], env: { TMPDIR: '/dev/shm' } }),
    reference: () => ({ kind: 'nbdx', args: ['memory', '1G'] }),
    prepare: fill,
  },
};
