import {
  NbdClient,
  NbdConnectionError,
  NbdOptionError,
  NbdRequestError,
  NbdTlsError,
  NBD,
  type NbdTarget,
} from '@nbdx/client';
import { Errno, NbdError, debug } from '@nbdx/server/api';
import { describeAddress, type ProxyConfig, type UpstreamAddress } from './config.js';

export const NAME = 'nbd';

/** Pause between connection attempts with retry=N. */
export const RETRY_DELAY_MS = 1000;

export function targetOf(a: UpstreamAddress): NbdTarget {
  return a.kind === 'unix' ? { path: a.path } : { host: a.host, port: a.port };
}

/**
 * Run `attempt` (a connection to the upstream server), trying again up to `config.retry` more
 * times, one second apart. A refusal by a server that answered (an option error: unknown export,
 * TLS required) is final at once: asking again would get the same answer.
 */
export async function withRetry<T>(
  config: ProxyConfig,
  what: string,
  attempt: () => Promise<T>,
  sleep: (ms: number) => Promise<void> = (ms) => new Promise((r) => setTimeout(r, ms)),
): Promise<T> {
  const tries = config.retry + 1;
  for (let i = 1; ; i++) {
    try {
      return await attempt();
    } catch (err) {
      if (err instanceof NbdOptionError) {
        if (err.replyType === NBD.REP_ERR_TLS_REQD) {
          throw new NbdError(Errno.EINVAL, `${what}: the upstream server requires TLS: use tls=require (or an nbds:// URI) with tls-psk= or tls-certificates=`);
        }
        throw new NbdError(Errno.EINVAL, `${what}: the upstream server refused: ${err.serverMessage ?? err.message}`);
      }
      // Wrong keys, unverified certificates, no TLS upstream: asking again gets the same answer.
      if (err instanceof NbdTlsError) throw new NbdError(Errno.EIO, `${what}: ${err.message}`);
      const reason = reasonOf(err);
      if (i >= tries) {
        const times = tries === 1 ? '' : ` (tried ${tries} times, ${RETRY_DELAY_MS / 1000} s apart)`;
        throw new NbdError(Errno.EIO, `${what}: cannot connect to the upstream server${times}: ${reason}`);
      }
      debug(NAME, `${what}: attempt ${i} of ${tries} failed (${reason}); retrying in ${RETRY_DELAY_MS} ms`);
      await sleep(RETRY_DELAY_MS);
    }
  }
}

function reasonOf(err: unknown): string {
  const e = err as { code?: unknown; message?: unknown } | null;
  const msg = typeof e?.message === 'string' ? e.message : String(err);
  return typeof e?.code === 'string' && !msg.includes(e.code) ? `${e.code}: ${msg}` : msg;
}

/** Open a transmission connection to `exportName` upstream. */
export function connectUpstream(config: ProxyConfig, exportName: string): Promise<NbdClient> {
  const where = describeAddress(config.address, exportName, config.tls.tls);
  return withRetry(config, `connecting to ${where}`, () =>
    NbdClient.connect(targetOf(config.address), {
      ...config.tls,
      exportName,
      timeout: config.timeoutMs,
      requestTimeout: config.requestTimeoutMs,
    }),
  );
}

/**
 * The error a client gets when the upstream connection is gone: EIO, and `fatal` so the core
 * closes the client connection after replying (new connections open a fresh upstream
 * connection). `code` ENOTCONN lets layers that look at Node error codes (the shared filter's
 * reopen policy) see that the context is beyond use.
 */
export function upstreamLost(cause: unknown): NbdError {
  const why = cause instanceof Error ? cause.message : String(cause);
  const err = new NbdError(Errno.EIO, `upstream connection lost: ${why}`, { fatal: true });
  return Object.assign(err, { code: 'ENOTCONN', cause });
}

/**
 * Turn what @nbdx/client rejected with into what the core replies: the upstream's own error
 * number and message, EIO for a reply that broke the protocol, a fatal EIO when the connection
 * is gone.
 */
export function translateError(err: unknown): never {
  if (err instanceof NbdConnectionError) throw upstreamLost(err);
  if (err instanceof NbdRequestError) {
    const text = err.serverMessage ?? err.message;
    throw new NbdError(err.errno, err.local ? text : `upstream: ${text}`);
  }
  throw err;
}
