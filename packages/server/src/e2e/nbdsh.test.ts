/**
 * Every command and flag, and every error case, driven by libnbd's nbdsh with its client-side
 * checks turned off (strict mode 0) so the server sees exactly what we send.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import { definePlugin } from '../api/define.js';
import { serve } from '../server.js';
import { NBDSH_HELPERS, needTools, run } from '@nbdx/testkit';

const have = needTools('nbdsh');

/**
 * A script prelude: connect without client-side checks; testkit's NBDSH_HELPERS give
 * expect_err(name, f), which prints "ok NAME" when f fails with that errno.
 */
function script(uri: string, body: string): string {
  return `
h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.connect_uri(${JSON.stringify(uri)})
${NBDSH_HELPERS}
${body}
print("done")
`;
}

describe.skipIf(!have)('nbdsh: commands, flags and errors', () => {
  let server: Awaited<ReturnType<typeof serve>>;
  let ro: Awaited<ReturnType<typeof serve>>;
  beforeAll(async () => {
    server = await serve({ plugin: createMemoryPlugin(), config: { size: '1M' } });
    ro = await serve({ plugin: createMemoryPlugin(), config: { size: '1M' }, readonly: true });
  });
  afterAll(async () => {
    await server.close();
    await ro.close();
  });

  async function runScript(uri: string, body: string): Promise<string> {
    const r = await run('nbdsh', ['-c', script(uri, body)]);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('done');
    return r.stdout;
  }

  it('serves every command with every valid flag', async () => {
    const out = await runScript(
      server.uri,
      `
assert h.get_size() == 1048576
assert h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero() and h.can_fast_zero()
assert h.can_cache() and h.can_multi_conn() and h.can_df() and not h.is_read_only()
h.pwrite(b"\\x11" * 65536, 0)
h.pwrite(b"\\x22" * 4096, 65536, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 0) == b"\\x11" * 65536
assert h.pread(4096, 65536, nbd.CMD_FLAG_DF) == b"\\x22" * 4096
h.flush()
h.cache(8192, 0)
h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
h.zero(4096, 4096, nbd.CMD_FLAG_FUA)
h.zero(4096, 8192, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(12288, 0) == bytes(12288)
h.trim(65536, 0, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 0) == bytes(65536)
seen = []
def cb(meta, off, ents, err):
    seen.append((meta, list(ents)))
h.block_status(1048576, 0, cb)
assert seen[0][0] == "base:allocation", seen
ents = seen[0][1]
# [length, flags, ...]: trimmed first 64K is a hole, then the 4K of data, then holes
assert ents[0:2] == [65536, 3], ents
assert ents[2:4] == [32768, 0], ents
seen.clear()
h.block_status(1048576, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(seen[0][1]) == 2, seen
print("extents", ents)
`,
    );
    expect(out).toContain('extents');
  });

  it('answers each bad request with the right error and keeps the connection', async () => {
    const out = await runScript(
      server.uri,
      `
expect_err("EINVAL", lambda: h.pread(0, 0))
expect_err("EINVAL", lambda: h.pread(4096, 1048576 - 1024))
expect_err("ENOSPC", lambda: h.pwrite(b"x" * 4096, 1048576 - 1024))
expect_err("ENOSPC", lambda: h.zero(4096, 1048576 - 1024))
expect_err("EINVAL", lambda: h.trim(4096, 1048576 - 1024))
expect_err("EINVAL", lambda: h.cache(4096, 1048576))
expect_err("EINVAL", lambda: h.block_status(4096, 1048576, lambda *a: 0))
expect_err("EINVAL", lambda: h.trim(0, 0))
expect_err("EINVAL", lambda: h.zero(0, 0))
# flags that are not valid for the command; the rejected write's payload is read and dropped
expect_err("EINVAL", lambda: h.pwrite(b"y" * 65536, 0, nbd.CMD_FLAG_DF))
expect_err("EINVAL", lambda: h.pread(512, 0, nbd.CMD_FLAG_NO_HOLE))
expect_err("EINVAL", lambda: h.pread(512, 0, 0x80))
# FUA is accepted on every command once advertised (it changes nothing where nothing is written);
# libnbd's strict mode would refuse to send it, so it is turned off for these
strict = h.get_strict_mode()
h.set_strict_mode(0)
h.flush(nbd.CMD_FLAG_FUA)
h.pread(512, 0, nbd.CMD_FLAG_FUA)
h.cache(512, 0, nbd.CMD_FLAG_FUA)
h.block_status(512, 0, lambda *a: 0, nbd.CMD_FLAG_FUA)
h.set_strict_mode(strict)
print("ok fua everywhere")
# the connection still works, and the rejected write changed nothing
h.pwrite(b"z" * 512, 0)
assert h.pread(512, 0) == b"z" * 512
assert h.pread(512, 512) == bytes(512)
`,
    );
    expect(out.match(/^ok /gm)?.length).toBe(13);
  });

  it('refuses writes on a read-only export with EPERM', async () => {
    const out = await runScript(
      ro.uri,
      `
assert h.is_read_only()
expect_err("EPERM", lambda: h.pwrite(b"x" * 512, 0))
expect_err("EPERM", lambda: h.trim(512, 0))
expect_err("EPERM", lambda: h.zero(512, 0))
assert h.pread(512, 0) == bytes(512)
`,
    );
    expect(out.match(/^ok /gm)?.length).toBe(3);
  });

  it('rejects FAST_ZERO when it was not advertised, without crashing', async () => {
    const plain = definePlugin({
      apiVersion: 2,
      name: 'no-fast-zero',
      getSize: () => 1 << 20,
      pread: (_h, buf) => void buf.fill(0),
      pwrite: () => {},
      zero: () => {},
      canFastZero: () => false,
      canFua: () => 'none',
    });
    const s = await serve({ plugin: plain });
    try {
      const out = await runScript(
        s.uri,
        `
assert not h.can_fast_zero() and h.can_zero() and not h.can_fua() and not h.can_flush()
expect_err("EINVAL", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO))
expect_err("EINVAL", lambda: h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA))
expect_err("EINVAL", lambda: h.flush())
expect_err("EINVAL", lambda: h.trim(512, 0))
expect_err("EINVAL", lambda: h.cache(512, 0))
h.zero(4096, 0)
`,
      );
      expect(out.match(/^ok /gm)?.length).toBe(5);
    } finally {
      await s.close();
    }
  });

  it('fails a fast zero with ENOTSUP when the zero would not be fast', async () => {
    const slowZero = definePlugin({
      apiVersion: 2,
      name: 'slow-zero',
      getSize: () => 1 << 20,
      pread: (_h, buf) => void buf.fill(1),
      pwrite: () => {},
      // No zero callback: zeroes are written by the core, which is never fast.
    });
    const s = await serve({ plugin: slowZero });
    try {
      const out = await runScript(
        s.uri,
        `
assert h.can_fast_zero()
expect_err("ENOTSUP", lambda: h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO))
h.zero(4096, 0)
`,
      );
      expect(out).toContain('ok ENOTSUP');
    } finally {
      await s.close();
    }
  });

});
