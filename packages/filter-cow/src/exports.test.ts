/**
 * One overlay per export of the layer below, not per name a client chose (see overlayKey): names
 * that reach the same export share an overlay, names the layer below refuses create none, and a
 * stream of connections with new names costs no descriptors.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { NbdClient } from '@nbdx/client';
import { definePlugin, type ExportEntry, type LayerBelow } from '@nbdx/server/api';
import { serve, type ServeOptions } from '@nbdx/server';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import {
  exportUri,
  needNbdx,
  needTools,
  qemuIo,
  removeDir,
  run,
  runOk,
  socketOf,
  startCli,
  tmpDir,
  waitFor,
  type CliServer,
} from '@nbdx/testkit';
import { createCowFilter, overlayKey, parseMaxOverlays } from './index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

type Server = Awaited<ReturnType<typeof serve>>;
const servers: Server[] = [];
const clis: CliServer[] = [];
const conns: NbdClient[] = [];
afterEach(async () => {
  for (const c of conns.splice(0)) if (c.isOpen) c.close();
  await Promise.all(servers.splice(0).map((s) => s.close()));
  await Promise.all(clis.splice(0).map((s) => s.stop()));
});

let dir: string;
beforeAll(() => {
  dir = tmpDir('nbdx-cow-exports-');
});
afterAll(() => {
  removeDir(dir);
});

/**
 * Start a server whose overlays go to a TMPDIR of their own, so they can be counted: cow reads
 * TMPDIR in getReady, so it only has to be set while serve() starts.
 */
async function start(options: ServeOptions): Promise<{ s: Server; tmp: string }> {
  const tmp = fs.mkdtempSync(path.join(dir, 'tmp-'));
  const saved = process.env.TMPDIR;
  process.env.TMPDIR = tmp;
  try {
    const s = await serve({ error: () => {}, ...options });
    servers.push(s);
    return { s, tmp };
  } finally {
    if (saved === undefined) delete process.env.TMPDIR;
    else process.env.TMPDIR = saved;
  }
}

async function connect(uri: string, exportName: string): Promise<NbdClient> {
  const c = await NbdClient.connect(uri, { exportName });
  conns.push(c);
  return c;
}

/** What the descriptors of process `pid` point to. */
function fdLinks(pid: number | 'self' = 'self'): string[] {
  const base = `/proc/${pid}/fd`;
  return fs.readdirSync(base).map((fd) => {
    try {
      return fs.readlinkSync(`${base}/${fd}`);
    } catch {
      return ''; // closed between readdir and readlink (the readdir's own descriptor, for one)
    }
  });
}

/** Open overlays of process `pid`: its descriptors on (unlinked) cow temporary files in `tmp`. */
function overlayCount(tmp: string, pid: number | 'self' = 'self'): number {
  return fdLinks(pid).filter((l) => l.startsWith(path.join(tmp, 'nbdx-cow-'))).length;
}

/** Like Promise.all, but only once every promise has settled: no connection outlives a failure. */
async function settleAll(jobs: Promise<unknown>[]): Promise<void> {
  const failed = (await Promise.allSettled(jobs)).find((r) => r.status === 'rejected');
  if (failed) throw (failed as PromiseRejectedResult).reason;
}

