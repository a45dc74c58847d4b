/**
 * The nbdx command as users run it: listeners, --run, pidfile, detaching, signals, -s, socket
 * activation, bad command lines.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { nbdxBin, needTools, run, runOk, startCli, tmpDir, waitFor } from '@nbdx/testkit';

const have = needTools('nbdinfo', 'nbdsh', 'qemu-img');
const dir = tmpDir();
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

const nbdx = (args: string[], opts?: { timeout?: number }) => run(process.execPath, [nbdxBin(), ...args], opts);

describe('bad command lines: one clear line, exit 1', () => {
  for (const [args, msg] of [
    [['memory'], /size is required/],
    [['memory', '1G', '--bogus'], /unknown option '--bogus'/],
    [['nosuchplugin', '1G'], /plugin 'nosuchplugin' not found\. 'nbdx --list' shows/],
    [['memroy', '1G'], /plugin 'memroy' not found\. Did you mean 'memory'\?/],
    [['memory', '1G', '2G'], /only the first parameter may leave out 'size='/],
    [['memory', 'size=lots'], /could not parse 'lots' as a size/],
    [['memory', '1G', 'colour=blue'], /unknown parameter 'colour'/],
    [['--filter=nosuch', 'memory', '1G'], /filter 'nosuch' not found/],
    [['-p', 'x', 'memory', '1G'], /not a port number/],
    [['--tls=maybe', 'memory', '1G'], /--tls: 'maybe'/],
    [['--poll=soon', 'memory', '1G'], /--poll: 'soon' is not a number of microseconds/],
    [['--timeout=soon', 'memory', '1G'], /--timeout: 'soon' is not a number of seconds/],
    [['--max-options=0', 'memory', '1G'], /--max-options: '0' is not a number from 1 to 65536/],
    [['--max-connection-memory=1K', 'memory', '1G'], /--max-connection-memory: '1K' is below the smallest useful limit of 1M/],
    [['--max-server-memory=lots', 'memory', '1G'], /could not parse 'lots' as a size/],
    [[], /no plugin given/],
    // Issue 15's list: each once gave a stack trace or blamed the wrong thing.
    [['-f', '-P', '/nonexistent/dir/pid', '-U', path.join(dir, 'p1.sock'), 'memory', '1M'], /^nbdx: -P \/nonexistent\/dir\/pid: cannot write the pidfile: no such file or directory/],
    [['-f', '-U', path.join(dir, 'm5.sock'), 'memory', '5T', 'allocator=malloc'], /^nbdx: (memory: )?allocator=malloc: (\d+ bytes is more than one buffer can hold here \(\d+\); use allocator=sparse|cannot allocate \d+ bytes)/],
    [['-f', '-U', path.join(dir, 'sh.sock'), '--filter=shared', 'file', `dir=${dir}`, 'shared-export=nope'], /^nbdx: file: ENOENT: .*nope/],
    [['-f', '-U', '/nonexistent/dir/x.sock', 'memory', '1M'], /^nbdx: cannot listen: -U \/nonexistent\/dir\/x\.sock: the directory \/nonexistent\/dir does not exist\n/],
    [['-U', path.join(dir, 'x.sock'), '-p', '10999', 'memory', '1M'], /^nbdx: --dump-plugin, -p, --run, -s and -U cannot be used in this combination\n/],
    [['-f', '-i', '192.0.2.1', '-p', '0', 'memory', '1M'], /^nbdx: cannot listen: -i 192\.0\.2\.1: no such address on this machine\n/],
    [['--max-payload=1000', 'memory', '1M'], /^nbdx: --max-payload: 1000 is not between 64K and 1G/],
  ] as const) {
    it(`nbdx ${args.join(' ')}`, async () => {
      const r = await nbdx([...args, '--no-install']);
      expect(r.code).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(msg);
      expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
    });
  }
});

describe('information', () => {
  it('--help, PLUGIN --help, --version, --dump-plugin, --dump-config', async () => {
    expect((await nbdx(['--help'])).stdout).toMatch(/Usage: nbdx \[OPTIONS\] PLUGIN/);
    expect((await nbdx(['memory', '--help'])).stdout).toMatch(/allocator=malloc/);
    expect((await nbdx(['--version'])).stdout).toMatch(/^nbdx \d+\.\d+\.\d+\n$/);
    expect((await nbdx(['memory', '--version'])).stdout).toMatch(/^nbdx \S+\nmemory \S+\n$/);
    const dump = (await nbdx(['memory', '--dump-plugin'])).stdout;
    for (const l of ['name=memory', 'api_version=2', 'thread_model=parallel', 'has_pread=1', 'has_extents=1', 'memory_allocators=sparse,malloc']) {
      expect(dump).toContain(l);
    }
    expect((await nbdx(['--dump-config'])).stdout).toMatch(/plugin_api_versions=1,2/);
  });
});

describe.skipIf(!have)('serving', () => {
  it('--run sets $uri $nbd $port $unixsocket $exportname and exits with the command status', async () => {
    const r = await nbdx(['-U', '-', '-e', 'x', 'memory', '1M', '--run', 'nbdinfo --size "$uri"; echo "[$unixsocket][$exportname][$port]"; exit 3']);
    expect(r.code).toBe(3);
    expect(r.stdout).toMatch(/^1048576\n\[\/.*\/socket\]\[x\]\[\]\n$/);
    const t = await nbdx(['-p', '0', 'memory', '1M', '--run', 'echo "$uri $nbd $port"']);
    expect(t.code).toBe(0);
    const [uri, nbd, port] = t.stdout.trim().split(' ');
    // As nbdkit 1.32 sets them: no slash for the default export, $nbd the same URI.
    expect(uri).toBe(`nbd://localhost:${port}`);
    expect(nbd).toBe(uri);
    // -U - made a private socket that is gone afterwards
    const sock = /\[(.*)\]\[x\]/.exec(r.stdout)![1]!;
    expect(fs.existsSync(sock)).toBe(false);
  });

  it('listens on TCP for IPv4 and IPv6, and on -i only where asked', async () => {
    const r = await nbdx(['-p', '0', 'memory', '1M', '--run', 'nbdinfo --size "nbd://127.0.0.1:$port" && nbdinfo --size "nbd://[::1]:$port"']);
    expect(r.stdout).toBe('1048576\n1048576\n');
    const s = await nbdx(['-p', '0', '-i', '127.0.0.1', 'memory', '1M', '--run', 'nbdinfo --size "$uri"; nbdinfo --size "nbd://[::1]:$port" 2>/dev/null || echo refused']);
    expect(s.stdout).toBe('1048576\nrefused\n');
  });

  it('detaches by default, writes the pidfile first, and SIGTERM removes it and the socket', async () => {
    const sock = path.join(dir, 'bg.sock');
    const pidfile = path.join(dir, 'bg.pid');
    const r = await nbdx(['-U', sock, '-P', pidfile, 'memory', '1M']);
    expect(r.code).toBe(0);
    const pid = Number(fs.readFileSync(pidfile, 'utf8'));
    expect(await runOk('nbdinfo', ['--size', `nbd+unix:///?socket=${sock}`])).toBe('1048576\n');
    process.kill(pid, 'SIGTERM');
    await waitFor(() => !fs.existsSync(pidfile) && !fs.existsSync(sock));
  });

  it('reports startup errors before detaching', async () => {
    const r = await nbdx(['-U', path.join(dir, 'nodir', 'x.sock'), 'memory', '1M']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/cannot listen/);
  });

  it('SIGTERM lets in-flight requests finish, then runs close and unload', async () => {
    const filter = path.join(dir, 'slow-read.mjs');
    const log = path.join(dir, 'slow-read.log');
    fs.writeFileSync(
      filter,
      `import * as fs from 'node:fs';
export default {
  kind: 'filter', name: 'slow-read', apiVersion: 2,
  pread: (next, h, buf, off, flags) => {
    fs.appendFileSync(${JSON.stringify(log)}, 'pread\\n');
    return new Promise((r) => setTimeout(r, 1000)).then(() => next.pread(buf, off, flags));
  },
  close: () => fs.appendFileSync(${JSON.stringify(log)}, 'close\\n'),
  unload: () => fs.appendFileSync(${JSON.stringify(log)}, 'unload\\n'),
};
`,
    );
    const srv = await startCli(['-U', path.join(dir, 'term.sock'), `--filter=${filter}`, 'memory', '1M']);
    const read = run('nbdsh', ['-u', srv.uri, '-c', 'print(len(h.pread(512, 0)))']);
    // SIGTERM once the read is in flight (nbdsh takes a while to start on a busy machine).
    for (let i = 0; i < 400 && !(fs.existsSync(log) && fs.readFileSync(log, 'utf8').includes('pread')); i++) {
      await new Promise((r) => setTimeout(r, 25));
    }
    const code = srv.stop('SIGTERM');
    expect((await read).stdout).toBe('512\n');
    expect(await code).toBe(0);
    expect(fs.readFileSync(log, 'utf8')).toBe('pread\nclose\nunload\n');
  });

  it('-s serves one connection on stdin/stdout', async () => {
    const r = await run('nbdsh', ['-c', `h.connect_command(["${process.execPath}", "${nbdxBin()}", "-s", "memory", "1M"])\nh.pwrite(b"x"*512, 0)\nprint(h.get_size(), h.pread(1, 0))`]);
    expect(r.stdout).toBe("1048576 bytearray(b'x')\n");
  });

  it('-s also works when stdin and stdout are pipes, not sockets', async () => {
    const child = spawn(process.execPath, [nbdxBin(), '-s', 'memory', '1M'], { stdio: ['pipe', 'pipe', 'inherit'] });
    const { NbdClient } = await import('@nbdx/client');
    const { Duplex } = await import('node:stream');
    const c = await NbdClient.connect({ socket: Duplex.from({ readable: child.stdout!, writable: child.stdin! }) });
    await c.pwrite(Buffer.alloc(4096, 9), 4096);
    expect((await c.pread(4096, 4096)).every((b) => b === 9)).toBe(true);
    await c.disconnect();
    expect(await new Promise((r) => child.on('exit', r))).toBe(0);
  });

  it('serves sockets handed over by socket activation (LISTEN_FDS)', async () => {
    const r = await run('nbdsh', ['-c', `h.connect_systemd_socket_activation(["${process.execPath}", "${nbdxBin()}", "memory", "1M"])\nprint(h.get_size())`]);
    expect(r.stdout).toBe('1048576\n');
  });

  it('--no-sr and --mask-handshake change what is offered', async () => {
    const r = await nbdx(['-U', '-', '--no-sr', 'memory', '1M', '--run', 'nbdinfo "$uri" | grep protocol']);
    expect(r.stdout).toMatch(/using simple packets/);
    const m = await nbdx(['-U', '-', '--mask-handshake=0', 'memory', '1M', '--run', 'nbdinfo "$uri" | grep protocol']);
    expect(m.stdout).toMatch(/protocol: newstyle without TLS/);
  });

  it('-v prints debug lines; -t and -D are accepted', async () => {
    const r = await nbdx(['-U', '-', '-v', '-t', '4', '-D', 'memory.x=1', 'memory', '1M', '--run', 'nbdinfo --size "$uri"']);
    expect(r.code).toBe(0);
    expect(r.stdout).toBe('1048576\n');
    expect(r.stderr).toMatch(/nbdx: debug: conn \d+: client option GO/);
    expect(r.stderr).toMatch(/transmission: export '' size 1048576/);
    const quiet = await nbdx(['-U', '-', 'memory', '1M', '--run', 'nbdinfo --size "$uri"']);
    expect(quiet.stderr).toBe('');
  });

  it('-r makes the export read-only', async () => {
    const r = await nbdx(['-U', '-', '-r', 'memory', '1M', '--run', 'nbdinfo --json "$uri"']);
    expect(JSON.parse(r.stdout).exports[0].is_read_only).toBe(true);
  });

  it('--exit-with-parent exits when the parent goes', async () => {
    const sock = path.join(dir, 'ewp.sock');
    // A shell that starts nbdx in the background and exits at once: nbdx is re-parented.
    const sh = spawn('/bin/sh', ['-c', `"${process.execPath}" "${nbdxBin()}" --exit-with-parent -U ${sock} memory 1M & echo $!; sleep 1`], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    let out = '';
    sh.stdout!.on('data', (d) => (out += d));
    await new Promise((r) => sh.on('exit', r));
    const pid = Number(out.trim());
    await waitFor(() => {
      try {
        process.kill(pid, 0);
        return false;
      } catch {
        return true;
      }
    }, 5000);
    expect(fs.existsSync(sock)).toBe(false);
  });

  it('--list shows the plugins and filters, installed ones with package and version', async () => {
    const r = await nbdx(['--list']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^plugins:\n/);
    expect(r.stdout).toMatch(/^  memory +@nbdx\/plugin-memory \d+\.\d+\.\d+/m);
    expect(r.stdout).toMatch(/^filters:\n(.*\n)*  offset +@nbdx\/filter-offset /m);
  });

  // The fast paths use Node internals (direct reads into payload buffers, polling the socket's
  // descriptor): on each supported Node line they must be on, not quietly fall back.
  it(`the direct-read and polling fast paths are on (Node ${process.version})`, async () => {
    const r = await nbdx(['-v', '-U', '-', 'memory', '1M', '--run', 'nbdsh -u "$uri" -c "h.pwrite(bytearray(300000), 0); h.pread(512, 0)"']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/^nbdx: debug: conn \d+: fast paths: direct reads on, polling on$/m);
  });

  it('the process is named nbdx in ps and top (comm and cmdline)', async () => {
    const srv = await startCli(['-U', path.join(dir, 'title.sock'), 'memory', '1M']);
    const pid = srv.child.pid!;
    expect(fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim()).toBe('nbdx');
    expect(fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/[\0 ]+$/, '')).toBe('nbdx');
    expect(await srv.stop()).toBe(0);
  });

  it('one client that sends garbage does not stop the command-line server', async () => {
    const srv = await startCli(['-U', path.join(dir, 'g.sock'), 'memory', '1M']);
    await new Promise<void>((resolve) => {
      const s = net.connect(path.join(dir, 'g.sock'), () => s.end(Buffer.alloc(100, 0xff)));
      s.resume(); // read the greeting, so the close is seen
      s.on('close', () => resolve());
      s.on('error', () => resolve());
    });
    expect(await runOk('nbdinfo', ['--size', srv.uri])).toBe('1048576\n');
    expect(await srv.stop()).toBe(0);
  });
});
