/**
 * `nbdx --workers`: connections served on several threads, with the file plugin (which declares
 * workerThreads). Real clients: nbdcopy's connections are spread over the threads and the data
 * they copy in comes back out intact; what one thread's connection writes, another's reads
 * (one disk); layers that keep their disk in their own memory stay on one thread with a warning
 * when more were asked for; shutdown with workers is clean; bad values are one line.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { nbdxBin, needNbdx, needTools, run, runOk, startCli, tmpDir, type CliServer } from '@nbdx/testkit';
import { chooseWorkers } from '../cli/workers.js';

const have = needTools('nbdcopy', 'nbdsh', 'nbdinfo') && needNbdx();
const MiB = 1024 * 1024;

describe('chooseWorkers', () => {
  const helper = { dup: () => 0, getBuffer: () => 0, setBuffer: () => 0 };
  const file = [{ kind: 'plugin' as const, name: 'file', workerThreads: true }];
  const base = { single: false, layers: file, threadModel: 'parallel' as const, helper: { ops: helper, path: 'x.node' }, metrics: false };

  it('auto: one thread per core, at most 4; one on a single core', () => {
    expect(chooseWorkers({ ...base, requested: undefined, cores: 2 }).count).toBe(2);
    expect(chooseWorkers({ ...base, requested: 'auto', cores: 16 }).count).toBe(4);
    expect(chooseWorkers({ ...base, requested: 'auto', cores: 1 })).toEqual({ count: 1, reason: 'this machine has 1 core' });
    expect(chooseWorkers({ ...base, requested: 8, cores: 2 }).count).toBe(8);
  });

  it('one thread, with the reason, whenever a layer or option does not allow more', () => {
    const memory = [{ kind: 'filter' as const, name: 'offset', workerThreads: true }, { kind: 'plugin' as const, name: 'memory' }];
    expect(chooseWorkers({ ...base, requested: 4, layers: memory }).reason).toMatch(/^plugin memory keeps its state in its own memory/);
    expect(chooseWorkers({ ...base, requested: 4, single: true }).reason).toBe('-s serves one connection');
    expect(chooseWorkers({ ...base, requested: 4, threadModel: 'serialize_all_requests' }).count).toBe(1);
    expect(chooseWorkers({ ...base, requested: 4, metrics: true }).reason).toBe('--metrics counts on one thread');
    expect(chooseWorkers({ ...base, requested: 4, helper: { ops: null, reason: 'x' } }).reason).toMatch(/@nbdx\/native \(x\)/);
    expect(chooseWorkers({ ...base, requested: 1 }).count).toBe(1);
  });
});

describe.skipIf(!have)('nbdx --workers with the file plugin', () => {
  let dir: string;
  let disk: string;
  let src: string;
  let srv: CliServer;
  beforeAll(async () => {
    dir = tmpDir('nbdx-workers-');
    disk = path.join(dir, 'disk.img');
    fs.writeFileSync(disk, '');
    fs.truncateSync(disk, 64 * MiB);
    src = path.join(dir, 'src.img');
    fs.writeFileSync(src, randomBytes(64 * MiB));
    srv = await startCli(['-v', '--workers=2', '-U', path.join(dir, 'w.sock'), 'file', disk]);
  });
  afterAll(async () => {
    await srv?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('serves on two threads, and nbdcopy\'s two connections are spread over them', async () => {
    expect(srv.stderr()).toContain('serving connections on 2 threads');
    expect(srv.stderr()).toContain('worker 1 ready');
    await runOk('nbdcopy', ['--connections=2', src, srv.uri]);
    const out = path.join(dir, 'out.img');
    await runOk('nbdcopy', ['--connections=2', srv.uri, out]);
    expect(fs.readFileSync(out).equals(fs.readFileSync(src))).toBe(true);
    expect(fs.readFileSync(disk).equals(fs.readFileSync(src))).toBe(true);
    // Each copy: one connection here, one handed over (the least busy thread takes the next).
    expect(srv.stderr().match(/handed a connection to worker 1/g)?.length ?? 0).toBeGreaterThanOrEqual(2);
  });

  it('one disk: a write on one thread\'s connection is read on the other\'s, flush included', async () => {
    // Two handles at once: the first stays on this thread, the second goes to the worker.
    const script = `
import nbd
a = nbd.NBD(); a.connect_uri(${JSON.stringify(srv.uri)})
b = nbd.NBD(); b.connect_uri(${JSON.stringify(srv.uri)})
for i in range(16):
    w, r = (a, b) if i % 2 == 0 else (b, a)
    data = bytes([i + 1]) * 65536
    w.pwrite(data, i * 65536, nbd.CMD_FLAG_FUA)
    assert r.pread(65536, i * 65536) == data, i
    w.flush()
print("ok", a.can_multi_conn(), b.can_multi_conn())
`;
    expect((await runOk('nbdsh', ['-c', script])).trim()).toBe('ok True True');
  });

  it('many clients at once, some hanging up mid-handshake: every complete one is served', async () => {
    const sock = srv.uri.replace(/^.*socket=/, '');
    const net = await import('node:net');
    const rude = Array.from({ length: 6 }, () => {
      const s = net.connect(sock);
      s.on('error', () => {});
      s.once('data', () => s.destroy());
      return s;
    });
    const sizes = await Promise.all(Array.from({ length: 12 }, () => runOk('nbdinfo', ['--size', srv.uri])));
    for (const s of sizes) expect(s.trim()).toBe(String(64 * MiB));
    for (const s of rude) s.destroy();
  });

  it('TLS on worker threads: every thread negotiates it, a copy round-trips, a wrong key is refused', async () => {
    const keys = path.join(dir, 'keys.psk');
    const wrong = path.join(dir, 'wrong.psk');
    fs.writeFileSync(keys, `alice:${randomBytes(32).toString('hex')}\n`);
    fs.writeFileSync(wrong, `alice:${randomBytes(32).toString('hex')}\n`);
    const sock = path.join(dir, 'tls.sock');
    const s = await startCli(['-v', '--workers=2', '--tls=require', `--tls-psk=${keys}`, '-U', sock, 'file', disk]);
    try {
      const uri = (k: string) => `nbds+unix://alice@/?socket=${sock}&tls-psk-file=${k}`;
      const out = path.join(dir, 'tls-out.img');
      await runOk('nbdcopy', ['--connections=2', uri(keys), out]);
      expect(fs.readFileSync(out).equals(fs.readFileSync(disk))).toBe(true);
      expect(s.stderr()).toMatch(/handed a connection to worker 1/);
      const refused = await run('nbdinfo', ['--size', uri(wrong)]);
      expect(refused.code).not.toBe(0);
      expect((await runOk('nbdinfo', ['--size', uri(keys)])).trim()).toBe(String(64 * MiB));
    } finally {
      await s.stop();
    }
  });

  it('ends cleanly on SIGTERM: exit 0, socket removed, workers gone', async () => {
    const sock = path.join(dir, 'term.sock');
    const s = await startCli(['--workers=3', '-U', sock, 'file', disk]);
    await runOk('nbdinfo', ['--size', s.uri]);
    await runOk('nbdinfo', ['--size', s.uri]);
    expect(await s.stop('SIGTERM')).toBe(0);
    expect(fs.existsSync(sock)).toBe(false);
    expect(s.stderr()).toBe('');
  });
});

describe.skipIf(!have)('nbdx --workers with memory allocator=malloc (the disk in shared memory)', () => {
  it('both threads serve one disk: a write through one is read through the other, and a copy round-trips', async () => {
    const dir = tmpDir('nbdx-workers-');
    try {
      const s = await startCli(['-v', '--workers=2', '-U', path.join(dir, 'm.sock'), 'memory', '32M', 'allocator=malloc']);
      try {
        expect(s.stderr()).toContain('serving connections on 2 threads');
        const script = `
import nbd
a = nbd.NBD(); a.connect_uri(${JSON.stringify(s.uri)})
b = nbd.NBD(); b.connect_uri(${JSON.stringify(s.uri)})
for i in range(32):
    w, r = (a, b) if i % 2 == 0 else (b, a)
    data = bytes([i + 7]) * 4096
    w.pwrite(data, i * 1048576 + 512)
    assert r.pread(4096, i * 1048576 + 512) == data, i
    w.zero(4096, i * 1048576 + 512)
    assert r.pread(4096, i * 1048576 + 512) == bytes(4096), i
print("ok")
`;
        expect((await runOk('nbdsh', ['-c', script])).trim()).toBe('ok');
        expect(s.stderr()).toMatch(/handed a connection to worker 1/);
        const src = path.join(dir, 'src');
        fs.writeFileSync(src, randomBytes(32 * MiB));
        await runOk('nbdcopy', [src, s.uri]);
        const out = path.join(dir, 'out');
        await runOk('nbdcopy', [s.uri, out]);
        expect(fs.readFileSync(out).equals(fs.readFileSync(src))).toBe(true);
      } finally {
        await s.stop();
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe.skipIf(!have)('nbdx --workers with the sparse memory disk (page table and chunks in shared memory)', () => {
  it('every thread serves one disk: writes, zeroes, trims and extents agree across threads, and copies round-trip', async () => {
    const dir = tmpDir('nbdx-workers-');
    try {
      const s = await startCli(['-v', '--workers=2', '-U', path.join(dir, 's.sock'), 'memory', '1T']);
      try {
        expect(s.stderr()).toContain('serving connections on 2 threads');
        // Scattered sub-block writes (sparse pages), whole pages, a page made dense and one
        // trimmed back: each done on one thread and checked on the other.
        const script = `
import nbd
a = nbd.NBD(); a.connect_uri(${JSON.stringify(s.uri)})
b = nbd.NBD(); b.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION); b.connect_uri(${JSON.stringify(s.uri)})
G = 1 << 30
for i in range(64):
    w, r = (a, b) if i % 2 == 0 else (b, a)
    at = i * 7 * G + 5 * 4096 + 100
    data = bytes([i + 1]) * 3000
    w.pwrite(data, at)
    assert r.pread(3000, at) == data, i
    page = i * 7 * G + 1048576
    w.pwrite(bytes([i + 2]) * 131072, page)
    assert r.pread(131072, page) == bytes([i + 2]) * 131072, i
    w.trim(32768, page)
    assert r.pread(32768, page) == bytes(32768), i
    w.zero(2000, at + 500)
    assert r.pread(3000, at) == data[:500] + bytes(2000) + data[2500:], i
seen = []
b.block_status(2 * G, 0, lambda ctx, off, e, err: seen.append(list(e)) or 0)
assert seen[0][:4] == [32768, 0, 1048576, 3], seen[0][:4]
print("ok")
`;
        expect((await runOk('nbdsh', ['-c', script])).trim()).toBe('ok');
        expect(s.stderr()).toMatch(/handed a connection to worker 1/);
      } finally {
        await s.stop();
      }
      expect(s.stderr()).not.toMatch(/error/i);
      // nbdcopy's four connections over both threads, into a disk and back out (payloads
      // received into pages taken for them, replies sent from the pages).
      const c = await startCli(['--workers=2', '-U', path.join(dir, 'c.sock'), 'memory', '48M']);
      try {
        const src = path.join(dir, 'src');
        fs.writeFileSync(src, randomBytes(48 * MiB));
        await runOk('nbdcopy', ['--connections=4', src, c.uri]);
        const out = path.join(dir, 'out');
        await runOk('nbdcopy', ['--connections=4', c.uri, out]);
        expect(fs.readFileSync(out).equals(fs.readFileSync(src))).toBe(true);
      } finally {
        await c.stop();
      }
      expect(c.stderr()).toBe('');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe.skipIf(!have)('nbdx --workers where it cannot apply', () => {
  it('a filter keeping its state in its own memory: one thread, one warning line, still served', async () => {
    const dir = tmpDir('nbdx-workers-');
    try {
      const s = await startCli(['--workers=2', '-U', path.join(dir, 'm.sock'), '--filter=cow', 'memory', '16M']);
      expect((await runOk('nbdinfo', ['--size', s.uri])).trim()).toBe(String(16 * MiB));
      await s.stop();
      const lines = s.stderr().trim().split('\n');
      expect(lines).toEqual([
        'nbdx: warning: --workers=2: serving on one thread: filter cow keeps its state in its own memory (it does not declare workerThreads)',
      ]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('bad values: one line, exit 1', async () => {
    for (const v of ['0', '-1', 'two', '1.5', '65']) {
      const r = await run(process.execPath, [nbdxBin(), `--workers=${v}`, 'memory', '1M']);
      expect(r.code).toBe(1);
      expect(r.stderr).toBe(`nbdx: --workers: '${v}' is not 'auto' or a number of threads from 1 to 64\n`);
    }
  });
});
