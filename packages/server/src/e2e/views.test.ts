/**
 * readView / writeView (PluginV2): READ replies sent straight from the plugin's memory and WRITE
 * payloads received into it, in every reply mode (simple, structured, extended), through our
 * client and real ones; with a filter above, or a view the plugin declines, the ordinary path.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { needTools, nbdshOk, runOk, servePlugin, socketOf, tmpDir, waitFor } from '@nbdx/testkit';
import { defineFilter, definePlugin } from '../api/define.js';
import { windowDataCalls } from '../api/window.js';
import * as C from '../wire/constants.js';
import { GO_REPLY_SIZE, GREETING_SIZE, RawSession, clientFlags, go, pskTls, request } from './raw-session.js';

const SIZE = 4 << 20;

/** A flat RAM disk offering views, counting how each request was served and each view given back. */
function viewPlugin(offerViews = true, size = SIZE) {
  const disk = Buffer.alloc(size);
  const calls = { pread: 0, readView: 0, writeView: 0, pwriteCopied: 0, pwriteInPlace: 0 };
  /** Views handed out and not given back yet; views given back, completed or not. */
  const views = { out: 0, completed: 0, abandoned: 0 };
  const give = (v: Buffer | undefined) => {
    if (v) views.out++;
    return v;
  };
  const plugin = definePlugin({
    apiVersion: 2,
    name: 'views',
    open: () => ({}),
    getSize: () => size,
    canWrite: () => true,
    pread: (_h, buf, offset) => {
      calls.pread++;
      disk.copy(buf, 0, offset, offset + buf.length);
    },
    pwrite: (_h, buf, offset) => {
      if (buf.buffer === disk.buffer && buf.byteOffset === disk.byteOffset + offset) calls.pwriteInPlace++;
      else {
        calls.pwriteCopied++;
        disk.set(buf, offset);
      }
    },
    readView: (_h, count, offset) => {
      calls.readView++;
      return give(offerViews ? disk.subarray(offset, offset + count) : undefined);
    },
    writeView: (_h, count, offset) => {
      calls.writeView++;
      return give(offerViews ? disk.subarray(offset, offset + count) : undefined);
    },
    releaseView: (_h, view, completed) => {
      expect(view.buffer).toBe(disk.buffer);
      views.out--;
      if (completed) views.completed++;
      else views.abandoned++;
    },
  });
  return { plugin, disk, calls, views };
}

/** A raw client that negotiated and sent a WRITE header plus `first` bytes of its payload. */
async function startWrite(uri: string, offset: number, payload: Buffer, first: number) {
  const r = await RawSession.open(socketOf(uri));
  r.send(clientFlags(), go());
  await r.waitUntil(() => r.receivedLength >= GREETING_SIZE + GO_REPLY_SIZE, 3000);
  r.send(request(C.CMD_WRITE, offset, payload.length, { cookie: 7n }), payload.subarray(0, first));
  return r;
}

