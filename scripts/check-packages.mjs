#!/usr/bin/env node
/**
 * `pnpm check:packages`: every workspace package checked as it would be published.
 *
 * The workspace is packed once with pnpm (so `workspace:` ranges become real ones, as on
 * publish); then, for each tarball:
 *   - publint (strict: warnings fail too);
 *   - are-the-types-wrong, for packages with types. Our packages are ESM-only by design, so
 *     `require()` from CommonJS (node16-cjs) is not checked; node10, node16-esm and bundler are;
 *   - the file list npm would publish (`npm pack --dry-run --json`) equals the tarball's and holds
 *     only dist/, README.md, package.json (and a licence or changelog), never sources or tests;
 *   - the manifest rules of DESIGN.md: exports with types, files, engines, repository, keywords
 *     (nbdx-plugin / nbdx-filter), the core as a peer dependency with a range the current core
 *     satisfies, public access for @nbdx packages, no `workspace:` left.
 * Needs built packages (`pnpm build`). Exit status 1 with one line per problem.
 */
import { execFile } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { publint } from 'publint';
import { formatMessage } from 'publint/utils';
import { checkPackage, createPackageFromTarballData } from '@arethetypeswrong/core';

const run = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const REPOSITORY = 'git+https://example.invalid/nbdx/nbdx.git';
/** Files a package may publish besides dist/. */
const ALLOWED_TOP = new Set(['package.json', 'README.md', 'LICENSE', 'LICENSE.md', 'CHANGELOG.md']);
/** Extra published paths some packages need (sources of a native addon built on install). */
const EXTRA_ALLOWED = {
  // The command is plain JavaScript kept in git, so installs link it before anything is built.
  nbdx: [/^bin\/nbdx\.js$/],
  '@nbdx/plugin-file': [/^native\//, /^binding\.gyp$/, /^scripts\/build-addon\.mjs$/, /^prebuilds\/linux-(x64|arm64)-(glibc|musl)\/file_ops\.node$/],
  '@nbdx/plugin-rbd': [/^native\//, /^binding\.gyp$/, /^scripts\/build-addon\.mjs$/, /^prebuilds\/linux-(x64|arm64)-glibc\/rbd_ops\.node$/],
  '@nbdx/native': [/^native\//, /^binding\.gyp$/, /^scripts\/build-addon\.mjs$/, /^prebuilds\/linux-(x64|arm64)-(glibc|musl)\/socket_ops\.node$/],
};

const problems = [];
const problem = (pkg, msg) => problems.push(`${pkg}: ${msg}`);

/** The workspace packages under packages/ and examples/. */
function workspacePackages() {
  const out = [];
  for (const group of ['packages', 'examples']) {
    const base = path.join(root, group);
    if (!fs.existsSync(base)) continue;
    for (const d of fs.readdirSync(base).sort()) {
      const pj = path.join(base, d, 'package.json');
      if (!fs.existsSync(pj)) continue;
      const manifest = JSON.parse(fs.readFileSync(pj, 'utf8'));
      out.push({ dir: path.join(base, d), rel: `${group}/${d}`, manifest });
    }
  }
  return out;
}

/** pnpm's tarball name for a package. */
const tarballName = (m) => `${m.name.replace(/^@/, '').replace('/', '-')}-${m.version}.tgz`;

/** Run up to `n` async jobs at once. */
async function pool(items, n, fn) {
  const queue = [...items];
  await Promise.all(
    Array.from({ length: Math.min(n, queue.length) }, async () => {
      while (queue.length) await fn(queue.shift());
    }),
  );
}

// --- a small semver range check: enough for ^, ~, >=, >, <=, <, =, x-ranges, spaces and || --------

function parseVersion(v) {
  const m = /^v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?$/.exec(v.trim());
  return m ? { nums: [Number(m[1]), Number(m[2]), Number(m[3])], pre: m[4] ?? null } : null;
}
function cmp(a, b) {
  for (let i = 0; i < 3; i++) if (a.nums[i] !== b.nums[i]) return a.nums[i] - b.nums[i];
  if (a.pre === b.pre) return 0;
  return a.pre === null ? 1 : b.pre === null ? -1 : a.pre < b.pre ? -1 : 1;
}
function comparators(part) {
  const m = /^(\^|~|>=|<=|>|<|=)?\s*v?(\d+|x|\*)(?:\.(\d+|x|\*))?(?:\.(\d+|x|\*))?(-[0-9A-Za-z.-]+)?$/.exec(part);
  if (!m) return null;
  const [, op = '', a, b, c, pre] = m;
  const wild = (s) => s === undefined || s === 'x' || s === '*';
  const nums = [a, b, c].map((s) => (wild(s) ? 0 : Number(s)));
  const v = (n) => ({ nums: n, pre: null });
  const exact = { nums, pre: pre ? pre.slice(1) : null };
  if (op === '^') {
    const upper = nums[0] > 0 || wild(b) ? [nums[0] + 1, 0, 0] : nums[1] > 0 || wild(c) ? [0, nums[1] + 1, 0] : [0, 0, nums[2] + 1];
    return [['>=', exact], ['<', v(upper)]];
  }
  if (op === '~') return [['>=', exact], ['<', v(wild(b) ? [nums[0] + 1, 0, 0] : [nums[0], nums[1] + 1, 0])]];
  if (op === '' || op === '=') {
    if (wild(a)) return [];
    if (wild(b)) return [['>=', exact], ['<', v([nums[0] + 1, 0, 0])]];
    if (wild(c)) return [['>=', exact], ['<', v([nums[0], nums[1] + 1, 0])]];
    return [['=', exact]];
  }
  return [[op, exact]];
}
export function satisfies(version, range) {
  const v = parseVersion(version);
  if (!v) return false;
  return range.split('||').some((alt) => {
    const parts = alt.trim().replace(/(>=|<=|>|<|=|\^|~)\s+/g, '$1').split(/\s+/).filter(Boolean);
    const all = parts.map(comparators);
    if (all.some((c) => c === null)) return false;
    return all.flat().every(([op, w]) => {
      const d = cmp(v, w);
      return op === '>=' ? d >= 0 : op === '>' ? d > 0 : op === '<=' ? d <= 0 : op === '<' ? d < 0 : d === 0;
    });
  });
}

// --- the checks ---------------------------------------------------------------------------------

function listFiles(dir, prefix = '') {
  const out = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const rel = prefix ? `${prefix}/${e.name}` : e.name;
    if (e.isDirectory()) out.push(...listFiles(path.join(dir, e.name), rel));
    else out.push(rel);
  }
  return out.sort();
}

/** Every file a manifest points at: exports targets, main, types, bin. */
function entryFiles(m) {
  const out = [];
  const walk = (t) => {
    if (typeof t === 'string') out.push(t);
    else if (t && typeof t === 'object') for (const v of Object.values(t)) walk(v);
  };
  walk(m.exports);
  for (const k of ['main', 'types', 'module']) if (typeof m[k] === 'string') out.push(m[k]);
  if (typeof m.bin === 'string') out.push(m.bin);
  else if (m.bin) out.push(...Object.values(m.bin));
  return [...new Set(out.map((f) => f.replace(/^\.\//, '')))];
}

function checkManifest(pkg, m, files, coreVersion) {
  const name = m.name;
  for (const k of ['name', 'version', 'description', 'license', 'engines', 'repository', 'keywords', 'files', 'exports']) {
    if (m[k] === undefined) problem(name, `package.json has no "${k}"`);
  }
  if (m.type !== 'module') problem(name, '"type" is not "module"');
  // The oldest supported Node.js line (README, "Node.js versions"; .ci/run tests it).
  if (!m.engines?.node || !satisfies('22.0.0', m.engines.node)) problem(name, `engines.node '${m.engines?.node}' does not accept Node 22`);
  const repo = m.repository;
  if (!repo || repo.type !== 'git' || repo.url !== REPOSITORY || repo.directory !== pkg.rel) {
    problem(name, `repository should be { type: git, url: ${REPOSITORY}, directory: ${pkg.rel} }, is ${JSON.stringify(repo)}`);
  }
  const kw = m.keywords ?? [];
  if (new Set(kw).size !== kw.length) problem(name, `keywords repeat: ${kw.join(', ')}`);
  if (!kw.includes('nbdx')) problem(name, 'keywords lack "nbdx"');
  const kind = /^(@nbdx\/|nbdx-)plugin-/.test(name) ? 'plugin' : /^(@nbdx\/|nbdx-)filter-/.test(name) ? 'filter' : null;
  if (kind && !kw.includes(`nbdx-${kind}`)) problem(name, `keywords lack "nbdx-${kind}" (how people find ${kind}s on npm)`);
  if (!kind && kw.some((k) => k === 'nbdx-plugin' || k === 'nbdx-filter')) problem(name, 'is not a plugin or filter but has its keyword');

  const dot = m.exports?.['.'];
  if (!dot || typeof dot !== 'object') problem(name, 'exports has no "." condition object');
  else {
    const keys = Object.keys(dot);
    if (keys[0] !== 'types') problem(name, `exports["."]: "types" must come first, is ${keys.join(', ')}`);
    if (!dot.import && !dot.default) problem(name, 'exports["."] has no "import"');
  }
  for (const f of entryFiles(m)) if (!files.includes(f)) problem(name, `points at ${f}, which is not in the package`);

  const json = JSON.stringify(m);
  if (json.includes('workspace:')) problem(name, 'the published package.json still has a workspace: range');

  const peer = m.peerDependencies?.['@nbdx/server'];
  const dep = m.dependencies?.['@nbdx/server'];
  if (name === '@nbdx/server') {
    // the core itself
  } else if (name === 'nbdx' || name === '@nbdx/client') {
    // The command is the core's front door, and the client shares its wire codec: real dependencies.
    if (!dep || !satisfies(coreVersion, dep)) problem(name, `dependencies["@nbdx/server"] '${dep}' does not accept the core ${coreVersion}`);
  } else {
    if (!peer) problem(name, 'the core (@nbdx/server) is not a peer dependency');
    else if (peer === '*' || !satisfies(coreVersion, peer)) problem(name, `peerDependencies["@nbdx/server"] '${peer}' is not a range that accepts the core ${coreVersion}`);
    else {
      const nextMajor = `${Number(coreVersion.split('.')[0]) + 1}.0.0`;
      if (satisfies(nextMajor, peer)) problem(name, `peerDependencies["@nbdx/server"] '${peer}' accepts the next major core ${nextMajor}: give it an upper bound`);
    }
    if (dep) problem(name, '@nbdx/server is a dependency; it must be a peer dependency (one core per process)');
  }
  if (name.startsWith('@') && m.publishConfig?.access !== 'public' && !m.private) problem(name, 'publishConfig.access is not "public"');
}

function checkFiles(name, files) {
  if (!files.includes('README.md')) problem(name, 'README.md is not in the package (every package has one)');
  const extra = EXTRA_ALLOWED[name] ?? [];
  for (const f of files) {
    const allowed = ALLOWED_TOP.has(f) || f.startsWith('dist/') || extra.some((re) => re.test(f));
    if (!allowed) problem(name, `publishes ${f} (only dist/, README.md and package.json belong in the package)`);
    if (/\.test\.|\.test-helper\.|\.tsbuildinfo$/.test(f)) problem(name, `publishes a test or build artefact: ${f}`);
  }
  if (!files.some((f) => f.startsWith('dist/') && f.endsWith('.js'))) problem(name, 'has no dist/*.js: build it first (pnpm build)');
  if (name === '@nbdx/plugin-file' && !files.includes('prebuilds/linux-x64-glibc/file_ops.node')) problem(name, 'has no prebuilds/linux-x64-glibc/file_ops.node (its prepack script, scripts/prebuild.mjs, makes it)');
  if (name === '@nbdx/plugin-rbd' && !files.includes('prebuilds/linux-x64-glibc/rbd_ops.node')) problem(name, 'has no prebuilds/linux-x64-glibc/rbd_ops.node (its prepack script, scripts/prebuild.mjs, makes it; needs librbd-dev)');
  if (name === '@nbdx/native' && !files.includes('prebuilds/linux-x64-glibc/socket_ops.node')) problem(name, 'has no prebuilds/linux-x64-glibc/socket_ops.node (its prepack script, scripts/prebuild-addon.mjs, makes it)');
}

async function main() {
  const pkgs = workspacePackages();
  const core = pkgs.find((p) => p.manifest.name === '@nbdx/server');
  const coreVersion = core.manifest.version;
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-check-packages-'));
  try {
    const names = new Map();
    for (const p of pkgs) {
      const t = tarballName(p.manifest);
      if (names.has(t)) problem(p.manifest.name, `packs to the same file name as ${names.get(t)}`);
      names.set(t, p.manifest.name);
    }
    await run('pnpm', ['-r', '--filter', './packages/*', '--filter', './examples/*', 'pack', '--pack-destination', tmp], {
      cwd: root,
      maxBuffer: 16 << 20,
    });

    await pool(pkgs, 4, async (p) => {
      const m0 = p.manifest;
      const tgz = path.join(tmp, tarballName(m0));
      if (!fs.existsSync(tgz)) return problem(m0.name, `pnpm pack made no ${tarballName(m0)}`);
      const out = path.join(tmp, `x-${tarballName(m0)}`);
      fs.mkdirSync(out);
      await run('tar', ['-xzf', tgz, '-C', out]);
      const files = listFiles(path.join(out, 'package'));
      const m = JSON.parse(fs.readFileSync(path.join(out, 'package', 'package.json'), 'utf8'));
      checkManifest(p, m, files, coreVersion);
      checkFiles(m.name, files);

      // What npm itself would publish from the same directory.
      const { stdout } = await run('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], { cwd: p.dir, maxBuffer: 16 << 20 });
      const npmFiles = JSON.parse(stdout)[0].files.map((f) => f.path).sort();
      if (npmFiles.join('\n') !== files.join('\n')) {
        problem(m.name, `npm pack and pnpm pack disagree on the contents: npm [${npmFiles.join(', ')}], pnpm [${files.join(', ')}]`);
      }

      const data = fs.readFileSync(tgz);
      const tarball = data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength);
      const lint = await publint({ pack: { tarball }, strict: true, level: 'suggestion' });
      for (const msg of lint.messages) {
        const text = formatMessage(msg, lint.pkg)?.replace(/\x1b\[[0-9;]*m/g, '') ?? msg.code;
        if (msg.type === 'suggestion') console.log(`${m.name}: publint suggests: ${text}`);
        else problem(m.name, `publint: ${text}`);
      }

      const analysis = await checkPackage(createPackageFromTarballData(new Uint8Array(data)));
      if (analysis.types) {
        for (const pr of analysis.problems) {
          if (pr.resolutionKind === 'node16-cjs') continue; // ESM-only by design
          problem(m.name, `are-the-types-wrong: ${pr.kind}${pr.entrypoint ? ` at ${pr.entrypoint}` : ''}${pr.resolutionKind ? ` (${pr.resolutionKind})` : ''}`);
        }
      } else if (m.types || m.exports?.['.']?.types) {
        problem(m.name, 'are-the-types-wrong found no types although package.json declares them');
      }
      console.log(`${m.name}@${m.version}: ${files.length} files checked`);
    });
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  if (problems.length) {
    console.error(`\n${problems.length} packaging problem(s):`);
    for (const p of problems) console.error(`  ${p}`);
    process.exit(1);
  }
  console.log(`all ${pkgs.length} packages are fit to publish`);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) await main();
