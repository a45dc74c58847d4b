import type {
  BlockSize,
  CacheMode,
  Extent,
  ExportEntry,
  FuaMode,
  ReadResult,
} from '../common.js';

/**
 * The layer below a filter, as one open context: every capability and data method, already
 * bound to the context, always returning promises. Capabilities are computed once per context
 * and cached. Calls made through `Next` get the core's rules (bounds checks, FUA/zero/cache
 * emulation, extent normalisation) just like client requests do.
 */
export interface Next {
  readonly exportName: string;
  readonly readonly: boolean;
  /**
   * Aborted when the connection this context serves goes away before its requests are done: the
   * client disconnected without NBD_CMD_DISC, or the server is shutting down. Waits (timers,
   * polling) should then end early and fail with `signal.reason` (an NbdError ESHUTDOWN). Never
   * aborted for contexts a filter opened itself with `openContext`. Optional in this interface
   * only so that hand-made `Next` objects (tests, wrappers) need not provide one.
   */
  readonly signal?: AbortSignal;
  getSize(): Promise<number>;
  blockSize(): Promise<BlockSize | undefined>;
  exportDescription(): Promise<string | undefined>;
  canWrite(): Promise<boolean>;
  canFlush(): Promise<boolean>;
  isRotational(): Promise<boolean>;
  canTrim(): Promise<boolean>;
  canZero(): Promise<boolean>;
  canFastZero(): Promise<boolean>;
  canExtents(): Promise<boolean>;
  canFua(): Promise<FuaMode>;
  canMultiConn(): Promise<boolean>;
  canCache(): Promise<CacheMode>;

  pread(buf: Uint8Array, offset: number, flags?: number): Promise<ReadResult>;
  pwrite(buf: Uint8Array, offset: number, flags?: number): Promise<void>;
  flush(flags?: number): Promise<void>;
  trim(count: number, offset: number, flags?: number): Promise<void>;
  zero(count: number, offset: number, flags?: number): Promise<void>;
  /**
   * Sorted, merged extents starting exactly at `offset`, contiguous, clipped to the request.
   * They may stop before `offset + count` (the layer below answered for less); never empty.
   */
  extents(count: number, offset: number, flags?: number): Promise<Extent[]>;
  cache(count: number, offset: number, flags?: number): Promise<void>;
  /**
   * Replace the connection's context below this filter by a fresh one, opened with the same
   * export name and TLS state (and the same read-only mode unless `options.readonly` says
   * otherwise), and return it. The whole chain below is opened again, then the old context is
   * closed; from then on the filter's callbacks receive the new context as `next`. This is how
   * the retry filter recovers from a broken plugin (nbdkit's context_open + context_set_next).
   *
   * Calling it on a context that was already replaced returns the context that replaced it, and
   * concurrent calls share one reopen, so requests that failed together reopen once. If opening
   * fails, the old context stays in place and the error is thrown; if the new context has a
   * different size, it is closed and EIO is thrown (the size was announced to the client).
   *
   * Only the per-connection context the core opened below a filter can be reopened: contexts
   * from `openContext` or passed to `use` throw ENOTSUP. Optional here only so that hand-made
   * `Next` objects need not provide it.
   */
  reopen?(options?: ReopenOptions): Promise<Next>;
  /**
   * Synchronous, for filters that pass views through (FilterV2.readView / writeView): the bytes
   * as a view of the plugin's own memory, when the layers below offer one, else undefined.
   * Optional here only so that hand-made `Next` objects need not provide them.
   */
  readView?(count: number, offset: number): Uint8Array | undefined;
  writeView?(count: number, offset: number): Uint8Array | undefined;
  /** Give back a view got through readView or writeView (the core does this for the views it uses). */
  releaseView?(view: Uint8Array, completed: boolean): void;
}

export interface ReopenOptions {
  /** Open the new context read-only (or writable) instead of as the old one was. */
  readonly?: boolean;
}

/** A context a filter opened itself (see LayerBelow.openContext); close it when done. */
export interface OwnedContext extends Next {
  close(): Promise<void>;
}

export interface OpenContextOptions {
  readonly?: boolean;
  exportName?: string;
  isTls?: boolean;
}

/**
 * The layer below a filter outside of any one connection: listing exports, and opening contexts
 * that live as long as the filter wants (the shared filter opens one for the whole server).
 */
export interface LayerBelow {
  listExports(readonly: boolean, isTls: boolean): Promise<ExportEntry[]>;
  defaultExport(readonly: boolean, isTls: boolean): Promise<string>;
  openContext(options?: OpenContextOptions): Promise<OwnedContext>;
}

/**
 * Given to a filter's `open`. Call `open()` to open the per-connection context below (with other
 * arguments if the filter wants: a read-only overlay opens below read-only), or `use(ctx)` to
 * serve this connection from a context the filter opened itself, in which case the core opens
 * nothing below for this connection. If the filter does neither, the core opens below with the
 * connection's own arguments.
 */
export interface NextOpener extends LayerBelow {
  /** The connection's signal (see Next.signal), for waits inside `open`. */
  readonly signal?: AbortSignal;
  open(readonly?: boolean, exportName?: string): Promise<void>;
  use(context: Next): void;
}
