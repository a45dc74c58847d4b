import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';

/**
 * The cache's temporary file: created in the cache directory and unlinked at once, so it is gone
 * when the descriptor closes or the process dies, however that happens. Cached blocks live in
 * numbered slots of one block each, not at their disk offsets, so that a cache with a maximum
 * size reuses the slots it freed and the file never grows past that size, without needing
 * fallocate(PUNCH_HOLE), which Node cannot call.
 */
export class SlotFile {
  private closed = false;
  /**
   * Pieces up to this size are read and written synchronously: the file is fresh and temporary,
   * so they nearly always hit the page cache, where a synchronous call costs one copy and a
   * thread-pool round trip costs several times more.
   */
  syncLimit = 64 * 1024;

  private constructor(
    readonly fd: number,
    readonly dir: string,
  ) {}

  static async create(dir: string): Promise<SlotFile> {
    const name = path.join(dir, `nbdx-cache-${process.pid}-${randomBytes(6).toString('hex')}`);
    const fd = await new Promise<number>((resolve, reject) =>
      fs.open(name, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o600, (err, fd) =>
        err ? reject(err) : resolve(fd),
      ),
    );
    try {
      await fs.promises.unlink(name);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
    return new SlotFile(fd, dir);
  }

  /** Fill `buf` from `position`; bytes past the end of the file read as zeroes. */
  read(buf: Uint8Array, position: number): Promise<void> | undefined {
    if (buf.length <= this.syncLimit) {
      try {
        for (let done = 0; done < buf.length; ) {
          const n = fs.readSync(this.fd, buf, done, buf.length - done, position + done);
          if (n === 0) {
            buf.fill(0, done);
            break;
          }
          done += n;
        }
        return undefined;
      } catch (err) {
        return Promise.reject(err);
      }
    }
    return new Promise((resolve, reject) => {
      const step = (done: number): void => {
        fs.read(this.fd, buf, done, buf.length - done, position + done, (err, n) => {
          if (err) return reject(err);
          if (n === 0) {
            buf.fill(0, done);
            return resolve();
          }
          if (done + n < buf.length) return step(done + n);
          resolve();
        });
      };
      step(0);
    });
  }

  /** Write all of `buf` at `position`. */
  write(buf: Uint8Array, position: number): Promise<void> | undefined {
    if (buf.length <= this.syncLimit) {
      try {
        for (let done = 0; done < buf.length; ) done += fs.writeSync(this.fd, buf, done, buf.length - done, position + done);
        return undefined;
      } catch (err) {
        return Promise.reject(err);
      }
    }
    return new Promise((resolve, reject) => {
      const step = (done: number): void => {
        fs.write(this.fd, buf, done, buf.length - done, position + done, (err, n) => {
          if (err) return reject(err);
          if (done + n < buf.length) return step(done + n);
          resolve();
        });
      };
      step(0);
    });
  }

  /** Bytes of disk the file occupies (st_blocks × 512). */
  allocatedBytes(): number {
    return fs.fstatSync(this.fd).blocks * 512;
  }

  close(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.closed = true;
    return new Promise((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(err) : resolve())));
  }
}
