import { Errno, NbdError, THREAD_MODELS, type ExportEntry, type ThreadModel } from '../api/common.js';
import type { Filter, Plugin } from '../api/define.js';
import type { Context } from './context.js';
import { FilterLayer, type Layer } from './filter-layer.js';
import { PluginLayer, threadModelOf } from './plugin-layer.js';

/**
 * The whole chain: filters (outermost first) over one plugin, with the lifecycle calls that run
 * once per server, configuration routed through the filters, and per-connection opens.
 */
export class Backend {
  readonly plugin: PluginLayer;
  /** Outermost first, as given on the command line. */
  readonly filters: FilterLayer[];
  readonly top: Layer;
  private loaded: Layer[] = [];

  constructor(plugin: Plugin, filters: readonly Filter[] = []) {
    this.plugin = new PluginLayer(plugin);
    let below: Layer = this.plugin;
    const built: FilterLayer[] = [];
    for (let i = filters.length - 1; i >= 0; i--) {
      below = new FilterLayer(filters[i]!, below);
      built.unshift(below);
    }
    this.filters = built;
    this.top = below;
  }

  /** Layers from the bottom (plugin) up: the order nbdkit loads and configures them. */
  get layersBottomUp(): Layer[] {
    return [this.plugin, ...[...this.filters].reverse()];
  }

  /** The strictest thread model of the plugin and every filter. */
  threadModel(): ThreadModel {
    let strictest = THREAD_MODELS.length - 1;
    for (const layer of this.layersBottomUp) {
      const t = threadModelOf(layer.kind === 'plugin' ? layer.plugin : layer.filter);
      const i = THREAD_MODELS.indexOf(t);
      if (i < 0) throw new NbdError(Errno.EINVAL, `${layer.name}: unknown thread model '${t}'`);
      strictest = Math.min(strictest, i);
    }
    return THREAD_MODELS[strictest]!;
  }

  async load(): Promise<void> {
    for (const layer of this.layersBottomUp) {
      if (layer.kind === 'plugin') await layer.plugin.load?.();
      else await layer.filter.load?.();
      this.loaded.push(layer);
    }
    const model = this.threadModel();
    for (const f of this.filters) f.ownedContextLock = model !== 'parallel';
  }

  /** Give one key=value to the outermost filter; each filter passes on what it does not take. */
  config(key: string, value: string): Promise<void> {
    return this.configAt(0, key, value);
  }

  private async configAt(i: number, key: string, value: string): Promise<void> {
    const f = this.filters[i];
    if (f) {
      const next = (k: string, v: string) => this.configAt(i + 1, k, v);
      if (f.filter.config) return f.filter.config(next, key, value);
      return next(key, value);
    }
    const p = this.plugin.plugin;
    if (!p.config) {
      throw new NbdError(Errno.EINVAL, `${p.name}: this plugin takes no parameters (got '${key}=${value}')`);
    }
    await p.config(key, value);
  }

  configComplete(): Promise<void> {
    const at = async (i: number): Promise<void> => {
      const f = this.filters[i];
      if (!f) return void (await this.plugin.plugin.configComplete?.());
      if (f.filter.configComplete) return f.filter.configComplete(() => at(i + 1));
      return at(i + 1);
    };
    return at(0);
  }

  async getReady(): Promise<void> {
    for (const layer of this.layersBottomUp) {
      if (layer.kind === 'plugin') await layer.plugin.getReady?.();
      else await layer.filter.getReady?.(layer.belowApi);
    }
  }

  async afterStart(): Promise<void> {
    for (const layer of this.layersBottomUp) {
      if (layer.kind === 'plugin') await layer.plugin.afterStart?.();
      else await layer.filter.afterStart?.(layer.belowApi);
    }
  }

  async preconnect(readonly: boolean): Promise<void> {
    for (const layer of this.layersBottomUp) {
      if (layer.kind === 'plugin') await layer.plugin.preconnect?.(readonly);
      else await layer.filter.preconnect?.(layer.belowApi, readonly);
    }
  }

  /** Unload outermost first (filters may still hold contexts into the layers below). */
  async unload(): Promise<void> {
    const layers = this.loaded.reverse();
    this.loaded = [];
    for (const layer of layers) {
      try {
        if (layer.kind === 'plugin') await layer.plugin.unload?.();
        else await layer.filter.unload?.();
      } catch (err) {
        process.stderr.write(`nbdx: ${layer.name}: unload: ${(err as Error).message}\n`);
      }
    }
  }

  listExports(readonly: boolean, isTls: boolean): Promise<ExportEntry[]> {
    return this.top.listExports(readonly, isTls);
  }

  defaultExport(readonly: boolean, isTls: boolean): Promise<string> {
    return this.top.defaultExport(readonly, isTls);
  }

  /** Open a context on every layer for one connection; the result is the outermost. */
  open(readonly: boolean, exportName: string, isTls: boolean, signal?: AbortSignal): Promise<Context> {
    return this.top.open(readonly, exportName, isTls, signal);
  }
}
