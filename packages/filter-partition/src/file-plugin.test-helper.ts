/**
 * A minimal file-backed plugin for the tests (so they do not depend on @nbdx/plugin-file):
 * `file=PATH`, optional `min-block=N` to advertise a minimum block size.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { Errno, NbdError, definePlugin } from '@nbdx/server/api';

export function createTestFilePlugin() {
  let path: string | undefined;
  let minBlock: number | undefined;
  return definePlugin<{ fh: FileHandle; size: number }>({
    apiVersion: 2,
    name: 'testfile',
    config(key, value) {
      if (key === 'file') path = value;
      else if (key === 'min-block') minBlock = Number(value);
      else throw new NbdError(Errno.EINVAL, `unknown parameter '${key}'`);
    },
    async open(readonly) {
      const fh = await open(path!, readonly ? 'r' : 'r+');
      return { fh, size: (await fh.stat()).size };
    },
    async close(h) {
      await h.fh.close();
    },
    getSize: (h) => h.size,
    blockSize: () => (minBlock ? { minimum: minBlock, preferred: Math.max(minBlock, 4096), maximum: 32 * 1024 * 1024 } : undefined),
    canWrite: () => true,
    async pread(h, buf, offset) {
      let done = 0;
      while (done < buf.length) {
        const { bytesRead } = await h.fh.read(buf, done, buf.length - done, offset + done);
        if (bytesRead === 0) throw new NbdError(Errno.EIO, 'short read');
        done += bytesRead;
      }
    },
    async pwrite(h, buf, offset) {
      await h.fh.write(buf, 0, buf.length, offset);
    },
  });
}
