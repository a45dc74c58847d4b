/**
 * The filter's callbacks against a fake layer below: offsets shifted into the member, bounds,
 * export names, and one scan per archive.
 */
import { describe, expect, it } from 'vitest';
import { EXTENT_HOLE, EXTENT_ZERO, FLAG_FUA, FLAG_REQ_ONE, NbdError, type Next, type NextOpener, type OwnedContext } from '@nbdx/server/api';
import { createTarFilter } from './index.js';
import { END_OF_ARCHIVE, tarMember } from './test-support.js';

/** Two archives as exports of a fake layer below ('' and 'other'), recording what is called. */
function fakeBelow() {
  const archives: Record<string, Buffer> = {
    '': Buffer.concat([
      tarMember({ name: 'a.txt' }, Buffer.from('AAAA')),
      tarMember({ name: 'disk.img' }, Buffer.alloc(4096, 0x44)),
      tarMember({ name: 'dir/', typeflag: '5' }),
      END_OF_ARCHIVE,
    ]),
    other: Buffer.concat([tarMember({ name: 'disk.img' }, Buffer.alloc(1024, 0x4f)), END_OF_ARCHIVE]),
  };
  const calls: string[] = [];
  const contexts: { exportName: string; readonly: boolean; owned: boolean }[] = [];
  const makeNext = (exportName: string, readonly: boolean): OwnedContext => {
    const bytes = archives[exportName];
    if (!bytes) throw new NbdError(22, `no export '${exportName}'`);
    const rec = (s: string) => calls.push(s);
    return {
      exportName,
      readonly,
      getSize: async () => bytes.length,
      blockSize: async () => ({ minimum: 512, preferred: 4096, maximum: 1 << 20 }),
      exportDescription: async () => undefined,
      canWrite: async () => !readonly,
      canFlush: async () => true,
      isRotational: async () => false,
      canTrim: async () => true,
      canZero: async () => true,
      canFastZero: async () => false,
      canExtents: async () => true,
      canFua: async () => 'native',
      canMultiConn: async () => true,
      canCache: async () => 'native',
      pread: async (buf, offset, flags) => {
        rec(`pread ${buf.length}@${offset} ${flags ?? 0}`);
        buf.set(bytes.subarray(offset, offset + buf.length));
      },
      pwrite: async (buf, offset, flags) => {
        rec(`pwrite ${buf.length}@${offset} ${flags ?? 0}`);
        bytes.set(buf, offset);
      },
      flush: async () => void rec('flush'),
      trim: async (count, offset) => void rec(`trim ${count}@${offset}`),
      zero: async (count, offset) => void rec(`zero ${count}@${offset}`),
      cache: async (count, offset) => void rec(`cache ${count}@${offset}`),
      // Pieces of 1000 bytes, to check that the filter asks again for the rest.
      extents: async (count, offset) => {
        rec(`extents ${count}@${offset}`);
        const len = Math.min(count, 1000);
        return [{ offset, length: len, type: offset < 4000 ? EXTENT_HOLE | EXTENT_ZERO : 0 }];
      },
      close: async () => void rec(`close ${exportName}`),
    };
  };
  const below = {
    listExports: async () => Object.keys(archives).map((name) => ({ name })),
    defaultExport: async () => '',
    openContext: async (o: { readonly?: boolean; exportName?: string } = {}) => {
      contexts.push({ exportName: o.exportName ?? '', readonly: o.readonly ?? false, owned: true });
      return makeNext(o.exportName ?? '', o.readonly ?? false);
    },
  };
  /** What the core hands to open(): `open()` opens the per-connection context. */
  const opener = () => {
    let opened: Next | undefined;
    const o: NextOpener = {
      ...below,
      open: async (readonly = false, exportName = '') => {
        contexts.push({ exportName, readonly, owned: false });
        opened = makeNext(exportName, readonly);
      },
      use: (ctx) => {
        opened = ctx;
      },
    };
    return { o, next: () => opened! };
  };
  return { archives, calls, contexts, below, opener };
}

async function configure(filter: ReturnType<typeof createTarFilter>, pairs: [string, string][]) {
  const passed: [string, string][] = [];
  for (const [k, v] of pairs) await filter.config!(async (k2, v2) => void passed.push([k2, v2]), k, v);
  await filter.configComplete!(async () => {});
  return passed;
}

