import { afterAll, describe } from 'vitest';
import { describeConformance, startCeph, type CephCluster } from '@nbdx/testkit';
import { createRbdPlugin } from './index.js';
import { needRbd, rbdCli } from './test-support.js';

// The testkit's conformance suite (bounds, flags, zero/trim/flush/FUA, extents, many requests in
// flight, read-only mode) against a real image, and against a snapshot (read-only).
let cluster: Promise<CephCluster> | undefined;
function ceph(): Promise<CephCluster> {
  cluster ??= (async () => {
    const c = await startCeph({ pools: ['rbd'] });
    await rbdCli(c, 'create', '--size', '24M', 'rbd/conf');
    await rbdCli(c, 'create', '--size', '8M', 'rbd/ro');
    await rbdCli(c, 'snap', 'create', 'rbd/ro@s');
    return c;
  })();
  return cluster;
}

afterAll(async () => {
  if (cluster) await (await cluster).stop();
});

if (needRbd()) {
  describeConformance('rbd image', async () => ({ plugin: createRbdPlugin(), config: [['image', 'rbd/conf'], ['conf', (await ceph()).conf]] }));
  describeConformance('rbd snapshot', async () => ({ plugin: createRbdPlugin(), config: [['image', 'rbd/ro@s'], ['conf', (await ceph()).conf]] }), {
    writable: false,
    readonlyChecks: false,
  });
} else {
  describe.skip('conformance: rbd (Ceph not installed)', () => {});
}
