import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import { describeConformance, needTools, runOk, servePlugin, startCli, tmpDir } from '@nbdx/testkit';
import { createXorFilter, parseKey } from './index.js';

// The suite every filter should pass, from @nbdx/testkit, over a memory disk.
describeConformance('xor over memory', () => ({
  plugin: createMemoryPlugin(),
  filters: [createXorFilter()],
  config: [['size', '1M'], ['xor', '0x5a']],
}));
describeConformance('xor with key 0 over memory', () => ({
  plugin: createMemoryPlugin(),
  filters: [createXorFilter()],
  config: [['size', '1M'], ['xor', '0']],
}));

describe('xor: parameters', () => {
  it('reads decimal and hex bytes, refuses anything else', () => {
    expect(parseKey('0x5a')).toBe(0x5a);
    expect(parseKey('0XFF')).toBe(255);
    expect(parseKey('90')).toBe(90);
    expect(parseKey('0')).toBe(0);
    for (const bad of ['256', '-1', 'x', '0x100', '', '1.5']) expect(() => parseKey(bad)).toThrow(/is not a byte/);
  });
});

describe('xor: served over memory', () => {
  it('stores the XOR below and gives back the plain bytes above; zero reads as zero', async () => {
    const memory = createMemoryPlugin();
    const above = await servePlugin(memory, { filters: [createXorFilter()], config: [['size', '1M'], ['xor', '0x0f']] });
    try {
      const c = await above.connect();
      // Unwritten memory is zero below, so it reads as the key above.
      expect((await c.pread(16, 4096)).every((b) => b === 0x0f)).toBe(true);
      const data = randomBytes(10_000);
      await c.pwrite(data, 123);
      expect(Buffer.compare(await c.pread(data.length, 123), data)).toBe(0);
      await c.zero(5000, 1000);
      expect((await c.pread(5000, 1000)).every((b) => b === 0)).toBe(true);
      // Holes and zero ranges below are not zero above, so the map says data only.
      const map = (await c.blockStatus(1 << 20, 0)).get('base:allocation');
      if (map) expect(map.every((e) => (e.flags & 2) === 0)).toBe(true);
    } finally {
      await above.close();
    }
  });

  it('passes unknown keys on to the plugin (which refuses them)', async () => {
    await expect(
      servePlugin(createMemoryPlugin(), { filters: [createXorFilter()], config: [['size', '1M'], ['colour', 'red']] }),
    ).rejects.toThrow(/unknown parameter 'colour'/);
    await expect(
      servePlugin(createMemoryPlugin(), { filters: [createXorFilter()], config: [['size', '1M'], ['xor', 'lots']] }),
    ).rejects.toThrow(/xor: 'lots' is not a byte/);
  });
});

const have = needTools('nbdcopy');
describe.runIf(have)('xor: by name on the nbdx command line', () => {
  const dir = tmpDir();
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('nbdx --filter=xor memory 1M xor=0xff: a fresh disk reads as 0xff', async () => {
    const pkg = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
    fs.mkdirSync(path.join(dir, 'node_modules'));
    fs.symlinkSync(pkg, path.join(dir, 'node_modules', 'nbdx-filter-xor'));
    const srv = await startCli(['-U', '-', '--filter=xor', 'memory', '1M', 'xor=0xff'], { cwd: dir });
    try {
      const out = path.join(dir, 'out.img');
      await runOk('nbdcopy', [srv.uri, out]);
      const got = fs.readFileSync(out);
      expect(got.length).toBe(1 << 20);
      expect(got.every((b) => b === 0xff)).toBe(true);
    } finally {
      await srv.stop();
    }
  });
});
