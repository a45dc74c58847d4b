#!/usr/bin/env node
// The programs the tests drive beside nbdx (qemu-img, nbdinfo, nbdkit, ...), and the Debian
// packages they come in. Run before the tests (`npm test`, `pnpm test`) and by .ci/run:
//
//   node scripts/interop-tools.mjs            check; install what is missing when this user can
//                                             (root, or sudo without a password) and apt-get exists;
//                                             otherwise name exactly what to install, and go on
//   node scripts/interop-tools.mjs --check    check only; exit 1 when something is missing
//
// NBDX_NO_APT=1 never installs. Outside CI a test whose tool is missing is skipped; with CI=true
// it fails (see @nbdx/testkit's needTools), so CI always installs.
import { spawnSync } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { delimiter, join } from 'node:path';

/**
 * Debian package → the programs (or `python3:MODULE` modules, or `file:PATH` files such as a library's
 * headers) the tests need from it.
 */
export const PACKAGES = {
  'qemu-utils': ['qemu-img', 'qemu-io', 'qemu-nbd'],
  'libnbd-bin': ['nbdinfo', 'nbdcopy', 'nbdsh'],
  'python3-libnbd': ['python3:nbd'],
  nbdkit: ['nbdkit'],
  fio: ['fio'],
  fdisk: ['sfdisk'],
  gdisk: ['sgdisk'],
  openssl: ['openssl'],
  tar: ['tar'],
  // A throw-away Ceph cluster (@nbdx/testkit's startCeph) and librbd's headers for plugin-rbd's addon.
  'ceph-mon': ['ceph-mon', 'monmaptool'],
  'ceph-osd': ['ceph-osd'],
  'ceph-common': ['ceph', 'rados', 'rbd'],
  radosgw: ['radosgw', 'radosgw-admin'],
  'librbd-dev': ['file:/usr/include/rbd/librbd.h'],
  bsdutils: ['script'],
  // nbdkit's S3 plugin (Python, boto3): plugin-s3 checks it reads and writes the same objects.
  'nbdkit-plugin-python': ['file:/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-S3-plugin'],
  'python3-boto3': ['python3:boto3'],
};

// nbdsh and the python module are the system python's: look in the system directories first
// (pyenv shims and the like must not shadow them).
const PATH = ['/usr/bin', '/usr/sbin', '/bin', '/sbin', ...(process.env.PATH ?? '').split(delimiter)];

function onPath(program) {
  return PATH.some((dir) => {
    try {
      accessSync(join(dir, program), constants.X_OK);
      return true;
    } catch {
      return false;
    }
  });
}

function present(need) {
  if (need.startsWith('file:')) {
    try {
      accessSync(need.slice('file:'.length), constants.R_OK);
      return true;
    } catch {
      return false;
    }
  }
  if (need.startsWith('python3:')) {
    return spawnSync('/usr/bin/python3', ['-c', `import ${need.slice('python3:'.length)}`], { stdio: 'ignore' }).status === 0;
  }
  return onPath(need);
}

export function missingPackages() {
  return Object.entries(PACKAGES)
    .map(([pkg, needs]) => ({ pkg, missing: needs.filter((n) => !present(n)) }))
    .filter((p) => p.missing.length > 0);
}

function run(cmd, args) {
  console.error(`interop tools: ${cmd} ${args.join(' ')}`);
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'ignore', 'inherit'], env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' } });
  return r.status === 0;
}

function main() {
  const checkOnly = process.argv.includes('--check');
  let missing = missingPackages();
  if (missing.length === 0) return 0;
  const names = missing.map((m) => m.pkg);
  const what = missing.map((m) => `${m.missing.join(', ')} (${m.pkg})`).join('; ');
  const canApt = onPath('apt-get') && process.env.NBDX_NO_APT !== '1' && !checkOnly;
  const asRoot = process.getuid?.() === 0;
  const sudo = !asRoot && canApt && onPath('sudo') && spawnSync('sudo', ['-n', 'true'], { stdio: 'ignore' }).status === 0;
  if (canApt && (asRoot || sudo)) {
    const pre = sudo ? ['sudo', '-n'] : [];
    const [cmd, ...rest] = [...pre, 'apt-get'];
    console.error(`interop tools: missing ${what}; installing`);
    if (run(cmd, [...rest, 'update', '-qq']) && run(cmd, [...rest, 'install', '-y', '-qq', ...names])) {
      missing = missingPackages();
      if (missing.length === 0) return 0;
    }
  }
  const still = missing.map((m) => `${m.missing.join(', ')} (${m.pkg})`).join('; ');
  console.error(`interop tools: missing ${still}`);
  console.error(`interop tools: install them with: sudo apt-get install -y ${missing.map((m) => m.pkg).join(' ')}`);
  console.error(`interop tools: until then the tests that drive them are skipped${process.env.CI === 'true' ? ' (CI=true: they fail)' : ''}`);
  return checkOnly ? 1 : 0;
}

if (import.meta.url === `file://${process.argv[1]}`) process.exit(main());
