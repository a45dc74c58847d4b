import { NBD, NbdClient, type Extent as StatusExtent } from '@nbdx/client';
import {
  FLAG_FAST_ZERO,
  FLAG_FUA,
  FLAG_MAY_TRIM,
  FLAG_REQ_ONE,
  debug,
  definePlugin,
  type Extent,
  type ExportEntry,
  type ReadResult,
  type ZeroSpan,
  packageVersion,
} from '@nbdx/server/api';
import { CONFIG_HELP, applyParam, completeConfig, describeAddress, type ProxyConfig, type RawParams } from './config.js';
import { NAME, connectUpstream, targetOf, translateError, withRetry } from './upstream.js';

export { completeConfig, applyParam, describeAddress, type ProxyConfig, type UpstreamAddress } from './config.js';
export { upstreamLost, translateError, withRetry } from './upstream.js';

/** One client connection's upstream connection. */
export interface NbdHandle {
  readonly client: NbdClient;
  /** Set once the upstream connection is gone. */
  lost: Error | null;
}

/**
 * Upstream block status answers may cover less than asked; ask again from where they stopped,
 * at most this many times per request, then call the rest data (never skipped by a client).
 */
const MAX_STATUS_ROUNDS = 64;

const BASE_ALLOCATION = 'base:allocation';

function spans(holes: ZeroSpan[]): ReadResult {
  return holes.length > 0 ? holes : undefined;
}

/**
 * A fresh `nbd` plugin: a proxy to another NBD server through @nbdx/client. Use a new instance
 * per server (tests); the default export is one instance.
 */
