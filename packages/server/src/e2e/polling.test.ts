/**
 * Polling (protocol/poller.ts) with a real client in another process: libnbd's synchronous calls
 * are one request at a time, the case polling is for. Every byte must come back as written,
 * whichever way a request or a payload arrived, and the server must say that polling took part.
 */
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { needNbdx, needTools, nbdshOk, removeDir, startCli, tmpDir, waitFor, type CliServer } from '@nbdx/testkit';

const ready = needTools('nbdsh') && needNbdx();

/** Random writes of 1 byte to 1 MiB (big ones arrive by direct reads), each read back at once. */
const SCRIPT = `
import random
random.seed(7)
size = h.get_size()
model = bytearray(size)
for i in range(600):
    n = random.choice([1, 512, 4096, 65536, 200000, 1 << 20])
    off = random.randrange(0, size - n)
    if random.random() < 0.5:
        data = random.randbytes(n)
        h.pwrite(data, off)
        model[off:off + n] = data
    got = h.pread(n, off)
    assert got == bytes(model[off:off + n]), "mismatch at %d+%d" % (off, n)
assert h.pread(size, 0) == bytes(model)
print("ok")
`;

describe.skipIf(!ready)('polling an idle connection', () => {
  let dir: string;
  let srv: CliServer;
  beforeAll(async () => {
    dir = tmpDir();
    srv = await startCli(['-v', '-U', path.join(dir, 'p.sock'), 'memory', '16M']);
  });
  afterAll(async () => {
    await srv?.stop();
    removeDir(dir);
  });

  it('serves one-at-a-time requests correctly, partly found by polling', async () => {
    expect((await nbdshOk(srv.uri, SCRIPT)).trim()).toBe('ok');
    await waitFor(() => /connection ending/.test(srv.stderr()), 5000, 'the end of the connection');
    const m = /\((\d+) of (\d+) reads found by polling\)/.exec(srv.stderr());
    expect(m, srv.stderr().slice(-2000)).not.toBeNull();
    expect(Number(m![2])).toBeGreaterThan(600);
    expect(Number(m![1])).toBeGreaterThan(0);
  });

  it('does not poll around big requests: one-at-a-time 256 KiB writes and reads are found by the event loop', async () => {
    const big = await startCli(['-v', '-U', path.join(dir, 'b.sock'), 'memory', '16M']);
    try {
      const script = [
        'data = bytes(range(256)) * 1024',
        'for i in range(200):',
        '    h.pwrite(data, (i % 60) * 262144)',
        '    assert h.pread(262144, (i % 60) * 262144) == data',
        'print("ok")',
      ].join('\n');
      expect((await nbdshOk(big.uri, script)).trim()).toBe('ok');
      await waitFor(() => /connection ending/.test(big.stderr()), 5000, 'the end of the connection');
      const m = /\((\d+) of (\d+) reads found by polling\)/.exec(big.stderr());
      expect(m, big.stderr().slice(-2000)).not.toBeNull();
      expect(Number(m![2])).toBeGreaterThan(400);
      expect(Number(m![1])).toBe(0);
    } finally {
      await big.stop();
    }
  });

  it('--poll=0 turns it off', async () => {
    const off = await startCli(['-v', '--poll=0', '-U', path.join(dir, 'q.sock'), 'memory', '16M']);
    try {
      expect((await nbdshOk(off.uri, SCRIPT)).trim()).toBe('ok');
      await waitFor(() => /connection ending/.test(off.stderr()), 5000, 'the end of the connection');
      expect(off.stderr()).not.toMatch(/found by polling/);
    } finally {
      await off.stop();
    }
  });
});