describe('overlayKey: which export of the layer below a name reaches', () => {
  /** A layer below as the filter sees it, counting how often it is asked. */
  function below(list: readonly string[] | Error, def: string | Error) {
    const calls = { list: 0, def: 0 };
    const layer: LayerBelow = {
      async listExports(): Promise<ExportEntry[]> {
        calls.list++;
        if (list instanceof Error) throw list;
        return list.map((name) => ({ name }));
      },
      async defaultExport() {
        calls.def++;
        if (def instanceof Error) throw def;
        return def;
      },
      openContext: () => Promise.reject(new Error('not used')),
    };
    return { layer, calls };
  }

  it('a layer without export names (one export, the default): every name is that export', async () => {
    // What the core makes of a plugin without listExports (memory), and what file=, nbd without
    // dynamic-export and shared say of themselves.
    for (const def of ['', 'disk']) {
      const { layer } = below([def], def);
      for (const name of ['', def, 'other', 'x'.repeat(4096), 'a/b']) expect(await overlayKey(layer, name, false)).toBe(def);
    }
  });

  it('a layer that lists exports: each listed name is its own export, "" is the default', async () => {
    const { layer } = below(['a', 'b'], 'b');
    expect(await overlayKey(layer, 'a', false)).toBe('a');
    expect(await overlayKey(layer, 'b', false)).toBe('b');
    expect(await overlayKey(layer, '', false)).toBe('b');
    // Opened but not listed (a dynamic export): its own overlay.
    expect(await overlayKey(layer, 'c', false)).toBe('c');
    // One export listed that is not the default (file dir= with one file, no default-export):
    // nothing says other names reach it.
    expect(await overlayKey(below(['a'], '').layer, 'c', false)).toBe('c');
  });

  it('a layer that cannot list or name its default keeps names apart', async () => {
    expect(await overlayKey(below(new Error('no LIST upstream'), 'a').layer, 'z', false)).toBe('z');
    expect(await overlayKey(below(new Error('no LIST upstream'), 'a').layer, '', false)).toBe('a');
    expect(await overlayKey(below(['a'], new Error('no info')).layer, 'z', false)).toBe('z');
    expect(await overlayKey(below(['a'], new Error('no info')).layer, '', false)).toBe('');
  });

  it('a name that already has an overlay is not listed again', async () => {
    const { layer, calls } = below(['a', 'b'], 'a');
    expect(await overlayKey(layer, 'b', false, (k) => k === 'b')).toBe('b');
    expect(await overlayKey(layer, '', false, (k) => k === 'a')).toBe('a');
    expect(calls.list).toBe(0);
  });

  it('cow-max-overlays takes a whole number of at least 1', () => {
    expect(parseMaxOverlays('1')).toBe(1);
    expect(parseMaxOverlays(' 4096 ')).toBe(4096);
    for (const bad of ['0', '-1', '1.5', '1K', '', 'many']) expect(() => parseMaxOverlays(bad)).toThrow(/cow-max-overlays/);
  });
});

describe('cow over a one-export plugin (memory): every name shares one overlay', () => {
  it('500 connections with distinct names: one overlay, writes seen through every name, no descriptor growth', async () => {
    const { s, tmp } = await start({ plugin: createMemoryPlugin(), filters: [createCowFilter()], config: [['size', '1M']] });

    const first = await connect(s.uri, '');
    await first.pwrite(Buffer.from('written through ""'), 0);
    await first.disconnect();
    expect(overlayCount(tmp)).toBe(1);
    const before = fdLinks().length;

    // Each connection, under a name of its own, reads what "" wrote and leaves its own mark.
    const N = 500;
    const batch = 25;
    for (let i = 0; i < N; i += batch) {
      await settleAll(
        Array.from({ length: batch }, async (_, j) => {
          const n = i + j;
          const c = await NbdClient.connect(s.uri, { exportName: `client-${n}` });
          try {
            expect((await c.pread(18, 0)).toString()).toBe('written through ""');
            const mark = Buffer.alloc(8);
            mark.writeUInt32BE(n + 1);
            await c.pwrite(mark, 4096 + n * 8);
          } finally {
            await c.disconnect().catch(() => c.close());
          }
        }),
      );
    }

    // Every mark, read back through yet another name, and through "".
    for (const name of ['one-more', '']) {
      const c = await connect(s.uri, name);
      const marks = await c.pread(N * 8, 4096);
      for (let n = 0; n < N; n++) expect(marks.readUInt32BE(n * 8)).toBe(n + 1);
      await c.disconnect();
    }

    expect(overlayCount(tmp)).toBe(1);
    // The server closes its side of each connection a moment after the client: wait for that,
    // then the process holds no more descriptors than before (a few for vitest's own business).
    await waitFor(() => fdLinks().length <= before + 4, 10_000, 'the connections\' descriptors to close').catch(() => {});
    expect(fdLinks().length).toBeLessThanOrEqual(before + 4);

    // Released when the server unloads the filter.
    servers.splice(servers.indexOf(s), 1);
    await s.close();
    expect(overlayCount(tmp)).toBe(0);
  });

  it('nbdx --filter=cow memory: nbdsh writes through "", qemu-io through "other", each sees the other\'s data; /proc/PID/fd stays flat', async () => {
    if (!needTools('nbdsh', 'qemu-io') || !needNbdx()) return;
    const tmp = fs.mkdtempSync(path.join(dir, 'cli-tmp-'));
    const sock = path.join(dir, 'cli.sock');
    // Run from the repository root, where the memory plugin and this filter resolve by name.
    const cli = await startCli(['-U', sock, '--filter=cow', 'memory', '1M'], {
      cwd: path.resolve(__dirname, '../../..'),
      env: { TMPDIR: tmp },
    });
    clis.push(cli);
    const pid = cli.child.pid!;
    const uri = cli.uri;
    expect(socketOf(uri)).toBe(sock);

    // nbdsh, with the export name set by hand (not from a URI): "" and a name the plugin never
    // heard of.
    const nbdshAt = (name: string, body: string) =>
      runOk('nbdsh', ['-c', `h.set_export_name(${JSON.stringify(name)})\nh.connect_unix(${JSON.stringify(sock)})\n${body}`]);
    await nbdshAt('', "h.pwrite(b'\\x5a' * 65536, 0)");
    await qemuIo(exportUri(uri, 'other'), 'read -P 0x5a 0 64k', 'write -P 0xa5 64k 64k');
    const out = await nbdshAt(
      '',
      "assert h.pread(65536, 0) == b'\\x5a' * 65536\nassert h.pread(65536, 65536) == b'\\xa5' * 65536\nprint('ok')",
    );
    expect(out.trim()).toBe('ok');
    expect((await nbdshAt('third', "print(h.pread(4, 65536).hex())")).trim()).toBe('a5a5a5a5');
    expect(overlayCount(tmp, pid)).toBe(1);

    // A crowd of new names costs the server nothing that stays.
    const before = fdLinks(pid).length;
    for (let i = 0; i < 300; i += 30) {
      await settleAll(
        Array.from({ length: 30 }, async (_, j) => {
          const c = await NbdClient.connect(uri, { exportName: `probe-${i + j}` });
          try {
            expect((await c.pread(1, 0))[0]).toBe(0x5a);
          } finally {
            await c.disconnect().catch(() => c.close());
          }
        }),
      );
    }
    await waitFor(() => fdLinks(pid).length <= before + 2, 10_000, 'the server to close its sockets').catch(() => {});
    expect(fdLinks(pid).length).toBeLessThanOrEqual(before + 2);
    expect(overlayCount(tmp, pid)).toBe(1);
    expect(await cli.stop()).toBe(0);
    expect(cli.stderr()).toBe('');
  });
});