export function createNbdPlugin() {
  let params: RawParams = {};
  let config: ProxyConfig | undefined;

  function cfg(): ProxyConfig {
    if (!config) throw new Error('nbd: used before configComplete');
    return config;
  }

  return definePlugin<NbdHandle>({
    apiVersion: 2,
    name: NAME,
    version: packageVersion(import.meta.url),
    longname: 'nbdx NBD proxy plugin',
    description: 'Serves an export of another NBD server, through @nbdx/client.',
    magicConfigKey: 'uri',
    configHelp: CONFIG_HELP,
    threadModel: 'parallel',
    // Each connection has its own upstream connection: copies on worker threads are as safe as one.
    workerThreads: true,

    load() {
      params = {};
      config = undefined;
    },

    config(key, value) {
      applyParam(params, key, value);
    },

    configComplete() {
      config = completeConfig(params);
      debug(
        NAME,
        `upstream ${describeAddress(config.address, config.exportName, config.tls.tls)}` +
          `${config.tls.tls === 'on' ? ', TLS if offered' : ''}` +
          `${config.dynamicExport ? ', dynamic export' : ''}, retry ${config.retry}, timeout ${config.timeoutMs} ms`,
      );
    },

    dumpPlugin() {
      return { nbd_client: '@nbdx/client', nbd_tls: true, nbd_dynamic_export: true, nbd_retry: true };
    },

    async listExports(): Promise<ExportEntry[]> {
      const c = cfg();
      if (!c.dynamicExport) return [{ name: c.exportName }];
      const where = describeAddress(c.address, '', c.tls.tls);
      const list = await withRetry(c, `listing the exports of ${where}`, () =>
        NbdClient.list(targetOf(c.address), { ...c.tls, timeout: c.timeoutMs }),
      );
      return list.map((e) => (e.description ? { name: e.name, description: e.description } : { name: e.name }));
    },

    async defaultExport(): Promise<string> {
      const c = cfg();
      if (!c.dynamicExport) return c.exportName;
      // The upstream's canonical name for its default export, when it tells (NBD_INFO_NAME).
      try {
        const info = await withRetry(c, `asking ${describeAddress(c.address, '', c.tls.tls)} for its default export`, () =>
          NbdClient.info(targetOf(c.address), '', { ...c.tls, timeout: c.timeoutMs, requestInfos: [NBD.INFO_NAME] }),
        );
        return info.name ?? '';
      } catch (err) {
        // Let open() connect with '' and report whatever is wrong in the client's handshake.
        debug(NAME, `default export: ${(err as Error).message}`);
        return '';
      }
    },

    async open(_readonly, exportName): Promise<NbdHandle> {
      const c = cfg();
      const name = c.dynamicExport ? exportName : c.exportName;
      const client = await connectUpstream(c, name);
      const h: NbdHandle = { client, lost: null };
      client.on('close', (err) => {
        if (err) {
          h.lost = err;
          debug(NAME, `upstream connection to ${describeAddress(c.address, name, c.tls.tls)} lost: ${err.message}`);
        }
      });
      debug(
        NAME,
        `connected to ${describeAddress(c.address, name, c.tls.tls)}${client.tlsNegotiated ? ' (TLS)' : ''}: size ${client.size}, flags 0x${client.transmissionFlags.toString(16)}` +
          `${client.extendedHeaders ? ', extended headers' : client.structuredReplies ? ', structured replies' : ''}`,
      );
      return h;
    },

    async close(h) {
      if (h.lost) return;
      try {
        await h.client.disconnect();
      } catch {
        h.client.close();
      }
    },

    getSize: (h) => h.client.size,
    blockSize: (h) => h.client.blockSize,
    exportDescription: (h) => h.client.description,
    canWrite: (h) => !h.client.readOnly,
    canFlush: (h) => h.client.canFlush,
    isRotational: (h) => h.client.isRotational,
    canTrim: (h) => h.client.canTrim,
    // Without WRITE_ZEROES upstream the core zeroes by writing.
    canZero: (h) => h.client.canZero,
    canFastZero: (h) => h.client.canZero && h.client.canFastZero,
    canExtents: (h) => h.client.metaContexts.has(BASE_ALLOCATION),
    canFua: (h) => (h.client.canFua ? 'native' : h.client.canFlush ? 'emulate' : 'none'),
    canMultiConn: (h) => h.client.canMultiConn,
    // Emulating CACHE would pull the data over the network only to drop it.
    canCache: (h) => (h.client.canCache ? 'native' : 'none'),

    pread(h, buf, offset) {
      return h.client.preadInto(buf, offset).then(spans, translateError);
    },

    pwrite(h, buf, offset, flags) {
      return h.client.pwrite(buf, offset, flags & FLAG_FUA ? NBD.CMD_FLAG_FUA : 0).catch(translateError);
    },

    flush(h) {
      return h.client.flush().catch(translateError);
    },

    trim(h, count, offset, flags) {
      return h.client.trim(count, offset, flags & FLAG_FUA ? NBD.CMD_FLAG_FUA : 0).catch(translateError);
    },

    zero(h, count, offset, flags) {
      let f = 0;
      if (flags & FLAG_FUA) f |= NBD.CMD_FLAG_FUA;
      if (!(flags & FLAG_MAY_TRIM)) f |= NBD.CMD_FLAG_NO_HOLE;
      if (flags & FLAG_FAST_ZERO) f |= NBD.CMD_FLAG_FAST_ZERO;
      return h.client.zero(count, offset, f).catch(translateError);
    },

    cache(h, count, offset) {
      return h.client.cache(count, offset).catch(translateError);
    },

    async extents(h, count, offset, flags): Promise<Extent[]> {
      const reqOne = (flags & FLAG_REQ_ONE) !== 0;
      const end = offset + count;
      const out: Extent[] = [];
      let pos = offset;
      for (let round = 0; pos < end; round++) {
        if (round === MAX_STATUS_ROUNDS) {
          out.push({ offset: pos, length: end - pos, type: 0 });
          break;
        }
        let status: Map<string, StatusExtent[]>;
        try {
          status = await h.client.blockStatus(end - pos, pos, reqOne ? NBD.CMD_FLAG_REQ_ONE : 0);
        } catch (err) {
          translateError(err);
        }
        // The client checks the reply: one list for base:allocation, no zero-length extents.
        const list = status.get(BASE_ALLOCATION) ?? [];
        for (const e of list) {
          out.push({ offset: pos, length: e.length, type: e.flags & 3 });
          pos += e.length;
        }
        if (reqOne || list.length === 0) break;
      }
      return out;
    },
  });
}

export default createNbdPlugin();
