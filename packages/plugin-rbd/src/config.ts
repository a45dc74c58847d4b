import { Errno, NbdError, parseBool, parseDuration } from '@nbdx/server/api';

/** Where an image is: pool, RADOS namespace ('' = the default one), image name, snapshot. */
export interface ImageSpec {
  pool: string;
  namespace: string;
  image: string;
  snap?: string;
}

/** Everything the parameters say, checked and complete. */
export interface RbdConfig {
  pool: string;
  namespace: string;
  /** The image served (without dynamic-export), or the default export (with it). */
  image?: string;
  snap?: string;
  dynamicExport: boolean;
  conf?: string;
  /** The cephx user without the `client.` prefix (librados' id). */
  id?: string;
  keyring?: string;
  monHost?: string;
  /** Seconds allowed to reach the monitors and authenticate (client_mount_timeout). */
  connectTimeoutS: number;
  /** Seconds an OSD or monitor operation may take before it fails with ETIMEDOUT; 0 = wait. */
  opTimeoutS: number;
}

/** Parameters as given, before configComplete() checks that they fit together. */
export interface RawParams {
  image?: string;
  pool?: string;
  namespace?: string;
  snap?: string;
  dynamicExport?: boolean;
  conf?: string;
  id?: string;
  keyring?: string;
  monHost?: string;
  connectTimeoutS?: number;
  opTimeoutS?: number;
}

/** The pool the Ceph tools use when none is named (rbd_default_pool). */
export const DEFAULT_POOL = 'rbd';
export const DEFAULT_CONNECT_TIMEOUT_S = 30;

export const CONFIG_HELP = [
  '[image=]POOL/IMAGE[@SNAP]  the image to serve; also POOL/NAMESPACE/IMAGE, or IMAGE with pool=',
  'pool=POOL                  the pool (default rbd); with dynamic-export=true the pool served',
  'namespace=NS               RADOS namespace inside the pool (default: none)',
  'snap=SNAP                  serve this snapshot of the image, read-only',
  'dynamic-export=true        each client\'s export name is an image (or IMAGE@SNAP) in the pool;\n                           listing shows the pool\'s images',
  'conf=FILE                  ceph.conf to read (default: the Ceph search path, /etc/ceph/ceph.conf)',
  'id=USER                    cephx user, as rbd --id (default admin; client.USER also accepted)',
  'keyring=FILE               keyring holding the user\'s key (default: from the conf file)',
  'mon_host=ADDR[,ADDR...]    monitor addresses (mon-host= too), instead of or over the conf file',
  'connect-timeout=SECONDS    time allowed to reach the monitors and authenticate (default 30)',
  'timeout=SECONDS            fail an OSD or monitor operation after this long (default 0 = wait)',
].join('\n');

// Pool and image names: what `rbd` accepts, minus the separators used here.
const NAME_RE = /^[^/@\s]+$/;

function checkName(what: string, value: string): string {
  if (!NAME_RE.test(value)) throw new NbdError(Errno.EINVAL, `${what}: '${value}' is not a valid name (no '/', '@' or spaces)`);
  if (Buffer.byteLength(value) > 255) throw new NbdError(Errno.EINVAL, `${what}: '${value.slice(0, 40)}...' is too long`);
  return value;
}

/**
 * `[POOL/[NAMESPACE/]]IMAGE[@SNAP]`, the form `rbd` and qemu's `rbd:` take. Parts not given stay
 * undefined (the pool= and snap= parameters may supply them).
 */
export function parseImageSpec(text: string): { pool?: string; namespace?: string; image: string; snap?: string } {
  const at = text.indexOf('@');
  const path = at < 0 ? text : text.slice(0, at);
  const snap = at < 0 ? undefined : text.slice(at + 1);
  const parts = path.split('/');
  if (parts.length > 3 || parts.some((p) => p === '')) {
    throw new NbdError(Errno.EINVAL, `image: '${text}' is not IMAGE, POOL/IMAGE or POOL/NAMESPACE/IMAGE (optionally @SNAP)`);
  }
  const image = checkName('image', parts[parts.length - 1]!);
  const pool = parts.length > 1 ? checkName('pool', parts[0]!) : undefined;
  const namespace = parts.length === 3 ? checkName('namespace', parts[1]!) : undefined;
  if (snap !== undefined) checkName('snap', snap);
  return { pool, namespace, image, snap };
}

function seconds(text: string, what: string): number {
  return parseDuration(text, what) / 1000;
}

function once<K extends keyof RawParams>(p: RawParams, key: K, param: string, value: RawParams[K]): void {
  if (p[key] !== undefined) throw new NbdError(Errno.EINVAL, `${param}= given more than once`);
  p[key] = value;
}

