import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { TempFile } from './temp-file.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-tempfile-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

describe('TempFile', () => {
  it('leaves no name behind, reads unwritten ranges as zeroes, and stays sparse', async () => {
    const f = await TempFile.create(dir, 'nbdx-test-');
    expect(fs.readdirSync(dir)).toEqual([]);
    const data = Buffer.alloc(100_000, 7);
    await f.write(data, 10 * 1024 * 1024);
    const back = Buffer.alloc(100_000, 0xee);
    await f.read(back, 10 * 1024 * 1024);
    expect(back.equals(data)).toBe(true);
    // Before the data: a hole; past the end: zeroes, not an error.
    const hole = Buffer.alloc(4096, 0xee);
    await f.read(hole, 4096);
    expect(hole.equals(Buffer.alloc(4096))).toBe(true);
    const tail = Buffer.alloc(8192, 0xee);
    await f.read(tail, 10 * 1024 * 1024 + 100_000 - 4096);
    expect(tail.subarray(0, 4096).equals(Buffer.alloc(4096, 7))).toBe(true);
    expect(tail.subarray(4096).equals(Buffer.alloc(4096))).toBe(true);
    expect(f.allocatedBytes()).toBeLessThan(1024 * 1024);
    await f.close();
    await f.close(); // twice is fine
  });

  it('up to syncLimit bytes, reads and writes are done at once (no promise)', async () => {
    const f = await TempFile.create(dir);
    f.syncLimit = 4096;
    expect(f.write(Buffer.alloc(4096, 1), 0)).toBeUndefined();
    const b = Buffer.alloc(4096);
    expect(f.read(b, 0)).toBeUndefined();
    expect(b.equals(Buffer.alloc(4096, 1))).toBe(true);
    // Bigger ones go through the thread pool.
    const p = f.write(Buffer.alloc(8192, 2), 4096);
    expect(p).toBeInstanceOf(Promise);
    await p;
    await f.close();
    // On a closed descriptor a synchronous call fails as a rejected promise, never by throwing.
    await expect(f.read(Buffer.alloc(16), 0)).rejects.toThrow();
  });

  it('a directory that is not there: the error of open', async () => {
    await expect(TempFile.create(path.join(dir, 'missing'))).rejects.toMatchObject({ code: 'ENOENT' });
  });
});
