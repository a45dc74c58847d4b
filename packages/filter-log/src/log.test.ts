import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serve } from '@nbdx/server';
import { Errno, NbdError, definePlugin } from '@nbdx/server/api';
import { NbdClient } from '@nbdx/client';
import { nbdxBin, needNbdx, needTools, removeDir, run, tmpDir } from '@nbdx/testkit';
import { createLogFilter } from './index.js';

const tools = needTools('nbdsh', 'nbdinfo', 'nbdkit');
const cli = needNbdx();

/** Requests of every kind, one connection listing exports first. */
const WORKLOAD = `
import nbd
for i in range(4): h.pread(4096, i * 4096)
h.pwrite(b"x" * 1000, 513, nbd.CMD_FLAG_FUA)
h.pwrite(b"y" * 8192, 8192)
h.trim(65536, 1 << 20)
h.zero(8192, 4096)
h.zero(4096, 1 << 21, nbd.CMD_FLAG_NO_HOLE)
h.flush()
h.cache(4096, 0)
h.block_status(1 << 22, 0, lambda *a: 0)
h.block_status(1 << 22, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
`;

const TIMESTAMP = /^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6} /;

/** Lines without their timestamps; nbdkit's lines that nbdx has no counterpart for are dropped. */
function body(log: string): string[] {
  return log
    .trimEnd()
    .split('\n')
    .map((l) => {
      expect(l).toMatch(TIMESTAMP);
      return l.replace(TIMESTAMP, '');
    })
    // nbdkit: the thread model on Ready, and Fork (nbdx never forks)
    .map((l) => l.replace(/^Ready thread_model=\d$/, 'Ready'))
    .filter((l) => l !== 'Fork');
}

/**
 * nbdkit logs the extents the layer below returned, and trims them to one for a REQ_ONE request
 * only afterwards; in nbdx the layer below has already honoured REQ_ONE. Keep nbdkit's first.
 */
