import type {
  BlockSize,
  CacheMode,
  ExportEntry,
  FuaMode,
  MaybePromise,
  ThreadModel,
} from '../common.js';

/**
 * Callbacks that are the same in every plugin API version: identity, configuration, lifecycle,
 * negotiation and capabilities. `H` is the plugin's per-connection handle (whatever `open`
 * returns).
 */
export interface PluginCommon<H> {
  /** Short name, as typed on the command line (`memory`). */
  /** Set by definePlugin(); checked by the loader when present. */
  kind?: 'plugin';
  name: string;
  version?: string;
  longname?: string;
  description?: string;
  /** The key a bare `VALUE` on the command line is given to (`memory 1G` = `memory size=1G`). */
  magicConfigKey?: string;
  /** Shown by `nbdx PLUGIN --help`: one `key=VALUE  meaning` line per parameter. */
  configHelp?: string;
  /** Defaults to 'parallel'. */
  threadModel?: ThreadModel | (() => ThreadModel);
  /**
   * true: the server may serve connections on several worker threads (`--workers`), each of which
   * loads, configures and opens its own copy of this plugin. Declare it only when those copies
   * behave as one disk because the data lives outside the JavaScript heap: a file, a device, a
   * remote server. A plugin that keeps its disk in its own memory leaves it unset, and the server
   * then serves every connection on one thread.
   */
  workerThreads?: boolean;

  load?(): MaybePromise<void>;
  unload?(): MaybePromise<void>;
  config?(key: string, value: string): MaybePromise<void>;
  configComplete?(): MaybePromise<void>;
  getReady?(): MaybePromise<void>;
  afterStart?(): MaybePromise<void>;
  /** Lines for `--dump-plugin`: `key=value` strings or an object. */
  dumpPlugin?(): MaybePromise<readonly string[] | Record<string, string | number | boolean> | void>;

  /** Called for each new connection before the handshake; throw to refuse it. */
  preconnect?(readonly: boolean): MaybePromise<void>;
  listExports?(readonly: boolean, isTls: boolean): MaybePromise<readonly (ExportEntry | string)[]>;
  defaultExport?(readonly: boolean, isTls: boolean): MaybePromise<string>;

  open?(readonly: boolean, exportName: string, isTls: boolean): MaybePromise<H>;
  close?(h: H): MaybePromise<void>;

  /** Size in bytes; numbers above 2^53 are refused. */
  getSize(h: H): MaybePromise<number | bigint>;
  blockSize?(h: H): MaybePromise<BlockSize | undefined>;
  exportDescription?(h: H): MaybePromise<string | undefined>;
  canWrite?(h: H): MaybePromise<boolean>;
  canFlush?(h: H): MaybePromise<boolean>;
  isRotational?(h: H): MaybePromise<boolean>;
  canTrim?(h: H): MaybePromise<boolean>;
  canZero?(h: H): MaybePromise<boolean>;
  canFastZero?(h: H): MaybePromise<boolean>;
  canExtents?(h: H): MaybePromise<boolean>;
  canFua?(h: H): MaybePromise<FuaMode>;
  canMultiConn?(h: H): MaybePromise<boolean>;
  canCache?(h: H): MaybePromise<CacheMode>;
}
