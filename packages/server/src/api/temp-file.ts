import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';

/**
 * An anonymous temporary file, for layers that keep data on local disk (cow's overlay, cache's
 * blocks): created in `dir` and unlinked at once, so it disappears when the descriptor is closed
 * or the process dies, whatever the reason. Written at offsets, it stays sparse: untouched ranges
 * take no disk space and read as zeroes.
 */
export class TempFile {
  private closed = false;
  /**
   * Reads and writes of at most this many bytes are done synchronously (0: none, the default):
   * a file that is recent and temporary is nearly always in the page cache, where a synchronous
   * pread costs a copy and a thread-pool round trip costs many times more. The price is that a
   * slow disk stalls the event loop for that long; the cow filter lets the user choose (cow-io).
   */
  syncLimit = 0;

  private constructor(readonly fd: number) {}

  /** A new file in `dir`, named `PREFIX-PID-RANDOM` for the moment it exists. */
  static async create(dir: string, prefix = 'nbdx-'): Promise<TempFile> {
    const name = path.join(dir, `${prefix}${process.pid}-${randomBytes(6).toString('hex')}`);
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
    return new TempFile(fd);
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
        // Always fail as a promise, never by throwing: callers may have other work in flight.
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

  /** Bytes of disk the file occupies (st_blocks × 512), for tests and debug output. */
  allocatedBytes(): number {
    return fs.fstatSync(this.fd).blocks * 512;
  }

  close(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.closed = true;
    return new Promise((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(err) : resolve())));
  }
}
