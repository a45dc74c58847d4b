import { afterEach, describe, expect, it } from 'vitest';
import { NbdClient, NbdOptionError, NbdRequestError } from '@nbdx/client';
import { Errno, NbdError } from '@nbdx/server/api';
import { serve, type ServeOptions } from '@nbdx/server';
import { createSharedFilter } from './index.js';
import { isFatal, retires } from './policy.js';
import { createRecordingPlugin } from './fixtures.test-helper.js';
import { exportUri, nbdxBin, needTools, qemuIo, removeDir, run, runOk, startNbdkit, tmpDir } from '@nbdx/testkit';
import * as fs from 'node:fs';
import * as path from 'node:path';

type Server = Awaited<ReturnType<typeof serve>>;
const servers: Server[] = [];
async function start(options: ServeOptions): Promise<Server> {
  const s = await serve({ error: () => {}, ...options });
  servers.push(s);
  return s;
}
const open: NbdClient[] = [];
afterEach(async () => {
  // Clients a failed test left connected are dropped first: the server waits for connections.
  for (const c of open.splice(0)) if (c.isOpen) c.close();
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

async function connect(uri: string, options?: Parameters<typeof NbdClient.connect>[1]): Promise<NbdClient> {
  const c = await NbdClient.connect(uri, options);
  open.push(c);
  return c;
}
const clients = (uri: string, n: number) => Promise.all(Array.from({ length: n }, () => connect(uri)));
const pattern = (n: number, seed: number) => Buffer.from(Array.from({ length: n }, (_, i) => (i * 7 + seed) & 255));

describe('shared: one context for every connection', () => {
  it('ten concurrent clients cause one open, and one close at shutdown', async () => {
    const { plugin, rec } = createRecordingPlugin();
    const s = await start({ plugin, filters: [createSharedFilter()] });
    expect(rec.opens).toHaveLength(1); // opened at start-up, before any client
    const cs = await clients(s.uri, 10);
    await Promise.all(cs.map((c, i) => c.pwrite(pattern(4096, i), i * 4096)));
    await Promise.all(cs.map((c) => c.disconnect()));
    expect(rec.opens).toHaveLength(1);
    expect(rec.closes).toHaveLength(0); // connections going away close nothing below
    await s.close();
    expect(rec.opens).toHaveLength(1);
    expect(rec.closes).toEqual([rec.opens[0]!.id]);
  });

  it('without the filter the same ten clients cause ten opens and ten closes', async () => {
    const { plugin, rec } = createRecordingPlugin();
    const s = await start({ plugin });
    const cs = await clients(s.uri, 10);
    await Promise.all(cs.map((c) => c.pread(512, 0)));
    await Promise.all(cs.map((c) => c.disconnect()));
    await s.close();
    expect(rec.opens).toHaveLength(10);
    expect(rec.closes).toHaveLength(10);
  });

  it('shared-open=lazy opens once for ten clients arriving together', async () => {
    const { plugin, rec } = createRecordingPlugin({ delayMs: 2 });
    const s = await start({ plugin, filters: [createSharedFilter()], config: [['shared-open', 'lazy']] });
    expect(rec.opens).toHaveLength(0);
    const cs = await clients(s.uri, 10);
    expect(rec.opens).toHaveLength(1);
    await Promise.all(cs.map((c) => c.disconnect()));
    await s.close();
    expect(rec.closes).toHaveLength(1);
  });

  it('a write from one client is visible to another at once; multi-conn is advertised', async () => {
    const { plugin } = createRecordingPlugin();
    const s = await start({ plugin, filters: [createSharedFilter()] });
    const [a, b] = await clients(s.uri, 2);
    const data = pattern(65536, 3);
    await a!.pwrite(data, 12345);
    expect(Buffer.compare(await b!.pread(65536, 12345), data)).toBe(0);
    expect(a!.canMultiConn).toBe(true);
    await Promise.all([a!.disconnect(), b!.disconnect()]);
  });

  it('control: without the filter each connection has its own handle and no multi-conn', async () => {
    const { plugin } = createRecordingPlugin();
    const s = await start({ plugin });
    const [a, b] = await clients(s.uri, 2);
    await a!.pwrite(pattern(4096, 9), 0);
    expect((await b!.pread(4096, 0)).every((x) => x === 0)).toBe(true);
    expect(a!.canMultiConn).toBe(false);
    await Promise.all([a!.disconnect(), b!.disconnect()]);
  });

  it('nbdinfo shows can_multi_conn through the filter', async () => {
    if (!needTools('nbdinfo')) return;
    const { plugin } = createRecordingPlugin();
    const s = await start({ plugin, filters: [createSharedFilter()] });
    const info = JSON.parse(await runOk('nbdinfo', ['--json', s.uri]));
    const exp = info.exports[0];
    expect(exp.can_multi_conn).toBe(true);
    expect(exp.is_read_only).toBe(false);
  });

  it('qemu-io writes through one connection and reads back through another (real tool)', async () => {
    if (!needTools('qemu-io')) return;
    const { plugin, rec } = createRecordingPlugin();
    const s = await start({ plugin, filters: [createSharedFilter()] });
    await qemuIo(s.uri, 'write -P 0x5a 4096 8192');
    const out = await qemuIo(s.uri, 'read -P 0x5a 4096 8192');
    expect(out).not.toMatch(/fail|error|verification/i);
    expect(rec.opens).toHaveLength(1);
  });
});

describe('shared: thread model across connections', () => {
  async function maxOverlap(threadModel: 'serialize_requests' | 'parallel', filtered: boolean) {
    const { plugin, rec } = createRecordingPlugin({ threadModel, delayMs: 1 });
    const s = await start({ plugin, filters: filtered ? [createSharedFilter()] : [] });
    const cs = await clients(s.uri, 4);
    await Promise.all(
      cs.flatMap((c, i) => Array.from({ length: 8 }, (_, j) => c.pwrite(pattern(512, i + j), (i * 8 + j) * 512))),
    );
    await Promise.all(cs.map((c) => c.disconnect()));
    return rec;
  }

  it('a serialize_requests plugin is serialised across all clients through shared', async () => {
    const rec = await maxOverlap('serialize_requests', true);
    expect(rec.calls).toBe(32);
    expect(rec.maxInFlight).toBe(1);
  });

  it('control: without shared, serialize_requests plugins overlap across connections', async () => {
    const rec = await maxOverlap('serialize_requests', false);
    expect(rec.maxInFlight).toBeGreaterThan(1);
  });

  it('control: a parallel plugin overlaps through shared', async () => {
    const rec = await maxOverlap('parallel', true);
    expect(rec.maxInFlight).toBeGreaterThan(1);
  });
});

describe('shared: exports', () => {
  it('serves the shared export only; others get an error with a message; listing shows it', async () => {
    const { plugin, rec } = createRecordingPlugin({ exports: ['a', 'b'] });
    const s = await start({ plugin, filters: [createSharedFilter()], config: [['shared-export', 'b']] });
    expect(rec.opens.map((o) => o.exportName)).toEqual(['b']);
    expect((await NbdClient.list(s.uri)).map((e) => e.name)).toEqual(['b']);

    const err = await connect(s.uri, { exportName: 'a' }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(NbdOptionError);
    expect((err as NbdOptionError).serverMessage).toMatch(/shares one export, 'b'; export 'a' is not available/);

    const viaDefault = await connect(s.uri, { exportName: '' });
    expect(viaDefault.exportName).toBe('b');
    const byName = await connect(s.uri, { exportName: 'b' });
    await Promise.all([viaDefault.disconnect(), byName.disconnect()]);
    expect(rec.opens).toHaveLength(1);
  });

  it('without shared-export the default export is shared (nbdinfo --list)', async () => {
    if (!needTools('nbdinfo')) return;
    const { plugin, rec } = createRecordingPlugin({ exports: ['first', 'second'] });
    const s = await start({ plugin, filters: [createSharedFilter()] });
    const listed = JSON.parse(await runOk('nbdinfo', ['--list', '--json', s.uri]));
    expect(listed.exports.map((e: { 'export-name': string }) => e['export-name'])).toEqual(['first']);
    const r = await run('nbdinfo', ['--size', exportUri(s.uri, 'second')]);
    expect(r.code).not.toBe(0);
    expect(rec.opens.map((o) => o.exportName)).toEqual(['first']);
  });
});

describe('shared: read-only', () => {
  it('start-up opens read-write; -r still makes every client read-only', async () => {
    const { plugin, rec } = createRecordingPlugin();
    const s = await start({ plugin, filters: [createSharedFilter()], readonly: true });
    expect(rec.opens[0]!.readonly).toBe(false);
    const c = await connect(s.uri);
    expect(c.readOnly).toBe(true);
    const err = await c.request({ type: 1 /* WRITE */, offset: 0, length: 512, payload: Buffer.alloc(512) });
    expect(err.error).toBe(Errno.EPERM);
    await c.disconnect();
  });

  it('shared-open=lazy with -r opens the layer below read-only', async () => {
    const { plugin, rec } = createRecordingPlugin();
    const s = await start({ plugin, filters: [createSharedFilter()], readonly: true, config: [['shared-open', 'lazy']] });
    const c = await connect(s.uri);
    expect(rec.opens).toEqual([{ id: 1, readonly: true, exportName: '' }]);
    expect(c.readOnly).toBe(true);
    await c.disconnect();
  });

  it('shared-readonly=true opens read-only at start-up', async () => {
    const { plugin, rec } = createRecordingPlugin();
    const s = await start({ plugin, filters: [createSharedFilter()], config: [['shared-readonly', 'true']] });
    expect(rec.opens[0]!.readonly).toBe(true);
    const c = await connect(s.uri);
    expect(c.readOnly).toBe(true);
    await c.disconnect();
  });

  it('falls back to read-only when the layer below cannot be opened for writing', async () => {
    const { plugin, rec } = createRecordingPlugin();
    rec.refuseReadWrite = true;
    const s = await start({ plugin, filters: [createSharedFilter()] });
    expect(rec.opens).toEqual([{ id: 1, readonly: true, exportName: '' }]);
    const c = await connect(s.uri);
    expect(c.readOnly).toBe(true);
    expect(c.canMultiConn).toBe(true); // read-only: every client trivially sees the same data
    await c.disconnect();
  });

  it('shared-readonly=false refuses to fall back', async () => {
    const { plugin, rec } = createRecordingPlugin();
    rec.refuseReadWrite = true;
    await expect(
      serve({ plugin, filters: [createSharedFilter()], config: [['shared-readonly', 'false']] }),
    ).rejects.toThrow(/cannot open for writing/);
  });
});

describe('shared: failures and reopening', () => {
  const dead = () => new NbdError(Errno.ESHUTDOWN, 'recording: upstream went away');
  const eio = () => new NbdError(Errno.EIO, 'recording: bad sector');

  it('after a fatal failure the next connection opens a fresh context (default shared-reopen=fatal)', async () => {
    const { plugin, rec } = createRecordingPlugin();
    const s = await start({ plugin, filters: [createSharedFilter()] });
    const a = await connect(s.uri);
    await a.pwrite(pattern(512, 1), 0);
    rec.broken.set(1, dead);
    const err = await a.pread(512, 0).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdRequestError);
    expect((err as NbdRequestError).errno).toBe(Errno.ESHUTDOWN);
    expect((err as NbdRequestError).serverMessage).toMatch(/upstream went away/);

    const b = await connect(s.uri);
    expect(rec.opens.map((o) => o.id)).toEqual([1, 2]);
    await b.pwrite(pattern(512, 2), 0);
    expect(Buffer.compare(await b.pread(512, 0), pattern(512, 2))).toBe(0);
    // The old connection keeps its (failed) context until it goes; then that context is closed.
    expect((await a.pread(512, 0).catch((e: NbdRequestError) => e)) as NbdRequestError).toBeInstanceOf(NbdRequestError);
    expect(rec.closes).toEqual([]);
    await a.disconnect();
    await new Promise((r) => setTimeout(r, 20));
    expect(rec.closes).toEqual([1]);
    await b.disconnect();
    await s.close();
    expect(rec.closes).toEqual([1, 2]);
  });

  it('an error the layer below marks fatal: that client is disconnected, the next one gets a fresh context', async () => {
    const { plugin, rec } = createRecordingPlugin();
    const s = await start({ plugin, filters: [createSharedFilter()] });
    const a = await connect(s.uri);
    const closed = new Promise<void>((r) => a.once('close', () => r()));
    rec.broken.set(1, () => new NbdError(Errno.EIO, 'recording: upstream connection lost', { fatal: true }));
    const err = (await a.pread(512, 0).catch((e) => e)) as NbdRequestError;
    expect(err.errno).toBe(Errno.EIO);
    await closed; // the core ends a connection after a fatal error
    await new Promise((r) => setTimeout(r, 20));
    expect(rec.closes).toEqual([1]); // its last user gone, the failed context is closed
    const b = await connect(s.uri);
    expect(rec.opens.map((o) => o.id)).toEqual([1, 2]);
    await b.pwrite(pattern(512, 4), 0);
    expect(Buffer.compare(await b.pread(512, 0), pattern(512, 4))).toBe(0);
    await b.disconnect();
  });

  it('an ordinary I/O error is replied but does not reopen under shared-reopen=fatal', async () => {
    const { plugin, rec } = createRecordingPlugin();
    const s = await start({ plugin, filters: [createSharedFilter()] });
    const a = await connect(s.uri);
    rec.broken.set(1, eio);
    expect(((await a.pread(512, 0).catch((e) => e)) as NbdRequestError).errno).toBe(Errno.EIO);
    rec.broken.delete(1);
    const b = await connect(s.uri);
    expect(rec.opens).toHaveLength(1);
    await b.pread(512, 0);
    await Promise.all([a.disconnect(), b.disconnect()]);
  });

  it('shared-reopen=error reopens after an I/O error too', async () => {
    const { plugin, rec } = createRecordingPlugin();
    const s = await start({ plugin, filters: [createSharedFilter()], config: [['shared-reopen', 'error']] });
    const a = await connect(s.uri);
    rec.broken.set(1, eio);
    await a.pread(512, 0).catch(() => {});
    const b = await connect(s.uri);
    expect(rec.opens).toHaveLength(2);
    await b.pread(512, 0);
    await Promise.all([a.disconnect(), b.disconnect()]);
  });

  it('shared-reopen=never keeps the failed context: every connection gets its errors', async () => {
    const { plugin, rec } = createRecordingPlugin();
    const s = await start({ plugin, filters: [createSharedFilter()], config: [['shared-reopen', 'never']] });
    const a = await connect(s.uri);
    rec.broken.set(1, dead);
    await a.pread(512, 0).catch(() => {});
    const b = await connect(s.uri);
    expect(((await b.pread(512, 0).catch((e) => e)) as NbdRequestError).errno).toBe(Errno.ESHUTDOWN);
    expect(rec.opens).toHaveLength(1);
    await Promise.all([a.disconnect(), b.disconnect()]);
  });

  it('a lazy open that fails is reported to that client and retried by the next', async () => {
    const { plugin, rec } = createRecordingPlugin();
    rec.failOpens = 1;
    const s = await start({ plugin, filters: [createSharedFilter()], config: [['shared-open', 'lazy']] });
    const err = await connect(s.uri).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NbdOptionError);
    expect((err as NbdOptionError).serverMessage).toMatch(/upstream is not reachable/);
    const c = await connect(s.uri);
    expect(rec.opens).toHaveLength(1);
    await c.disconnect();
  });

  it('a failing open at start-up stops the server from starting, with the message', async () => {
    const { plugin, rec } = createRecordingPlugin();
    rec.failOpens = 1;
    await expect(serve({ plugin, filters: [createSharedFilter()], error: () => {} })).rejects.toThrow(
      /upstream is not reachable/,
    );
  });

  it('classifies failures', () => {
    expect(isFatal(new NbdError(Errno.ESHUTDOWN))).toBe(true);
    expect(isFatal(Object.assign(new Error('reset'), { code: 'ECONNRESET' }))).toBe(true);
    expect(isFatal(new NbdError(Errno.EIO))).toBe(false);
    expect(isFatal(new NbdError(Errno.EIO, 'gone', { fatal: true }))).toBe(true);
    expect(retires('fatal', new NbdError(Errno.EIO))).toBe(false);
    expect(retires('error', new NbdError(Errno.EIO))).toBe(true);
    expect(retires('error', new Error('anything'))).toBe(true);
    expect(retires('error', new NbdError(Errno.EINVAL))).toBe(false);
    expect(retires('error', new NbdError(Errno.ENOSPC))).toBe(false);
    expect(retires('never', new NbdError(Errno.ESHUTDOWN))).toBe(false);
  });
});

describe('shared: over the nbd plugin, when the upstream goes away', () => {
  it('clients of the dead upstream get errors; once it is back, the next connection reopens', async () => {
    if (!needTools('nbdkit')) return;
    // The nbd plugin is another package of this repository, used from its build. It is not a
    // devDependency of this package: @nbdx/plugin-nbd's tests devDepend on this filter, and the
    // workspace graph may not have a cycle; it comes from the root package.json's devDependencies.
    const { createNbdPlugin } = await import('@nbdx/plugin-nbd');
    const dir = tmpDir('nbdx-shared-test-');
    const sock = path.join(dir, 'upstream.sock');
    const upstream = () => startNbdkit(dir, ['memory', '1M'], sock);
    let nbdkit = await upstream();
    try {
      const s = await start({
        plugin: createNbdPlugin(),
        filters: [createSharedFilter()],
        config: [['uri', `nbd+unix:///?socket=${sock}`]],
      });
      const a = await connect(s.uri);
      await a.pwrite(pattern(4096, 1), 0);
      expect(Buffer.compare(await a.pread(4096, 0), pattern(4096, 1))).toBe(0);

      await nbdkit.kill('SIGKILL');
      fs.rmSync(sock, { force: true });
      const err = (await a.pread(4096, 0).catch((e) => e)) as NbdRequestError;
      expect(err).toBeInstanceOf(NbdRequestError);
      expect(err.serverMessage ?? err.message).toMatch(/upstream connection lost/);

      nbdkit = await upstream();
      const b = await connect(s.uri);
      expect((await b.pread(4096, 0)).every((x) => x === 0)).toBe(true); // a fresh upstream
      await b.pwrite(pattern(4096, 2), 0);
      const c = await connect(s.uri);
      expect(Buffer.compare(await c.pread(4096, 0), pattern(4096, 2))).toBe(0);
      await Promise.all([b.disconnect(), c.disconnect()]);
    } finally {
      await nbdkit.kill('SIGKILL');
      removeDir(dir);
    }
  });
});

describe('shared from the command line', () => {
  it('nbdx --filter=shared memory 1M --run (loaded by name)', async () => {
    if (!needTools('qemu-io')) return;
    const script = 'qemu-io -f raw -c "write -P 0x33 0 64k" "$uri" && qemu-io -f raw -c "read -P 0x33 0 64k" "$uri"';
    const r = await run(process.execPath, [nbdxBin(), '-U', '-', '--filter=shared', 'memory', '1M', 'shared-open=lazy', '--run', script]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/read 65536\/65536 bytes/);
    expect(r.stdout).not.toMatch(/Pattern verification failed/);
  });
});

describe('shared: configuration', () => {
  it('passes other keys on to the plugin and rejects bad values clearly', async () => {
    const { plugin } = createRecordingPlugin();
    await expect(serve({ plugin, filters: [createSharedFilter()], config: [['shared-open', 'soon']] })).rejects.toThrow(
      "shared-open: 'soon' is not one of start, lazy",
    );
    await expect(
      serve({ plugin, filters: [createSharedFilter()], config: [['shared-reopen', 'maybe']] }),
    ).rejects.toThrow("shared-reopen: 'maybe' is not one of fatal, error, never");
    await expect(
      serve({ plugin, filters: [createSharedFilter()], config: [['shared-readonly', 'perhaps']] }),
    ).rejects.toThrow(/shared-readonly/);
    // The recording plugin takes no parameters: the key reached it.
    await expect(serve({ plugin, filters: [createSharedFilter()], config: [['size', '1M']] })).rejects.toThrow(
      /takes no parameters/,
    );
  });

  it('works over the memory plugin with its own parameters', async () => {
    const { createMemoryPlugin } = await import('@nbdx/plugin-memory');
    const s = await start({ plugin: createMemoryPlugin(), filters: [createSharedFilter()], config: [['size', '1M']] });
    const c = await connect(s.uri);
    expect(c.size).toBe(1 << 20);
    await c.disconnect();
  });
});