describe('cow over a multi-export layer (file dir=)', () => {
  function makeDir(): string {
    const d = fs.mkdtempSync(path.join(dir, 'exports-'));
    fs.writeFileSync(path.join(d, 'a.img'), Buffer.alloc(1 * MiB, 0xaa));
    fs.writeFileSync(path.join(d, 'b.img'), Buffer.alloc(1 * MiB, 0xbb));
    return d;
  }

  it('two exports keep two overlays; "" shares the default export\'s; a refused name creates none', async () => {
    // The file plugin is another package of this repository (a devDependency): used from its build.
    const { createFilePlugin } = await import('@nbdx/plugin-file');
    const d = makeDir();
    const { s, tmp } = await start({
      plugin: createFilePlugin(),
      filters: [createCowFilter()],
      config: [
        ['dir', d],
        ['default-export', 'a.img'],
      ],
    });
    const a = await connect(s.uri, 'a.img');
    const b = await connect(s.uri, 'b.img');
    await a.pwrite(Buffer.alloc(100, 1), 0);
    await b.pwrite(Buffer.alloc(100, 2), 100);
    expect(overlayCount(tmp)).toBe(2);

    expect((await a.pread(200, 0)).equals(Buffer.concat([Buffer.alloc(100, 1), Buffer.alloc(100, 0xaa)]))).toBe(true);
    expect((await b.pread(200, 0)).equals(Buffer.concat([Buffer.alloc(100, 0xbb), Buffer.alloc(100, 2)]))).toBe(true);
    // "" is a.img (default-export), under its listed name: the same overlay.
    const def = await connect(s.uri, '');
    expect((await def.pread(100, 0)).every((x) => x === 1)).toBe(true);
    await def.pwrite(Buffer.alloc(10, 3), 500);
    expect((await a.pread(10, 500)).every((x) => x === 3)).toBe(true);
    expect((await b.pread(10, 500)).every((x) => x === 0xbb)).toBe(true);

    // Names the file plugin refuses: no overlay, however many.
    for (const bad of ['nope.img', '../a.img', 'c.img']) {
      await expect(NbdClient.connect(s.uri, { exportName: bad })).rejects.toThrow();
    }
    expect(overlayCount(tmp)).toBe(2);
    // The files themselves are untouched.
    expect(fs.readFileSync(path.join(d, 'a.img')).every((x) => x === 0xaa)).toBe(true);
    expect(fs.readFileSync(path.join(d, 'b.img')).every((x) => x === 0xbb)).toBe(true);
  });

  it('real clients: qemu-io writes a.img, nbdsh reads it through "" and sees b.img unchanged', async () => {
    if (!needTools('nbdsh', 'qemu-io')) return;
    const { createFilePlugin } = await import('@nbdx/plugin-file');
    const d = makeDir();
    const { s } = await start({
      plugin: createFilePlugin(),
      filters: [createCowFilter()],
      config: [
        ['dir', d],
        ['default-export', 'a.img'],
      ],
    });
    await qemuIo(exportUri(s.uri, 'a.img'), 'write -P 0x11 0 64k');
    const sock = socketOf(s.uri);
    const script = [
      "h.set_export_name('')",
      `h.connect_unix(${JSON.stringify(sock)})`,
      "assert h.pread(65536, 0) == b'\\x11' * 65536",
      'h.shutdown()',
      'h2 = nbd.NBD()',
      "h2.set_export_name('b.img')",
      `h2.connect_unix(${JSON.stringify(sock)})`,
      "assert h2.pread(65536, 0) == b'\\xbb' * 65536",
      "print('ok')",
    ].join('\n');
    expect((await runOk('nbdsh', ['-c', script])).trim()).toBe('ok');
  });

  it('cow-max-overlays bounds the exports with an overlay; the others are refused, clearly', async () => {
    const { createFilePlugin } = await import('@nbdx/plugin-file');
    const d = makeDir();
    const { s, tmp } = await start({
      plugin: createFilePlugin(),
      filters: [createCowFilter()],
      config: [
        ['dir', d],
        ['cow-max-overlays', '1'],
      ],
    });
    const a = await connect(s.uri, 'a.img');
    await a.pwrite(Buffer.alloc(10, 7), 0);
    await expect(NbdClient.connect(s.uri, { exportName: 'b.img' })).rejects.toThrow(/cow-max-overlays=1/);
    // The export that has one goes on working, for new connections too.
    expect((await (await connect(s.uri, 'a.img')).pread(10, 0)).every((x) => x === 7)).toBe(true);
    expect(overlayCount(tmp)).toBe(1);
    if (needTools('nbdinfo')) {
      const r = await run('nbdinfo', [exportUri(s.uri, 'b.img')]);
      // (libnbd shows the reply's type, not the server's text: the message is checked above.)
      expect(r.code).not.toBe(0);
    }
  });
});

