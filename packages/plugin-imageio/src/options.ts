/** What `OPTIONS /images/TICKET` told us about the transfer. */
export interface ServerOptions {
  /** `PATCH {"op":"zero"}` is available. */
  zero: boolean;
  /** The client controls flushing (`?flush=`, PATCH flush). Without it the server flushes every PUT. */
  flush: boolean;
  /** `GET …/extents` is available. */
  extents: boolean;
  /** PUT is allowed (false for read-only tickets, whose `allow` header is `OPTIONS,GET`). */
  writable: boolean;
  maxReaders: number;
  maxWriters: number;
  /** The local service's socket as advertised (may be an abstract name starting with NUL). */
  unixSocket: string | null;
  /** The server answered 405 or 204: no OPTIONS support, GET and PUT only. */
  old: boolean;
  /** The raw `features` list, for debug output. */
  features: string[];
}

/** Old servers (daemon < 1.3 answers 405, the old proxy 204): no features, one connection. */
export const OLD_SERVER: Readonly<ServerOptions> = Object.freeze({
  zero: false,
  flush: false,
  extents: false,
  writable: true,
  maxReaders: 1,
  maxWriters: 1,
  unixSocket: null,
  old: true,
  features: [],
});

function positiveInt(v: unknown, fallback: number): number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 1 ? v : fallback;
}

/**
 * Interpret a 200 answer to OPTIONS. A body that is not JSON means "no features", as in imageio's
 * own client; absent `max_readers`/`max_writers` mean 1 (an old server). `allow` without PUT
 * marks a read-only ticket.
 */
export function parseOptions(body: string, allow: string | undefined): ServerOptions {
  let json: Record<string, unknown> = {};
  try {
    const parsed: unknown = JSON.parse(body);
    if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) json = parsed as Record<string, unknown>;
  } catch {
    // Not JSON: keep the defaults (no features).
  }
  const features = Array.isArray(json.features) ? json.features.filter((f): f is string => typeof f === 'string') : [];
  const methods = allow
    ?.split(',')
    .map((m) => m.trim().toUpperCase())
    .filter(Boolean);
  const unix = typeof json.unix_socket === 'string' && json.unix_socket !== '' ? json.unix_socket : null;
  return {
    zero: features.includes('zero'),
    flush: features.includes('flush'),
    extents: features.includes('extents'),
    writable: methods && methods.length > 0 ? methods.includes('PUT') : true,
    maxReaders: positiveInt(json.max_readers, 1),
    maxWriters: positiveInt(json.max_writers, 1),
    unixSocket: unix,
    old: false,
    features,
  };
}

/**
 * How many HTTP connections to open: imageio advertises how many may read and write one image
 * concurrently (advisory, but concurrent writers beyond `max_writers` are unsafe on the file
 * backend), capped by the user's `connections=`. A read-only ticket ignores `max_writers`.
 */
export function poolSize(opts: ServerOptions, cap: number): number {
  const limit = opts.writable ? Math.min(opts.maxReaders, opts.maxWriters) : opts.maxReaders;
  return Math.max(1, Math.min(limit, cap));
}
