import * as net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { RECEIVE, SEND, loadSocketOps, type SocketOps } from './index.js';

const load = loadSocketOps();

/** A connected pair of Unix sockets: [accepted (server side), client]. */
async function pair(dir: string): Promise<{ accepted: net.Socket; client: net.Socket; server: net.Server }> {
  const path = `${dir}/s`;
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(path, r));
  const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
  const client = net.connect(path);
  await new Promise<void>((r) => client.once('connect', r));
  return { accepted: await accepted, client, server };
}

function fdOf(s: net.Socket): number {
  return (s as unknown as { _handle: { fd: number } })._handle.fd;
}

describe('@nbdx/native', () => {
  const cleanups: Array<() => void> = [];
  afterEach(() => {
    for (const c of cleanups.splice(0)) c();
  });

  it('loads here (a Linux machine with a compiler builds it at install)', () => {
    expect(load.ops, load.ops ? '' : load.reason).not.toBeNull();
  });

  it('hands a connection over: the duplicate keeps it open after the original handle closes', async () => {
    const ops = load.ops as SocketOps;
    const { mkdtempSync, rmSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const dir = mkdtempSync(`${tmpdir()}/nbdx-native-`);
    const { accepted, client, server } = await pair(dir);
    cleanups.push(() => {
      client.destroy();
      server.close();
      rmSync(dir, { recursive: true, force: true });
    });
    const copy = ops.dup(fdOf(accepted));
    expect(copy).toBeGreaterThan(2);
    accepted.destroy(); // closes the original descriptor only
    await new Promise((r) => accepted.once('close', r));
    const handedOver = new net.Socket({ fd: copy, readable: true, writable: true });
    cleanups.push(() => handedOver.destroy());
    const got = new Promise<string>((r) => handedOver.once('data', (d) => r(d.toString())));
    client.write('ping');
    expect(await got).toBe('ping');
    const back = new Promise<string>((r) => client.once('data', (d) => r(d.toString())));
    handedOver.write('pong');
    expect(await back).toBe('pong');
  });

  it('raises a send buffer, reports what the kernel granted, and reads it back', async () => {
    const ops = load.ops as SocketOps;
    const { mkdtempSync, rmSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const dir = mkdtempSync(`${tmpdir()}/nbdx-native-`);
    const { accepted, client, server } = await pair(dir);
    cleanups.push(() => {
      accepted.destroy();
      client.destroy();
      server.close();
      rmSync(dir, { recursive: true, force: true });
    });
    const fd = fdOf(accepted);
    const before = ops.getBuffer(fd, SEND);
    const granted = ops.setBuffer(fd, SEND, 1024 * 1024);
    expect(granted).toBe(ops.getBuffer(fd, SEND));
    // Linux doubles the request, then caps it at net.core.wmem_max (doubled too).
    const { readFileSync } = await import('node:fs');
    const wmemMax = Number(readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
    expect(granted).toBe(Math.min(2 * 1024 * 1024, 2 * wmemMax));
    expect(granted).toBeGreaterThanOrEqual(Math.min(before, granted));
    expect(ops.getBuffer(fd, RECEIVE)).toBeGreaterThan(0);
  });

  it('throws Node-style errors, never crashes, on bad descriptors and arguments', () => {
    const ops = load.ops as SocketOps;
    expect(() => ops.dup(987654)).toThrow(expect.objectContaining({ code: 'EBADF', syscall: 'dup', errno: -9 }));
    expect(() => ops.setBuffer(0x7ffffff0, SEND, 1)).toThrow(expect.objectContaining({ code: 'EBADF' }));
    expect(() => ops.getBuffer(1, 7 as never)).toThrow(RangeError);
    expect(() => ops.dup(-1)).toThrow(TypeError);
    expect(() => (ops.dup as (x?: unknown) => number)()).toThrow(TypeError);
    expect(() => ops.dup('3' as never)).toThrow(TypeError);
  });
});
