import type { ExtentSource, MaybePromise, ReadResult } from '../common.js';
import type { PluginCommon } from './shared.js';

/**
 * Plugin API version 2 (current). `pread` fills the caller's buffer (and may instead report
 * parts of it as zero, see ZeroSpan); every data call takes flags (FLAG_FUA, FLAG_MAY_TRIM,
 * FLAG_FAST_ZERO, FLAG_REQ_ONE).
 *
 * A `zero` that cannot honour the request throws NbdError(ENOTSUP): without FLAG_FAST_ZERO the
 * core then writes zeroes itself; with it the client gets ENOTSUP.
 *
 * Buffers passed to `pread` and `pwrite` belong to the core and are reused once the call has
 * returned (or its promise settled): copy what must outlive the call.
 */
export interface PluginV2<H = any> extends PluginCommon<H> {
  apiVersion: 2;
  pread(h: H, buf: Uint8Array, offset: number, flags: number): MaybePromise<ReadResult>;
  pwrite?(h: H, buf: Uint8Array, offset: number, flags: number): MaybePromise<void>;
  flush?(h: H, flags: number): MaybePromise<void>;
  trim?(h: H, count: number, offset: number, flags: number): MaybePromise<void>;
  zero?(h: H, count: number, offset: number, flags: number): MaybePromise<void>;
  extents?(h: H, count: number, offset: number, flags: number): MaybePromise<ExtentSource>;
  cache?(h: H, count: number, offset: number, flags: number): MaybePromise<void>;

  /**
   * Optional, for plugins that hold the disk in their own memory at fixed places (a flat RAM
   * disk): the `count` bytes at `offset` as a view of that memory, which the core sends as the
   * READ reply without copying them (the kernel copies straight from it). The view must stay
   * valid and in place while the reply is queued: memory that may be freed or reused for other
   * offsets (a sparse allocator's chunks) is held back until `releaseView` says the core is done
   * with it. Return undefined to be asked through `pread` instead. Not used over TLS, and only
   * through filters that pass views on (FilterV2.readView: offset, partition, delay without a
   * delay); any other filter above the plugin turns them off.
   */
  readView?(h: H, count: number, offset: number): Uint8Array | undefined;
  /**
   * Optional, likewise: where a WRITE's `count` bytes at `offset` belong. The core reads the
   * payload straight into this view and then calls `pwrite` with it (recognise your own memory
   * and skip the copy). The bytes land before the write is acknowledged, and a client that
   * disconnects in the middle of a payload leaves part of it written: only for plugins where
   * that is acceptable (a RAM disk, which a crash loses anyway). Only through filters that pass
   * views on (FilterV2.writeView), and only for requests that passed every check.
   */
  writeView?(h: H, count: number, offset: number): Uint8Array | undefined;
  /**
   * Optional: called once for every view readView or writeView handed out, when the core is
   * done with it: a READ reply's bytes were taken by the kernel (or dropped with the
   * connection); a WRITE's pwrite returned (`completed` true) or the client went away in the
   * middle of its payload (`completed` false: the view holds a part of it at most). Until then
   * the view's memory must stay where it is, for these offsets; a plugin whose memory moves
   * (chunks freed by trim and reused elsewhere) holds such memory back until this call.
   */
  releaseView?(h: H, view: Uint8Array, completed: boolean): void;
}
