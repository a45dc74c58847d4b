/**
 * Benchmark scenarios: each names what nbdx runs and what it is compared with.
 * `nbdx(ctx)` / `reference(ctx)` return { kind: 'nbdx' | 'nbdkit', args }.
 */
export const scenarios = {
  memory: {
    labels: ['nbdx memory', 'nbdkit memory'],
    size: '1g',
    nbdx: () => ({ kind: 'nbdx', args: ['memory', '1G'] }),
    reference: () => ({ kind: 'nbdkit', args: ['memory', '1G'] }),
  },
};
