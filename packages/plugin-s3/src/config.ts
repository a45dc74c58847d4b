import { Errno, NbdError, parseBool, parseDuration, parseSize, readSecret } from '@nbdx/server/api';

export interface Settings {
  bucket: string | null;
  /** Layout 1: one existing object, served read-only. */
  key: string | null;
  /** Layout 2: a writable disk of fixed-size objects under this prefix. */
  prefix: string | null;
  endpoint: URL | null;
  region: string | null;
  /** null = path-style when endpoint= is given, virtual-hosted otherwise (what AWS wants). */
  pathStyle: boolean | null;
  profile: string | null;
  accessKey: string | null;
  secretKey: string | null;
  sessionToken: string | null;
  size: number | null;
  objectSize: number | null;
  writeBuffer: number;
  connections: number;
  timeoutMs: number;
}

export const MiB = 1024 * 1024;
export const DEFAULT_OBJECT_SIZE = MiB;
export const MIN_OBJECT_SIZE = 4096;
/** Each dirty object is one buffer of this size in RAM, and a PUT of it: keep them moderate. */
export const MAX_OBJECT_SIZE = 64 * MiB;
export const DEFAULT_WRITE_BUFFER = 64 * MiB;
export const DEFAULT_CONNECTIONS = 64;
export const MAX_CONNECTIONS = 1024;
export const DEFAULT_TIMEOUT_MS = 60_000;
/** Our object keys are 16 hex digits; the manifest's name can never be one. */
export const MANIFEST_NAME = 'nbdx-disk.json';

export function defaultSettings(): Settings {
  return {
    bucket: null,
    key: null,
    prefix: null,
    endpoint: null,
    region: null,
    pathStyle: null,
    profile: null,
    accessKey: null,
    secretKey: null,
    sessionToken: null,
    size: null,
    objectSize: null,
    writeBuffer: DEFAULT_WRITE_BUFFER,
    connections: DEFAULT_CONNECTIONS,
    timeoutMs: DEFAULT_TIMEOUT_MS,
  };
}

function invalid(message: string): NbdError {
  return new NbdError(Errno.EINVAL, message);
}

function wholeNumber(key: string, value: string, min: number, max: number): number {
  const n = Number(value);
  if (!/^\s*\d+\s*$/.test(value) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw invalid(`${key}: '${value}' is not a whole number from ${min} to ${max}`);
  }
  return n;
}

/** S3 bucket naming rules (the common subset every store accepts, plus underscores for Ceph). */
function checkBucket(value: string): string {
  if (!/^[a-zA-Z0-9][a-zA-Z0-9._-]{2,254}$/.test(value)) {
    throw invalid(`bucket: '${value}' is not a bucket name (letters, digits, '.', '-', '_'; 3 to 255 characters)`);
  }
  return value;
}

function checkKey(what: string, value: string): string {
  if (Buffer.byteLength(value) > 900) throw invalid(`${what}: longer than 900 bytes (S3 keys are at most 1024)`);
  return value;
}

