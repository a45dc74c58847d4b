import { randomBytes } from 'node:crypto';
import * as net from 'node:net';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '@nbdx/client';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import { serve } from '../server.js';
import { enableDirectReads } from './direct-reads.js';

describe('direct reads', () => {
  it('can be turned on for an accepted socket, and reads land where asked', async () => {
    const target = Buffer.alloc(100_000);
    const got: Array<[number, boolean]> = [];
    let direct: Uint8Array | null = null;
    const done = new Promise<void>((resolve) => {
      const server = net.createServer((sock) => {
        const ok = enableDirectReads(sock, {
          onRead: (n, buf) => {
            got.push([n, buf === direct]);
            if (buf === direct) direct = null;
            else direct = target.subarray(0, 100_000); // the next read goes straight into target
            if (got.reduce((a, [k]) => a + k, 0) >= 100_010) {
              server.close();
              sock.destroy();
              resolve();
            }
            return true;
          },
          nextBuffer: () => direct,
        });
        expect(ok).not.toBeNull();
        sock.resume();
      });
      server.listen(0, () => {
        const c = net.connect({ port: (server.address() as net.AddressInfo).port }, () => {
          c.write(Buffer.alloc(10, 1));
          setTimeout(() => c.end(Buffer.alloc(100_000, 2)), 50);
        });
      });
    });
    await done;
    expect(got[0]).toEqual([10, false]);
    expect(got.slice(1).some(([, d]) => d)).toBe(true);
    expect(target.subarray(0, got[1]![0]).every((b) => b === 2)).toBe(true);
  });

  it('big writes in odd pieces, mixed with small requests, keep every byte', async () => {
    const s = await serve({ plugin: createMemoryPlugin(), config: { size: '64M' }, listen: { kind: 'tcp', port: 0 } });
    try {
      const c = await NbdClient.connect(s.uri);
      const blobs = [1 << 20, 3 << 20, 17 * 1024, 300_001, 8 << 20].map((n) => randomBytes(n));
      let off = 0;
      const writes = blobs.map((b) => {
        const o = off;
        off += b.length + 4096;
        return c.pwrite(b, o).then(() => c.pwrite(Buffer.alloc(512, 7), o + b.length));
      });
      await Promise.all(writes);
      off = 0;
      for (const b of blobs) {
        expect(Buffer.compare(await c.pread(b.length, off), b)).toBe(0);
        expect((await c.pread(512, off + b.length)).every((x) => x === 7)).toBe(true);
        off += b.length + 4096;
      }
      await c.disconnect();
    } finally {
      await s.close();
    }
  });
});
