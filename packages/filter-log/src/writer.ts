import * as fs from 'node:fs';

/** Above this many characters waiting, lines are written at once (bounded memory under a slow disk). */
const MAX_PENDING = 8 * 1024 * 1024;

/**
 * Appends lines to a file without blocking the event loop per line: lines gather in memory and
 * go out in one asynchronous write per event-loop turn (one write in flight at a time), so a
 * busy connection costs a string concatenation per line.
 *
 * Nothing is lost at the end: `close()` waits for the write in flight and writes the rest; if
 * the process exits without unloading the filter, an 'exit' hook writes what is left
 * synchronously. In a regular file every chunk is written at a position this writer keeps, so
 * that hook can safely write again the chunk that may still be in flight (the same bytes at the
 * same place). Pipes and terminals (`/dev/stderr`) are written in order without positions.
 */
export class LineWriter {
  private pending = '';
  private scheduled = false;
  /** The chunk being written asynchronously, where it goes, and how far it got. */
  private inflight: Buffer | null = null;
  private inflightPos = 0;
  private inflightDone = 0;
  private inflightEnded: Promise<void> = Promise.resolve();
  private endInflight: () => void = () => {};
  /** Where the next chunk goes in a regular file. */
  private pos: number;
  private readonly positional: boolean;
  private closed = false;
  private failed = false;
  private readonly onExit = (): void => this.flushSync();

  /**
   * @param fd open for writing (without O_APPEND when the file is regular: positions are ours)
   * @param startPos where writing starts in a regular file (its size when appending)
   * @param onError told once about a write error; later lines are dropped
   */
  constructor(
    private readonly fd: number,
    startPos: number,
    private readonly onError: (err: Error) => void = () => {},
  ) {
    this.positional = fs.fstatSync(fd).isFile();
    this.pos = startPos;
    process.on('exit', this.onExit);
  }

  /** Open `file` as nbdkit does: truncated, or appended to with `append`. */
  static open(file: string, append: boolean, onError?: (err: Error) => void): LineWriter {
    const fd = fs.openSync(file, append ? fs.constants.O_WRONLY | fs.constants.O_CREAT : 'w', 0o666);
    try {
      return new LineWriter(fd, append ? fs.fstatSync(fd).size : 0, onError);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /** Add text (whole lines, newline included). */
  write(text: string): void {
    if (this.closed || this.failed) return;
    this.pending += text;
    if (this.pending.length > MAX_PENDING && this.positional) {
      // The disk is far behind: write this part now rather than hold more.
      this.writeSyncAt(Buffer.from(this.pending));
      this.pending = '';
      return;
    }
    if (!this.scheduled && !this.inflight) {
      this.scheduled = true;
      setImmediate(this.kick);
    }
  }

  private readonly kick = (): void => {
    this.scheduled = false;
    if (this.inflight || !this.pending || this.failed) return;
    const buf = Buffer.from(this.pending);
    this.pending = '';
    this.inflight = buf;
    this.inflightPos = this.pos;
    this.inflightDone = 0;
    if (this.positional) this.pos += buf.length;
    this.inflightEnded = new Promise((resolve) => (this.endInflight = resolve));
    this.continueInflight();
  };

  private continueInflight(): void {
    const buf = this.inflight!;
    const position = this.positional ? this.inflightPos + this.inflightDone : null;
    fs.write(this.fd, buf, this.inflightDone, buf.length - this.inflightDone, position, (err, n) => {
      if (this.inflight !== buf) return; // flushSync took over
      if (err) {
        this.fail(err);
      } else {
        this.inflightDone += n;
        if (this.inflightDone < buf.length) return this.continueInflight();
      }
      this.inflight = null;
      this.endInflight();
      if (this.pending && !this.closed) this.kick();
    });
  }

  private fail(err: Error): void {
    if (this.failed) return;
    this.failed = true;
    this.pending = '';
    this.onError(err);
  }

  private writeSyncAt(buf: Buffer): void {
    let done = 0;
    try {
      while (done < buf.length) {
        done += fs.writeSync(this.fd, buf, done, buf.length - done, this.positional ? this.pos + done : null);
      }
    } catch (err) {
      this.fail(err as Error);
    }
    if (this.positional) this.pos += buf.length;
  }

  /** Write everything now, synchronously (the process is exiting). */
  flushSync(): void {
    if (this.failed) return;
    if (this.inflight && this.positional) {
      // The asynchronous write may or may not have happened: writing the same bytes at the
      // same place again is harmless either way.
      const buf = this.inflight;
      const at = this.pos;
      this.pos = this.inflightPos;
      this.inflight = null;
      this.endInflight();
      this.writeSyncAt(buf);
      this.pos = at;
    }
    if (this.pending) {
      const buf = Buffer.from(this.pending);
      this.pending = '';
      this.writeSyncAt(buf);
    }
  }

  /** Wait for the write in flight, write the rest, close the file. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.inflightEnded;
    this.flushSync();
    process.removeListener('exit', this.onExit);
    fs.closeSync(this.fd);
  }
}
