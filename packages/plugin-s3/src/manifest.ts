/**
 * The manifest of a prefix= disk: a small JSON object beside the data objects that fixes the
 * disk's size and object size, so that every server opening the prefix agrees on the geometry.
 * Created (If-None-Match: *) by the first server started with size=; checked by every later one.
 */
import { Errno, NbdError } from '@nbdx/server/api';
import { MANIFEST_NAME, MAX_OBJECT_SIZE, MIN_OBJECT_SIZE } from './config.js';
import type { Geometry } from './disk.js';
import type { Store } from './store.js';

const FORMAT = 'nbdx-s3-disk';
const VERSION = 1;
/** A manifest is a few dozen bytes; refuse to read anything big. */
const MAX_MANIFEST = 64 * 1024;

export function manifestKey(prefix: string): string {
  return prefix + MANIFEST_NAME;
}

export function encodeManifest(g: Geometry): Buffer {
  return Buffer.from(`${JSON.stringify({ format: FORMAT, version: VERSION, size: g.size, objectSize: g.objectSize })}\n`);
}

/** Validate what the store holds (it may have been written by anyone). */
export function parseManifest(text: string, where: string): Geometry {
  let m: unknown;
  try {
    m = JSON.parse(text);
  } catch {
    throw new NbdError(Errno.EINVAL, `${where}: not an nbdx disk manifest (not JSON)`);
  }
  const o = (m && typeof m === 'object' ? m : {}) as Record<string, unknown>;
  if (o.format !== FORMAT) throw new NbdError(Errno.EINVAL, `${where}: not an nbdx disk manifest (format is not "${FORMAT}")`);
  if (o.version !== VERSION) {
    throw new NbdError(Errno.EINVAL, `${where}: manifest version ${JSON.stringify(o.version)} is not supported (this plugin knows ${VERSION})`);
  }
  const { size, objectSize } = o;
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size <= 0) {
    throw new NbdError(Errno.EINVAL, `${where}: manifest size ${JSON.stringify(size)} is not a positive whole number`);
  }
  if (
    typeof objectSize !== 'number' ||
    !Number.isSafeInteger(objectSize) ||
    objectSize < MIN_OBJECT_SIZE ||
    objectSize > MAX_OBJECT_SIZE ||
    objectSize % 4096 !== 0
  ) {
    throw new NbdError(Errno.EINVAL, `${where}: manifest objectSize ${JSON.stringify(objectSize)} is not a multiple of 4K from 4K to 64M`);
  }
  return { size, objectSize };
}

async function readManifest(store: Store, key: string): Promise<Geometry | null> {
  const buf = Buffer.alloc(MAX_MANIFEST);
  const got = await store.get(key, 0, MAX_MANIFEST, (chunk, pos) => buf.set(chunk, pos));
  if (got === null) return null;
  if (got.bytes >= MAX_MANIFEST) throw new NbdError(Errno.EINVAL, `${store.where(key)}: too big to be an nbdx disk manifest`);
  return parseManifest(buf.subarray(0, got.bytes).toString('utf8'), store.where(key));
}

function checkMatch(found: Geometry, size: number | null, objectSize: number | null, where: string): Geometry {
  if (size !== null && size !== found.size) {
    throw new NbdError(Errno.EINVAL, `size=${size} does not match the disk at ${where} (${found.size} bytes); resizing is not supported`);
  }
  if (objectSize !== null && objectSize !== found.objectSize) {
    throw new NbdError(Errno.EINVAL, `object-size=${objectSize} does not match the disk at ${where} (object size ${found.objectSize})`);
  }
  return found;
}

/** The disk's geometry from its manifest, creating the manifest when there is none and size= is given. */
export async function openManifest(
  store: Store,
  prefix: string,
  size: number | null,
  objectSize: number | null,
  defaultObjectSize: number,
): Promise<{ geometry: Geometry; created: boolean }> {
  const key = manifestKey(prefix);
  const where = store.where(prefix);
  const found = await readManifest(store, key);
  if (found) return { geometry: checkMatch(found, size, objectSize, where), created: false };
  if (size === null) {
    throw new NbdError(Errno.EINVAL, `no disk at ${where} (no ${store.where(key)}): give size= to create one`);
  }
  const geometry = { size, objectSize: objectSize ?? defaultObjectSize };
  const put = await store.put(key, encodeManifest(geometry), { ifNoneMatch: '*' });
  if (put !== false) return { geometry, created: true };
  // Another server created it first: use theirs if it agrees.
  const theirs = await readManifest(store, key);
  if (!theirs) throw new NbdError(Errno.EIO, `${store.where(key)}: creation conflicted but the manifest is not there`);
  return { geometry: checkMatch(theirs, size, objectSize, where), created: false };
}