describe('tar filter callbacks', () => {
  it('takes its own keys and passes the others on', async () => {
    const f = createTarFilter();
    expect(await configure(f, [['tar-entry', 'x'], ['file', 'a.tar'], ['tar-limit', '1M'], ['size', '1']])).toEqual([
      ['file', 'a.tar'],
      ['size', '1'],
    ]);
    const g = createTarFilter();
    await expect(configure(g, [['tar-entry', '']])).rejects.toThrow(/must not be empty/);
    const h = createTarFilter();
    await expect(configure(h, [['tar-entry', 'x'], ['tar-export', 'y']])).rejects.toThrow(/tar-export applies only without tar-entry/);
  });

  it('shifts every data call into the member and keeps them inside it', async () => {
    const fake = fakeBelow();
    const f = createTarFilter();
    await configure(f, [['tar-entry', 'disk.img']]);
    const { o, next } = fake.opener();
    const h = await f.open!(o, false, '', false);
    const n = next();
    await f.prepare!(n, h, false);
    // The scan: one read ahead covering the whole (small) archive, then the context is closed.
    expect(fake.calls).toEqual([`pread ${fake.archives['']!.length}@0 0`, 'close ']);
    fake.calls.length = 0;
    // disk.img: header at 1024, data at 1536.
    expect(await f.getSize!(n, h)).toBe(4096);
    const buf = Buffer.alloc(10);
    await f.pread!(n, h, buf, 100, 0);
    expect(buf).toEqual(Buffer.alloc(10, 0x44));
    await f.pwrite!(n, h, Buffer.from('zz'), 4094, FLAG_FUA);
    await f.zero!(n, h, 512, 0, 0);
    await f.trim!(n, h, 1024, 1024, 0);
    await f.cache!(n, h, 4096, 0, 0);
    expect(fake.calls).toEqual([
      `pread 10@${1536 + 100} 0`,
      `pwrite 2@${1536 + 4094} ${FLAG_FUA}`,
      `zero 512@1536`,
      `trim 1024@${1536 + 1024}`,
      `cache 4096@1536`,
    ]);
    // The archive around the member is untouched: the next header still starts at 1536 + 4096.
    expect(fake.archives['']!.subarray(1536 + 4094, 1536 + 4096).toString()).toBe('zz');
    expect(fake.archives['']!.subarray(1536 + 4096, 1536 + 4096 + 3).toString()).toBe('dir');

    await expect(f.pwrite!(n, h, Buffer.alloc(4), 4094, 0)).rejects.toMatchObject({ errno: 28 });
    await expect(f.zero!(n, h, 1, 4096, 0)).rejects.toMatchObject({ errno: 28 });
    await expect(f.pread!(n, h, Buffer.alloc(1), 4096, 0)).rejects.toMatchObject({ errno: 22 });

    fake.calls.length = 0;
    const ext = await f.extents!(n, h, 2500, 500, 0);
    expect([...(ext as Iterable<unknown>)]).toEqual([
      { offset: 500, length: 1000, type: EXTENT_HOLE | EXTENT_ZERO },
      { offset: 1500, length: 1000, type: EXTENT_HOLE | EXTENT_ZERO },
      { offset: 2500, length: 500, type: 0 },
    ]);
    expect(fake.calls).toEqual([`extents 2500@2036`, `extents 1500@3036`, `extents 500@4036`]);
    fake.calls.length = 0;
    const one = await f.extents!(n, h, 2500, 500, FLAG_REQ_ONE);
    expect([...(one as Iterable<unknown>)]).toHaveLength(1);
    // 1536 is not a multiple of 4096: the preferred size is lowered to what stays aligned.
    expect(await f.blockSize!(n, h)).toEqual({ minimum: 512, preferred: 512, maximum: 1 << 20 });
  });

  it('reads ahead while scanning, but never past tar-limit', async () => {
    const fake = fakeBelow();
    const f = createTarFilter();
    await configure(f, [['tar-entry', 'disk.img'], ['tar-limit', '1536']]);
    await f.afterStart!(fake.below);
    expect(fake.calls).toEqual(['pread 1536@0 0', 'close ']);
    const g = createTarFilter();
    await configure(g, [['tar-entry', 'disk.img'], ['tar-limit', '1535']]);
    await expect(g.afterStart!(fake.below)).rejects.toThrow(/tar-entry 'disk.img' was not found within the first 1535 bytes/);
  });

  it('with tar-entry, export names go to the layer below, one scan per archive', async () => {
    const fake = fakeBelow();
    const f = createTarFilter();
    await configure(f, [['tar-entry', 'disk.img']]);
    expect(await f.listExports!(fake.below, false, false)).toEqual([{ name: '' }, { name: 'other' }]);
    expect(await f.defaultExport!(fake.below, false, false)).toBe('');
    await f.afterStart!(fake.below);
    for (let i = 0; i < 3; i++) {
      for (const name of ['', 'other']) {
        const { o, next } = fake.opener();
        const h = await f.open!(o, i === 2, name, false);
        expect(next().exportName).toBe(name);
        expect(next().readonly).toBe(i === 2);
        expect(await f.getSize!(next(), h)).toBe(name === '' ? 4096 : 1024);
      }
    }
    expect(f.scanCount).toBe(2);
    expect(fake.contexts.filter((c) => c.owned)).toEqual([
      { exportName: '', readonly: true, owned: true },
      { exportName: 'other', readonly: true, owned: true },
    ]);
  });

  it('without tar-entry, members are exports of the archive in tar-export', async () => {
    const fake = fakeBelow();
    const f = createTarFilter();
    await configure(f, [['tar-export', 'other']]);
    expect(await f.listExports!(fake.below, false, false)).toEqual([
      { name: 'disk.img', description: '1024 bytes (1 KiB) in tar archive' },
    ]);
    const { o, next } = fake.opener();
    const h = await f.open!(o, false, 'disk.img', false);
    expect(next().exportName).toBe('other');
    expect(await f.getSize!(next(), h)).toBe(1024);

    const g = createTarFilter();
    await configure(g, [['tar-default', 'disk.img']]);
    expect((await g.listExports!(fake.below, false, false)).map((e) => (typeof e === 'string' ? e : e.name))).toEqual([
      'a.txt',
      'disk.img',
    ]);
    expect(await g.defaultExport!(fake.below, false, false)).toBe('disk.img');
    const x = fake.opener();
    await expect(g.open!(x.o, false, 'dir', false)).rejects.toThrow(/'dir\/' is a directory/);
    await expect(g.open!(x.o, false, 'zzz', false)).rejects.toThrow(/export 'zzz' is not in the archive; its files are 'a.txt', 'disk.img'/);
    const y = fake.opener();
    const h2 = await g.open!(y.o, false, '', false);
    expect(await g.getSize!(y.next(), h2)).toBe(4096);
    expect(g.scanCount).toBe(1);
  });

  it('copes with a layer below whose default export cannot be opened (file dir=)', async () => {
    const fake = fakeBelow();
    delete fake.archives[''];
    const f = createTarFilter();
    await configure(f, [['tar-entry', 'disk.img']]);
    await expect(f.afterStart!(fake.below)).resolves.toBeUndefined();
    const { o, next } = fake.opener();
    const h = await f.open!(o, false, 'other', false);
    expect(await f.getSize!(next(), h)).toBe(1024);
    expect(f.scanCount).toBe(2); // the failed attempt at start-up, then 'other'

    const g = createTarFilter();
    await configure(g, []);
    await expect(g.afterStart!(fake.below)).rejects.toThrow(
      /cannot open the archive \(export '' of the layer below\): no export ''; set tar-export=NAME/,
    );
  });

  it('refuses a member the archive no longer holds', async () => {
    const fake = fakeBelow();
    const f = createTarFilter();
    await configure(f, [['tar-entry', 'disk.img']]);
    const { o, next } = fake.opener();
    const h = await f.open!(o, false, '', false);
    const full = fake.archives[''];
    fake.archives[''] = full!.subarray(0, 2048); // the archive shrank under us
    await expect(f.prepare!(next(), h, false)).resolves.toBeUndefined(); // next was built before
    const again = fake.opener();
    const h2 = await f.open!(again.o, false, '', false);
    await expect(f.prepare!(again.next(), h2, false)).rejects.toThrow(/ends at offset 5632 but the archive is only 2048 bytes/);
  });
});
