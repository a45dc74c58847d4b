import * as fs from 'node:fs';
import { stat, statfs } from 'node:fs/promises';
import {
  EXTENT_HOLE,
  EXTENT_ZERO,
  Errno,
  FLAG_FAST_ZERO,
  FLAG_FUA,
  FLAG_MAY_TRIM,
  NbdError,
  debug,
  type Extent,
} from '@nbdx/server/api';
import type { NativeOps } from './native.js';
import { blockDeviceSizeFromSysfs, isRotationalDevice } from './sysfs.js';

export type Fadvise = 'normal' | 'random' | 'sequential';

export interface OpenOptions {
  /** cache=none: drop pages from the page cache after each read and write. */
  cacheNone: boolean;
  fadvise: Fadvise;
  native: NativeOps | null;
  /**
   * mmap=auto: where memory-backed files are mapped read-only, to send READ replies from the
   * mapping (readView); null for mmap=off.
   */
  mappings: Mappings | null;
  /**
   * How many handles of this plugin are open in the whole process, every worker thread included
   * (a counter in shared memory); decides where big writes are copied (see SYNC_POOL_FROM).
   * Optional: without it, big writes are copied on the event loop.
   */
  clients?: Int32Array;
}

/**
 * Largest request copied on the event loop thread rather than on the libuv thread pool: on tmpfs
 * always, elsewhere when preadv2(RWF_NOWAIT) finds the data in the page cache. The thread pool
 * round trip costs more CPU than copying this much; a bigger copy would stall other requests.
 */
export const SYNC_LIMIT = 1024 * 1024;

/**
 * Writes are copied on the event loop up to SYNC_LIMIT too (memory-backed files only), while more
 * than one client is connected. Handing big ones to the thread pool overlaps the copy with
 * receiving the next payload, but the round trip (a futex wake of a pool thread, its wake-up of
 * the loop, context switches, pool threads contending for the inode lock) costs more CPU than
 * the copy: nbdcopy into a tmpfs file took 0.82-0.84 server CPU-seconds per GiB that way and
 * 0.63-0.69 copied here, and its time went from 0.66-0.73x nbdkit's to 0.91-1.00x. With one
 * client alone (qemu-img convert, a single fio job at QD16) every other core is idle and the
 * overlap wins instead: 256 KiB writes at QD16 ran at 2418-2538 MiB/s through the pool and
 * 1925-1936 copied here. So writes above SYNC_POOL_FROM go to the pool while a single client is
 * connected to the whole server.
 */
export const SYNC_POOL_FROM = 64 * 1024;

const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;

async function isMemoryBacked(path: string): Promise<boolean> {
  try {
    const { type } = await statfs(path);
    return type === TMPFS_MAGIC || type === RAMFS_MAGIC;
  } catch {
    return false;
  }
}

/**
 * A mapping outlives the last handle using it by this long, so that a client reconnecting (nbdcopy
 * opens new connections for every copy) finds the file's pages mapped already: filling a new
 * mapping's page tables costs page faults.
 */
export const MAP_LINGER_MS = 5_000;

/** One file's mapping, shared by the handles of one plugin instance that serve it. */
interface SharedMap {
  buffer: ArrayBuffer;
  users: number;
  timer: NodeJS.Timeout | null;
}

/**
 * The mappings of one plugin instance (each worker thread loads its own), by device, inode and
 * size. Each instance holds its own ArrayBuffer, but the helper gives them all the same mapping
 * (see native/file_ops.c), so the page tables are filled once per process.
 */
export class Mappings {
  private readonly maps = new Map<string, SharedMap>();

  constructor(private readonly native: NativeOps) {}

  acquire(key: string, make: () => ArrayBuffer | null): ArrayBuffer | null {
    let m = this.maps.get(key);
    if (!m) {
      const buffer = make();
      if (!buffer) return null;
      m = { buffer, users: 0, timer: null };
      this.maps.set(key, m);
    }
    if (m.timer) clearTimeout(m.timer);
    m.timer = null;
    m.users++;
    return m.buffer;
  }

