/** Tests against qemu-nbd: export list/info, sparse reads with OFFSET_HOLE, error messages. */
import { spawnSync } from 'node:child_process';
import { open, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { NBD, NbdClient, NbdOptionError, NbdRequestError, type ConnectOptions, type Span } from './index.js';
import { describeWithTools, makeTempDir, startQemuNbd, type Peer } from './test-utils/peers.js';

const MiB = 1024 * 1024;

describeWithTools(['qemu-nbd', 'qemu-img'], 'against qemu-nbd', () => {
  let tmp: { dir: string; cleanup: () => Promise<void> };
  let rawFile: string;
  let qcowFile: string;
  let raw: Peer; // sparse raw file, export "sparse"
  let qcow: Peer; // qcow2 image, export "q", allocation depth on
  const peers: Peer[] = [];
  const clients: NbdClient[] = [];

  beforeAll(async () => {
    tmp = await makeTempDir();
    // 8 MiB sparse raw file: data at [0, 64K) and [4M, 4M+64K).
    rawFile = path.join(tmp.dir, 'sparse.img');
    await writeFile(rawFile, '');
    const fh = await open(rawFile, 'r+');
    await fh.truncate(8 * MiB);
    await fh.write(Buffer.alloc(65536, 0x11), 0, 65536, 0);
    await fh.write(Buffer.alloc(65536, 0x22), 0, 65536, 4 * MiB);
    await fh.close();
    qcowFile = path.join(tmp.dir, 'disk.qcow2');
    const r = spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', qcowFile, '16M'], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`qemu-img create failed: ${r.stderr}`);
    raw = await startQemuNbd(tmp.dir, rawFile, { exportName: 'sparse', extra: ['-D', 'a sparse test disk'] });
    qcow = await startQemuNbd(tmp.dir, qcowFile, { exportName: 'q', format: 'qcow2', extra: ['-A'] });
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    for (const p of peers.splice(0)) await p.stop();
  });
  afterAll(async () => {
    await raw?.stop();
    await qcow?.stop();
    await tmp?.cleanup();
  });

  async function connect(p: Peer, exportName: string, o: ConnectOptions = {}): Promise<NbdClient> {
    const c = await NbdClient.connect({ path: p.socket }, { exportName, ...o });
    clients.push(c);
    return c;
  }

  function covered(spans: Span[], start: number, end: number): boolean {
    return spans.some((s) => s.start <= start && s.start + s.length >= end);
  }

  it('lists exports with descriptions and reports export info', async () => {
    expect(await NbdClient.list({ path: raw.socket })).toEqual([{ name: 'sparse', description: 'a sparse test disk' }]);
    const info = await NbdClient.info({ path: raw.socket }, 'sparse');
    expect(info).toMatchObject({ exportName: 'sparse', name: 'sparse', size: 8 * MiB, description: 'a sparse test disk' });
    expect(info.blockSize).toBeDefined();
    expect(info.blockSize!.minimum).toBeGreaterThanOrEqual(1);
    expect(info.blockSize!.maximum).toBeGreaterThanOrEqual(info.blockSize!.preferred);
    expect(info.transmissionFlags & NBD.TF_HAS_FLAGS).toBe(NBD.TF_HAS_FLAGS);
  });

  it('an unknown export is an NbdOptionError carrying qemu-nbd\'s message', async () => {
    const err = await NbdClient.connect({ path: raw.socket }, { exportName: 'nope' }).catch((e) => e);
    expect(err).toBeInstanceOf(NbdOptionError);
    expect(err.option).toBe(NBD.OPT_GO);
    expect(err.replyType).toBe(NBD.REP_ERR_UNKNOWN);
    expect(err.serverMessage).toMatch(/nope/);
    await expect(NbdClient.info({ path: raw.socket }, 'nope')).rejects.toBeInstanceOf(NbdOptionError);
  });

  it('preadInto reports holes of a sparse qcow2 without writing them; pread zero-fills', async () => {
    const c = await connect(qcow, 'q');
    expect(c.structuredReplies).toBe(true);
    await c.pwrite(Buffer.alloc(65536, 0x33), MiB);
    await c.flush();
    const buf = Buffer.alloc(4 * MiB, 0xee);
    const holes = await c.preadInto(buf, 0);
    // Data at [1M, 1M+64K); everything else unallocated and sent as OFFSET_HOLE.
    expect(covered(holes, 0, MiB)).toBe(true);
    expect(covered(holes, MiB + 65536, 4 * MiB)).toBe(true);
    expect(holes.some((h) => h.start < MiB + 65536 && h.start + h.length > MiB)).toBe(false);
    expect(buf.subarray(MiB, MiB + 65536).every((x) => x === 0x33)).toBe(true);
    // Hole ranges were left alone.
    for (const h of holes) expect(buf.subarray(h.start, h.start + h.length).every((x) => x === 0xee)).toBe(true);
    const b = await c.pread(4 * MiB, 0);
    expect(b.subarray(0, MiB).every((x) => x === 0)).toBe(true);
    expect(b.subarray(MiB, MiB + 65536).every((x) => x === 0x33)).toBe(true);
    expect(b.subarray(MiB + 65536).every((x) => x === 0)).toBe(true);
    // With DF the reply must come as one data chunk: no holes.
    if (c.canDf) {
      const df = Buffer.alloc(65536, 0xee);
      expect(await c.preadInto(df, 0, NBD.CMD_FLAG_DF)).toEqual([]);
      expect(df.every((x) => x === 0)).toBe(true);
    }
  });

  it('preadInto on a sparse raw file (holes when the filesystem keeps the file sparse)', async () => {
    const c = await connect(raw, 'sparse');
    const buf = Buffer.alloc(8 * MiB, 0xee);
    const holes = await c.preadInto(buf, 0);
    expect(buf.subarray(0, 65536).every((x) => x === 0x11)).toBe(true);
    expect(buf.subarray(4 * MiB, 4 * MiB + 65536).every((x) => x === 0x22)).toBe(true);
    for (const h of holes) expect(buf.subarray(h.start, h.start + h.length).every((x) => x === 0xee)).toBe(true);
    const st = await stat(rawFile);
    if (st.blocks * 512 < st.size / 2) {
      expect(covered(holes, 65536, 4 * MiB)).toBe(true);
      expect(covered(holes, 4 * MiB + 65536, 8 * MiB)).toBe(true);
    }
    // Everything not a hole was written: data ranges + hole ranges cover the buffer.
    const notHole = Buffer.alloc(buf.length);
    for (const h of holes) notHole.fill(1, h.start, h.start + h.length);
    for (let i = 0; i < buf.length; i += 4096) if (!notHole[i]) expect(buf[i]).not.toBe(0xee);
  });

  it('block status with base:allocation and qemu:allocation-depth', async () => {
    const c = await connect(qcow, 'q', { metaContexts: ['base:allocation', 'qemu:allocation-depth'] });
    expect([...c.metaContexts.keys()].sort()).toEqual(['base:allocation', 'qemu:allocation-depth']);
    await c.pwrite(Buffer.alloc(65536, 1), 8 * MiB);
    const st = await c.blockStatus(c.size, 0);
    const alloc = st.get('base:allocation')!;
    let at = 0;
    let sawData = false;
    for (const e of alloc) {
      if (at >= 8 * MiB && at < 8 * MiB + 65536) {
        expect(e.flags & NBD.STATE_HOLE).toBe(0);
        sawData = true;
      }
      if (at + e.length <= MiB) expect(e.flags & NBD.STATE_ZERO).toBe(NBD.STATE_ZERO);
      at += e.length;
    }
    expect(sawData).toBe(true);
    expect(st.get('qemu:allocation-depth')!.length).toBeGreaterThan(0);
  });

  it('errors carry qemu-nbd\'s message: raw read past the end, non-strict pread, read-only write', async () => {
    const c = await connect(raw, 'sparse', { strict: false });
    const r = await c.request({ type: NBD.CMD_READ, offset: c.size, length: 512 });
    expect(r.error).toBe(22);
    expect(r.message).toBeTruthy();
    expect(r.chunks[0]).toMatchObject({ type: NBD.REPLY_TYPE_ERROR, errno: 22 });
    const err = await c.pread(512, c.size - 256).catch((e) => e);
    expect(err).toBeInstanceOf(NbdRequestError);
    expect(err.errno).toBe(22);
    expect(err.message).toBe(err.serverMessage);
    expect(err.message).toMatch(/EOF|end|bounds|range/i);
    // Bad flags on READ (FUA) come back as EINVAL with a message too.
    const bad = await c.request({ type: NBD.CMD_READ, flags: NBD.CMD_FLAG_REQ_ONE | 0x4000, offset: 0, length: 512 });
    expect(bad.error).toBe(22);

    const ro = await startQemuNbd(tmp.dir, rawFile, { exportName: 'ro', extra: ['-r'] });
    peers.push(ro);
    const rc = await connect(ro, 'ro');
    expect(rc.readOnly).toBe(true);
    const w = await rc.request({ type: NBD.CMD_WRITE, offset: 0, length: 512, payload: Buffer.alloc(512) });
    // The protocol table suggests EPERM; qemu-nbd 7.2 answers EINVAL (with a message). Either is a
    // clean per-request failure.
    expect([1, 22]).toContain(w.error);
    expect(w.message).toBeTruthy();
    await expect(rc.pwrite(Buffer.alloc(512), 0)).rejects.toMatchObject({ errno: 1, local: true });
  });

  it('many reads in flight with simple replies and with structured replies', async () => {
    for (const structuredReplies of [false, true]) {
      const c = await connect(raw, 'sparse', { structuredReplies });
      expect(c.structuredReplies).toBe(structuredReplies);
      const reads = Array.from({ length: 64 }, (_, i) => c.pread(128 * 1024, i * 128 * 1024));
      const bufs = await Promise.all(reads);
      const whole = Buffer.concat(bufs);
      expect(whole.subarray(0, 65536).every((x) => x === 0x11)).toBe(true);
      expect(whole.subarray(65536, 4 * MiB).every((x) => x === 0)).toBe(true);
      expect(whole.subarray(4 * MiB, 4 * MiB + 65536).every((x) => x === 0x22)).toBe(true);
      await c.disconnect();
    }
  });
});
