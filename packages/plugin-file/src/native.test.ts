/**
 * Where the native helper comes from: the load order (a local build, then the prebuild for this
 * machine), libc detection, the install script's choice between prebuild and node-gyp, and the
 * one-line start-up warning when nothing loads, seen through the real nbdx command.
 */
import { closeSync, copyFileSync, cpSync, existsSync, mkdirSync, openSync, readSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import { nbdxBin, needNbdx, needTools, removeDir, run, tmpDir } from '@nbdx/testkit';
import { createFilePlugin } from './index.js';
import { candidatePaths, detectLibc, hostLocation, loadNativeFrom, prebuildTarget, type NativeOps } from './native.js';
import { CI, PACKAGE_ROOT, compileHelper, installedCopy } from './test-support.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const HOST = hostLocation().target;
const hasCc = process.platform === 'linux' && HOST !== null && needTools('cc');

describe('libc detection and prebuild names', () => {
  it('a report header with glibcVersionRuntime is glibc', () => {
    expect(detectLibc({ header: { glibcVersionRuntime: '2.36' }, sharedObjects: ['/lib/x86_64-linux-gnu/libc.so.6'] })).toBe('glibc');
  });

  it('a report listing the musl loader is musl', () => {
    expect(detectLibc({ header: {}, sharedObjects: ['/usr/bin/node', '/lib/ld-musl-x86_64.so.1'] })).toBe('musl');
    expect(detectLibc({ header: {}, sharedObjects: ['/lib/libc.musl-aarch64.so.1'] })).toBe('musl');
  });

  it('a report with neither is unknown, and then no prebuild fits', () => {
    expect(detectLibc({ header: {}, sharedObjects: ['/usr/lib/libc.so'] })).toBeUndefined();
    expect(detectLibc({})).toBeUndefined();
    expect(prebuildTarget('linux', 'x64', undefined)).toBeNull();
  });

  it('this process: detectLibc agrees with its own report', () => {
    if (process.platform !== 'linux') return;
    const report = process.report.getReport() as { header: { glibcVersionRuntime?: string } };
    expect(detectLibc()).toBe(report.header.glibcVersionRuntime ? 'glibc' : 'musl');
  });

  it('folder names: platform-arch, with the libc on Linux', () => {
    expect(prebuildTarget('linux', 'x64', 'glibc')).toBe('linux-x64-glibc');
    expect(prebuildTarget('linux', 'arm64', 'musl')).toBe('linux-arm64-musl');
    expect(prebuildTarget('darwin', 'arm64', undefined)).toBe('darwin-arm64');
  });

  it('the install script names the same prebuild folder as the loader', async () => {
    const r = await run(process.execPath, [join(PACKAGE_ROOT, 'scripts/build-addon.mjs'), '--print-target']);
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toBe(HOST ?? 'none');
  });
});

describe.skipIf(!hasCc)('load order', () => {
  const tmp = tmpDir('nbdx-file-native-');
  let helper: string;
  const target = HOST!;
  /** A fresh package root with the given files: 'release', 'debug', 'prebuild', each good or 'broken'. */
  let rootSeq = 0;
  function root(files: Partial<Record<'release' | 'debug' | 'prebuild', 'good' | 'broken'>>): string {
    const r = join(tmp, `root-${++rootSeq}`);
    const where = { release: 'build/Release', debug: 'build/Debug', prebuild: `prebuilds/${target}` } as const;
    for (const [k, how] of Object.entries(files)) {
      const dir = join(r, where[k as keyof typeof where]);
      mkdirSync(dir, { recursive: true });
      if (how === 'good') copyFileSync(helper, join(dir, 'file_ops.node'));
      else writeFileSync(join(dir, 'file_ops.node'), 'not an ELF file\n');
    }
    return r;
  }

  beforeAll(async () => {
    helper = await compileHelper(join(tmp, 'compiled'), target);
  });
  afterAll(() => removeDir(tmp));

  it('tries build/Release, build/Debug, then the prebuild for this machine', () => {
    expect(candidatePaths({ root: '/pkg', target: 'linux-x64-glibc' })).toEqual([
      '/pkg/build/Release/file_ops.node',
      '/pkg/build/Debug/file_ops.node',
      '/pkg/prebuilds/linux-x64-glibc/file_ops.node',
    ]);
    expect(candidatePaths({ root: '/pkg', target: null })).toHaveLength(2);
  });

  it('a local build comes before the prebuild', () => {
    const r = root({ release: 'good', prebuild: 'good' });
    const loaded = loadNativeFrom({ root: r, target });
    expect(loaded.ops).not.toBeNull();
    expect(loaded.ops && loaded.path).toBe(join(r, 'build/Release/file_ops.node'));
  });

  it('without build/, the prebuild is used, and the builds it looked for are recorded', () => {
    const r = root({ prebuild: 'good' });
    const loaded = loadNativeFrom({ root: r, target });
    expect(loaded.ops && loaded.path).toBe(join(r, 'prebuilds', target, 'file_ops.node'));
    expect(loaded.ops!.features.seekData).toBe(true);
    expect(loaded.tried).toEqual([`${join(r, 'build/Release/file_ops.node')}: not there`, `${join(r, 'build/Debug/file_ops.node')}: not there`]);
  });

  it('a build that does not load is passed over with its reason, and the prebuild is used', () => {
    const r = root({ release: 'broken', prebuild: 'good' });
    const loaded = loadNativeFrom({ root: r, target });
    expect(loaded.ops && loaded.path).toBe(join(r, 'prebuilds', target, 'file_ops.node'));
    expect(loaded.tried[0]).toMatch(/build\/Release\/file_ops\.node: .*(invalid ELF header|too short|file too short)/);
  });

  it('nothing there: no helper, and the short reason names the prebuild it looked for', () => {
    const loaded = loadNativeFrom({ root: root({}), target });
    expect(loaded.ops).toBeNull();
    expect(!loaded.ops && loaded.reason).toBe(`not built, and no prebuild for ${target}`);
    expect(loaded.tried).toHaveLength(3);
  });

  it('a prebuild that does not load: the short reason is its loader error, relative to the package', () => {
    const loaded = loadNativeFrom({ root: root({ prebuild: 'broken' }), target });
    expect(!loaded.ops && loaded.reason).toMatch(new RegExp(`^prebuilds/${target}/file_ops\\.node: .*(invalid ELF header|too short)`));
  });

  it('an unknown C library: no prebuild is tried, and the reason says why', () => {
    const loaded = loadNativeFrom({ root: root({ prebuild: 'good' }), target: null });
    expect(!loaded.ops && loaded.reason).toBe('not built, and the C library is neither glibc nor musl, so no prebuild fits');
  });

  it('elsewhere than Linux the reason says the helper is Linux-only', () => {
    const loaded = loadNativeFrom({ root: root({}), target: 'darwin-arm64', platform: 'darwin' });
    expect(!loaded.ops && loaded.reason).toBe('it is Linux-only, this is darwin');
  });
});

describe.skipIf(!hasCc)("the musl build's direct preadv2/pwritev2 system calls (compiled on glibc with -DNBDX_FILE_RAW_RWV2)", () => {
  const tmp = tmpDir('nbdx-file-native-');
  afterAll(() => removeDir(tmp));

  it('write with FUA and read from the page cache at an offset past 4 GiB', async () => {
    const r = join(tmp, 'root');
    mkdirSync(join(r, 'prebuilds'), { recursive: true });
    await compileHelper(join(r, 'prebuilds'), HOST!, '-DNBDX_FILE_RAW_RWV2');
    const loaded = loadNativeFrom({ root: r, target: HOST });
    expect(loaded.ops, !loaded.ops ? loaded.reason : '').not.toBeNull();
    const native = loaded.ops as NativeOps;
    const file = join(tmp, 'big.img');
    writeFileSync(file, '');
    truncateSync(file, 8 * GiB);
    const fd = openSync(file, 'r+');
    try {
      const at = 5 * GiB + 12345;
      const data = Buffer.from('past the 32-bit offsets');
      expect(await native.pwriteDsync(fd, data, at)).toBe(data.length);
      const viaFs = Buffer.alloc(data.length);
      readSync(fd, viaFs, 0, viaFs.length, at);
      expect(viaFs.toString()).toBe(data.toString());
      // now cached: RWF_NOWAIT reads it at the same offset
      const back = Buffer.alloc(data.length);
      const n = native.preadNowait(fd, back, at);
      expect(n).toBe(data.length);
      expect(back.toString()).toBe(data.toString());
      // and nothing landed at the offset modulo 4 GiB
      const low = Buffer.alloc(data.length, 1);
      readSync(fd, low, 0, low.length, at - 4 * GiB);
      expect(low.equals(Buffer.alloc(data.length))).toBe(true);
    } finally {
      closeSync(fd);
    }
  });
});

describe.skipIf(!hasCc)('the install script', () => {
  const tmp = tmpDir('nbdx-file-native-');
  let helper: string;
  beforeAll(async () => {
    helper = await compileHelper(join(tmp, 'compiled'), HOST!);
  });
  afterAll(() => removeDir(tmp));

  /** A published-package layout (no src/): the script, the C source, binding.gyp, maybe a prebuild. */
  let seq = 0;
  function packageDir(prebuild: 'good' | 'broken' | 'none', source = true): string {
    const dir = join(tmp, `pkg-${++seq}`);
    mkdirSync(join(dir, 'scripts'), { recursive: true });
    copyFileSync(join(PACKAGE_ROOT, 'scripts/build-addon.mjs'), join(dir, 'scripts/build-addon.mjs'));
    copyFileSync(join(PACKAGE_ROOT, 'binding.gyp'), join(dir, 'binding.gyp'));
    if (source) cpSync(join(PACKAGE_ROOT, 'native'), join(dir, 'native'), { recursive: true });
    if (prebuild !== 'none') {
      mkdirSync(join(dir, 'prebuilds', HOST!), { recursive: true });
      const to = join(dir, 'prebuilds', HOST!, 'file_ops.node');
      if (prebuild === 'good') copyFileSync(helper, to);
      else writeFileSync(to, 'not an ELF file\n');
    }
    return dir;
  }
  const install = (dir: string, env: NodeJS.ProcessEnv = {}) =>
    run(process.execPath, [join(dir, 'scripts/build-addon.mjs')], {
      cwd: dir,
      timeout: 120_000,
      env: { NBDX_FILE_BUILD_FROM_SOURCE: '', npm_config_build_from_source: '', NBDX_FILE_REQUIRE_ADDON: '', ...env },
    });
  /** node-gyp missing outside CI: the build half cannot be checked here. */
  const noGyp = (out: string) => !CI && /node-gyp not found/.test(out);

  it('uses a prebuild that loads and builds nothing', async () => {
    const dir = packageDir('good');
    const r = await install(dir);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain(`using the prebuilt native helper prebuilds/${HOST}/file_ops.node`);
    expect(existsSync(join(dir, 'build'))).toBe(false);
  });

  it('builds from source when the prebuild does not load', async () => {
    const dir = packageDir('broken');
    const r = await install(dir);
    if (noGyp(r.stdout + r.stderr)) return;
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toContain(`prebuilds/${HOST}/file_ops.node does not load`);
    expect(existsSync(join(dir, 'build/Release/file_ops.node'))).toBe(true);
  });

  it('NBDX_FILE_BUILD_FROM_SOURCE=1 builds even when the prebuild loads', async () => {
    const dir = packageDir('good');
    const r = await install(dir, { NBDX_FILE_BUILD_FROM_SOURCE: '1' });
    if (noGyp(r.stdout + r.stderr)) return;
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).not.toContain('using the prebuilt');
    expect(existsSync(join(dir, 'build/Release/file_ops.node'))).toBe(true);
  });

  it('neither a prebuild nor a build: a warning, and an error with NBDX_FILE_REQUIRE_ADDON=1', async () => {
    const dir = packageDir('none', false); // no C source: node-gyp fails (or is not there)
    const soft = await install(dir);
    expect(soft.code).toBe(0);
    expect(soft.stderr).toMatch(/@nbdx\/plugin-file: (node-gyp rebuild failed|node-gyp not found).*still works without extents/);
    const hard = await install(dir, { NBDX_FILE_REQUIRE_ADDON: '1' });
    expect(hard.code).toBe(1);
    expect(hard.stderr).toContain('(NBDX_FILE_REQUIRE_ADDON=1)');
  });
});

