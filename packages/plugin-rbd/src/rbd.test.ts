import { createHash, randomBytes } from 'node:crypto';
import { closeSync, openSync, readFileSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '@nbdx/client';
import {
  NBDSH_HELPERS,
  cephDaemonPids,
  exportUri,
  nbdsh,
  nbdshOk,
  qemuImgMap,
  qemuIo,
  removeDir,
  run,
  runOk,
  startCeph,
  tmpDir,
  type CephCluster,
} from '@nbdx/testkit';
import { MiB, needRbd, rbdCli, serveRbd } from './test-support.js';

const GiB = 1024 * MiB;
const ready = needRbd('qemu-img', 'qemu-io', 'nbdinfo', 'nbdsh');

/** [offset, length] pairs merged where they touch. */
function merge(ranges: [number, number][]): [number, number][] {
  const out: [number, number][] = [];
  for (const [o, l] of [...ranges].sort((a, b) => a[0] - b[0])) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] >= o) last[1] = Math.max(last[1], o + l - last[0]);
    else out.push([o, l]);
  }
  return out;
}

interface DiffEntry {
  offset: number;
  length: number;
  exists: string;
}

async function rbdDiff(c: CephCluster, image: string, ...extra: string[]): Promise<[number, number][]> {
  const list = JSON.parse(await rbdCli(c, 'diff', '--format', 'json', ...extra, image)) as DiffEntry[];
  return merge(list.filter((e) => e.exists === 'true').map((e) => [e.offset, e.length]));
}

async function usedBytes(c: CephCluster, image: string): Promise<number> {
  const du = JSON.parse(await rbdCli(c, 'du', '--format', 'json', image)) as { images: { name: string; used_size: number }[] };
  return du.images.find((i) => !('snapshot' in i))!.used_size;
}

