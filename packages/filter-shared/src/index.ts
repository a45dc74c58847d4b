import {
  Errno,
  NbdError,
  debug,
  defineFilter,
  logError,
  toErrno,
  type ExportEntry,
  type LayerBelow,
  type Next,
  type OwnedContext,
  packageVersion,
} from '@nbdx/server/api';
import { applyOption, defaultOptions, retires, type SharedOptions } from './policy.js';

export { isFatal, retires, type OpenMode, type ReopenPolicy, type SharedOptions } from './policy.js';

const NAME = 'shared';

/**
 * One opened context below, and the connections served from it. A generation is replaced when it
 * fails (see shared-reopen); connections keep the generation they started with.
 */
interface Generation {
  readonly id: number;
  readonly ctx: OwnedContext;
  /** What connections are served from: the context, with its failures watched. */
  readonly view: Next;
  users: number;
  /** No longer handed to new connections; closed once its last user goes. */
  retired: boolean;
}

interface Handle {
  gen: Generation;
}

/** Wrap a context so that failures of its data calls reach `onError` (and still reach the caller). */
function watched(ctx: OwnedContext, onError: (err: unknown) => void): Next {
  const fail = (err: unknown): never => {
    onError(err);
    throw err;
  };
  return {
    get exportName() {
      return ctx.exportName;
    },
    get readonly() {
      return ctx.readonly;
    },
    getSize: () => ctx.getSize(),
    blockSize: () => ctx.blockSize(),
    exportDescription: () => ctx.exportDescription(),
    canWrite: () => ctx.canWrite(),
    canFlush: () => ctx.canFlush(),
    isRotational: () => ctx.isRotational(),
    canTrim: () => ctx.canTrim(),
    canZero: () => ctx.canZero(),
    canFastZero: () => ctx.canFastZero(),
    canExtents: () => ctx.canExtents(),
    canFua: () => ctx.canFua(),
    canMultiConn: () => ctx.canMultiConn(),
    canCache: () => ctx.canCache(),
    pread: (buf, offset, flags) => ctx.pread(buf, offset, flags).catch(fail),
    pwrite: (buf, offset, flags) => ctx.pwrite(buf, offset, flags).catch(fail),
    flush: (flags) => ctx.flush(flags).catch(fail),
    trim: (count, offset, flags) => ctx.trim(count, offset, flags).catch(fail),
    zero: (count, offset, flags) => ctx.zero(count, offset, flags).catch(fail),
    extents: (count, offset, flags) => ctx.extents(count, offset, flags).catch(fail),
    cache: (count, offset, flags) => ctx.cache(count, offset, flags).catch(fail),
  };
}

/**
 * A fresh `shared` filter: one context into the layer below for the whole server, serving every
 * client connection. Use a new instance per server (tests); the default export is one instance.
 */
