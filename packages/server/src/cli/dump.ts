import type { Filter, Plugin } from '../api/define.js';
import { threadModelOf } from '../backend/plugin-layer.js';

const CALLBACKS = [
  'load', 'unload', 'config', 'configComplete', 'getReady', 'afterStart', 'preconnect', 'listExports',
  'defaultExport', 'open', 'close', 'getSize', 'blockSize', 'exportDescription', 'canWrite', 'canFlush',
  'isRotational', 'canTrim', 'canZero', 'canFastZero', 'canExtents', 'canFua', 'canMultiConn', 'canCache',
  'pread', 'pwrite', 'flush', 'trim', 'zero', 'extents', 'cache', 'dumpPlugin',
];

/** nbdkit's snake_case names, so scripts that parse `--dump-plugin` output keep working. */
const snake = (s: string) => s.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

async function ownLines(x: Plugin | Filter): Promise<string[]> {
  const extra = await x.dumpPlugin?.();
  if (!extra) return [];
  if (Array.isArray(extra)) return extra.map(String);
  return Object.entries(extra).map(([k, v]) => `${k}=${v}`);
}

/** `--dump-plugin`: name, version, API version, thread model, has_* lines, the plugin's own lines. */
export async function dumpPlugin(plugin: Plugin, filters: Filter[]): Promise<string> {
  const lines: string[] = [];
  for (const f of filters) {
    lines.push(`filter_name=${f.name}`, `filter_version=${f.version ?? ''}`, `filter_api_version=${f.apiVersion ?? 1}`);
    lines.push(...(await ownLines(f)));
  }
  lines.push(`path=${plugin.name}`, `name=${plugin.name}`, `version=${plugin.version ?? ''}`);
  lines.push(`api_version=${plugin.apiVersion ?? 1}`, `thread_model=${threadModelOf(plugin)}`);
  if (plugin.magicConfigKey) lines.push(`magic_config_key=${plugin.magicConfigKey}`);
  for (const c of CALLBACKS) {
    if (typeof (plugin as unknown as Record<string, unknown>)[c] === 'function') lines.push(`has_${snake(c)}=1`);
  }
  lines.push(...(await ownLines(plugin)));
  return lines.join('\n') + '\n';
}