describe('cow over a plugin that lists exports but answers to any name', () => {
  it('listed names get their own overlays; unlisted ones are dynamic exports with their own, bounded', async () => {
    // Like the nbd plugin with dynamic-export=true: the listing is not the whole story.
    const opened: string[] = [];
    const plugin = definePlugin({
      apiVersion: 2,
      name: 'dynamic',
      listExports: () => ['a', 'b'],
      defaultExport: () => 'a',
      open(_readonly, exportName) {
        opened.push(exportName);
        return {};
      },
      getSize: () => 1 * MiB,
      pread: (_h, buf) => void buf.fill(0),
    });
    const { s, tmp } = await start({ plugin, filters: [createCowFilter()], config: [['cow-max-overlays', '3']] });
    const a = await connect(s.uri, 'a');
    const def = await connect(s.uri, '');
    const x = await connect(s.uri, 'x');
    await a.pwrite(Buffer.from('a'), 0);
    await x.pwrite(Buffer.from('x'), 0);
    expect((await def.pread(1, 0)).toString()).toBe('a');
    expect(overlayCount(tmp)).toBe(2);
    await connect(s.uri, 'b');
    expect(overlayCount(tmp)).toBe(3);
    await expect(NbdClient.connect(s.uri, { exportName: 'y' })).rejects.toThrow(/cow-max-overlays=3/);
    expect(overlayCount(tmp)).toBe(3);
    // The layer below was asked for each name, read-only.
    expect(opened).toEqual(['a', 'a', 'x', 'b', 'y']);
  });
});