export function createSharedFilter() {
  let options: SharedOptions = defaultOptions();
  let below: LayerBelow | undefined;
  let current: Generation | null = null;
  let opening: Promise<Generation> | null = null;
  let nextId = 1;
  /** Every generation not yet closed (current and retired ones still in use). */
  const live = new Set<Generation>();
  let unloading = false;

  async function openBelow(layer: LayerBelow, readonly: boolean, isTls: boolean): Promise<OwnedContext> {
    const exportName = options.exportName;
    if (readonly) return layer.openContext({ readonly: true, exportName, isTls });
    try {
      return await layer.openContext({ readonly: false, exportName, isTls });
    } catch (err) {
      // Fall back only when writing is what was refused (a read-only file, a read-only upstream);
      // an explicit shared-readonly=false means writable or nothing.
      if (options.readonly === false || toErrno(err) !== Errno.EPERM) throw err;
      debug(NAME, `opening read-write failed (${(err as Error).message}); opening read-only instead`);
      return layer.openContext({ readonly: true, exportName, isTls });
    }
  }

  async function openGeneration(layer: LayerBelow, readonly: boolean, isTls: boolean): Promise<Generation> {
    const ctx = await openBelow(layer, readonly, isTls);
    const id = nextId++;
    const gen: Generation = {
      id,
      ctx,
      users: 0,
      retired: false,
      view: watched(ctx, (err) => failed(gen, err)),
    };
    live.add(gen);
    current = gen;
    debug(NAME, `opened shared context #${id} for export '${ctx.exportName}' (${ctx.readonly ? 'read-only' : 'read-write'})`);
    return gen;
  }

  /** A data call on `gen` failed: retire it if the policy says so. */
  function failed(gen: Generation, err: unknown): void {
    if (gen.retired || !retires(options.reopen, err)) return;
    gen.retired = true;
    if (current === gen) current = null;
    logError(
      NAME,
      `shared context #${gen.id} failed (${(err as Error)?.message ?? String(err)}); ` +
        `connections using it keep getting its errors, the next connection opens a new one`,
    );
    if (gen.users === 0) void closeGeneration(gen);
  }

  async function closeGeneration(gen: Generation): Promise<void> {
    if (!live.delete(gen)) return;
    if (current === gen) current = null;
    try {
      await gen.ctx.close();
      debug(NAME, `closed shared context #${gen.id}`);
    } catch (err) {
      logError(NAME, `closing shared context #${gen.id}: ${(err as Error).message}`);
    }
  }

  /** The context to serve from, opening it if there is none (once, however many ask at once). */
  function acquire(layer: LayerBelow, readonly: boolean, isTls: boolean): Promise<Generation> {
    if (current) return Promise.resolve(current);
    if (unloading) return Promise.reject(new NbdError(Errno.ESHUTDOWN, `${NAME}: the server is shutting down`));
    if (!opening) {
      // Explicit shared-readonly wins; otherwise start-up opens read-write (falling back to
      // read-only) and a lazy open follows the connection that triggers it.
      const ro = options.readonly ?? (options.open === 'lazy' ? readonly : false);
      opening = openGeneration(layer, ro, isTls).finally(() => {
        opening = null;
      });
    }
    return opening;
  }

  /** The name of the one export this server offers. */
  async function sharedName(layer: LayerBelow, readonly: boolean, isTls: boolean): Promise<string> {
    if (options.exportName !== undefined) return options.exportName;
    if (current) return current.ctx.exportName;
    return layer.defaultExport(readonly, isTls);
  }

  return defineFilter<Handle>({
    apiVersion: 2,
    name: NAME,
    version: packageVersion(import.meta.url),
    longname: 'nbdx shared filter',
    description: 'One context into the layer below, opened once and shared by every connection.',
    configHelp: [
      'shared-export=NAME        export opened below and offered to clients (default: the default export)',
      'shared-open=start|lazy    open at start-up (default) or with the first connection',
      'shared-reopen=fatal|error|never',
      '                          which failures make the next connection open a fresh context (default fatal)',
      'shared-readonly=true|false  open below read-only / insist on read-write (default: decide, see README)',
    ].join('\n'),

    load() {
      options = defaultOptions();
      current = null;
      opening = null;
      live.clear();
      unloading = false;
    },

    config(next, key, value) {
      if (!applyOption(options, key, value)) return next(key, value);
    },

    getReady(layer) {
      below = layer;
    },

    async afterStart(layer) {
      below = layer;
      if (options.open === 'start') await acquire(layer, false, false);
    },

    async unload() {
      unloading = true;
      // Connections are gone by now (the server closes them before unloading); close everything.
      if (opening) await opening.catch(() => {});
      await Promise.all([...live].map((g) => closeGeneration(g)));
    },

    async listExports(layer, readonly, isTls) {
      const name = await sharedName(layer, readonly, isTls);
      let description: string | undefined;
      try {
        description = (await layer.listExports(readonly, isTls)).find((e) => e.name === name)?.description;
      } catch {
        // The listing below is only consulted for a description.
      }
      const entry: ExportEntry = { name };
      if (description) entry.description = description;
      return [entry];
    },

    defaultExport(layer, readonly, isTls) {
      return sharedName(layer, readonly, isTls);
    },

    async open(next, readonly, exportName, isTls) {
      const layer = below ?? next;
      const name = await sharedName(layer, readonly, isTls);
      if (exportName !== name) {
        throw new NbdError(
          Errno.EINVAL,
          `${NAME}: this server shares one export, '${name}'; export '${exportName}' is not available`,
        );
      }
      const gen = await acquire(layer, readonly, isTls);
      gen.users++;
      next.use(gen.view);
      return { gen };
    },

    async close(h) {
      const gen = h.gen;
      gen.users--;
      if (gen.retired && gen.users === 0) await closeGeneration(gen);
    },

    async canMultiConn(next) {
      // Every connection goes through the same context, so they all see the same data at once;
      // a flush on any of them flushes that one context.
      if (await next.canFlush()) return true;
      if (!(await next.canWrite())) return true;
      return next.canMultiConn();
    },
  });
}

export default createSharedFilter();
