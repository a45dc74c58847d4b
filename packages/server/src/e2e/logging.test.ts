/**
 * What operators see (issue 15 item 2): errors at the default level, one line naming the layer;
 * the first error of each kind per connection, then a count; -v adds the listen address, each
 * module's path and version, and a line per request; a detached server logs to syslog.
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Errno, NbdError } from '../api/common.js';
import { definePlugin } from '../api/define.js';
import { serve } from '../server.js';
import * as C from '../wire/constants.js';
import { TOOL_ENV, needNbdx, needTools, nbdxBin, run, tmpDir, waitFor } from '@nbdx/testkit';
import { GREETING_SIZE, RawSession, clientFlags, go, optionReplies, request } from './raw-session.js';

const have = needNbdx() && needTools('nbdinfo', 'logger', 'python3');
const dir = tmpDir();
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** A disk image with no partition table: the partition filter cannot open it. */
function blankImage(): string {
  const img = path.join(dir, 'blank.img');
  fs.writeFileSync(img, Buffer.alloc(1024 * 1024));
  return img;
}

describe('errors are logged by default', () => {
  it('the first I/O error of each kind per connection, naming the layer; then how many more', async () => {
    const lines: string[] = [];
    const plugin = definePlugin({
      apiVersion: 2,
      name: 'failing',
      open: () => ({}),
      getSize: () => 1 << 20,
      pread: () => {
        throw new NbdError(Errno.EIO, 'the disk is on fire');
      },
    });
    const s = await serve({ plugin, error: (m) => lines.push(m) });
    try {
      const r = await RawSession.open(s.addresses[0]!.path!);
      r.send(clientFlags(), go(), ...Array.from({ length: 5 }, (_, i) => request(C.CMD_READ, 0, 512, { cookie: BigInt(i) })));
      const start = () => GREETING_SIZE + optionReplies(r.received).reduce((n, x) => n + 20 + x.length, 0);
      await r.waitUntil(() => r.receivedLength >= start() + 5 * 16, 3000);
      r.send(request(C.CMD_READ, 1 << 20, 512, { cookie: 9n })); // beyond the end: the client's fault
      await r.waitUntil(() => r.receivedLength >= start() + 6 * 16, 3000);
      r.send(request(C.CMD_DISC, 0, 0));
      await r.untilClosed(3000);
      await waitFor(() => lines.length >= 3, 3000, 'the log lines');
      expect(lines).toEqual([
        'failing: error: READ 512 bytes at 0: the disk is on fire (EIO)',
        expect.stringMatching(/^error: invalid request: READ 512 bytes at 1048576: .*beyond the end.* \(EINVAL\)$/),
        '4 more error(s) like the ones above on this connection (-v shows each)',
      ]);
    } finally {
      await s.close();
    }
  });

  it.skipIf(!have)('an open failure is one line naming the layer, without -v', async () => {
    const r = await run(process.execPath, [nbdxBin(), '-U', '-', '--filter=partition', 'file', blankImage(), 'partition=1', '--run', 'nbdinfo --size "$uri" >/dev/null 2>&1; true'], { env: TOOL_ENV });
    const lines = r.stderr.trim().split('\n');
    expect(lines.length).toBeGreaterThanOrEqual(1);
    for (const l of lines) expect(l).toMatch(/^nbdx: partition: error: cannot open export '': no partition table/);
  });

  it.skipIf(!have)('-v shows the listen address, each module with its path and version, and each request', async () => {
    const r = await run(process.execPath, [nbdxBin(), '-v', '-U', '-', '--filter=offset', 'memory', '1M', 'offset=4096', '--run', 'nbdsh -u "$uri" -c "h.pread(512, 0)"'], { env: TOOL_ENV });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/^nbdx: debug: loaded plugin memory \S+ from \/\S+plugin-memory\S*\.js$/m);
    expect(r.stderr).toMatch(/^nbdx: debug: loaded filter offset \S+ from \/\S+filter-offset\S*\.js$/m);
    expect(r.stderr).toMatch(/^nbdx: debug: listening on \/\S+socket \(nbd\+unix:/m);
    expect(r.stderr).toMatch(/^nbdx: debug: conn \d+: READ 512 bytes at 0 flags 0x0 cookie \d+$/m);
  });
});

describe.skipIf(!have)('syslog', () => {
  /** A Unix datagram socket that collects what arrives (Node cannot make one; Python can). */
  function listener(sock: string) {
    const child = spawn('python3', ['-u', '-c', [
      'import socket, sys',
      's = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)',
      `s.bind(${JSON.stringify(sock)})`,
      'print("ready", flush=True)',
      'while True:',
      '    print(s.recv(65536).decode("utf-8", "replace"), flush=True)',
    ].join('\n')], { env: TOOL_ENV, stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout!.on('data', (d) => (out += d));
    return { child, text: () => out };
  }

  it('a detached server (the default) logs its errors to syslog, tagged nbdx[PID]', async () => {
    const sock = path.join(dir, 'log.sock');
    const l = listener(sock);
    try {
      await waitFor(() => l.text().includes('ready'), 5000, 'the syslog listener');
      const srvSock = path.join(dir, 'detached.sock');
      const pidfile = path.join(dir, 'detached.pid');
      const env = { ...TOOL_ENV, NBDX_SYSLOG_SOCKET: sock };
      const started = spawnSync(process.execPath, [nbdxBin(), '-U', srvSock, '-P', pidfile, '--filter=partition', 'file', blankImage(), 'partition=1'], { env, encoding: 'utf8' });
      expect(started.status, started.stderr).toBe(0);
      const pid = Number(fs.readFileSync(pidfile, 'utf8'));
      try {
        await run('nbdinfo', ['--size', `nbd+unix:///?socket=${srvSock}`], { env: TOOL_ENV });
        await waitFor(() => /partition: error: cannot open export/.test(l.text()), 5000, 'the error in syslog');
        // BSD syslog: <priority>timestamp tag[pid]: message; daemon.err is <27>.
        expect(l.text()).toMatch(new RegExp(`<27>.*nbdx\\[${pid}\\]: partition: error: cannot open export '': no partition table`));
      } finally {
        process.kill(pid, 'SIGTERM');
      }
    } finally {
      l.child.kill();
    }
  });

  it('--log=syslog without a syslog socket warns once and falls back to stderr', async () => {
    const r = await run(process.execPath, [nbdxBin(), '--log=syslog', '-U', '-', '--filter=partition', 'file', blankImage(), 'partition=1', '--run', 'nbdinfo --size "$uri" >/dev/null 2>&1; true'], {
      env: { ...TOOL_ENV, NBDX_SYSLOG_SOCKET: path.join(dir, 'nowhere.sock') },
    });
    expect(r.stderr).toMatch(/^nbdx: warning: --log=syslog: no syslog socket at \S+nowhere.sock; logging to stderr$/m);
    expect(r.stderr).toMatch(/^nbdx: partition: error: cannot open export/m);
  });
});
