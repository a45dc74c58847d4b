import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { EXTENT_HOLE, EXTENT_ZERO, Errno, NbdError } from '@nbdx/server/api';
import { needTools, removeDir, run, runOk, tmpDir, nbdxBin, needNbdx } from '@nbdx/testkit';
import { applyParam, completeConfig, exportImage, parseImageSpec, radosSettings, specName, type RawParams } from './config.js';
import { allocationMap, toNbdError } from './index.js';
import { loadNative, packageRoot } from './native.js';

function config(...pairs: [string, string][]) {
  const p: RawParams = {};
  for (const [k, v] of pairs) applyParam(p, k, v);
  return completeConfig(p);
}

describe('image specs', () => {
  it('reads IMAGE, POOL/IMAGE, POOL/NAMESPACE/IMAGE, each with an optional @SNAP', () => {
    expect(parseImageSpec('vm1')).toEqual({ image: 'vm1' });
    expect(parseImageSpec('rbd/vm1')).toEqual({ pool: 'rbd', image: 'vm1' });
    expect(parseImageSpec('rbd/ns/vm1@s')).toEqual({ pool: 'rbd', namespace: 'ns', image: 'vm1', snap: 's' });
    for (const bad of ['a/b/c/d', '/vm1', 'rbd/', 'rbd//x', 'a b', 'x@', 'x@a@b']) expect(() => parseImageSpec(bad)).toThrow(NbdError);
  });

  it('fills pool (default rbd), namespace and snap from parameters; refuses contradictions', () => {
    expect(config(['image', 'vm1'])).toMatchObject({ pool: 'rbd', namespace: '', image: 'vm1', snap: undefined, dynamicExport: false });
    expect(config(['pool', 'p'], ['namespace', 'n'], ['image', 'vm1'], ['snap', 's'])).toMatchObject({ pool: 'p', namespace: 'n', image: 'vm1', snap: 's' });
    expect(config(['image', 'p/vm1@s'], ['pool', 'p'], ['snap', 's'])).toMatchObject({ pool: 'p', snap: 's' });
    expect(() => config(['image', 'p/vm1'], ['pool', 'q'])).toThrow(/names pool 'p' but pool=q/);
    expect(() => config(['image', 'vm1@a'], ['snap', 'b'])).toThrow(/names snapshot 'a' but snap=b/);
    expect(() => config()).toThrow(/image= is required/);
    expect(() => config(['pool', 'p'], ['snap', 's'], ['dynamic-export', 'true'])).toThrow(/snap= needs image=/);
    expect(() => config(['image', 'a'], ['image', 'b'])).toThrow(/given more than once/);
    expect(() => config(['image', 'a'], ['colour', 'blue'])).toThrow(/unknown parameter 'colour'/);
  });

  it('takes the Ceph connection parameters as the tools do', () => {
    const c = config(['image', 'vm1'], ['id', 'client.backup'], ['keyring', '/k'], ['mon-host', '10.0.0.1:6789'], ['connect-timeout', '5'], ['timeout', '500ms']);
    expect(c).toMatchObject({ id: 'backup', keyring: '/k', monHost: '10.0.0.1:6789', connectTimeoutS: 5, opTimeoutS: 0.5 });
    expect(radosSettings(c)).toEqual([
      ['keyring', '/k'],
      ['mon_host', '10.0.0.1:6789'],
      ['client_mount_timeout', '5'],
      ['rados_osd_op_timeout', '0.5'],
      ['rados_mon_op_timeout', '0.5'],
    ]);
    expect(radosSettings(config(['image', 'vm1']))).toEqual([['client_mount_timeout', '30']]);
    expect(() => config(['image', 'vm1'], ['connect-timeout', '0'])).toThrow(/more than 0/);
    expect(() => config(['image', 'vm1'], ['id', ''])).toThrow(/not a cephx user/);
  });

  it('maps export names to images: the configured one, or IMAGE[@SNAP] of the pool with dynamic-export', () => {
    const fixed = config(['image', 'rbd/vm1']);
    expect(specName(exportImage(fixed, 'anything'))).toBe('rbd/vm1');
    const dyn = config(['pool', 'p'], ['namespace', 'n'], ['dynamic-export', 'true']);
    expect(specName(exportImage(dyn, 'vm2@s'))).toBe('p/n/vm2@s');
    expect(() => exportImage(dyn, '')).toThrow(/no default export/);
    for (const bad of ['a/b', 'a@b@c', 'a b', '@s']) expect(() => exportImage(dyn, bad)).toThrow(/is not IMAGE or IMAGE@SNAP/);
    expect(specName(exportImage(config(['image', 'p/def'], ['dynamic-export', 'true']), ''))).toBe('p/def');
  });
});

