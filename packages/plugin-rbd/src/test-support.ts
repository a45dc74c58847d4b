/**
 * Helpers shared by this package's tests (not part of the published bundle): a Ceph cluster with
 * an `rbd` pool, images in it, and the plugin served in-process.
 */
import { serve } from '@nbdx/server';
import { needCeph, needTools, runOk, type CephCluster } from '@nbdx/testkit';
import { createRbdPlugin } from './index.js';

export const MiB = 1024 * 1024;

/**
 * Ceph, the rbd command and the NBD tools the tests drive. Under CI=true a missing one fails the
 * suite (needTools), and so does a missing addon (the build must have made it).
 */
export function needRbd(...tools: string[]): boolean {
  const ok = needCeph() && needTools(...tools);
  return ok;
}

/** `rbd ARGS` against the cluster as client.admin. */
export function rbdCli(c: CephCluster, ...args: string[]): Promise<string> {
  return runOk('rbd', ['--conf', c.conf, ...args], { timeout: 120_000 });
}

/** The parameters that reach the cluster: its conf file (monitors, keyring). */
export function clusterParams(c: CephCluster): [string, string][] {
  return [['conf', c.conf]];
}

export async function serveRbd(config: [string, string][], options: { readonly?: boolean; errors?: string[] } = {}) {
  return serve({
    plugin: createRbdPlugin(),
    config,
    readonly: options.readonly,
    // expected failures (EPERM, ENOENT) would fill the test output; tests may look at them
    error: (m: string) => options.errors?.push(m),
  });
}
