import type { ExportEntry, MaybePromise, ThreadModel } from '../common.js';
import type { LayerBelow, Next, NextOpener } from './next.js';

export type ConfigNext = (key: string, value: string) => Promise<void>;

/** Callbacks that are the same in every filter API version. */
export interface FilterCommon<H> {
  /** Set by defineFilter(); checked by the loader when present. */
  kind?: 'filter';
  name: string;
  version?: string;
  longname?: string;
  description?: string;
  configHelp?: string;
  threadModel?: ThreadModel | (() => ThreadModel);
  /**
   * true: every worker thread may load its own copy of this filter (see the plugin's
   * `workerThreads`). Declare it when the filter keeps no state shared between connections
   * (offset, partition, delay); an overlay, a shared context or counters for the whole server
   * keep it unset.
   */
  workerThreads?: boolean;

  load?(): MaybePromise<void>;
  unload?(): MaybePromise<void>;
  /** Take the keys this filter understands; pass every other one on with `next`. */
  config?(next: ConfigNext, key: string, value: string): MaybePromise<void>;
  configComplete?(next: () => Promise<void>): MaybePromise<void>;
  getReady?(below: LayerBelow): MaybePromise<void>;
  afterStart?(below: LayerBelow): MaybePromise<void>;
  dumpPlugin?(): MaybePromise<readonly string[] | Record<string, string | number | boolean> | void>;

  preconnect?(below: LayerBelow, readonly: boolean): MaybePromise<void>;
  listExports?(below: LayerBelow, readonly: boolean, isTls: boolean): MaybePromise<readonly (ExportEntry | string)[]>;
  defaultExport?(below: LayerBelow, readonly: boolean, isTls: boolean): MaybePromise<string>;

  open?(next: NextOpener, readonly: boolean, exportName: string, isTls: boolean): MaybePromise<H>;
  /** After open, with the layer below ready: check sizes, read headers. Throw to refuse. */
  prepare?(next: Next, h: H, readonly: boolean): MaybePromise<void>;
  /** Before close, while the layer below is still open. */
  finalize?(next: Next, h: H): MaybePromise<void>;
  close?(h: H): MaybePromise<void>;
}