describe('plugin memory views (readView / writeView)', () => {
  for (const mode of ['simple', 'structured', 'extended'] as const) {
    it(`${mode} replies: data round-trips, nothing copied by the plugin`, async () => {
      const { plugin, disk, calls } = viewPlugin();
      const srv = await servePlugin(plugin);
      try {
        const c = await srv.connect({ structuredReplies: mode !== 'simple', extendedHeaders: mode === 'extended' });
        const data = randomBytes(300_000); // several socket reads: direct reads land in place too
        await c.pwrite(data, 12345);
        const small = randomBytes(100); // arrives with its header: copied once from the queue
        await c.pwrite(small, 1 << 20);
        expect(disk.subarray(12345, 12345 + data.length).equals(data)).toBe(true);
        expect(disk.subarray(1 << 20, (1 << 20) + 100).equals(small)).toBe(true);
        expect(Buffer.from(await c.pread(data.length, 12345)).equals(data)).toBe(true);
        expect(Buffer.from(await c.pread(100, 1 << 20)).equals(small)).toBe(true);
        expect(calls).toMatchObject({ pread: 0, pwriteCopied: 0, pwriteInPlace: 2 });
        await c.disconnect();
      } finally {
        await srv.close();
      }
    });
  }

  it('bad requests never reach the views; the connection goes on', async () => {
    const { plugin, calls } = viewPlugin();
    const srv = await servePlugin(plugin);
    try {
      const c = await srv.connect();
      await expect(c.pwrite(Buffer.alloc(4096), SIZE - 100)).rejects.toThrow();
      await expect(c.pread(4096, SIZE - 100)).rejects.toThrow();
      expect(calls.writeView + calls.readView).toBe(0);
      expect((await c.pread(10, 0)).length).toBe(10);
      await c.disconnect();
    } finally {
      await srv.close();
    }
  });

  it('declined views and filters above take the ordinary path', async () => {
    const declined = viewPlugin(false);
    const passthrough = defineFilter({ apiVersion: 2, name: 'pass' });
    for (const [subject, filters] of [
      [declined, []],
      [viewPlugin(), [passthrough]],
    ] as const) {
      const srv = await servePlugin(subject.plugin, { filters });
      try {
        const c = await srv.connect();
        const data = randomBytes(70_000);
        await c.pwrite(data, 4096);
        expect(Buffer.from(await c.pread(data.length, 4096)).equals(data)).toBe(true);
        expect(subject.calls.pread).toBe(1);
        expect(subject.calls.pwriteCopied).toBe(1);
        await c.disconnect();
      } finally {
        await srv.close();
      }
    }
  });

  it('a filter that only shifts requests passes the views through, at the shifted offsets', async () => {
    const { plugin, disk, calls, views } = viewPlugin();
    const SHIFT = 1 << 20;
    const window = defineFilter<{}>({
      apiVersion: 2,
      name: 'window',
      open: () => ({}),
      getSize: async (next) => (await next.getSize()) - SHIFT,
      ...windowDataCalls<{}>(() => SHIFT),
    });
    const srv = await servePlugin(plugin, { filters: [window] });
    try {
      const c = await srv.connect({ structuredReplies: true });
      const data = randomBytes(300_000);
      await c.pwrite(data, 4096);
      expect(disk.subarray(SHIFT + 4096, SHIFT + 4096 + data.length).equals(data)).toBe(true);
      expect(Buffer.from(await c.pread(data.length, 4096)).equals(data)).toBe(true);
      expect(calls).toMatchObject({ pread: 0, pwriteCopied: 0, pwriteInPlace: 1, readView: 1, writeView: 1 });
      // Beyond the window's end: refused as usual, never a view.
      await expect(c.pread(8192, SIZE - SHIFT - 4096)).rejects.toThrow();
      await c.disconnect();
      await waitFor(() => views.completed === 2, 3000);
      expect(views).toEqual({ out: 0, completed: 2, abandoned: 0 });
    } finally {
      await srv.close();
    }
  });

  it.skipIf(!needTools('nbdsh'))('a real client (libnbd) reads and writes through views', async () => {
    const { plugin, calls } = viewPlugin();
    const srv = await servePlugin(plugin);
    try {
      const out = await nbdshOk(
        srv.uri,
        `
import os
d = os.urandom(1 << 20)
h.pwrite(d, 65536)
assert h.pread(1 << 20, 65536) == d
print("ok")
`,
      );
      expect(out.trim()).toBe('ok');
      expect(calls.pread).toBe(0);
      expect(calls.pwriteCopied).toBe(0);
    } finally {
      await srv.close();
    }
  });

  it('every view is given back once: replies once sent, payloads once written', async () => {
    const { plugin, calls, views } = viewPlugin();
    const srv = await servePlugin(plugin);
    try {
      const c = await srv.connect({ structuredReplies: true });
      const data = randomBytes(256 * 1024);
      await Promise.all(Array.from({ length: 8 }, (_, i) => c.pwrite(data, i * data.length)));
      const back = await Promise.all(Array.from({ length: 8 }, (_, i) => c.pread(data.length, i * data.length)));
      for (const b of back) expect(Buffer.from(b).equals(data)).toBe(true);
      await c.disconnect();
      expect(calls.readView + calls.writeView).toBe(16);
      await waitFor(() => views.completed === 16, 3000);
      expect(views).toEqual({ out: 0, completed: 16, abandoned: 0 });
    } finally {
      await srv.close();
    }
  });

  it('a client gone in the middle of a payload received in place: the view comes back unfinished', async () => {
    const { plugin, views, disk } = viewPlugin();
    const srv = await servePlugin(plugin);
    try {
      const payload = randomBytes(1 << 20);
      const r = await startWrite(srv.uri, 0, payload, 200_000);
      await waitFor(() => disk.subarray(0, 100_000).equals(payload.subarray(0, 100_000)), 3000);
      expect(views.out).toBe(1);
      r.destroy();
      await waitFor(() => views.abandoned === 1, 3000);
      expect(views).toMatchObject({ out: 0, completed: 0, abandoned: 1 });
      // Nobody else noticed.
      const c = await srv.connect();
      expect((await c.pread(4096, 0)).length).toBe(4096);
      await c.disconnect();
    } finally {
      await srv.close();
    }
  });

  // A payload received in place used to go into the buffer pool when the view was a whole
  // buffer (byteOffset 0): the next WRITE to any export then landed in this plugin's disk.
  it("the plugin's memory never goes into the core's buffer pool", async () => {
    const LEN = 256 * 1024;
    const viewed = viewPlugin(true, LEN);
    const plain = viewPlugin(false, 1 << 20);
    const a = await servePlugin(viewed.plugin);
    const b = await servePlugin(plain.plugin);
    try {
      const mine = randomBytes(LEN);
      const other = randomBytes(LEN);
      // Header first, the payload later: the rest is read by the socket straight into place.
      for (const [srv, data, done] of [
        [a, mine, () => viewed.calls.pwriteInPlace === 1],
        [b, other, () => plain.calls.pwriteCopied === 1],
      ] as const) {
        const r = await startWrite(srv.uri, 0, data, 1000);
        await new Promise((resolve) => setTimeout(resolve, 50));
        r.send(data.subarray(1000));
        await waitFor(done, 3000);
        await r.waitUntil(() => r.receivedLength >= GREETING_SIZE + GO_REPLY_SIZE + 16, 3000);
        r.destroy();
      }
      expect(viewed.disk.equals(mine)).toBe(true);
      expect(plain.disk.subarray(0, LEN).equals(other)).toBe(true);
    } finally {
      await a.close();
      await b.close();
    }
  });

  it.skipIf(!needTools('nbdsh'))('over TLS, READ replies are read through pread, never sent from a view', async () => {
    const dir = tmpDir();
    const keys = path.join(dir, 'keys.psk');
    const PSK = '0123456789abcdef0123456789abcdef';
    fs.writeFileSync(keys, `alice:${PSK}\n`);
    const { plugin, calls, views } = viewPlugin();
    const srv = await servePlugin(plugin, {
      serve: { tls: pskTls('alice', Buffer.from(PSK, 'hex')) },
    });
    try {
      const uri = `nbds+unix://alice@/?socket=${socketOf(srv.uri)}&tls-psk-file=${keys}`;
      const out = await runOk('nbdsh', [
        '-c',
        `
h.set_uri_allow_local_file(True)
h.connect_uri(${JSON.stringify(uri)})
import os
d = os.urandom(1 << 20)
h.pwrite(d, 65536)
assert h.pread(1 << 20, 65536) == d
print("ok")
`,
      ]);
      expect(out.trim()).toBe('ok');
      expect(calls.readView).toBe(0);
      expect(calls.pread).toBeGreaterThan(0);
      await waitFor(() => views.out === 0, 3000);
    } finally {
      await srv.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

