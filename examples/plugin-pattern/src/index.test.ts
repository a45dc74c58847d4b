import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { describeConformance, needTools, runOk, servePlugin, startCli, tmpDir } from '@nbdx/testkit';
import { createPatternPlugin, fillPattern, parsePattern } from './index.js';

// The suite every plugin should pass, from @nbdx/testkit: this plugin is read-only.
describeConformance('pattern', () => ({ plugin: createPatternPlugin(), config: [['size', '1M'], ['pattern', 'deadbeef']] }), {
  writable: false,
});
describeConformance('pattern of zeroes', () => ({ plugin: createPatternPlugin(), config: [['size', '1M'], ['pattern', '0000']] }), {
  writable: false,
});

/** The bytes a pattern disk should hold, computed the slow way. */
function expected(pattern: Buffer, offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i++) out[i] = pattern[(offset + i) % pattern.length]!;
  return out;
}

describe('pattern: parameters', () => {
  it('parses hex in several spellings', () => {
    expect(parsePattern('deadbeef')).toEqual(Buffer.from([0xde, 0xad, 0xbe, 0xef]));
    expect(parsePattern('0xDE,AD')).toEqual(Buffer.from([0xde, 0xad]));
    expect(parsePattern('00')).toEqual(Buffer.from([0]));
  });
  it('refuses what is not hex, odd lengths and patterns over 4096 bytes', () => {
    expect(() => parsePattern('xyz')).toThrow(/not an even number of hex digits/);
    expect(() => parsePattern('abc')).toThrow(/not an even number of hex digits/);
    expect(() => parsePattern('')).toThrow(/not an even number of hex digits/);
    expect(() => parsePattern('ab'.repeat(4097))).toThrow(/longer than the 4096 allowed/);
  });
  it('fills any window of the pattern, across tile boundaries', () => {
    const p = Buffer.from('0102030405', 'hex');
    const tile = Buffer.concat([p, p, p]);
    for (const [off, len] of [[0, 1], [3, 20], [14, 1], [1234567, 33]] as const) {
      const buf = Buffer.alloc(len);
      fillPattern(buf, off, tile, p.length);
      expect(buf).toEqual(expected(p, off, len));
    }
  });
});

describe('pattern: served', () => {
  it('reads the pattern at unaligned offsets, larger than the tile, and refuses writes', async () => {
    const p = parsePattern('0011223344556677889a');
    const s = await servePlugin(createPatternPlugin(), { config: [['size', '3M'], ['pattern', p.toString('hex')]] });
    try {
      const c = await s.connect();
      expect(c.size).toBe(3 << 20);
      expect(c.readOnly).toBe(true);
      for (const [off, len] of [[0, 512], [7, 100_003], [(3 << 20) - 9, 9], [65_531, 200_000]] as const) {
        expect(Buffer.compare(await c.pread(len, off), expected(p, off, len))).toBe(0);
      }
    } finally {
      await s.close();
    }
  });

  it('describes an all-zero pattern as a hole that reads as zero', async () => {
    const s = await servePlugin(createPatternPlugin(), { config: [['size', '1M'], ['pattern', '00']] });
    try {
      const c = await s.connect();
      const map = (await c.blockStatus(1 << 20, 0)).get('base:allocation')!;
      expect(map).toEqual([{ length: 1 << 20, flags: 3 }]);
      expect((await c.pread(4096, 100)).every((b) => b === 0)).toBe(true);
    } finally {
      await s.close();
    }
  });

  it('refuses a bad command line with a clear error', async () => {
    await expect(servePlugin(createPatternPlugin(), { config: [['pattern', '12']] })).rejects.toThrow(/size is required/);
    await expect(servePlugin(createPatternPlugin(), { config: [['size', '1M'], ['colour', 'red']] })).rejects.toThrow(
      /unknown parameter 'colour'/,
    );
  });
});

// Found by name, as `nbdx pattern`: a directory whose node_modules holds the package.
const have = needTools('nbdcopy');
describe.runIf(have)('pattern: by name on the nbdx command line', () => {
  const dir = tmpDir();
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('nbdx pattern 1M pattern=HEX serves the pattern to nbdcopy', async () => {
    const pkg = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
    fs.mkdirSync(path.join(dir, 'node_modules'));
    fs.symlinkSync(pkg, path.join(dir, 'node_modules', 'nbdx-plugin-pattern'));
    const srv = await startCli(['-U', '-', 'pattern', '1M', 'pattern=c0ffee'], { cwd: dir });
    try {
      const out = path.join(dir, 'out.img');
      await runOk('nbdcopy', [srv.uri, out]);
      expect(Buffer.compare(fs.readFileSync(out), expected(Buffer.from('c0ffee', 'hex'), 0, 1 << 20))).toBe(0);
    } finally {
      await srv.stop();
    }
  });
});
