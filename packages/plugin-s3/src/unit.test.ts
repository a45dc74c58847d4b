/** Unit tests that need no object store: parameters, secrets, the manifest, the written-range set. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { removeDir, tmpDir } from '@nbdx/testkit';
import { Errno } from '@nbdx/server/api';
import { applyConfig, checkSettings, defaultSettings, type Settings } from './config.js';
import { encodeManifest, parseManifest } from './manifest.js';
import { Ranges } from './ranges.js';
import { objectName } from './disk.js';
import { storeOptions, unquote } from './store.js';

let dir: string;
beforeAll(() => {
  dir = tmpDir('nbdx-s3-unit-');
});
afterAll(() => removeDir(dir));

async function settings(params: Record<string, string>): Promise<Settings> {
  const s = defaultSettings();
  for (const [k, v] of Object.entries(params)) await applyConfig(s, k, v);
  checkSettings(s);
  return s;
}

describe('Ranges', () => {
  it('merges overlapping and touching ranges, keeps order', () => {
    const r = new Ranges();
    r.add(100, 200);
    r.add(300, 400);
    r.add(0, 10);
    expect(r.toArray()).toEqual([
      [0, 10],
      [100, 200],
      [300, 400],
    ]);
    r.add(200, 300); // touches both neighbours
    expect(r.toArray()).toEqual([
      [0, 10],
      [100, 400],
    ]);
    r.add(5, 150);
    expect(r.toArray()).toEqual([[0, 400]]);
    expect(r.covers(400)).toBe(true);
    expect(r.covers(401)).toBe(false);
    r.add(50, 60); // inside
    expect(r.toArray()).toEqual([[0, 400]]);
  });

  it('contains, gaps and written parts of a window', () => {
    const r = new Ranges();
    r.add(10, 20);
    r.add(30, 40);
    expect(r.contains(10, 20)).toBe(true);
    expect(r.contains(12, 18)).toBe(true);
    expect(r.contains(15, 35)).toBe(false);
    expect(r.contains(0, 5)).toBe(false);
    expect(r.contains(45, 50)).toBe(false);
    const gaps: number[][] = [];
    r.forEachGap(0, 50, (s, e) => gaps.push([s, e]));
    expect(gaps).toEqual([
      [0, 10],
      [20, 30],
      [40, 50],
    ]);
    const inner: number[][] = [];
    r.forEachGap(15, 35, (s, e) => inner.push([s, e]));
    expect(inner).toEqual([[20, 30]]);
    const parts: number[][] = [];
    r.forEachIn(15, 35, (s, e) => parts.push([s, e]));
    expect(parts).toEqual([
      [15, 20],
      [30, 35],
    ]);
    const empty = new Ranges();
    const all: number[][] = [];
    empty.forEachGap(0, 8, (s, e) => all.push([s, e]));
    expect(all).toEqual([[0, 8]]);
    expect(empty.isEmpty).toBe(true);
  });

  it('agrees with a byte map under random writes', () => {
    let seed = 12345;
    const rand = (n: number) => ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) % n);
    for (let round = 0; round < 50; round++) {
      const len = 1 + rand(300);
      const map = new Uint8Array(len);
      const r = new Ranges();
      for (let k = 0; k < 1 + rand(12); k++) {
        const s = rand(len);
        const e = s + rand(len - s + 1);
        r.add(s, e);
        map.fill(1, s, e);
      }
      const fromGaps = new Uint8Array(len).fill(1);
      r.forEachGap(0, len, (s, e) => fromGaps.fill(0, s, e));
      expect(fromGaps).toEqual(map);
      expect(r.covers(len)).toBe(map.every((b) => b === 1));
    }
  });
});

describe('parameters', () => {
  it('a prefix= disk with every parameter', async () => {
    const s = await settings({
      bucket: 'my-bucket',
      prefix: 'vm1/',
      size: '10G',
      'object-size': '4M',
      endpoint: 'http://127.0.0.1:7480',
      region: 'eu-west-3',
      'access-key': 'AKIA',
      'secret-key': 'clear-secret',
      'write-buffer': '256M',
      connections: '16',
      timeout: '30',
    });
    expect(s).toMatchObject({ bucket: 'my-bucket', prefix: 'vm1/', size: 10 * 2 ** 30, objectSize: 4 * 2 ** 20, writeBuffer: 256 * 2 ** 20, connections: 16, timeoutMs: 30_000 });
    const o = storeOptions(s);
    expect(o).toMatchObject({ region: 'eu-west-3', pathStyle: true, credentials: { accessKeyId: 'AKIA', secretAccessKey: 'clear-secret' } });
  });

  it('defaults: region us-east-1 (or $AWS_REGION), virtual-hosted addressing without endpoint=, the SDK chain for credentials', async () => {
    const before = process.env.AWS_REGION;
    delete process.env.AWS_REGION;
    delete process.env.AWS_DEFAULT_REGION;
    try {
      const o = storeOptions(await settings({ bucket: 'bk1', key: 'disk.img' }));
      expect(o).toMatchObject({ region: 'us-east-1', pathStyle: false, credentials: null, connections: 64 });
      process.env.AWS_REGION = '';
      expect(storeOptions(await settings({ bucket: 'bk1', key: 'disk.img' })).region).toBe('us-east-1');
      process.env.AWS_REGION = 'ap-south-1';
      expect(storeOptions(await settings({ bucket: 'bk1', key: 'disk.img', 'path-style': 'true' }))).toMatchObject({ region: 'ap-south-1', pathStyle: true });
    } finally {
      if (before === undefined) delete process.env.AWS_REGION;
      else process.env.AWS_REGION = before;
    }
  });

  const bad: [Record<string, string>, RegExp][] = [
    [{ key: 'k' }, /bucket= is required/],
    [{ bucket: 'bk1' }, /exactly one of key=/],
    [{ bucket: 'bk1', key: 'k', prefix: 'p' }, /exactly one of key=/],
    [{ bucket: 'bk1', key: 'k', size: '1G' }, /size= is for prefix= disks/],
    [{ bucket: 'bk1', key: 'k', 'object-size': '1M' }, /object-size= is for prefix= disks/],
    [{ bucket: 'bk1', key: 'k', 'access-key': 'a' }, /access-key= and secret-key= go together/],
    [{ bucket: 'bk1', key: 'k', 'session-token': 't' }, /session-token= needs access-key=/],
    [{ bucket: 'bk1', key: 'k', profile: 'p', 'access-key': 'a', 'secret-key': 's' }, /profile= and access-key= exclude/],
    [{ bucket: 'bk1', prefix: 'p/', 'object-size': '3000' }, /multiple of 4K/],
    [{ bucket: 'bk1', prefix: 'p/', 'object-size': '128M' }, /multiple of 4K from 4K to 64M/],
    [{ bucket: 'bk1', prefix: 'p/', 'object-size': '4M', 'write-buffer': '1M' }, /write-buffer: must hold at least one object/],
    [{ bucket: 'bk1', prefix: 'p/', size: '0' }, /size: a disk of 0 bytes/],
    [{ bucket: 'bk1', prefix: 'p/', size: 'lots' }, /could not parse 'lots'/],
    [{ bucket: 'bk1', key: 'k', endpoint: 'not a url' }, /is not a URL/],
    [{ bucket: 'bk1', key: 'k', endpoint: 'http://u:p@h' }, /credentials in access-key=/],
    [{ bucket: 'bk1', key: 'k', connections: '0' }, /connections: '0' is not a whole number from 1 to 1024/],
    [{ bucket: 'bk1', key: 'k', timeout: '-1' }, /timeout/],
    [{ bucket: 'bk1', key: 'k', region: 'us east' }, /not a region name/],
    [{ bucket: 'bk1', key: 'k', colour: 'red' }, /unknown parameter 'colour'/],
    [{ bucket: 'no/slash', key: 'k' }, /not a bucket name/],
    [{ bucket: 'bk1', key: '' }, /empty object key/],
  ];
  it.each(bad)('%j is refused with EINVAL', async (params, message) => {
    const err = await settings(params).then(
      () => null,
      (e: unknown) => e as { errno: number; message: string },
    );
    expect(err?.errno).toBe(Errno.EINVAL);
    expect(err?.message).toMatch(message);
  });
});

describe('secrets (read by @nbdx/server/api readSecret, tested there in full)', () => {
  const secret = async (key: string, value: string) => {
    const s = defaultSettings();
    await applyConfig(s, key, value);
    return key === 'secret-key' ? s.secretKey : s.sessionToken;
  };

  it('+FILE reads the file without its trailing newline; a clear value is taken as is', async () => {
    const f = path.join(dir, 'secret');
    fs.writeFileSync(f, 'from-a-file\n');
    expect(await secret('secret-key', `+${f}`)).toBe('from-a-file');
    expect(await secret('session-token', `+${f}`)).toBe('from-a-file');
    expect(await secret('secret-key', 'in-clear')).toBe('in-clear');
    await expect(secret('secret-key', `+${path.join(dir, 'missing')}`)).rejects.toThrow(/secret-key: cannot read/);
    fs.writeFileSync(f, '\n');
    await expect(secret('secret-key', `+${f}`)).rejects.toThrow(/the secret is empty/);
  });

  it('-FD reads an inherited descriptor and closes it; 0-2 are refused', async () => {
    const f = path.join(dir, 'fd-secret');
    fs.writeFileSync(f, 'via-fd\n');
    const fd = fs.openSync(f, 'r');
    expect(await secret('secret-key', `-${fd}`)).toBe('via-fd');
    expect(() => fs.fstatSync(fd)).toThrow(/EBADF/);
    await expect(secret('secret-key', '-1')).rejects.toThrow(/descriptors 0, 1 and 2 are standard input, output and error/);
  });
});

describe('manifest and keys', () => {
  it('round-trips, and refuses anything that is not a sane manifest', () => {
    const g = { size: 10 * 2 ** 30, objectSize: 2 ** 20 };
    expect(parseManifest(encodeManifest(g).toString(), 'm')).toEqual(g);
    const bad = [
      'not json',
      '[]',
      '{"format":"other","version":1,"size":1,"objectSize":4096}',
      '{"format":"nbdx-s3-disk","version":2,"size":1,"objectSize":4096}',
      '{"format":"nbdx-s3-disk","version":1,"size":-1,"objectSize":4096}',
      '{"format":"nbdx-s3-disk","version":1,"size":1e300,"objectSize":4096}',
      '{"format":"nbdx-s3-disk","version":1,"size":"1G","objectSize":4096}',
      '{"format":"nbdx-s3-disk","version":1,"size":4096,"objectSize":1000}',
      '{"format":"nbdx-s3-disk","version":1,"size":4096,"objectSize":1073741824}',
    ];
    for (const text of bad) expect(() => parseManifest(text, 's3://b/p/nbdx-disk.json'), text).toThrow(/s3:\/\/b\/p\/nbdx-disk.json: /);
  });

  it('object names are 16 hex digits (key order is disk order, as nbdkit\'s S3 plugin names them)', () => {
    expect(objectName(0)).toBe('0000000000000000');
    expect(objectName(255)).toBe('00000000000000ff');
    expect(objectName(2 ** 40)).toBe('0000010000000000');
    const names = [3, 17, 256, 4095, 4096].map(objectName);
    expect([...names].sort()).toEqual(names);
  });

  it('ETags lose their quotes (radosgw matches If-Match only on the bare value)', () => {
    expect(unquote('"abc"')).toBe('abc');
    expect(unquote('W/"abc-2"')).toBe('abc-2');
    expect(unquote('abc')).toBe('abc');
    expect(unquote(undefined)).toBeNull();
  });
});
