/**
 * End to end: a real HTTP(S) server with byte ranges (testkit's startRangeServer, a Node server
 * reading a file) ← this plugin (in-process, or the nbdx command) ← qemu-img, nbdcopy, nbdsh.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import {
  NBDSH_HELPERS,
  makeTestCerts,
  nbdshOk,
  nbdxBin,
  needNbdx,
  needTools,
  removeDir,
  run,
  runOk,
  startRangeServer,
  tmpDir,
  type RangeServer,
  type RangeServerOptions,
  type TestCerts,
} from '@nbdx/testkit';
import { createHttpPlugin } from './index.js';

const have = needTools('nbdsh', 'qemu-img', 'nbdcopy', 'openssl', 'script');
const haveCli = needNbdx();
const MiB = 1024 * 1024;
const SIZE = 24 * MiB;

type Nbd = Awaited<ReturnType<typeof serve>>;
const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

let dir: string;
let certs: TestCerts;
let image: string;
beforeAll(async () => {
  dir = tmpDir('nbdx-http-');
  if (!have) return;
  certs = await makeTestCerts(dir);
  // Random data with holes: a copy that reads the wrong range cannot come out equal.
  image = path.join(dir, 'disk.img');
  const bytes = Buffer.alloc(SIZE);
  for (const [o, l] of [[0, 3 * MiB], [7 * MiB + 123, MiB], [SIZE - 2 * MiB, 2 * MiB]] as const) randomBytes(l).copy(bytes, o);
  fs.writeFileSync(image, bytes);
}, 60_000);
afterAll(() => {
  removeDir(dir);
});

async function startServer(options: Partial<RangeServerOptions> = {}): Promise<RangeServer> {
  const srv = await startRangeServer({ file: image, tls: { key: certs.key, cert: certs.cert }, ...options });
  cleanups.push(() => srv.close());
  return srv;
}

async function startNbd(config: [string, string][]): Promise<Nbd> {
  const nbd = await serve({ plugin: createHttpPlugin(), config });
  cleanups.push(() => nbd.close());
  return nbd;
}

async function nbdsh(uri: string, body: string): Promise<string> {
  const out = await nbdshOk(uri, `${NBDSH_HELPERS}${body}\nprint("done")\n`);
  if (!out.includes('done')) throw new Error(`nbdsh script did not finish:\n${out}`);
  return out;
}

async function convertAndCompare(uri: string): Promise<void> {
  const out = path.join(dir, `out-${Date.now()}.raw`);
  try {
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
    await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, out]);
  } finally {
    fs.rmSync(out, { force: true });
  }
}

describe.skipIf(!have)('http plugin: reading over https', () => {
  it('qemu-img convert over https with cafile= gives an identical image; every read is one ranged GET', async () => {
    const srv = await startServer();
    const nbd = await startNbd([['url', srv.url], ['cafile', certs.caFile]]);
    await convertAndCompare(nbd.uri);
    // Size from HEAD, no probe GET needed; reads are 206 answers only.
    expect(srv.requests[0]!.method).toBe('HEAD');
    const gets = srv.requests.filter((r) => r.method === 'GET');
    expect(gets.length).toBeGreaterThan(0);
    expect(gets.every((r) => r.status === 206 && /^bytes=\d+-\d+$/.test(r.range ?? ''))).toBe(true);
    expect(srv.requests[0]!.headers['user-agent']).toBe('nbdx-http');
  });

  it('nbdcopy with many requests in flight gets the same bytes, and the export says what it can do', async () => {
    const srv = await startServer();
    const nbd = await startNbd([['url', srv.url], ['cafile', certs.caFile], ['connections', '4']]);
    const out = path.join(dir, 'nbdcopy.raw');
    cleanups.push(() => fs.rmSync(out, { force: true }));
    await runOk('nbdcopy', ['--requests=32', '--connections=2', nbd.uri, out]);
    expect(fs.readFileSync(out).equals(fs.readFileSync(image))).toBe(true);
    await nbdsh(
      nbd.uri,
      `
assert h.get_size() == ${SIZE}
assert h.is_read_only()
assert h.can_multi_conn()
assert not h.can_flush() and not h.can_trim() and not h.can_zero()
expect_err("EPERM", lambda: h.pwrite(b"x", 0))
# unaligned, odd-sized, last byte
assert h.pread(1, ${SIZE - 1}) == open(${JSON.stringify(image)}, "rb").read()[${SIZE - 1}:]
with open(${JSON.stringify(image)}, "rb") as f:
    f.seek(7 * 1048576 + 100)
    assert h.pread(1000, 7 * 1048576 + 100) == f.read(1000)
`,
    );
    expect(srv.requests.some((r) => r.method !== 'GET' && r.method !== 'HEAD')).toBe(false);
    // Keep-alive: hundreds of GETs over at most connections=4 sockets (a fifth if one was closed).
    expect(srv.requests.length).toBeGreaterThan(90);
    expect(srv.stats.connections).toBeLessThanOrEqual(5);
    // Many in flight: the server was answering several GETs at once.
    expect(srv.stats.maxInFlight).toBeGreaterThan(1);
    expect(srv.stats.maxInFlight).toBeLessThanOrEqual(4);
  });

  it('refuses an untrusted certificate with a hint, and sslverify=false accepts it', async () => {
    const srv = await startServer();
    await expect(serve({ plugin: createHttpPlugin(), config: [['url', srv.url]] })).rejects.toThrow(/cafile=FILE or capath=DIR/);
    const nbd = await startNbd([['url', srv.url], ['sslverify', 'false']]);
    await nbdsh(nbd.uri, `assert h.get_size() == ${SIZE}`);
  });

  it('capath=DIR trusts the certificates in a directory', async () => {
    const srv = await startServer();
    const capath = path.join(dir, 'capath');
    fs.mkdirSync(capath, { recursive: true });
    fs.copyFileSync(certs.caFile, path.join(capath, 'test-ca.pem'));
    const nbd = await startNbd([['url', srv.url], ['capath', capath]]);
    await nbdsh(nbd.uri, `assert h.pread(512, 0) == open(${JSON.stringify(image)}, "rb").read(512)`);
  });
});

describe.skipIf(!have)('http plugin: servers that do not answer as expected', () => {
  it('a server that ignores Range gives a clear error at start-up, and the command exits 1 with one line', async () => {
    const srv = await startServer({ ignoreRange: true });
    await expect(serve({ plugin: createHttpPlugin(), config: [['url', srv.url], ['cafile', certs.caFile]] })).rejects.toThrow(
      /ignores Range requests \(it answered 200 with the whole resource instead of 206/,
    );
    // It stopped at the headers instead of downloading the image.
    if (haveCli) {
      const r = await run(process.execPath, [nbdxBin(), '-f', '-U', path.join(dir, 'never.sock'), 'http', srv.url, `cafile=${certs.caFile}`], {
        cwd: path.resolve(__dirname, '../../..'),
      });
      expect(r.code).toBe(1);
      const lines = r.stderr.trim().split('\n');
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(/ignores Range requests/);
    }
  });

  it('HEAD refused: the size comes from a one-byte ranged GET, and reads work', async () => {
    const srv = await startServer({ headRefused: true });
    const nbd = await startNbd([['url', srv.url], ['cafile', certs.caFile]]);
    expect(srv.requests.slice(0, 2).map((r) => [r.method, r.status, r.range])).toEqual([
      ['HEAD', 405, undefined],
      ['GET', 206, 'bytes=0-0'],
    ]);
    await convertAndCompare(nbd.uri);
  });

  it('no Accept-Ranges in HEAD: ranges are checked with a ranged GET before serving', async () => {
    const srv = await startServer({ noAcceptRanges: true });
    const nbd = await startNbd([['url', srv.url], ['cafile', certs.caFile]]);
    expect(srv.requests[1]!.range).toBe('bytes=0-0');
    await nbdsh(nbd.uri, `assert h.get_size() == ${SIZE}`);
  });

  it('a server that does not tell the size needs size=, which then works', async () => {
    const srv = await startServer({ hideSize: true });
    await expect(serve({ plugin: createHttpPlugin(), config: [['url', srv.url], ['cafile', certs.caFile]] })).rejects.toThrow(
      /does not tell the size.*give size=SIZE/,
    );
    const nbd = await startNbd([['url', srv.url], ['cafile', certs.caFile], ['size', String(SIZE)]]);
    await convertAndCompare(nbd.uri);
  });

  it('a read beyond the end of the file (size= too big) is answered 416 and gives EINVAL', async () => {
    const srv = await startServer();
    const nbd = await startNbd([['url', srv.url], ['cafile', certs.caFile], ['size', String(SIZE + MiB)]]);
    await nbdsh(nbd.uri, `expect_err("EINVAL", lambda: h.pread(4096, ${SIZE}))\nassert len(h.pread(4096, 0)) == 4096`);
    expect(srv.requests.some((r) => r.status === 416)).toBe(true);
  });

  it('404 at start-up is "not found"; 5xx on a read is EIO and the connection goes on', async () => {
    const srv = await startServer();
    await expect(serve({ plugin: createHttpPlugin(), config: [['url', `${srv.origin}/nothing.img`], ['cafile', certs.caFile]] })).rejects.toMatchObject({
      code: 'ENOENT',
      message: expect.stringMatching(/not found on the server \(404/),
    });
    const nbd = await startNbd([['url', srv.url], ['cafile', certs.caFile]]);
    srv.failNext(1, 'status');
    await nbdsh(
      nbd.uri,
      `
expect_err("EIO", lambda: h.pread(4096, 0))
assert h.pread(4096, 0) == open(${JSON.stringify(image)}, "rb").read(4096)
`,
    );
    srv.failNext(1, 'drop');
    await nbdsh(nbd.uri, `expect_err("EIO", lambda: h.pread(65536, 0))\nassert len(h.pread(65536, 0)) == 65536`);
  });

  it('follows a redirect at start-up and reads from where it led', async () => {
    const srv = await startServer({ redirectFrom: '/old/disk.img' });
    const nbd = await startNbd([['url', `${srv.origin}/old/disk.img`], ['cafile', certs.caFile]]);
    await nbdsh(nbd.uri, `assert h.pread(4096, 0) == open(${JSON.stringify(image)}, "rb").read(4096)`);
    expect(srv.requests.filter((r) => r.method === 'GET').every((r) => r.url === '/disk.img')).toBe(true);
    await expect(
      serve({ plugin: createHttpPlugin(), config: [['url', `${srv.origin}/old/disk.img`], ['cafile', certs.caFile], ['followlocation', 'false']] }),
    ).rejects.toThrow(/302/);
  });
});

describe.skipIf(!have)('http plugin: credentials and headers', () => {
  it('user= and password=+FILE send Basic authentication; a wrong password is "access denied"', async () => {
    const srv = await startServer({ basicAuth: { user: 'alice', password: 's3cret pass' } });
    const pw = path.join(dir, 'pw');
    fs.writeFileSync(pw, 's3cret pass\n', { mode: 0o600 });
    const nbd = await startNbd([['url', srv.url], ['cafile', certs.caFile], ['user', 'alice'], ['password', `+${pw}`]]);
    await nbdsh(nbd.uri, `assert h.get_size() == ${SIZE}`);
    fs.writeFileSync(pw, 'wrong\n');
    await expect(
      serve({ plugin: createHttpPlugin(), config: [['url', srv.url], ['cafile', certs.caFile], ['user', 'alice'], ['password', `+${pw}`]] }),
    ).rejects.toThrow(/access denied \(401/);
  });

  it('password=- asks on the terminal without echo', async () => {
    if (!haveCli) return;
    const srv = await startServer({ basicAuth: { user: 'bob', password: 'typed' } });
    // `script` gives nbdx a terminal; the password is typed into it.
    const cmd = [process.execPath, nbdxBin(), '-U', path.join(dir, 'tty.sock'), 'http', srv.url, `cafile=${certs.caFile}`, 'user=bob', 'password=-', '--run', 'nbdinfo --size "$uri"']
      .map((a) => `'${a.replace(/'/g, `'\\''`)}'`)
      .join(' ');
    const child = await import('node:child_process');
    const out = await new Promise<string>((resolve, reject) => {
      const p = child.spawn('script', ['-qec', cmd, '/dev/null'], { cwd: path.resolve(__dirname, '../../..'), env: { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH}` } });
      let text = '';
      let sent = false;
      p.stdout.on('data', (d: Buffer) => {
        text += d.toString();
        if (!sent && text.includes('password: ')) {
          sent = true;
          p.stdin.write('typed\r');
        }
      });
      p.on('error', reject);
      p.on('exit', (code) => (code === 0 ? resolve(text) : reject(new Error(`exit ${code}: ${text}`))));
    });
    expect(out).toContain(String(SIZE));
    expect(out).not.toContain('typed');
  });

  it('password=-FD reads a descriptor the parent passed (a FIFO that never ends), and nbdx closes it', async () => {
    if (!haveCli) return;
    const srv = await startServer({ basicAuth: { user: 'carol', password: 'from a pipe' } });
    const child = await import('node:child_process');
    // Opened read-write, the FIFO has a writer as long as nbdx holds it: nbdx must stop at the
    // newline instead of waiting for an end that never comes.
    const fifo = path.join(dir, 'password.fifo');
    child.execFileSync('mkfifo', [fifo]);
    const fd = fs.openSync(fifo, 'r+');
    fs.writeSync(fd, 'from a pipe\nnot the password\n');
    // Once the server is up, nbdx (the --run command's parent) lists what its descriptors are:
    // none may still be the FIFO (the number 3 itself is soon reused by Node).
    const args = [nbdxBin(), '-U', path.join(dir, 'fd.sock'), 'http', srv.url, `cafile=${certs.caFile}`, 'user=carol', 'password=-3', '--run', 'nbdinfo --size "$uri"; for f in /proc/$PPID/fd/*; do readlink "$f"; done'];
    const out = await new Promise<string>((resolve, reject) => {
      const p = child.spawn(process.execPath, args, { cwd: path.resolve(__dirname, '../../..'), env: { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH}` }, stdio: ['ignore', 'pipe', 'pipe', fd] });
      fs.closeSync(fd);
      let text = '';
      p.stdout!.on('data', (d: Buffer) => (text += d.toString()));
      p.stderr!.on('data', (d: Buffer) => (text += d.toString()));
      p.on('error', reject);
      p.on('exit', (code) => (code === 0 ? resolve(text) : reject(new Error(`exit ${code}: ${text}`))));
    });
    const [size, ...links] = out.trim().split('\n');
    expect(size).toBe(String(SIZE));
    expect(links.length).toBeGreaterThan(3);
    expect(links).not.toContain(fifo);
  });

  it('header= is sent with every request and headers=+FILE adds more; without them the server refuses', async () => {
    const srv = await startServer({ requireHeaders: { 'X-Disk-Token': 'abc 123', Authorization: 'Bearer t0k3n' } });
    const hfile = path.join(dir, 'headers');
    fs.writeFileSync(hfile, '# secrets stay out of ps\nAuthorization: Bearer t0k3n\n');
    const nbd = await startNbd([['url', srv.url], ['cafile', certs.caFile], ['header', 'X-Disk-Token: abc 123'], ['headers', `+${hfile}`], ['header', 'User-Agent:']]);
    await convertAndCompare(nbd.uri);
    expect(srv.requests.every((r) => r.headers['x-disk-token'] === 'abc 123' && r.headers['user-agent'] === undefined)).toBe(true);
    await expect(serve({ plugin: createHttpPlugin(), config: [['url', srv.url], ['cafile', certs.caFile]] })).rejects.toThrow(
      /access denied \(403 Forbidden: missing or wrong header/,
    );
  });

  it('cookie=+FILE sends the Cookie header', async () => {
    const srv = await startServer({ requireHeaders: { cookie: 'session=42; lang=en' } });
    const cfile = path.join(dir, 'cookie');
    fs.writeFileSync(cfile, 'session=42; lang=en\n');
    const nbd = await startNbd([['url', srv.url], ['cafile', certs.caFile], ['cookie', `+${cfile}`]]);
    await nbdsh(nbd.uri, `assert h.get_size() == ${SIZE}`);
  });

  it('unix-socket-path= reaches a server on a Unix socket', async () => {
    const sock = path.join(dir, 'http.sock');
    const srv = await startServer({ unixSocket: sock, tls: undefined });
    const nbd = await startNbd([['url', 'http://localhost/disk.img'], ['unix-socket-path', sock]]);
    await convertAndCompare(nbd.uri);
    expect(srv.requests.length).toBeGreaterThan(1);
  });
});

describe.skipIf(!haveCli)('http plugin: bad command lines', () => {
  for (const [args, message] of [
    [['http'], /url is required/],
    [['http', 'ftp://example.com/x'], /'ftp:' is not supported/],
    [['http', 'https://example.com/x', 'header=NoColon'], /is not 'Name: value'/],
    [['http', 'https://example.com/x', 'header=Range: bytes=0-1'], /'Range' is managed by the plugin/],
    [['http', 'https://example.com/x', 'connections=0'], /connections: '0' is not a whole number/],
    [['http', 'https://example.com/x', 'timeout=soon'], /timeout: 'soon'/],
    [['http', 'https://example.com/x', 'password=+/nonexistent/pw', 'user=u'], /password: cannot read '\/nonexistent\/pw'/],
    [['http', 'https://example.com/x', 'user=u', 'password=-'], /password=-: standard input is not a terminal, so the secret cannot be typed/],
    [['http', 'https://example.com/x', 'user=u', 'password=-1'], /password=-1: descriptors 0, 1 and 2 are standard input, output and error/],
    [['http', 'https://example.com/x', 'cookie=-oops'], /cookie: a value starting with '-' must be '-' \(type it\) or '-FD'/],
    [['http', 'https://example.com/x', 'nonsense=1'], /unknown parameter 'nonsense'/],
  ] as const) {
    it(`${args.slice(1).join(' ') || '(no url)'}: one line, exit 1`, async () => {
      const r = await run(process.execPath, [nbdxBin(), '-f', '-U', path.join(dir, 'bad.sock'), ...args], { cwd: path.resolve(__dirname, '../../..') });
      expect(r.code).toBe(1);
      const lines = r.stderr.trim().split('\n');
      expect(lines).toHaveLength(1);
      expect(lines[0]).toMatch(message);
    });
  }

  it('without -f, password=- and password=-FD are refused with a hint: the server in the background has no terminal or descriptor', async () => {
    for (const form of ['-', '-3']) {
      const r = await run(process.execPath, [nbdxBin(), '-U', path.join(dir, 'bg.sock'), 'http', 'https://example.com/x', 'user=u', `password=${form}`], {
        cwd: path.resolve(__dirname, '../../..'),
      });
      expect(r.code).toBe(1);
      expect(r.stderr.trim().split('\n')).toEqual([
        `nbdx: password=${form}: nbdx reads its parameters after going into the background, where there is no terminal and no inherited descriptor: add -f (or use --run), or use password=+FILE`,
      ]);
    }
  });
});