/** Take one KEY=VALUE from the command line; unknown keys and bad values are errors. */
export function applyParam(p: RawParams, key: string, value: string): void {
  switch (key) {
    case 'image':
      if (value === '') throw new NbdError(Errno.EINVAL, 'image= needs POOL/IMAGE');
      return once(p, 'image', key, value);
    case 'pool':
      return once(p, 'pool', key, checkName('pool', value));
    case 'namespace':
      return once(p, 'namespace', key, value === '' ? '' : checkName('namespace', value));
    case 'snap':
      return once(p, 'snap', key, checkName('snap', value));
    case 'dynamic-export':
      return once(p, 'dynamicExport', key, parseBool(value, 'dynamic-export'));
    case 'conf':
      if (value === '') throw new NbdError(Errno.EINVAL, 'conf= needs a file');
      return once(p, 'conf', key, value);
    case 'id':
    case 'user': {
      const id = value.startsWith('client.') ? value.slice('client.'.length) : value;
      if (id === '' || /\s/.test(id)) throw new NbdError(Errno.EINVAL, `${key}: '${value}' is not a cephx user name`);
      return once(p, 'id', 'id', id);
    }
    case 'keyring':
      if (value === '') throw new NbdError(Errno.EINVAL, 'keyring= needs a file');
      return once(p, 'keyring', key, value);
    case 'mon_host':
    case 'mon-host':
      if (value.trim() === '') throw new NbdError(Errno.EINVAL, `${key}= needs monitor addresses`);
      return once(p, 'monHost', 'mon_host', value);
    case 'connect-timeout': {
      const s = seconds(value, key);
      if (s <= 0) throw new NbdError(Errno.EINVAL, 'connect-timeout: must be more than 0');
      return once(p, 'connectTimeoutS', key, s);
    }
    case 'timeout':
      return once(p, 'opTimeoutS', key, seconds(value, key));
    default:
      throw new NbdError(Errno.EINVAL, `unknown parameter '${key}' (see nbdx rbd --help)`);
  }
}

/** Check that the parameters fit together and fill in the defaults. */
export function completeConfig(p: RawParams): RbdConfig {
  const spec = p.image !== undefined ? parseImageSpec(p.image) : undefined;
  if (spec?.pool !== undefined && p.pool !== undefined && spec.pool !== p.pool) {
    throw new NbdError(Errno.EINVAL, `image=${p.image} names pool '${spec.pool}' but pool=${p.pool}`);
  }
  if (spec?.namespace !== undefined && p.namespace !== undefined && spec.namespace !== p.namespace) {
    throw new NbdError(Errno.EINVAL, `image=${p.image} names namespace '${spec.namespace}' but namespace=${p.namespace}`);
  }
  if (spec?.snap !== undefined && p.snap !== undefined && spec.snap !== p.snap) {
    throw new NbdError(Errno.EINVAL, `image=${p.image} names snapshot '${spec.snap}' but snap=${p.snap}`);
  }
  const dynamicExport = p.dynamicExport ?? false;
  if (!spec && !dynamicExport) {
    throw new NbdError(Errno.EINVAL, 'image= is required: nbdx rbd POOL/IMAGE, or nbdx rbd pool=POOL dynamic-export=true');
  }
  const snap = spec?.snap ?? p.snap;
  if (snap !== undefined && !spec) throw new NbdError(Errno.EINVAL, 'snap= needs image=');
  return {
    pool: spec?.pool ?? p.pool ?? DEFAULT_POOL,
    namespace: spec?.namespace ?? p.namespace ?? '',
    image: spec?.image,
    snap,
    dynamicExport,
    conf: p.conf,
    id: p.id,
    keyring: p.keyring,
    monHost: p.monHost,
    connectTimeoutS: p.connectTimeoutS ?? DEFAULT_CONNECT_TIMEOUT_S,
    opTimeoutS: p.opTimeoutS ?? 0,
  };
}

/**
 * The image a client's export name stands for. Without dynamic-export the configured image,
 * whatever the name; with it the name is `IMAGE` or `IMAGE@SNAP` in the configured pool ("" is
 * image= when given).
 */
export function exportImage(cfg: RbdConfig, exportName: string): ImageSpec {
  if (!cfg.dynamicExport || exportName === '') {
    if (cfg.image === undefined) {
      throw new NbdError(Errno.EINVAL, `no default export: ask for an image of pool '${cfg.pool}' by name (nbdinfo --list shows them)`);
    }
    return { pool: cfg.pool, namespace: cfg.namespace, image: cfg.image, snap: cfg.snap };
  }
  const at = exportName.indexOf('@');
  const image = at < 0 ? exportName : exportName.slice(0, at);
  const snap = at < 0 ? undefined : exportName.slice(at + 1);
  if (!NAME_RE.test(image) || (snap !== undefined && !NAME_RE.test(snap)) || Buffer.byteLength(exportName) > 511) {
    throw new NbdError(Errno.EINVAL, `export '${exportName}' is not IMAGE or IMAGE@SNAP`);
  }
  return { pool: cfg.pool, namespace: cfg.namespace, image, snap };
}

/** `pool/[namespace/]image[@snap]`, as the Ceph tools print it. */
export function specName(s: ImageSpec): string {
  return `${s.pool}/${s.namespace ? `${s.namespace}/` : ''}${s.image}${s.snap !== undefined ? `@${s.snap}` : ''}`;
}

/** The librados settings for the parameters, applied over the conf file and CEPH_ARGS. */
export function radosSettings(cfg: RbdConfig): [string, string][] {
  const s: [string, string][] = [];
  if (cfg.keyring !== undefined) s.push(['keyring', cfg.keyring]);
  if (cfg.monHost !== undefined) s.push(['mon_host', cfg.monHost]);
  s.push(['client_mount_timeout', String(cfg.connectTimeoutS)]);
  if (cfg.opTimeoutS > 0) {
    s.push(['rados_osd_op_timeout', String(cfg.opTimeoutS)]);
    s.push(['rados_mon_op_timeout', String(cfg.opTimeoutS)]);
  }
  return s;
}
