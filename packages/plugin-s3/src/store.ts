/**
 * The few S3 operations the plugin needs, on one S3Client shared by every NBD connection, with
 * S3 failures turned into NBD errors that name the object and what the store said.
 */
import * as http from 'node:http';
import * as https from 'node:https';
import type { Readable } from 'node:stream';
import {
  DeleteObjectCommand,
  DeleteObjectsCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  type S3ClientConfig,
} from '@aws-sdk/client-s3';
import { Errno, NbdError } from '@nbdx/server/api';
import type { Settings } from './config.js';

export interface StoreOptions {
  bucket: string;
  endpoint: URL | null;
  region: string;
  pathStyle: boolean;
  profile: string | null;
  credentials: { accessKeyId: string; secretAccessKey: string; sessionToken?: string } | null;
  connections: number;
  timeoutMs: number;
}

export function storeOptions(s: Settings): StoreOptions {
  return {
    bucket: s.bucket!,
    endpoint: s.endpoint,
    // (an empty variable counts as unset, as in the AWS CLI)
    region: s.region ?? (process.env.AWS_REGION || process.env.AWS_DEFAULT_REGION || 'us-east-1'),
    pathStyle: s.pathStyle ?? s.endpoint !== null,
    profile: s.profile,
    credentials:
      s.accessKey !== null
        ? { accessKeyId: s.accessKey, secretAccessKey: s.secretKey!, ...(s.sessionToken ? { sessionToken: s.sessionToken } : {}) }
        : null,
    connections: s.connections,
    timeoutMs: s.timeoutMs,
  };
}

/** What the store told about an object. */
export interface ObjectInfo {
  size: number;
  /** Without quotes (radosgw matches If-Match only against the bare ETag). */
  etag: string | null;
}

/** The result of a GET: how many bytes came, and the object's ETag. */
export interface GetResult {
  bytes: number;
  etag: string | null;
}

interface SdkError {
  name?: string;
  code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
  Code?: string;
}

function statusOf(err: unknown): number | undefined {
  return (err as SdkError | null)?.$metadata?.httpStatusCode;
}

export function isNotFound(err: unknown): boolean {
  const e = err as SdkError | null;
  return statusOf(err) === 404 || e?.name === 'NoSuchKey' || e?.name === 'NotFound';
}

export function isPreconditionFailed(err: unknown): boolean {
  const e = err as SdkError | null;
  return statusOf(err) === 412 || e?.name === 'PreconditionFailed';
}

/** An S3 failure as an NBD error: denied → EPERM, quota → ENOSPC, anything else EIO. */
export function s3Error(what: string, err: unknown): NbdError {
  if (err instanceof NbdError) return err;
  const e = (err ?? {}) as SdkError;
  const status = statusOf(err);
  const name = e.name && e.name !== 'Error' ? e.name : e.code;
  const detail = `${name ? `${name}` : 'error'}${status ? ` (HTTP ${status})` : ''}${e.message && e.message !== name ? `: ${e.message}` : ''}`;
  let errno: number = Errno.EIO;
  if (status === 403 || name === 'AccessDenied' || name === 'InvalidAccessKeyId' || name === 'SignatureDoesNotMatch') errno = Errno.EPERM;
  else if (name === 'QuotaExceeded' || name === 'EntityTooLarge') errno = Errno.ENOSPC;
  const out = new NbdError(errno, `${what}: ${detail}`);
  out.cause = err;
  return out;
}