function firstExtentOnReqOne(lines: string[]): string[] {
  const reqOne = new Set<string>();
  return lines.map((l) => {
    const enter = /^(connection=\d+) Extents id=(\d+) .*req_one=1 \.\.\.$/.exec(l);
    if (enter) reqOne.add(`${enter[1]} ${enter[2]}`);
    const leave = /^(connection=\d+) \.\.\.Extents id=(\d+) extents=\((\S+ \S+ "[^"]*")[^)]*\)( return=0)$/.exec(l);
    if (leave && reqOne.has(`${leave[1]} ${leave[2]}`)) return `${leave[1]} ...Extents id=${leave[2]} extents=(${leave[3]})${leave[4]}`;
    return l;
  });
}

let dir: string;
beforeAll(() => {
  dir = tmpDir('nbdx-log-');
  fs.writeFileSync(path.join(dir, 'workload.py'), WORKLOAD);
});
afterAll(() => removeDir(dir));

const workload = (d: string) =>
  `nbdinfo --list "$uri" >/dev/null && nbdsh --base-allocation -u "$uri" -c "exec(open('${d}/workload.py').read())"`;

describe.skipIf(!tools || !cli)('log filter under the nbdx CLI, compared with nbdkit', () => {
  it('writes the same lines as nbdkit for the same session (timestamps aside)', async () => {
    const ours = path.join(dir, 'nbdx.log');
    const theirs = path.join(dir, 'nbdkit.log');
    const a = await run(process.execPath, [nbdxBin(), '-U', '-', '--filter=log', 'memory', '1G', `logfile=${ours}`, '--run', workload(dir)]);
    expect(a.stderr).toBe('');
    expect(a.code).toBe(0);
    const b = await run('nbdkit', ['-U', '-', '--filter=log', 'memory', '1G', `logfile=${theirs}`, '--run', workload(dir)]);
    expect(b.code).toBe(0);
    const mine = body(fs.readFileSync(ours, 'utf8'));
    expect(mine).toEqual(firstExtentOnReqOne(body(fs.readFileSync(theirs, 'utf8'))));
    // What the session looks like, so a change on both sides is noticed too.
    expect(mine[0]).toBe('Ready');
    expect(mine).toContain('ListExports id=1 readonly=0 tls=0 ...');
    expect(mine).toContain('...ListExports id=1 exports=("") return=0');
    expect(mine.filter((l) => l.startsWith('connection=2 Connect export="" tls=0 size=0x40000000 '))).toHaveLength(1);
    expect(mine).toContain('connection=2 Write id=5 offset=0x201 count=0x3e8 fua=1 ...');
    expect(mine).toContain('connection=2 Zero id=9 offset=0x200000 count=0x1000 trim=0 fua=0 fast=0 ...');
    expect(mine).toContain('connection=2 Flush id=10 ...');
    expect(mine).toContain('connection=2 Extents id=13 offset=0x0 count=0x400000 req_one=1 ...');
    expect(mine.at(-1)).toBe('connection=2 Disconnect transactions=13');
  });

  it('logappend=true keeps earlier runs', async () => {
    const file = path.join(dir, 'append.log');
    fs.writeFileSync(file, 'earlier\n');
    for (let i = 0; i < 2; i++) {
      const r = await run(process.execPath, [nbdxBin(), '-U', '-', '--filter=log', 'memory', '1M', `logfile=${file}`, 'logappend=true', '--run', 'nbdinfo --size "$uri"']);
      expect(r.code).toBe(0);
    }
    const lines = fs.readFileSync(file, 'utf8').trimEnd().split('\n');
    expect(lines[0]).toBe('earlier');
    expect(lines.filter((l) => / Ready$/.test(l))).toHaveLength(2);
  });

  it('logscript is refused with a clear message', async () => {
    const r = await run(process.execPath, [nbdxBin(), '-U', '-', '--filter=log', 'memory', '1M', 'logscript=echo', '--run', 'true']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/logscript: not supported/);
  });
});

describe('log filter embedded', () => {
  it('logs failures with the NBD error, and every line of a busy connection by close', async () => {
    const file = path.join(dir, 'errors.log');
    const plugin = definePlugin({
      apiVersion: 2,
      name: 'flaky',
      getSize: () => 1 << 20,
      pread(_h, buf, offset) {
        if (offset >= 4096) throw new NbdError(Errno.EIO, 'bad sector');
        buf.fill(0);
      },
      pwrite() {
        throw Object.assign(new Error('no room'), { code: 'ENOSPC' });
      },
    });
    const server = await serve({ plugin, filters: [createLogFilter()], config: [['logfile', file]], error: () => {} });
    const c = await NbdClient.connect(server.uri);
    await c.pread(512, 0);
    await expect(c.pread(512, 4096)).rejects.toThrow();
    await expect(c.pwrite(Buffer.alloc(512), 0)).rejects.toThrow();
    await Promise.all(Array.from({ length: 500 }, (_, i) => c.pread(512, (i % 8) * 512)));
    await c.disconnect();
    await server.close();
    const lines = body(fs.readFileSync(file, 'utf8'));
    expect(lines).toContain('connection=1 ...Read id=1 return=0');
    expect(lines).toContain('connection=1 ...Read id=2 return=-1 error=EIO');
    expect(lines).toContain('connection=1 Write id=3 offset=0x0 count=0x200 fua=0 ...');
    expect(lines).toContain('connection=1 ...Write id=3 return=-1 error=ENOSPC');
    expect(lines.filter((l) => l.startsWith('connection=1 ...Read '))).toHaveLength(502);
    expect(lines.at(-1)).toBe('connection=1 Disconnect transactions=503');
  });

  it('without logfile the filter does nothing', async () => {
    const server = await serve({
      plugin: definePlugin({ apiVersion: 2, name: 'zeroes', getSize: () => 4096, pread: (_h, buf) => void buf.fill(0) }),
      filters: [createLogFilter()],
      config: [],
    });
    const c = await NbdClient.connect(server.uri);
    expect((await c.pread(512, 0)).length).toBe(512);
    await c.disconnect();
    await server.close();
  });
});