  release(key: string): void {
    const m = this.maps.get(key);
    if (!m || --m.users > 0) return;
    m.timer = setTimeout(() => {
      this.maps.delete(key);
      // Let the file go now (a deleted image's memory is freed), not whenever the collector runs.
      this.native.detach?.(m.buffer);
    }, MAP_LINGER_MS);
    m.timer.unref();
  }

  /**
   * Let every mapping go now, lingering or not (the plugin's unload): a server stopped inside a
   * longer-lived process must not keep its files mapped, which would keep a deleted file's memory,
   * or a file system from being unmounted.
   */
  releaseAll(): void {
    for (const m of this.maps.values()) {
      if (m.timer) clearTimeout(m.timer);
      this.native.detach?.(m.buffer);
    }
    this.maps.clear();
  }

  /** How many files are mapped (tests). */
  get size(): number {
    return this.maps.size;
  }
}

/** At most this many extents per block-status reply; the rest of the range is then "data". */
export const MAX_EXTENTS = 32768;

const FALLBACK_ERRORS = new Set(['EOPNOTSUPP', 'ENOTSUP', 'ENOSYS']);
/** Opening read-write failed for a reason that opening read-only might not share. */
const NOT_WRITABLE_ERRORS = new Set(['EACCES', 'EPERM', 'EROFS', 'ETXTBSY']);

function codeOf(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

function isUnsupported(err: unknown): boolean {
  const code = codeOf(err);
  return code !== undefined && FALLBACK_ERRORS.has(code);
}

function openFd(path: string, flags: number): Promise<number> {
  return new Promise((resolve, reject) => fs.open(path, flags, (err, fd) => (err ? reject(err) : resolve(fd))));
}

function fstatFd(fd: number): Promise<fs.Stats> {
  return new Promise((resolve, reject) => fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st))));
}

// Callback forms of pread/pwrite: measurably cheaper per request than FileHandle promises.
function readAt(fd: number, buf: Uint8Array, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.read(fd, buf, at, length, position, (err, n) => (err ? reject(err) : resolve(n))),
  );
}

function writeAt(fd: number, buf: Uint8Array, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.write(fd, buf, at, length, position, (err, n) => (err ? reject(err) : resolve(n))),
  );
}

/**
 * One open file or block device: the handle of one connection. Every data call is positional
 * I/O on the descriptor, so any number of them may be in flight at once.
 */
export class OpenFile {
  /** What the kernel said no to, learnt once per handle so later calls go straight to the fallback. */
  private canPunch: boolean;
  private canZeroRange: boolean;
  private canAllocate: boolean;
  private canDiscard: boolean;
  private canSeekData: boolean;
  private canDsync: boolean;
  private canNowait: boolean;
  /** Requests up to this size are copied synchronously (memory-backed file systems only). */
  private readonly syncMax: number;
  /**
   * The whole file mapped read-only (mmap=auto on tmpfs/ramfs with the helper), or null. READ
   * replies are sent from it, so the kernel's copy from the file's pages into the socket is the
   * only one (pread makes two: file to buffer, buffer to socket), and no reply buffer is used.
   */
  private map: ArrayBuffer | null = null;
  private mapKey = '';

  private constructor(
    readonly path: string,
    readonly fd: number,
    readonly readonly: boolean,
    readonly isBlockDevice: boolean,
    readonly size: number,
    /** Logical sector size of a block device (alignment of discard/zero ioctls); 1 for files. */
    readonly sectorSize: number,
    private readonly dev: number,
    /** tmpfs or ramfs: reads and writes are memory copies that never wait for a disk. */
    readonly memoryBacked: boolean,
    private readonly options: OpenOptions,
  ) {
    const f = options.native?.features;
    this.canPunch = !!f?.fallocate;
    this.canZeroRange = !!f?.fallocate && !isBlockDevice;
    this.canAllocate = !!f?.fallocate && !isBlockDevice;
    this.canDiscard = !!f?.blockIoctls && isBlockDevice;
    this.canSeekData = !!f?.seekData && !isBlockDevice;
    this.canDsync = !!f?.pwriteDsync;
    this.canNowait = !!options.native?.preadNowait && !isBlockDevice && !memoryBacked;
    this.syncMax = memoryBacked ? SYNC_LIMIT : -1;
  }