/**
 * The real command on a copy of the package as installed (dist/ and package.json, no build/), with
 * or without a prebuild, serving a sparse 16 MiB file with 1 MiB of data at 4 MiB.
 */
const hasCli = needNbdx() && needTools('nbdinfo');

describe.skipIf(!hasCli || !hasCc)('the start-up warning, through the nbdx command', () => {
  const tmp = tmpDir('nbdx-file-native-');
  const img = join(tmp, 'sparse.img');
  let withPrebuild: string;
  let withNothing: string;

  beforeAll(async () => {
    writeFileSync(img, '');
    truncateSync(img, 16 * MiB);
    const fd = openSync(img, 'r+');
    writeSync(fd, Buffer.alloc(MiB, 0x5a), 0, MiB, 4 * MiB);
    closeSync(fd);
    withPrebuild = installedCopy(join(tmp, 'with-prebuild'));
    await compileHelper(join(tmp, 'with-prebuild/prebuilds'), HOST!);
    withNothing = installedCopy(join(tmp, 'with-nothing'));
  });
  afterAll(() => removeDir(tmp));

  /** `nbdx [-v] PLUGIN file=IMG --run 'nbdinfo --map --json'`: the map and what went to stderr. */
  async function serveAndMap(plugin: string, opts: { verbose?: boolean; env?: NodeJS.ProcessEnv } = {}) {
    const args = [nbdxBin(), ...(opts.verbose ? ['-v'] : []), '-U', '-', plugin, `file=${img}`, '--run', 'nbdinfo --map --json "$uri"'];
    const r = await run(process.execPath, args, { env: { NBDX_FILE_NO_ADDON: '', ...opts.env } });
    expect(r.code, r.stderr).toBe(0);
    const map = (JSON.parse(r.stdout) as { offset: number; length: number; type: number }[]).map((e) => [e.offset, e.length, e.type]);
    const warnings = r.stderr.split('\n').filter((l) => l.includes('native helper not available'));
    return { map, stderr: r.stderr, warnings };
  }
  const HOLES = [
    [0, 4 * MiB, 3],
    [4 * MiB, MiB, 0],
    [5 * MiB, 11 * MiB, 3],
  ];

  it('with only the prebuild (no build/), the holes are reported and nothing is said at the default level', async () => {
    const { map, stderr } = await serveAndMap(withPrebuild);
    expect(map).toEqual(HOLES);
    expect(stderr).toBe('');
  });

  it('with only the prebuild, -v names the prebuild that was loaded', async () => {
    const { stderr, warnings } = await serveAndMap(withPrebuild, { verbose: true });
    expect(stderr).toContain(`file: native helper loaded from ${join(tmp, 'with-prebuild/prebuilds', HOST!, 'file_ops.node')}`);
    expect(warnings).toEqual([]);
  });

  it('with neither, one line at start-up says what is lost; the file is served as all data', async () => {
    const { map, warnings } = await serveAndMap(withNothing);
    expect(map).toEqual([[0, 16 * MiB, 0]]);
    expect(warnings).toHaveLength(1);
    // "nbdx: file: warning: ..." (a CLI that marks default-level lines "error:" adds that word)
    expect(warnings[0]).toMatch(
      new RegExp(`^nbdx: (error: )?file: warning: native helper not available \\(not built, and no prebuild for ${HOST}\\): sparse files are served as all data, trim does nothing, zeroing writes zeroes`),
    );
  });

  it('with neither, -v adds every path that was tried', async () => {
    const { stderr, warnings } = await serveAndMap(withNothing, { verbose: true });
    expect(warnings).toHaveLength(1);
    const root = join(tmp, 'with-nothing');
    expect(stderr).toContain(`native helper: tried ${join(root, 'build/Release/file_ops.node')}: not there; `);
    expect(stderr).toContain(`${join(root, 'prebuilds', HOST!, 'file_ops.node')}: not there`);
  });

  it('NBDX_FILE_NO_ADDON=1: the same one line, saying the helper was turned off on purpose', async () => {
    const { map, warnings } = await serveAndMap(withPrebuild, { env: { NBDX_FILE_NO_ADDON: '1' } });
    expect(map).toEqual([[0, 16 * MiB, 0]]);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toContain('native helper not available (disabled by NBDX_FILE_NO_ADDON=1): sparse files are served as all data');
  });
});

describe('createFilePlugin({ native: false })', () => {
  it('asked for in code: a debug line, no warning', async () => {
    const tmp = tmpDir('nbdx-file-native-');
    const file = join(tmp, 'f.img');
    writeFileSync(file, Buffer.alloc(4096));
    const debug: string[] = [];
    const errors: string[] = [];
    const server = await serve({
      plugin: createFilePlugin({ native: false }),
      config: [['file', file]],
      debug: (m) => debug.push(m),
      error: (m) => errors.push(m),
    });
    try {
      expect(errors).toEqual([]);
      expect(debug.some((m) => m.startsWith('file: native helper not used (createFilePlugin({ native: false })): sparse files'))).toBe(true);
    } finally {
      await server.close();
      rmSync(tmp, { recursive: true, force: true });
    }
  });
});
