/** Tests against nbdkit (a real, independent NBD server). */
import { writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { NBD, NbdClient, NbdConnectionError, NbdRequestError, type ConnectOptions } from './index.js';
import { describeWithTools, makeTempDir, nbdkitVersion, startNbdkit, type Peer } from './test-utils/peers.js';

describeWithTools(['nbdkit'], 'against nbdkit', () => {
  let tmp: { dir: string; cleanup: () => Promise<void> };
  let mem: Peer; // nbdkit memory 64M, shared by the simple tests
  const peers: Peer[] = [];
  const clients: NbdClient[] = [];

  beforeAll(async () => {
    tmp = await makeTempDir();
    mem = await startNbdkit(tmp.dir, ['memory', '64M']);
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    for (const p of peers.splice(0)) await p.stop();
  });
  afterAll(async () => {
    await mem?.stop();
    await tmp?.cleanup();
  });

  async function connect(target: Parameters<typeof NbdClient.connect>[0], o: ConnectOptions = {}): Promise<NbdClient> {
    const c = await NbdClient.connect(target, o);
    clients.push(c);
    return c;
  }
  async function peer(args: string[]): Promise<Peer> {
    const p = await startNbdkit(tmp.dir, args);
    peers.push(p);
    return p;
  }

  function pattern(n: number, seed: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
    return b;
  }

  const variants: Array<[string, ConnectOptions]> = [
    ['defaults (extended headers if offered)', {}],
    ['structured replies, no extended headers', { extendedHeaders: false }],
    ['simple replies', { structuredReplies: false }],
    ['no direct reads', { directReads: false }],
  ];
  for (const [label, opts] of variants) {
    it(`read/write round trip: ${label}`, async () => {
      const c = await connect({ path: mem.socket }, opts);
      expect(c.size).toBe(64 * 1024 * 1024);
      expect(c.structuredReplies).toBe(opts.structuredReplies !== false);
      if (opts.extendedHeaders === false || opts.structuredReplies === false) expect(c.extendedHeaders).toBe(false);
      const seed = Math.floor(Math.random() * 1000);
      const big = pattern(3 * 1024 * 1024 + 512, seed);
      const off = 1024 * 1024 * (1 + (seed % 16));
      await c.pwrite(big, off);
      expect((await c.pread(big.length, off)).equals(big)).toBe(true);
      const into = Buffer.alloc(big.length);
      const holes = await c.preadInto(into, off);
      expect(holes).toEqual([]);
      expect(into.equals(big)).toBe(true);
      // Small unaligned pieces.
      await c.pwrite(Buffer.from('nbdx'), off + 3);
      expect((await c.pread(8, off)).subarray(3, 7).toString()).toBe('nbdx');
      await c.disconnect();
    });
  }

  it('reports what nbdkit offers (extended headers depend on the nbdkit version)', async () => {
    const c = await connect(`nbd+unix:///?socket=${mem.socket}`);
    const v = nbdkitVersion();
    // nbdkit gained extended headers in 1.3x; either way the client must end up with a working
    // structured-reply connection.
    expect(c.structuredReplies).toBe(true);
    if (v && v[0] === 1 && v[1] < 34) expect(c.extendedHeaders).toBe(false);
    expect(c.metaContexts.has('base:allocation')).toBe(true);
    expect(c.transmissionFlags & NBD.TF_HAS_FLAGS).toBe(NBD.TF_HAS_FLAGS);
    expect(c.readOnly).toBe(false);
    expect(c.canFlush && c.canTrim && c.canZero && c.canFua && c.canFastZero && c.canCache && c.canMultiConn).toBe(true);
    expect(c.canDf).toBe(true);
    expect(c.isRotational).toBe(false);
  });

  it('refuses structured replies from `nbdkit --no-sr`: simple replies throughout', async () => {
    const p = await peer(['--no-sr', 'memory', '1M']);
    const c = await connect({ path: p.socket });
    expect(c.structuredReplies).toBe(false);
    expect(c.extendedHeaders).toBe(false);
    expect(c.metaContexts.size).toBe(0);
    await c.pwrite(Buffer.alloc(4096, 9), 0);
    expect((await c.pread(4096, 0)).every((x) => x === 9)).toBe(true);
    // Errors in simple replies carry no message.
    const r = await c.request({ type: NBD.CMD_READ, offset: 1024 * 1024, length: 512 });
    expect(r).toMatchObject({ error: 22, simple: true, chunks: [] });
    expect(r.data).toBeUndefined();
  });

  it('handles plain newstyle (no FIXED_NEWSTYLE) and missing NO_ZEROES via --mask-handshake', async () => {
    const plain = await peer(['--mask-handshake=0', 'memory', '1M']);
    const c = await connect({ path: plain.socket });
    expect(c.size).toBe(1024 * 1024);
    expect(c.structuredReplies).toBe(false);
    await c.pwrite(Buffer.from('abc'), 10);
    expect((await c.pread(3, 10)).toString()).toBe('abc');
    await expect(NbdClient.connect({ path: plain.socket }, { fixedNewstyleOnly: true })).rejects.toThrow(/fixed newstyle/);

    const zeroes = await peer(['--mask-handshake=1', 'memory', '1M']);
    const c2 = await connect({ path: zeroes.socket });
    expect(c2.structuredReplies).toBe(true);
    expect((await c2.pread(16, 0)).length).toBe(16);
  });

  it('connects to an oldstyle server (nbdkit -o) unless fixed newstyle is required', async () => {
    const p = await peer(['-o', 'memory', '2M']);
    const c = await connect({ path: p.socket });
    expect(c.size).toBe(2 * 1024 * 1024);
    expect(c.exportName).toBe('');
    await c.pwrite(Buffer.from('old'), 0);
    expect((await c.pread(3, 0)).toString()).toBe('old');
    await expect(NbdClient.connect({ path: p.socket }, { fixedNewstyleOnly: true })).rejects.toThrow(/oldstyle/);
  });

  it('works over an already connected socket and with export names from URIs', async () => {
    const p = await peer(['-e', 'named', 'memory', '1M']);
    const sock = net.connect(p.socket);
    await new Promise((r) => sock.once('connect', r));
    const c = await connect({ socket: sock }, { exportName: 'named' });
    expect(c.exportName).toBe('named');
    await c.pwrite(Buffer.alloc(200_000, 3), 0);
    expect((await c.pread(200_000, 0)).every((x) => x === 3)).toBe(true);
    const c2 = await connect(`nbd+unix:///named?socket=${p.socket}`);
    expect(c2.exportName).toBe('named');
    const info = await NbdClient.info(`nbd+unix:///named?socket=${p.socket}`);
    expect(info).toMatchObject({ exportName: 'named', name: 'named', size: 1024 * 1024 });
    expect(info.transmissionFlags & NBD.TF_HAS_FLAGS).toBe(1);
    const list = await NbdClient.list({ path: p.socket });
    expect(Array.isArray(list)).toBe(true);
    expect(list.length).toBeGreaterThan(0);
  });

  it('keeps 64 requests in flight and matches out-of-order replies', async () => {
    // A disk whose reads sleep for an offset-dependent time, run in parallel threads, so replies
    // come back in a different order than the requests went out.
    const file = path.join(tmp.dir, 'ooo.img');
    const disk = pattern(1024 * 1024, 5);
    await writeFile(file, disk);
    const p = await peer([
      '-t', '32',
      'eval',
      'thread_model=echo parallel',
      `get_size=echo ${disk.length}`,
      `pread=sleep 0.0$(( ($4 / 4096 * 37) % 10 )); dd if=${file} iflag=skip_bytes,count_bytes skip=$4 count=$3 bs=65536 status=none`,
    ]);
    const c = await connect({ path: p.socket }, {});
    const N = 64;
    const order: number[] = [];
    const t0 = Date.now();
    const reads = Array.from({ length: N }, (_, i) =>
      c.pread(4096, i * 4096).then((b) => {
        order.push(i);
        return b;
      }),
    );
    expect(c.inFlight).toBe(N);
    const bufs = await Promise.all(reads);
    bufs.forEach((b, i) => expect(b.equals(disk.subarray(i * 4096, (i + 1) * 4096)), `read ${i}`).toBe(true));
    expect(order).not.toEqual([...order].sort((a, b) => a - b));
    expect(new Set(order).size).toBe(N);
    // In parallel, not one after the other (64 × up to 90 ms would take seconds).
    expect(Date.now() - t0).toBeLessThan(2500);
  });

  it('zero, trim, flush, cache and FUA', async () => {
    const c = await connect({ path: mem.socket });
    const base = 40 * 1024 * 1024;
    const data = pattern(256 * 1024, 1);
    await c.pwrite(data, base, NBD.CMD_FLAG_FUA);
    expect((await c.pread(data.length, base)).equals(data)).toBe(true);
    await c.zero(64 * 1024, base);
    let back = await c.pread(data.length, base);
    expect(back.subarray(0, 65536).every((x) => x === 0)).toBe(true);
    expect(back.subarray(65536).equals(data.subarray(65536))).toBe(true);
    await c.zero(4096, base + 65536, NBD.CMD_FLAG_NO_HOLE | NBD.CMD_FLAG_FUA);
    await c.zero(4096, base + 2 * 65536, NBD.CMD_FLAG_FAST_ZERO);
    back = await c.pread(data.length, base);
    expect(back.subarray(65536, 65536 + 4096).every((x) => x === 0)).toBe(true);
    expect(back.subarray(2 * 65536, 2 * 65536 + 4096).every((x) => x === 0)).toBe(true);
    await c.trim(65536, base + 3 * 65536, NBD.CMD_FLAG_FUA);
    await c.flush();
    await c.cache(data.length, base);
    // The memory plugin trims to zeroes.
    expect((await c.pread(65536, base + 3 * 65536)).every((x) => x === 0)).toBe(true);
    // Flags the server does not accept for a command are refused locally in strict mode...
    await expect(c.flush(NBD.CMD_FLAG_FUA)).rejects.toMatchObject({ errno: 22, local: true });
    await expect(c.pread(512, 0, NBD.CMD_FLAG_FUA)).rejects.toMatchObject({ errno: 22, local: true });
    // ...and by the server when sent raw.
    const raw = await c.request({ type: NBD.CMD_FLUSH, flags: NBD.CMD_FLAG_NO_HOLE });
    expect(raw.error).toBe(22);
  });

  it('block status on a memory disk: data vs. holes, REQ_ONE', async () => {
    const p = await peer(['memory', '8M']);
    const c = await connect({ path: p.socket });
    await c.pwrite(Buffer.alloc(65536, 1), 1024 * 1024);
    const st = await c.blockStatus(c.size, 0);
    const ext = st.get('base:allocation')!;
    expect(ext.length).toBeGreaterThanOrEqual(3);
    // Walk the extents: the written range is data, everything before it a hole that reads as zero.
    let at = 0;
    for (const e of ext) {
      if (at + e.length <= 1024 * 1024) expect(e.flags & (NBD.STATE_HOLE | NBD.STATE_ZERO)).toBe(NBD.STATE_HOLE | NBD.STATE_ZERO);
      else if (at >= 1024 * 1024 && at + e.length <= 1024 * 1024 + 65536) expect(e.flags).toBe(0);
      at += e.length;
    }
    expect(at).toBeGreaterThanOrEqual(c.size);
    const one = await c.blockStatus(c.size, 0, NBD.CMD_FLAG_REQ_ONE);
    expect(one.get('base:allocation')!.length).toBe(1);
  });

  it('errors: read beyond the end is EINVAL (raw and non-strict), read-only gives EPERM', async () => {
    const c = await connect({ path: mem.socket }, { strict: false });
    const r = await c.request({ type: NBD.CMD_READ, offset: c.size, length: 512 });
    expect(r.error).toBe(22);
    const err = await c.pread(512, c.size).catch((e) => e);
    expect(err).toBeInstanceOf(NbdRequestError);
    expect(err.errno).toBe(22);
    expect(err.errnoName).toBe('EINVAL');
    expect(err.local).toBe(false);
    // Zero-length and unknown commands go out through request() and get an error or success.
    expect((await c.request({ type: 99 })).error).toBe(22);

    const ro = await peer(['-r', 'memory', '1M']);
    const rc = await connect({ path: ro.socket });
    expect(rc.readOnly).toBe(true);
    await expect(rc.pwrite(Buffer.alloc(512), 0)).rejects.toMatchObject({ errno: 1, local: true });
    const w = await rc.request({ type: NBD.CMD_WRITE, offset: 0, length: 512, payload: Buffer.alloc(512) });
    expect(w.error).toBe(1);
  });

  it('honours advertised block sizes: splits big requests, refuses unaligned ones', async () => {
    const p = await peer([
      '--filter=blocksize-policy',
      'memory', '4M',
      'blocksize-minimum=512', 'blocksize-preferred=4096', 'blocksize-maximum=65536', 'blocksize-error-policy=error',
    ]);
    const c = await connect({ path: p.socket });
    expect(c.blockSize).toEqual({ minimum: 512, preferred: 4096, maximum: 65536 });
    const data = pattern(1024 * 1024, 2);
    await c.pwrite(data, 512);
    expect((await c.pread(data.length, 512)).equals(data)).toBe(true);
    await c.zero(1024 * 1024, 0);
    await expect(c.pread(100, 0)).rejects.toMatchObject({ errno: 22, local: true });
    // The server itself refuses an oversized request.
    expect((await c.request({ type: NBD.CMD_READ, offset: 0, length: 131072 })).error).toBe(22);
  });

  it('disconnect() lets slow requests finish first', async () => {
    const p = await peer(['--filter=delay', 'memory', '1M', 'delay-read=300ms']);
    const c = await connect({ path: p.socket });
    const closed = new Promise<Error | undefined>((r) => c.once('close', r));
    const reads = [c.pread(512, 0), c.pread(512, 4096)];
    await c.disconnect();
    expect((await Promise.all(reads)).map((b) => b.length)).toEqual([512, 512]);
    expect(await closed).toBeUndefined();
    expect(c.isOpen).toBe(false);
  });

  it('fails pending requests with EIO promptly when the server dies', async () => {
    const p = await peer(['--filter=delay', 'memory', '16M', 'delay-read=20']);
    const c = await connect({ path: p.socket });
    const closed = new Promise<Error | undefined>((r) => c.once('close', r));
    const reads = Array.from({ length: 8 }, (_, i) => c.pread(65536, i * 65536).then(
      () => 'resolved',
      (e: unknown) => e,
    ));
    const write = c.pwrite(Buffer.alloc(65536), 0).then(() => 'resolved', (e: unknown) => e);
    await new Promise((r) => setTimeout(r, 200));
    const t0 = Date.now();
    p.proc.kill('SIGKILL');
    const results = await Promise.all(reads);
    expect(Date.now() - t0).toBeLessThan(2000);
    for (const e of results) {
      expect(e).toBeInstanceOf(NbdConnectionError);
      expect((e as NbdConnectionError).errno).toBe(5);
      expect((e as Error).message).toBeTruthy();
    }
    // The write may have been answered before the kill; if not, it failed the same way.
    const w = await write;
    if (w !== 'resolved') expect(w).toMatchObject({ errno: 5 });
    expect(await closed).toBeInstanceOf(NbdConnectionError);
    await expect(c.pread(512, 0)).rejects.toMatchObject({ errno: 5 });
    await expect(c.flush()).rejects.toMatchObject({ errno: 5 });
  });
});