  static async open(path: string, readonly: boolean, options: OpenOptions): Promise<OpenFile> {
    const st0 = await stat(path);
    if (!st0.isFile() && !st0.isBlockDevice()) {
      throw new NbdError(Errno.EINVAL, `${path}: not a regular file or block device`);
    }
    let fd: number | undefined;
    let ro = readonly;
    if (!readonly) {
      try {
        fd = await openFd(path, fs.constants.O_RDWR);
      } catch (err) {
        if (!NOT_WRITABLE_ERRORS.has(codeOf(err) ?? '')) throw err;
        debug('file', `${path}: cannot open for writing (${(err as Error).message}); serving it read-only`);
        ro = true;
      }
    }
    fd ??= await openFd(path, fs.constants.O_RDONLY);
    try {
      const st = await fstatFd(fd);
      const { native } = options;
      let size: number;
      let sectorSize = 1;
      if (st.isBlockDevice()) {
        const fromSysfs = native ? undefined : await blockDeviceSizeFromSysfs(st.rdev);
        const s = native ? native.blockDeviceSize(fd) : fromSysfs;
        if (s === undefined) {
          throw new NbdError(Errno.EIO, `${path}: cannot find the size of this block device without the addon`);
        }
        size = s;
        sectorSize = native ? native.sectorSize(fd) : 512;
      } else if (st.isFile()) {
        size = st.size;
      } else {
        throw new NbdError(Errno.EINVAL, `${path}: not a regular file or block device`);
      }
      const memoryBacked = st.isFile() && (await isMemoryBacked(path));
      const dev = st.isBlockDevice() ? st.rdev : st.dev;
      const file = new OpenFile(path, fd, ro, st.isBlockDevice(), size, sectorSize, dev, memoryBacked, options);
      await file.applyFadvise();
      file.mapIfUseful();
      if (options.clients) Atomics.add(options.clients, 0, 1);
      return file;
    } catch (err) {
      fs.close(fd, () => {});
      throw err;
    }
  }

  private async applyFadvise(): Promise<void> {
    const { fadvise, native } = this.options;
    if (fadvise === 'normal') return;
    const advice =
      fadvise === 'random' ? native?.constants.POSIX_FADV_RANDOM : native?.constants.POSIX_FADV_SEQUENTIAL;
    if (!native?.features.fadvise || advice === undefined) {
      debug('file', `fadvise=${fadvise} ignored: posix_fadvise is not available (no addon)`);
      return;
    }
    await native.fadvise(this.fd, 0, 0, advice);
  }

  /**
   * Map the file when that saves a copy: memory-backed (reading through the mapping reads the
   * pages pread would copy from, never waits for a disk), a regular file, not cache=none.
   * Writes keep going through pwrite: see SYNC_POOL_FROM and docs/performance.md (third pass)
   * for why receiving payloads into a mapping cost more than it saved.
   */
  private mapIfUseful(): void {
    const native = this.options.native;
    const mappings = this.options.mappings;
    if (!mappings || !this.memoryBacked || this.isBlockDevice || this.options.cacheNone) return;
    if (!native?.mapShared || !native.resident || this.size === 0) return;
    // Exact numbers (bigint): two files must never share a key.
    const st = fs.fstatSync(this.fd, { bigint: true });
    const key = `${st.dev}:${st.ino}:${this.size}`;
    try {
      this.map = mappings.acquire(key, () => native.mapShared!(this.fd, this.size, key));
    } catch (err) {
      debug('file', `${this.path}: not mapped (${(err as Error).message}); pread/pwrite only`);
      return;
    }
    if (this.map) this.mapKey = key;
    else debug('file', `${this.path}: the kernel refused to map it; pread/pwrite only`);
  }

  get mapped(): boolean {
    return this.map !== null;
  }