/** Apply one key=value from the command line; throws EINVAL with a one-line explanation. */
export async function applyConfig(s: Settings, key: string, value: string): Promise<void> {
  switch (key) {
    case 'bucket':
      s.bucket = checkBucket(value);
      return;
    case 'key':
      if (value === '') throw invalid('key: empty object key');
      s.key = checkKey('key', value);
      return;
    case 'prefix':
      s.prefix = checkKey('prefix', value);
      return;
    case 'endpoint': {
      let url: URL;
      try {
        url = new URL(value);
      } catch {
        throw invalid(`endpoint: '${value}' is not a URL (expected http://HOST:PORT or https://HOST)`);
      }
      if (url.protocol !== 'http:' && url.protocol !== 'https:') {
        throw invalid(`endpoint: '${url.protocol}' is not supported, use http:// or https://`);
      }
      if (url.username || url.password) throw invalid('endpoint: put credentials in access-key= and secret-key=, not in the URL');
      if (url.search || url.hash) throw invalid('endpoint: no query or fragment allowed');
      s.endpoint = url;
      return;
    }
    case 'region':
      if (!/^[a-z0-9-]{1,64}$/i.test(value)) throw invalid(`region: '${value}' is not a region name (like us-east-1)`);
      s.region = value;
      return;
    case 'path-style':
      s.pathStyle = parseBool(value, 'path-style');
      return;
    case 'profile':
      if (value === '') throw invalid('profile: empty profile name');
      s.profile = value;
      return;
    case 'access-key':
      if (value === '') throw invalid('access-key: empty');
      s.accessKey = value;
      return;
    case 'secret-key':
      s.secretKey = await readSecret('secret-key', value, { plugin: 's3' });
      return;
    case 'session-token':
      s.sessionToken = await readSecret('session-token', value, { plugin: 's3' });
      return;
    case 'size':
      s.size = parseSize(value, 'size');
      if (s.size === 0) throw invalid('size: a disk of 0 bytes is not useful');
      return;
    case 'object-size': {
      const n = parseSize(value, 'object-size');
      if (n < MIN_OBJECT_SIZE || n > MAX_OBJECT_SIZE || n % 4096 !== 0) {
        throw invalid(`object-size: '${value}' must be a multiple of 4K from 4K to 64M`);
      }
      s.objectSize = n;
      return;
    }
    case 'write-buffer':
      s.writeBuffer = parseSize(value, 'write-buffer');
      return;
    case 'connections':
      s.connections = wholeNumber('connections', value, 1, MAX_CONNECTIONS);
      return;
    case 'timeout': {
      const ms = parseDuration(value, 'timeout');
      if (ms <= 0) throw invalid('timeout: must be above 0');
      s.timeoutMs = ms;
      return;
    }
    default:
      throw invalid(`unknown parameter '${key}' (see nbdx s3 --help)`);
  }
}

/** Cross-parameter checks, once every parameter is in. */
export function checkSettings(s: Settings): void {
  if (!s.bucket) throw invalid('bucket= is required: nbdx s3 bucket=B key=K (one object) or bucket=B prefix=P/ (a writable disk)');
  if ((s.key === null) === (s.prefix === null)) {
    throw invalid('give exactly one of key= (serve one existing object, read-only) or prefix= (a writable disk of objects)');
  }
  if (s.key !== null) {
    if (s.size !== null) throw invalid('size= is for prefix= disks; with key= the size is the object\'s');
    if (s.objectSize !== null) throw invalid('object-size= is for prefix= disks');
  }
  if ((s.accessKey === null) !== (s.secretKey === null)) {
    throw invalid('access-key= and secret-key= go together (or give neither and use the AWS environment/profile)');
  }
  if (s.sessionToken !== null && s.accessKey === null) throw invalid('session-token= needs access-key= and secret-key=');
  if (s.profile !== null && s.accessKey !== null) throw invalid('profile= and access-key= exclude each other');
  const objectSize = s.objectSize ?? DEFAULT_OBJECT_SIZE;
  if (s.prefix !== null && s.writeBuffer < objectSize) {
    throw invalid(`write-buffer: must hold at least one object (${objectSize} bytes)`);
  }
}

export const CONFIG_HELP = [
  'bucket=BUCKET        (required) the bucket',
  'key=KEY              serve this one existing object, read-only (ranged GETs)',
  'prefix=PREFIX        a writable disk stored as objects PREFIX0000000000000000, … and PREFIX' + MANIFEST_NAME,
  'size=SIZE            size of a new prefix= disk (must match the manifest of an existing one)',
  `object-size=SIZE     bytes per object of a new prefix= disk (default 1M; 4K to 64M)`,
  'endpoint=URL         a non-AWS store, e.g. http://127.0.0.1:7480 (path-style requests)',
  'region=REGION        signing region (default $AWS_REGION, else us-east-1)',
  'path-style=BOOL      force path-style (true) or virtual-hosted (false) bucket addressing',
  'profile=NAME         AWS shared config/credentials profile (default $AWS_PROFILE)',
  'access-key=ID        access key id (default: the AWS environment/profile chain)',
  'secret-key=+FILE|-|-FD|SECRET   secret key from a file, the terminal, a descriptor',
  'session-token=+FILE|-|-FD|TOKEN temporary credentials\' session token',
  `write-buffer=SIZE    dirty data held before writing back (default ${DEFAULT_WRITE_BUFFER / MiB}M)`,
  `connections=N        at most N HTTP connections (default ${DEFAULT_CONNECTIONS})`,
  `timeout=SECONDS      each S3 request must finish within this time (default ${DEFAULT_TIMEOUT_MS / 1000})`,
].join('\n');