export function unquote(etag: string | undefined): string | null {
  if (!etag) return null;
  return etag.replace(/^W\//, '').replace(/^"(.*)"$/, '$1');
}

/** One bucket through one S3Client with a keep-alive pool of `connections` sockets. */
export class Store {
  readonly client: S3Client;
  readonly bucket: string;
  private readonly agents: { destroy(): void }[] = [];

  constructor(readonly opts: StoreOptions) {
    this.bucket = opts.bucket;
    const agentOptions = { keepAlive: true, maxSockets: opts.connections, maxFreeSockets: opts.connections };
    const httpAgent = new http.Agent(agentOptions);
    const httpsAgent = new https.Agent(agentOptions);
    this.agents.push(httpAgent, httpsAgent);
    const config: S3ClientConfig = {
      region: opts.region,
      forcePathStyle: opts.pathStyle,
      // Non-AWS stores (radosgw, Swift s3api) do not all know the CRC checksums the SDK adds by
      // default, and the default breaks streamed PUTs there: checksum only where S3 requires one.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: {
        httpAgent,
        httpsAgent,
        connectionTimeout: Math.min(opts.timeoutMs, 30_000),
        // requestTimeout alone only logs a warning in this SDK: make it fail the request, and
        // also give up on a socket silent for as long.
        requestTimeout: opts.timeoutMs,
        throwOnRequestTimeout: true,
        socketTimeout: opts.timeoutMs,
        // Many NBD requests in flight queue for sockets by design: no "socket capacity" warnings.
        socketAcquisitionWarningTimeout: 24 * 3600 * 1000,
      },
    };
    if (opts.endpoint) config.endpoint = opts.endpoint.href.replace(/\/$/, '');
    if (opts.credentials) config.credentials = opts.credentials;
    if (opts.profile) config.profile = opts.profile;
    this.client = new S3Client(config);
  }

  where(key: string): string {
    return `s3://${this.bucket}/${key}`;
  }

  async head(key: string): Promise<ObjectInfo | null> {
    try {
      const r = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: key }));
      const size = r.ContentLength;
      if (size === undefined || !Number.isSafeInteger(size) || size < 0) {
        throw new NbdError(Errno.EIO, `HEAD ${this.where(key)}: the store gave no usable Content-Length`);
      }
      return { size, etag: unquote(r.ETag) };
    } catch (err) {
      if (isNotFound(err)) return null;
      throw s3Error(`HEAD ${this.where(key)}`, err);
    }
  }

  /**
   * GET bytes [start, start + length) of an object and hand each chunk of the body to `sink`
   * with its position relative to `start` (the chunks are the socket's buffers: the sink copies
   * them where they belong, so nothing else is allocated). Returns null when there is no such
   * object; fewer bytes than asked when the object is shorter. `ifMatch` pins the object's
   * content: a changed object fails with EIO instead of mixing old and new.
   */
  async get(
    key: string,
    start: number,
    length: number,
    sink: (chunk: Buffer, pos: number) => void,
    ifMatch?: string,
  ): Promise<GetResult | null> {
    const what = `GET ${this.where(key)} bytes ${start}-${start + length - 1}`;
    let body: Readable;
    let etag: string | null;
    try {
      const r = await this.client.send(
        new GetObjectCommand({
          Bucket: this.bucket,
          Key: key,
          Range: `bytes=${start}-${start + length - 1}`,
          ...(ifMatch ? { IfMatch: ifMatch } : {}),
        }),
      );
      body = r.Body as Readable;
      etag = unquote(r.ETag);
      if (r.ContentRange) {
        const m = /^bytes (\d+)-(\d+)\//.exec(r.ContentRange);
        if (!m || Number(m[1]) !== start) {
          body.destroy();
          throw new NbdError(Errno.EIO, `${what}: the store answered the range ${r.ContentRange}`);
        }
      } else if (start !== 0) {
        // A 200 with the whole object instead of 206: the store ignored Range.
        body.destroy();
        throw new NbdError(Errno.EIO, `${what}: the store ignored the Range header`);
      }
    } catch (err) {
      if (isNotFound(err)) return null;
      // The object ends before `start`.
      if (statusOf(err) === 416 || (err as SdkError).name === 'InvalidRange') return { bytes: 0, etag: null };
      if (isPreconditionFailed(err)) {
        throw new NbdError(Errno.EIO, `${what}: the object changed since the server started (its ETag is no longer ${ifMatch})`);
      }
      throw s3Error(what, err);
    }
    let pos = 0;
    try {
      for await (const chunk of body as AsyncIterable<Buffer>) {
        const take = Math.min(chunk.length, length - pos);
        if (take > 0) sink(take === chunk.length ? chunk : chunk.subarray(0, take), pos);
        pos += chunk.length;
        // A store that sent more than asked (a 200 with the whole object): stop reading it.
        if (pos >= length) break;
      }
    } catch (err) {
      throw s3Error(`${what}: reading the body`, err);
    }
    return { bytes: Math.min(pos, length), etag };
  }

  /**
   * PUT an object from a buffer (sent as it is, no copy). `condition` makes it conditional:
   * `{ ifMatch: ETAG }` (only if unchanged) or `{ ifNoneMatch: '*' }` (only if absent).
   * Returns false when the condition failed (412), the new ETag otherwise.
   */
  async put(key: string, body: Uint8Array, condition?: { ifMatch?: string; ifNoneMatch?: '*' }): Promise<string | null | false> {
    try {
      const r = await this.client.send(
        new PutObjectCommand({
          Bucket: this.bucket,
          Key: key,
          Body: body,
          ContentLength: body.length,
          ...(condition?.ifMatch ? { IfMatch: condition.ifMatch } : {}),
          ...(condition?.ifNoneMatch ? { IfNoneMatch: condition.ifNoneMatch } : {}),
        }),
      );
      return unquote(r.ETag);
    } catch (err) {
      // 409 ConditionalRequestConflict is AWS's answer to racing conditional writes.
      if (condition && (isPreconditionFailed(err) || statusOf(err) === 409)) return false;
      throw s3Error(`PUT ${this.where(key)} (${body.length} bytes)`, err);
    }
  }

  async delete(key: string): Promise<void> {
    try {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: key }));
    } catch (err) {
      if (isNotFound(err)) return;
      throw s3Error(`DELETE ${this.where(key)}`, err);
    }
  }

  /** Delete up to 1000 keys in one request (absent keys are no error). */
  async deleteMany(keys: string[]): Promise<void> {
    if (keys.length === 0) return;
    if (keys.length === 1) return this.delete(keys[0]!);
    const what = `batch DELETE of ${keys.length} objects from ${this.where(keys[0]!)}`;
    let errors;
    try {
      const r = await this.client.send(
        new DeleteObjectsCommand({ Bucket: this.bucket, Delete: { Objects: keys.map((Key) => ({ Key })), Quiet: true } }),
      );
      errors = r.Errors?.filter((e) => e.Code !== 'NoSuchKey');
    } catch (err) {
      throw s3Error(what, err);
    }
    if (errors && errors.length > 0) {
      const e = errors[0]!;
      const denied = e.Code === 'AccessDenied';
      throw new NbdError(denied ? Errno.EPERM : Errno.EIO, `${what}: ${errors.length} failed, first ${e.Key}: ${e.Code} ${e.Message ?? ''}`.trim());
    }
  }

  /**
   * Keys under `prefix` after `startAfter`, in key order, a page (up to 1000) at a time; stops
   * when the listing ends or the caller stops iterating.
   */
  async *list(prefix: string, startAfter?: string): AsyncGenerator<string> {
    let token: string | undefined;
    for (;;) {
      let r;
      try {
        r = await this.client.send(
          new ListObjectsV2Command({
            Bucket: this.bucket,
            Prefix: prefix,
            ...(token ? { ContinuationToken: token } : startAfter ? { StartAfter: startAfter } : {}),
          }),
        );
      } catch (err) {
        throw s3Error(`LIST s3://${this.bucket}/${prefix}*`, err);
      }
      for (const o of r.Contents ?? []) if (o.Key !== undefined) yield o.Key;
      if (!r.IsTruncated || !r.NextContinuationToken) return;
      token = r.NextContinuationToken;
    }
  }

  destroy(): void {
    this.client.destroy();
    for (const a of this.agents) a.destroy();
  }
}
