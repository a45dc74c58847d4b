import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Errno, NbdError } from '@nbdx/server/api';
import { removeDir, tmpDir } from '@nbdx/testkit';
import { failure, formatExtents, modeNumber, shellQuote, timestamp } from './format.js';
import { LineWriter } from './writer.js';

describe('log line pieces', () => {
  it('timestamps are UTC, YYYY-MM-DD HH:MM:SS.uuuuuu', () => {
    const t = Date.UTC(2018, 0, 27, 20, 38, 22) + 959.984;
    expect(timestamp(t)).toBe('2018-01-27 20:38:22.959984');
    expect(timestamp(Date.UTC(2020, 7, 6, 2, 7, 23))).toBe('2020-08-06 02:07:23.000000');
    expect(timestamp(Date.UTC(2020, 7, 6, 2, 7, 23) + 0.001)).toBe('2020-08-06 02:07:23.000001');
    expect(timestamp()).toMatch(/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$/);
  });

  it('strings are shell-quoted as nbdkit does', () => {
    expect(shellQuote('')).toBe('""');
    expect(shellQuote('disk.img')).toBe('disk.img');
    expect(shellQuote('a/b-c_d=e,f:g')).toBe('a/b-c_d=e,f:g');
    expect(shellQuote('two words')).toBe('"two words"');
    expect(shellQuote('$x`y\\z"')).toBe('"\\$x\\`y\\\\z\\""');
  });

  it('extents, modes and errors', () => {
    expect(
      formatExtents([
        { offset: 0, length: 0x10000, type: 0 },
        { offset: 0x10000, length: 0x1000, type: 3 },
        { offset: 0x11000, length: 0x1000, type: 1 },
        { offset: 0x12000, length: 0x1000, type: 2 },
      ]),
    ).toBe('0x0 0x10000 "" 0x10000 0x1000 "hole,zero" 0x11000 0x1000 "hole" 0x12000 0x1000 "zero"');
    expect([modeNumber('none'), modeNumber('emulate'), modeNumber('native')]).toEqual([0, 1, 2]);
    expect(failure(new NbdError(Errno.ENOSPC))).toBe('return=-1 error=ENOSPC');
    expect(failure(Object.assign(new Error('read-only'), { code: 'EROFS' }))).toBe('return=-1 error=EPERM');
    expect(failure(new Error('anything else'))).toBe('return=-1 error=EIO');
  });
});

describe('LineWriter', () => {
  let dir: string;
  beforeAll(() => (dir = tmpDir('nbdx-logwriter-')));
  afterAll(() => removeDir(dir));

  it('never writes on the caller\'s turn, keeps order, and close() writes everything', async () => {
    const file = path.join(dir, 'order.log');
    const w = LineWriter.open(file, false);
    for (let i = 0; i < 1000; i++) w.write(`line ${i}\n`);
    expect(fs.readFileSync(file, 'utf8')).toBe('');
    await new Promise((r) => setTimeout(r, 20));
    for (let i = 1000; i < 2000; i++) w.write(`line ${i}\n`);
    await w.close();
    const lines = fs.readFileSync(file, 'utf8').trimEnd().split('\n');
    expect(lines).toHaveLength(2000);
    expect(lines.every((l, i) => l === `line ${i}`)).toBe(true);
  });

  it('flushSync (the exit hook) writes what is pending and what may still be in flight', async () => {
    const file = path.join(dir, 'exit.log');
    const w = LineWriter.open(file, false);
    w.write('first\n');
    await new Promise((r) => setImmediate(r)); // the first chunk is now being written
    w.write('second\n');
    w.flushSync();
    expect(fs.readFileSync(file, 'utf8')).toBe('first\nsecond\n');
    await w.close();
    expect(fs.readFileSync(file, 'utf8')).toBe('first\nsecond\n');
  });

  it('appends after what the file held, or truncates it', async () => {
    const file = path.join(dir, 'append.log');
    fs.writeFileSync(file, 'old\n');
    const a = LineWriter.open(file, true);
    a.write('new\n');
    await a.close();
    expect(fs.readFileSync(file, 'utf8')).toBe('old\nnew\n');
    const t = LineWriter.open(file, false);
    t.write('only\n');
    await t.close();
    expect(fs.readFileSync(file, 'utf8')).toBe('only\n');
  });
});