  /**
   * The bytes of a READ as a view of the mapping, when every page of them is in memory already:
   * touching a tmpfs hole through a shared mapping would allocate a page for it, where pread
   * reads zeroes and allocates nothing. undefined sends the core to pread.
   */
  readView(count: number, offset: number): Uint8Array | undefined {
    const map = this.map;
    if (map === null || !this.options.native!.resident!(map, offset, count)) return undefined;
    return new Uint8Array(map, offset, count);
  }

  close(): Promise<void> {
    if (this.options.clients) Atomics.sub(this.options.clients, 0, 1);
    if (this.map) {
      // Replies still queued may hold views: the mapping stays a while (MAP_LINGER_MS).
      this.map = null;
      this.options.mappings!.release(this.mapKey);
    }
    return new Promise((resolve, reject) => fs.close(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  // ---- capabilities ---------------------------------------------------------------------------
  get canExtents(): boolean {
    return this.canSeekData;
  }
  get canTrim(): boolean {
    return this.isBlockDevice ? this.canDiscard : this.canPunch;
  }
  get canNativeCache(): boolean {
    return !!this.options.native?.features.fadvise;
  }
  isRotational(): Promise<boolean> {
    return isRotationalDevice(this.dev);
  }

  // ---- data -----------------------------------------------------------------------------------
  /**
   * Small requests (and all on tmpfs) are done right here and return nothing, so the core can
   * answer them without a promise turn; the rest resolve on the thread pool.
   */
  pread(buf: Uint8Array, offset: number): void | Promise<void> {
    if (buf.length > this.syncMax) return this.preadLater(buf, offset);
    this.readSync(buf, offset);
    if (this.options.cacheNone) return this.evict(offset, buf.length, false);
  }

  private readSync(buf: Uint8Array, offset: number): void {
    for (let done = 0; done < buf.length; ) {
      const n = fs.readSync(this.fd, buf, done, buf.length - done, offset + done);
      if (n === 0) throw this.shortRead(offset + done);
      done += n;
    }
  }

  private async preadLater(buf: Uint8Array, offset: number): Promise<void> {
    const length = buf.length;
    let done = 0;
    if (this.canNowait && length <= SYNC_LIMIT) {
      const n = this.options.native!.preadNowait(this.fd, buf, offset);
      if (n > 0) done = n;
      else if (n === -2) this.canNowait = false;
    }
    while (done < length) {
      const n = await readAt(this.fd, buf, done, length - done, offset + done);
      if (n === 0) throw this.shortRead(offset + done);
      done += n;
    }
    if (this.options.cacheNone) await this.evict(offset, length, false);
  }

  private shortRead(at: number): NbdError {
    return new NbdError(
      Errno.EIO,
      `read at ${at}: ${this.path} ends before the export's size ${this.size} (truncated while served?)`,
    );
  }

  /** As pread: a small plain write (no FUA, no cache=none) is done here and returns nothing. */
  pwrite(buf: Uint8Array, offset: number, flags: number): void | Promise<void> {
    if ((flags & FLAG_FUA) !== 0 || this.options.cacheNone || !this.writesHere(buf.length)) {
      return this.pwriteLater(buf, offset, flags);
    }
    this.writeSync(buf, offset);
  }

  /** Whether a write this long is done on the event loop rather than on the thread pool. */
  private writesHere(length: number): boolean {
    if (length > this.syncMax) return false;
    const clients = this.options.clients;
    return length <= SYNC_POOL_FROM || clients === undefined || Atomics.load(clients, 0) > 1;
  }

  private writeSync(buf: Uint8Array, offset: number): void {
    for (let done = 0; done < buf.length; ) {
      const n = fs.writeSync(this.fd, buf, done, buf.length - done, offset + done);
      if (n <= 0) throw new NbdError(Errno.EIO, `write at ${offset + done}: the kernel wrote nothing`);
      done += n;
    }
  }

  private async pwriteLater(buf: Uint8Array, offset: number, flags: number): Promise<void> {
    const fua = (flags & FLAG_FUA) !== 0;
    if (fua && this.canDsync) {
      try {
        await this.options.native!.pwriteDsync(this.fd, buf, offset);
        if (this.options.cacheNone) await this.evict(offset, buf.length, true);
        return;
      } catch (err) {
        if (!isUnsupported(err)) throw err;
        this.canDsync = false;
        debug('file', `pwritev2(RWF_DSYNC) not supported (${(err as Error).message}); FUA is write + fdatasync`);
      }
    }
    await this.writeAll(buf, offset);
    if (fua) await this.flush();
    if (this.options.cacheNone) await this.evict(offset, buf.length, true);
  }

  private async writeAll(buf: Uint8Array, offset: number): Promise<void> {
    if (this.writesHere(buf.length)) return this.writeSync(buf, offset);
    for (let done = 0; done < buf.length; ) {
      const n = await writeAt(this.fd, buf, done, buf.length - done, offset + done);
      if (n <= 0) throw new NbdError(Errno.EIO, `write at ${offset + done}: the kernel wrote nothing`);
      done += n;
    }
  }

  flush(): Promise<void> {
    return new Promise((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  /** Trim is advisory: where the kernel cannot deallocate, it quietly does nothing. */
  async trim(count: number, offset: number, flags: number): Promise<void> {
    const native = this.options.native;
    if (native && this.isBlockDevice && this.canDiscard) {
      const [start, end] = this.alignInward(offset, offset + count);
      if (end > start) {
        try {
          await native.discard(this.fd, start, end - start);
        } catch (err) {
          if (!isUnsupported(err)) throw err;
          this.canDiscard = false;
          debug('file', `${this.path}: BLKDISCARD not supported; trim does nothing`);
        }
      }
    } else if (native && !this.isBlockDevice && this.canPunch) {
      try {
        await this.punch(count, offset);
      } catch (err) {
        if (!isUnsupported(err)) throw err;
        this.canPunch = false;
        debug('file', `${this.path}: punching holes not supported here; trim does nothing`);
      }
    }
    if (flags & FLAG_FUA) await this.flush();
  }

  private punch(count: number, offset: number): Promise<void> {
    const c = this.options.native!.constants;
    return this.options.native!.fallocate(this.fd, offset, count, c.FALLOC_FL_PUNCH_HOLE | c.FALLOC_FL_KEEP_SIZE);
  }

  /**
   * Zero without writing zeroes: a punched hole when MAY_TRIM allows it, else ZERO_RANGE, else a
   * hole punched and allocated again. When none of these works, ENOTSUP lets the core write the
   * zeroes (or answer a FAST_ZERO request with ENOTSUP at once).
   */
  async zero(count: number, offset: number, flags: number): Promise<void> {
    const native = this.options.native;
    if (!native) throw new NbdError(Errno.ENOTSUP, 'zero: no addon, so no fallocate');
    const done = this.isBlockDevice
      ? await this.zeroBlockDevice(native, count, offset, flags)
      : await this.zeroFile(native, count, offset, flags);
    if (!done) throw new NbdError(Errno.ENOTSUP, 'zero: no fast way to zero this range here');
    if (flags & FLAG_FUA) await this.flush();
  }

  /** Runs one fallocate-based method; false (and never again) when the file system lacks it. */
  private async attempt(run: () => Promise<void>, what: string, disable: () => void): Promise<boolean> {
    try {
      await run();
      return true;
    } catch (err) {
      if (!isUnsupported(err)) throw err;
      disable();
      debug('file', `${this.path}: ${what} not supported (${(err as Error).message})`);
      return false;
    }
  }

  private async zeroFile(native: NativeOps, count: number, offset: number, flags: number): Promise<boolean> {
    const c = native.constants;
    if (flags & FLAG_MAY_TRIM && this.canPunch) {
      if (await this.attempt(() => this.punch(count, offset), 'punching holes', () => (this.canPunch = false))) {
        return true;
      }
    }
    if (this.canZeroRange && c.FALLOC_FL_ZERO_RANGE) {
      const zr = () => native.fallocate(this.fd, offset, count, c.FALLOC_FL_ZERO_RANGE);
      if (await this.attempt(zr, 'FALLOC_FL_ZERO_RANGE', () => (this.canZeroRange = false))) return true;
    }
    if (this.canPunch && this.canAllocate) {
      // tmpfs has no ZERO_RANGE: a hole allocated again reads as zeroes and stays allocated.
      if (!(await this.attempt(() => this.punch(count, offset), 'punching holes', () => (this.canPunch = false)))) {
        return false;
      }
      const alloc = () => native.fallocate(this.fd, offset, count, c.FALLOC_FL_KEEP_SIZE);
      // If allocation is unsupported the range is zero already but a hole: let the core write it.
      return this.attempt(alloc, 'fallocate (allocate)', () => (this.canAllocate = false));
    }
    return false;
  }

  private async zeroBlockDevice(native: NativeOps, count: number, offset: number, flags: number): Promise<boolean> {
    const [start, end] = this.alignInward(offset, offset + count);
    const mayTrim = (flags & FLAG_MAY_TRIM) !== 0;
    const fast = (flags & FLAG_FAST_ZERO) !== 0;
    let zeroMiddle: (() => Promise<void>) | undefined;
    if (end <= start) zeroMiddle = async () => {};
    else if (mayTrim && this.canPunch) {
      // On a block device the kernel punches only where the device zeroes without writing.
      zeroMiddle = () => this.punch(end - start, start);
    }
    let ok = false;
    if (zeroMiddle) {
      ok = await this.attempt(zeroMiddle, 'punching holes (fast device zeroing)', () => (this.canPunch = false));
    }
    // BLKZEROOUT may end up writing zeroes in the kernel: good, but never "fast".
    if (!ok && !fast && this.options.native?.features.blockIoctls) {
      ok = await this.attempt(
        () => native.zeroout(this.fd, start, end - start),
        'BLKZEROOUT',
        () => {},
      );
    }
    if (!ok) return false;
    // The unaligned edges, at most a sector each side, are written.
    if (start > offset || end < offset + count) {
      if (end <= start) await this.writeAll(Buffer.alloc(count), offset);
      else {
        if (start > offset) await this.writeAll(Buffer.alloc(start - offset), offset);
        if (end < offset + count) await this.writeAll(Buffer.alloc(offset + count - end), end);
      }
    }
    return true;
  }

  private alignInward(start: number, end: number): [number, number] {
    const s = this.sectorSize;
    const a = Math.ceil(start / s) * s;
    const b = Math.floor(end / s) * s;
    return b > a ? [a, b] : [a, a];
  }

  async extents(count: number, offset: number, reqOne: boolean): Promise<Extent[]> {
    const native = this.options.native;
    if (!native || !this.canSeekData) return [{ offset, length: count, type: 0 }];
    let raw: Float64Array;
    try {
      raw = await native.map(this.fd, offset, count, reqOne ? 2 : MAX_EXTENTS);
    } catch (err) {
      if (!isUnsupported(err) && codeOf(err) !== 'EINVAL') throw err;
      this.canSeekData = false;
      debug('file', `${this.path}: SEEK_DATA/SEEK_HOLE not usable (${(err as Error).message}); all data`);
      return [{ offset, length: count, type: 0 }];
    }
    const out: Extent[] = [];
    for (let i = 0; i + 2 < raw.length; i += 3) {
      out.push({ offset: raw[i]!, length: raw[i + 1]!, type: raw[i + 2]! & (EXTENT_HOLE | EXTENT_ZERO) });
    }
    return out;
  }

  async cache(count: number, offset: number): Promise<void> {
    const native = this.options.native!;
    await native.fadvise(this.fd, offset, count, native.constants.POSIX_FADV_WILLNEED!);
  }

  private async evict(offset: number, length: number, wasWrite: boolean): Promise<void> {
    const native = this.options.native;
    if (!native) return;
    await native.evict(this.fd, offset, length, wasWrite ? 1 : 0);
  }
}
