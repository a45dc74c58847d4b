/**
 * The optional native helper, @nbdx/native (an N-API addon, Linux): socket buffer sizes and
 * descriptor duplication, which Node's net module does not offer. It is an optional dependency of
 * @nbdx/server: installed with it where it builds or a prebuild fits, and when it is missing the
 * server keeps the system's socket buffers and serves on one thread (a debug line says why).
 */

/** What the server uses of @nbdx/native (its SocketOps). */
export interface SocketHelper {
  dup(fd: number): number;
  getBuffer(fd: number, kind: 0 | 1): number;
  setBuffer(fd: number, kind: 0 | 1, bytes: number): number;
}

export const SEND_BUFFER = 0;

export type SocketHelperLoad = { ops: SocketHelper; path: string } | { ops: null; reason: string };

let loaded: Promise<SocketHelperLoad> | undefined;

/** Load @nbdx/native once per thread; never throws. */
export function loadSocketHelper(): Promise<SocketHelperLoad> {
  loaded ??= (async (): Promise<SocketHelperLoad> => {
    // A name in a variable: bundlers leave it alone, and a missing package is not a build error.
    const name = '@nbdx/native';
    try {
      const mod = (await import(name)) as { loadSocketOps?: () => SocketHelperLoad };
      if (typeof mod.loadSocketOps !== 'function') return { ops: null, reason: `${name} has no loadSocketOps()` };
      return mod.loadSocketOps();
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      if (e.code === 'ERR_MODULE_NOT_FOUND' && e.message.includes(name)) return { ops: null, reason: `${name} is not installed` };
      return { ops: null, reason: `${name} does not load: ${e.message.split('\n', 1)[0]}` };
    }
  })();
  return loaded;
}
