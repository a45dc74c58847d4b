/**
 * The proxy in front of nbdkit: the conformance suite (nbd → nbdkit memory), and
 * dynamic-export against an upstream with several exports (nbdkit file dir=).
 */
import { createHash, randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  describeConformance,
  exportUri,
  needTools,
  run,
  runOk,
  servePlugin,
  startNbdkit,
  tmpDir,
  type Peer,
  type TestServer,
} from '@nbdx/testkit';
import { NbdClient, NbdOptionError } from '@nbdx/client';
import { createNbdPlugin } from './index.js';

const HAVE = needTools('nbdkit', 'nbdinfo', 'nbdcopy');

const peers: Peer[] = [];
const dirs: string[] = [];
afterAll(async () => {
  await Promise.all(peers.map((p) => p.kill('SIGTERM')));
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

if (HAVE) {
  describeConformance('nbd → nbdkit memory', async () => {
    const dir = tmpDir('nbdx-plugin-nbd-');
    dirs.push(dir);
    const nbdkit = await startNbdkit(dir, ['memory', '4M']);
    peers.push(nbdkit);
    return { plugin: createNbdPlugin(), config: [['uri', nbdkit.uri]] };
  });
}

function sha256(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

/** nbdinfo --list --json, without the URIs (they name different servers). */
async function listing(uri: string): Promise<Array<Record<string, unknown>>> {
  const j = JSON.parse(await runOk('nbdinfo', ['--list', '--json', uri]));
  return (j.exports as Array<Record<string, unknown>>)
    .map((e) => {
      delete e.uri;
      // nbdkit file sends no block sizes; nbdx always advertises its own.
      for (const k of Object.keys(e)) if (k.startsWith('block_size_')) delete e[k];
      return e;
    })
    .sort((a, b) => String(a['export-name']).localeCompare(String(b['export-name'])));
}

describe.skipIf(!HAVE)('dynamic-export in front of nbdkit file dir= (several exports)', () => {
  let dir: string;
  let files: Record<string, Buffer>;
  let nbdkit: Peer;
  let proxy: TestServer;

  beforeAll(async () => {
    dir = tmpDir('nbdx-plugin-nbd-');
    dirs.push(dir);
    const exportsDir = path.join(dir, 'exports');
    fs.mkdirSync(exportsDir);
    files = { alpha: randomBytes(1024 * 1024), 'beta.img': randomBytes(2 * 1024 * 1024), gamma: Buffer.alloc(3 * 1024 * 1024) };
    randomBytes(65536).copy(files.gamma!, 2 * 1024 * 1024);
    for (const [name, data] of Object.entries(files)) {
      if (name !== 'gamma') fs.writeFileSync(path.join(exportsDir, name), data);
    }
    // gamma is sparse: a 64 KiB island of data at 2 MiB.
    const fd = fs.openSync(path.join(exportsDir, 'gamma'), 'w');
    fs.ftruncateSync(fd, files.gamma!.length);
    fs.writeSync(fd, files.gamma!, 2 * 1024 * 1024, 65536, 2 * 1024 * 1024);
    fs.closeSync(fd);
    // The exportname filter gives the directory a default export and descriptions.
    nbdkit = await startNbdkit(dir, [
      '--filter=exportname',
      'file',
      `dir=${exportsDir}`,
      'default-export=gamma',
      'exportdesc=script:echo "file $name"',
    ]);
    peers.push(nbdkit);
    proxy = await servePlugin(createNbdPlugin(), { config: [['uri', nbdkit.uri], ['dynamic-export', 'true']] });
  });
  afterAll(async () => proxy?.close());

  it('nbdinfo --list through nbdx lists what nbdkit lists', async () => {
    const direct = await listing(nbdkit.uri);
    const via = await listing(proxy.uri);
    expect(via.map((e) => e['export-name'])).toEqual(['alpha', 'beta.img', 'gamma']);
    expect(via).toEqual(direct);
    expect(via.map((e) => e.description)).toEqual(['file alpha', 'file beta.img', 'file gamma']);
    expect(via.map((e) => e['export-size'])).toEqual([1, 2, 3].map((m) => m * 1024 * 1024));
  });

  it('serves each export with its own content (nbdcopy, sha256)', async () => {
    for (const [name, data] of Object.entries(files)) {
      const out = path.join(dir, `out-${name}`);
      await runOk('nbdcopy', [exportUri(proxy.uri, name), out]);
      expect(sha256(fs.readFileSync(out)), name).toBe(sha256(data));
    }
  });

  it('writes go to the export the client named', async () => {
    const uri = exportUri(proxy.uri, 'beta.img');
    const data = randomBytes(65536);
    const src = path.join(dir, 'patch');
    fs.writeFileSync(src, Buffer.concat([data, files['beta.img']!.subarray(65536)]));
    await runOk('nbdcopy', [src, uri]);
    const onDisk = fs.readFileSync(path.join(dir, 'exports', 'beta.img'));
    expect(onDisk.subarray(0, 65536).equals(data)).toBe(true);
    expect(fs.readFileSync(path.join(dir, 'exports', 'alpha')).equals(files.alpha!)).toBe(true);
  });

  it('the default export is the upstream\'s (by its canonical name)', async () => {
    const j = JSON.parse(await runOk('nbdinfo', ['--json', proxy.uri]));
    expect(j.exports[0]['export-name']).toBe('gamma');
    expect(j.exports[0]['export-size']).toBe(3 * 1024 * 1024);
    expect(await runOk('nbdinfo', ['--map', proxy.uri])).toBe(await runOk('nbdinfo', ['--map', nbdkit.uri]));
    expect(await runOk('nbdinfo', ['--map', proxy.uri])).toMatch(/2097152\s+65536\s+0\s+data/);
  });

  it('an export the upstream does not have is refused in the handshake', async () => {
    const r = await run('nbdinfo', [exportUri(proxy.uri, 'nope')]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/for export: nope/);
    const err = await NbdClient.connect(proxy.uri, { exportName: 'nope' }).catch((e: NbdOptionError) => e);
    expect(err).toBeInstanceOf(NbdOptionError);
    expect((err as NbdOptionError).serverMessage).toMatch(/cannot open export 'nope': connecting to nbd\+unix:\/\/\/nope\?socket=.*: the upstream server refused: /);
  });

  it('without dynamic-export every client gets the configured export', async () => {
    const fixed = await servePlugin(createNbdPlugin(), { config: [['socket', nbdkit.socket], ['export', 'alpha']] });
    try {
      const listed = await listing(fixed.uri);
      expect(listed.map((e) => e['export-name'])).toEqual(['alpha']);
      const c = await fixed.connect({ exportName: 'whatever' });
      expect(c.size).toBe(1024 * 1024);
      expect((await c.pread(4096, 0)).equals(files.alpha!.subarray(0, 4096))).toBe(true);
    } finally {
      await fixed.close();
    }
  });
});