describe.runIf(ready)('the rbd plugin on a real Ceph cluster', () => {
  let c: CephCluster;
  let tmp: string;
  let src: string;

  beforeAll(async () => {
    tmp = tmpDir('nbdx-rbd-');
    // A 1 GiB source with 2 MiB of random data every 16 MiB (object-unaligned on purpose) and a
    // few small writes: 130 MiB of data, the rest holes.
    src = join(tmp, 'src.img');
    writeFileSync(src, '');
    truncateSync(src, GiB);
    const fd = openSync(src, 'r+');
    for (let i = 0; i < 64; i++) writeSync(fd, randomBytes(2 * MiB), 0, 2 * MiB, i * 16 * MiB + (i % 4) * MiB + (i % 3) * 4096);
    for (const off of [700 * MiB + 123, 900 * MiB - 5, GiB - 4096]) writeSync(fd, randomBytes(4096), 0, 4096, off);
    closeSync(fd);
    c = await startCeph({ pools: ['rbd'], memstoreBytes: 3 * GiB });
    await rbdCli(c, 'create', '--size', '1G', 'rbd/vm1');
  });

  afterAll(async () => {
    await c?.stop();
    if (tmp) removeDir(tmp);
  });

  it('qemu-img convert of a 1 GiB image into RBD through nbdx; equal through nbdx and through rbd export', async () => {
    const s = await serveRbd([['image', 'rbd/vm1'], ['conf', c.conf]]);
    try {
      await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', '-W', src, s.uri], { timeout: 120_000 });
      await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, s.uri], { timeout: 120_000 });
    } finally {
      await s.close();
    }
    const exported = join(tmp, 'export.img');
    await rbdCli(c, 'export', 'rbd/vm1', exported);
    await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, exported], { timeout: 120_000 });
    removeDir(exported);
  });

  it('qemu-img map through nbdx shows holes where the image was never written, matching rbd diff', async () => {
    const s = await serveRbd([['image', 'rbd/vm1'], ['conf', c.conf]]);
    try {
      const map = await qemuImgMap('-f', 'raw', s.uri);
      const data = merge(map.filter((e) => e.data).map((e) => [e.start, e.length]));
      const holes = map.filter((e) => !e.data);
      // Holes are reported as zero too: a client may skip reading them.
      expect(holes.every((e) => e.zero)).toBe(true);
      expect(holes.reduce((n, e) => n + e.length, 0)).toBeGreaterThan(GiB / 2);
      // Whole objects, as rbd diff --whole-object counts them ...
      expect(data).toEqual(await rbdDiff(c, 'rbd/vm1', '--whole-object'));
      // ... and every byte rbd diff calls written lies in a data extent.
      for (const [o, l] of await rbdDiff(c, 'rbd/vm1')) {
        expect(data.some(([d, n]) => d <= o && o + l <= d + n)).toBe(true);
      }
    } finally {
      await s.close();
    }
  });

  it('a snapshot is served read-only, with the data of the moment it was taken', async () => {
    await rbdCli(c, 'snap', 'create', 'rbd/vm1@s1');
    const rw = await serveRbd([['image', 'rbd/vm1'], ['conf', c.conf]]);
    const snap = await serveRbd([['image', 'rbd/vm1@s1'], ['conf', c.conf]]);
    const snapByParam = await serveRbd([['pool', 'rbd'], ['image', 'vm1'], ['snap', 's1'], ['conf', c.conf]]);
    try {
      await qemuIo(rw.uri, 'write -P 0xee 0 1M');
      const out = await nbdshOk(
        snap.uri,
        NBDSH_HELPERS +
          `
print(h.is_read_only(), h.can_trim(), h.can_zero())
expect_err("EPERM", lambda: h.pwrite(b"x" * 512, 0))
`,
      );
      expect(out).toContain('True False');
      expect(out).toContain('ok EPERM');
      // The snapshot still holds what was converted in (the write above went to the head).
      await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, snap.uri], { timeout: 120_000 });
      await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, snapByParam.uri], { timeout: 120_000 });
    } finally {
      await Promise.all([rw.close(), snap.close(), snapByParam.close()]);
    }
  });

  it('trim (discard) of whole objects reduces rbd du; they read back as zeroes and as holes', async () => {
    // An image of its own: on vm1 the snapshot would keep the trimmed objects (and rbd du counts
    // a head only from its last snapshot).
    await rbdCli(c, 'create', '--size', '64M', 'rbd/t');
    const s = await serveRbd([['image', 'rbd/t'], ['conf', c.conf]]);
    try {
      await qemuIo(s.uri, 'write -P 0x5a 0 64M', 'flush');
      const before = await usedBytes(c, 'rbd/t');
      expect(before).toBe(64 * MiB);
      const out = await nbdshOk(
        s.uri,
        `
h.trim(32 * 1024 * 1024, 8 * 1024 * 1024)
h.flush()
print(h.pread(4096, 17 * 1024 * 1024) == bytes(4096))
`,
      );
      expect(out.trim()).toBe('True');
      expect(await usedBytes(c, 'rbd/t')).toBe(32 * MiB);
      const map = await qemuImgMap('-f', 'raw', s.uri);
      expect(map.find((e) => e.start === 8 * MiB)).toMatchObject({ length: 32 * MiB, data: false, zero: true });
      await qemuIo(s.uri, 'read -P 0x5a 0 8M', 'read -P 0 8M 32M', 'read -P 0x5a 40M 24M');
    } finally {
      await s.close();
    }
  });

  it('write-zeroes reads back as zero, inside one object and across objects (never a skipped discard)', async () => {
    await rbdCli(c, 'create', '--size', '32M', 'rbd/z');
    const s = await serveRbd([['image', 'rbd/z'], ['conf', c.conf]]);
    try {
      await qemuIo(s.uri, 'write -P 0xaa 0 32M');
      const out = await nbdshOk(
        s.uri,
        `
h.zero(5000, 4 * 1024 * 1024 + 1000)
h.zero(6 * 1024 * 1024, 7 * 1024 * 1024 - 300, nbd.CMD_FLAG_FAST_ZERO)
h.zero(512, 31 * 1024 * 1024, nbd.CMD_FLAG_FUA)
print(h.can_fast_zero())
`,
      );
      expect(out.trim()).toBe('True');
      await qemuIo(
        s.uri,
        'read -P 0xaa 0 4195304',
        'read -P 0 4195304 5000',
        `read -P 0xaa ${4 * MiB + 6000} ${7 * MiB - 300 - (4 * MiB + 6000)}`,
        `read -P 0 ${7 * MiB - 300} ${6 * MiB}`,
        `read -P 0xaa ${13 * MiB - 300} ${31 * MiB - (13 * MiB - 300)}`,
        `read -P 0 ${31 * MiB} 512`,
        `read -P 0xaa ${31 * MiB + 512} ${MiB - 512}`,
      );
      // And Ceph's own tool sees the same bytes.
      const exported = join(tmp, 'z.img');
      await rbdCli(c, 'export', 'rbd/z', exported);
      const viaNbd = join(tmp, 'z-nbd.img');
      await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', s.uri, viaNbd]);
      await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', exported, viaNbd]);
    } finally {
      await s.close();
    }
  });

  it('fast zero is refused (ENOTSUP) only where a clone still reads from its parent', async () => {
    await rbdCli(c, 'create', '--size', '16M', 'rbd/golden');
    const g = await serveRbd([['image', 'rbd/golden'], ['conf', c.conf]]);
    try {
      await qemuIo(g.uri, 'write -P 0x33 0 16M');
    } finally {
      await g.close();
    }
    await rbdCli(c, 'snap', 'create', 'rbd/golden@base');
    await rbdCli(c, 'snap', 'protect', 'rbd/golden@base');
    await rbdCli(c, 'clone', 'rbd/golden@base', 'rbd/child');
    await rbdCli(c, 'resize', '--size', '24M', 'rbd/child');
    const s = await serveRbd([['image', 'rbd/child'], ['conf', c.conf]]);
    try {
      const out = await nbdshOk(
        s.uri,
        NBDSH_HELPERS +
          `
expect_err("ENOTSUP", lambda: h.zero(1024 * 1024, 0, nbd.CMD_FLAG_FAST_ZERO))
h.zero(1024 * 1024, 0)
h.zero(1024 * 1024, 20 * 1024 * 1024, nbd.CMD_FLAG_FAST_ZERO)
print(h.pread(1024 * 1024, 0) == bytes(1024 * 1024), h.pread(4096, 2 * 1024 * 1024) == b"\\x33" * 4096)
`,
      );
      expect(out).toContain('ok ENOTSUP');
      expect(out).toContain('True True');
    } finally {
      await s.close();
    }
  });

  it('8 concurrent clients writing checksummed regions of one image, many requests in flight: no mismatch', async () => {
    await rbdCli(c, 'create', '--size', '64M', 'rbd/multi');
    const s = await serveRbd([['image', 'rbd/multi'], ['conf', c.conf]]);
    const REGION = 8 * MiB;
    const CHUNK = 256 * 1024;
    const regions = Array.from({ length: 8 }, () => randomBytes(REGION));
    const sums = regions.map((r) => createHash('sha256').update(r).digest('hex'));
    const clients = await Promise.all(regions.map(() => NbdClient.connect(s.uri)));
    try {
      expect(clients[0]!.canMultiConn).toBe(true);
      // Each writes its region in 32 requests at once (interleaved with the others), then flushes.
      await Promise.all(
        clients.map(async (cl, i) => {
          const writes: Promise<unknown>[] = [];
          for (let o = 0; o < REGION; o += CHUNK) writes.push(cl.pwrite(regions[i]!.subarray(o, o + CHUNK), i * REGION + o));
          await Promise.all(writes);
          await cl.flush();
        }),
      );
      // Every client reads every region (multi-conn: what one flushed, all see).
      await Promise.all(
        clients.map(async (cl, k) => {
          for (let j = 0; j < 8; j++) {
            const i = (j + k) % 8;
            const parts = [];
            for (let o = 0; o < REGION; o += CHUNK) parts.push(cl.pread(CHUNK, i * REGION + o));
            const got = Buffer.concat(await Promise.all(parts));
            expect(createHash('sha256').update(got).digest('hex')).toBe(sums[i]);
          }
        }),
      );
    } finally {
      await Promise.all(clients.map((cl) => cl.disconnect().catch(() => cl.close())));
      await s.close();
    }
    // And the cluster holds the same bytes.
    const exported = join(tmp, 'multi.img');
    await rbdCli(c, 'export', 'rbd/multi', exported);
    expect(createHash('sha256').update(readFileSync(exported)).digest('hex')).toBe(
      createHash('sha256').update(Buffer.concat(regions)).digest('hex'),
    );
  });

  it('dynamic-export: export names are images of the pool, listed; IMAGE@SNAP is read-only; one handle per export', async () => {
    await rbdCli(c, 'create', '--size', '8M', 'rbd/d1');
    await rbdCli(c, 'create', '--size', '12M', 'rbd/d2');
    await rbdCli(c, 'snap', 'create', 'rbd/d1@s');
    const debugLines: string[] = [];
    const errors: string[] = [];
    const { serve } = await import('@nbdx/server');
    const { createRbdPlugin } = await import('./index.js');
    const s = await serve({
      plugin: createRbdPlugin(),
      config: [
        ['pool', 'rbd'],
        ['dynamic-export', 'true'],
        ['conf', c.conf],
      ],
      debug: (m: string) => debugLines.push(m),
      error: (m: string) => errors.push(m),
    });
    try {
      const list = await runOk('nbdinfo', ['--list', '--json', s.uri]);
      const names = (JSON.parse(list) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name']).sort();
      expect(names).toEqual(expect.arrayContaining(['d1', 'd2']));
      expect(await runOk('nbdinfo', ['--size', exportUri(s.uri, 'd2')])).toBe(`${12 * MiB}\n`);
      const snapInfo = await runOk('nbdinfo', ['--json', exportUri(s.uri, 'd1@s')]);
      expect(JSON.parse(snapInfo).exports[0]['is_read_only']).toBe(true);
      // Three connections at once to one export: librbd opens it once (nbdinfo --list opened
      // and closed it before; count from here).
      debugLines.length = 0;
      const cls = await Promise.all([0, 1, 2].map(() => NbdClient.connect(exportUri(s.uri, 'd1'))));
      await Promise.all(cls.map((cl) => cl.pread(4096, 0)));
      await Promise.all(cls.map((cl) => cl.disconnect()));
      expect(debugLines.filter((l) => l.includes('opened rbd/d1')).length).toBe(1);
      // An image that is not there: the client is told, the server goes on.
      const r = await run('nbdinfo', [exportUri(s.uri, 'nope')]);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/No such file or directory for export: nope/);
      // The operator's log says why, naming the layer.
      expect(errors.join('\n')).toMatch(/rbd: error: cannot open export 'nope': image rbd\/nope does not exist/);
      expect(await runOk('nbdinfo', ['--size', exportUri(s.uri, 'd1')])).toBe(`${8 * MiB}\n`);
    } finally {
      await s.close();
    }
  });

  it('RADOS namespaces: POOL/NAMESPACE/IMAGE, and namespace= with dynamic-export', async () => {
    await rbdCli(c, 'namespace', 'create', 'rbd/tenant1');
    await rbdCli(c, 'create', '--size', '4M', 'rbd/tenant1/img');
    const s = await serveRbd([['image', 'rbd/tenant1/img'], ['conf', c.conf]]);
    try {
      await qemuIo(s.uri, 'write -P 0x66 0 4M');
    } finally {
      await s.close();
    }
    const d = await serveRbd([['pool', 'rbd'], ['namespace', 'tenant1'], ['dynamic-export', 'true'], ['conf', c.conf]]);
    try {
      const list = JSON.parse(await runOk('nbdinfo', ['--list', '--json', d.uri])) as { exports: { 'export-name': string }[] };
      expect(list.exports.map((e) => e['export-name'])).toEqual(['img']);
      await qemuIo(exportUri(d.uri, 'img'), 'read -P 0x66 0 4M');
    } finally {
      await d.close();
    }
  });

  it('a missing image or pool stops the server at start with one clear line', async () => {
    await expect(serveRbd([['image', 'rbd/nope'], ['conf', c.conf]])).rejects.toThrow(/^image rbd\/nope does not exist$/);
    await expect(serveRbd([['image', 'nopool/x'], ['conf', c.conf]])).rejects.toThrow(/pool 'nopool' does not exist/);
    await expect(serveRbd([['image', 'rbd/vm1@nosnap'], ['conf', c.conf]])).rejects.toThrow(/rbd\/vm1@nosnap: no such image or snapshot/);
  });

  it('with timeout=, an OSD that stops answering gives EIO naming the timeout; the server keeps serving once it is back', async () => {
    await rbdCli(c, 'create', '--size', '8M', 'rbd/slow');
    const errors: string[] = [];
    const s = await serveRbd([['image', 'rbd/slow'], ['conf', c.conf], ['timeout', '2']], { errors });
    const osd = cephDaemonPids(c).find((pid) => readFileSync(`/proc/${pid}/cmdline`, 'utf8').startsWith('ceph-osd'))!;
    try {
      await qemuIo(s.uri, 'write -P 0x11 0 1M');
      // A flush: librbd answers reads of never-written objects from its object map, others may
      // come from its cache, and writes go to the cache (write-back since qemu-io flushed).
      process.kill(osd, 'SIGSTOP');
      const t0 = Date.now();
      const out = await nbdshOk(s.uri, NBDSH_HELPERS + 'h.pwrite(b"w" * 4096, 8192)\nprint(expect_err("EIO", lambda: h.flush()))');
      expect(Date.now() - t0).toBeLessThan(15_000);
      expect(out).toContain('ok EIO');
      expect(errors.join('\n')).toMatch(/rbd: .*flush: librbd flush: Connection timed out \(timeout= reached: is the cluster healthy\?\)/);
      process.kill(osd, 'SIGCONT');
      await qemuIo(s.uri, 'read -P 0x11 0 8192', 'write -P 0x22 1M 1M', 'read -P 0x22 1M 1M');
    } finally {
      process.kill(osd, 'SIGCONT');
      await s.close();
    }
  });

  it('an image without object-map/fast-diff: the allocation map is still right (librbd lists the objects)', async () => {
    await rbdCli(c, 'create', '--size', '32M', '--image-feature', 'layering', 'rbd/plain');
    const s = await serveRbd([['image', 'rbd/plain'], ['conf', c.conf]]);
    try {
      await qemuIo(s.uri, 'write -P 0x9 4M 4k', 'write -P 0x9 20M 5M');
      const map = await qemuImgMap('-f', 'raw', s.uri);
      const data = merge(map.filter((e) => e.data).map((e) => [e.start, e.length]));
      expect(data).toEqual([
        [4 * MiB, 4 * MiB],
        [20 * MiB, 8 * MiB],
      ]);
      expect(data).toEqual(await rbdDiff(c, 'rbd/plain', '--whole-object'));
    } finally {
      await s.close();
    }
  });

  it('a client the cluster blocklists: EIO, the connection is closed, the server stays up', async () => {
    await rbdCli(c, 'create', '--size', '8M', 'rbd/fenced');
    const errors: string[] = [];
    const s = await serveRbd([['image', 'rbd/fenced'], ['conf', c.conf]], { errors });
    try {
      await qemuIo(s.uri, 'write -P 0x1 0 64k');
      // The server's librados client is the image's watcher: fence it, as an operator (or a
      // failover) would.
      const status = JSON.parse(await rbdCli(c, 'status', '--format', 'json', 'rbd/fenced')) as { watchers: { address: string }[] };
      expect(status.watchers).toHaveLength(1);
      await runOk('ceph', ['--conf', c.conf, 'osd', 'blocklist', 'add', status.watchers[0]!.address]);
      const out = await nbdsh(s.uri, 'h.pwrite(b"x" * 4096, 0)\nh.flush()');
      expect(out.code).not.toBe(0);
      expect(out.stderr).toMatch(/EIO|ESHUTDOWN|Input\/output error|shut down|closed/i);
      expect(errors.join('\n')).toMatch(/blocklisted by the cluster/);
      // The server itself still answers (a new connection is accepted; its I/O fails).
      const r = await run('nbdinfo', ['--size', s.uri]);
      expect(r.stdout).toBe(`${8 * MiB}\n`);
    } finally {
      await s.close();
    }
  });
});
