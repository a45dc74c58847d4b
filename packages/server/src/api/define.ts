import type { PluginV1 } from './plugin/v1.js';
import type { PluginV2 } from './plugin/v2.js';
import type { FilterV1 } from './filter/v1.js';
import type { FilterV2 } from './filter/v2.js';

export type Plugin<H = any> = PluginV1<H> | PluginV2<H>;
export type Filter<H = any> = FilterV1<H> | FilterV2<H>;

/** Plugin API versions this core understands. */
export const PLUGIN_API_VERSIONS = [1, 2] as const;
export const PLUGIN_API_VERSION_LATEST = 2;
/** Filter API versions this core understands. */
export const FILTER_API_VERSIONS = [1, 2] as const;
export const FILTER_API_VERSION_LATEST = 2;

/**
 * Why a plugin or filter cannot be used with this core's API versions, or null when it can.
 * One wording for the loader and the backend alike.
 */
export function unsupportedApiVersion(kind: 'plugin' | 'filter', version: unknown): string | null {
  const versions: readonly number[] = kind === 'plugin' ? PLUGIN_API_VERSIONS : FILTER_API_VERSIONS;
  if (versions.includes(version as number)) return null;
  return `asks for ${kind} API version ${String(version)}, but this nbdx supports versions ${versions.join(' and ')}`;
}

/** Identity helper that gives a plugin object its types (and checks them). */
export function definePlugin<H>(plugin: PluginV2<H>): PluginV2<H>;
export function definePlugin<H>(plugin: PluginV1<H>): PluginV1<H>;
export function definePlugin<H>(plugin: Plugin<H>): Plugin<H> {
  plugin.kind = 'plugin';
  return plugin;
}

/** Identity helper that gives a filter object its types (and checks them). */
export function defineFilter<H>(filter: FilterV2<H>): FilterV2<H>;
export function defineFilter<H>(filter: FilterV1<H>): FilterV1<H>;
export function defineFilter<H>(filter: Filter<H>): Filter<H> {
  filter.kind = 'filter';
  return filter;
}