describe('allocation map from rbd_diff_iterate2', () => {
  const HZ = EXTENT_HOLE | EXTENT_ZERO;
  it('reports what exists as data and everything else as zero holes, clipped to the request', () => {
    const t = new Float64Array([4, 4, 1, 12, 4, 1, 16, 4, 0, 24, 8, 1]);
    expect(allocationMap(t, 2, 26)).toEqual([
      { offset: 2, length: 2, type: HZ },
      { offset: 4, length: 4, type: 0 },
      { offset: 8, length: 4, type: HZ },
      { offset: 12, length: 4, type: 0 },
      { offset: 16, length: 8, type: HZ },
      { offset: 24, length: 4, type: 0 },
    ]);
    expect(allocationMap(new Float64Array([]), 0, 10)).toEqual([{ offset: 0, length: 10, type: HZ }]);
    // Out of order and overlapping answers still give one ordered, non-overlapping map.
    expect(allocationMap(new Float64Array([8, 8, 1, 0, 10, 1]), 0, 16)).toEqual([{ offset: 0, length: 16, type: 0 }]);
  });
});

describe('errors', () => {
  const e = (code: string) => Object.assign(new Error('librbd write: x'), { code });
  it('maps librados/librbd errors to NBD errors', () => {
    expect(toNbdError(e('EACCES'), 'write').errno).toBe(Errno.EPERM);
    expect(toNbdError(e('EPERM'), 'write').message).toMatch(/cephx user's caps/);
    expect(toNbdError(e('EROFS'), 'write').errno).toBe(Errno.EPERM);
    expect(toNbdError(e('EDQUOT'), 'write').errno).toBe(Errno.ENOSPC);
    expect(toNbdError(e('ETIMEDOUT'), 'read').message).toMatch(/timeout= reached/);
    expect(toNbdError(e('ETIMEDOUT'), 'read').errno).toBe(Errno.EIO);
    const fenced = toNbdError(e('ESHUTDOWN'), 'read');
    expect([fenced.errno, fenced.fatal]).toEqual([Errno.EIO, true]);
    expect(toNbdError(e('EWHATEVER'), 'read').errno).toBe(Errno.EIO);
  });
});

describe('the addon', () => {
  it('is built here (CI builds it: librbd-dev is installed there)', () => {
    const n = loadNative();
    if (process.env.CI === 'true') expect(n.ops, 'reason' in n ? n.reason : '').not.toBeNull();
    if (n.ops) expect(n.ops.librbdVersion()).toMatch(/^\d+\.\d+\.\d+$/);
  });

  it.runIf(needTools('cc') && needNbdx())('scripts/prebuild.mjs makes a binary that loads; without the addon nbdx says what to install in one line', async () => {
    const out = tmpDir('nbdx-rbd-prebuild-');
    try {
      await runOk(process.execPath, [join(packageRoot(), 'scripts/prebuild.mjs'), '--out', out]);
      const file = join(out, `linux-${process.arch}-glibc`, 'rbd_ops.node');
      const version = await runOk(process.execPath, ['-e', 'console.log(require(process.argv[1]).librbdVersion())', file]);
      expect(version.trim()).toMatch(/^\d+\.\d+\.\d+$/);
    } finally {
      removeDir(out);
    }
    const r = await run(process.execPath, [nbdxBin(), '-f', 'rbd', 'rbd/vm1'], { env: { NBDX_RBD_NO_ADDON: '1' } });
    expect(r.code).toBe(1);
    expect(r.stderr.trim()).toBe(
      'nbdx: the librbd addon is disabled (NBDX_RBD_NO_ADDON=1): install librbd (Debian/Ubuntu: apt-get install librbd1; ' +
        'to build the addon also librbd-dev, then npm rebuild @nbdx/plugin-rbd)',
    );
  });
});
