import * as tls from 'node:tls';
import type { Duplex } from 'node:stream';
import { layerOf, toErrno, type BlockSize } from '../api/common.js';
import { advertisedBlockSize } from '../backend/block-size.js';
import type { Context } from '../backend/context.js';
import * as C from '../wire/constants.js';
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeOptionHeader,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContextReply,
  encodeOptionReply,
  encodeServerReply,
  utf8Within,
} from '../wire/codec.js';
import type { ReplyWriter } from './reply-writer.js';
import type { ProtocolSettings } from './settings.js';
import type { SocketReader } from './socket-reader.js';

/** The id we give `base:allocation` when a client selects it. */
export const BASE_ALLOCATION_ID = 1;

export interface Negotiated {
  ctx: Context;
  structured: boolean;
  extended: boolean;
  /** Context id of base:allocation, when selected. */
  baseAllocation: number | null;
  /** Transmission flags as sent to the client. */
  flags: number;
  /** Block sizes advertised (or that would have been): the transmission enforces them. */
  blockSize: BlockSize;
  stream: Duplex;
  isTls: boolean;
}

/** Thrown to end the handshake by closing the connection (after an optional last reply). */
export class HandshakeClose extends Error {}

/** Transmission flags for an open context. */
export async function exportFlags(ctx: Context, structured: boolean): Promise<number> {
  let f = C.TF_HAS_FLAGS;
  const canWrite = await ctx.canWrite();
  if (!canWrite) f |= C.TF_READ_ONLY;
  if (await ctx.canFlush()) f |= C.TF_SEND_FLUSH;
  if ((await ctx.canFua()) !== 'none') f |= C.TF_SEND_FUA;
  if (await ctx.isRotational()) f |= C.TF_ROTATIONAL;
  if (await ctx.canTrim()) f |= C.TF_SEND_TRIM;
  if (await ctx.canZero()) {
    f |= C.TF_SEND_WRITE_ZEROES;
    if (await ctx.canFastZero()) f |= C.TF_SEND_FAST_ZERO;
  }
  if (structured) f |= C.TF_SEND_DF;
  if (await ctx.canMultiConn()) f |= C.TF_CAN_MULTI_CONN;
  if ((await ctx.canCache()) !== 'none') f |= C.TF_SEND_CACHE;
  return f;
}

/** Block sizes to advertise and enforce: the layers' own, capped by the server's payload limit. */
export async function blockSizes(ctx: Context, maxPayload: number): Promise<BlockSize> {
  return advertisedBlockSize(await ctx.blockSize(), maxPayload);
}

/**
 * Run fixed-newstyle negotiation until the client enters transmission (GO or EXPORT_NAME).
 * Returns null when the client aborted or went away.
 */
export async function negotiate(
  settings: ProtocolSettings,
  reader: SocketReader,
  writer: ReplyWriter,
): Promise<Negotiated | null> {
  const { backend } = settings;
  const offered = (C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES) & settings.handshakeMask;
  writer.writeNow(encodeGreeting(offered));
  const clientFlags = (await reader.read(4)).readUInt32BE(0);
  if (clientFlags & ~offered) {
    throw new HandshakeClose(`client flags 0x${clientFlags.toString(16)} include bits we did not offer`);
  }
  const noZeroes = (clientFlags & C.FLAG_C_NO_ZEROES) !== 0;

  let stream: Duplex = reader.stream;
  let isTls = false;
  let structured = false;
  let extended = false;
  let metaExport: string | null = null;
  let baseAllocation: number | null = null;

  const reply = (option: number, type: number, data?: Uint8Array) =>
    writer.writeNow(encodeOptionReply(option, type, data));
  const replyError = (option: number, type: number, message: string) => {
    settings.debug(`option ${C.OPTION_NAMES[option] ?? option}: ${message}`);
    reply(option, type, utf8Within(message));
  };
  const canonicalName = async (name: string) =>
    name === '' ? backend.defaultExport(settings.readonly, isTls) : name;

  for (let count = 1; ; count++) {
    // A client that does not read its option replies is not read either (memory-budget.ts).
    if (writer.backlog > settings.maxOptionLength) await writer.settled();
    const header = decodeOptionHeader(await reader.read(C.OPTION_HEADER_SIZE));
    if (!header) throw new HandshakeClose('bad option magic');
    const { option, length } = header;
    if (length > settings.maxOptionLength) {
      // EXPORT_NAME has no error reply: the only answer the spec allows is hanging up.
      if (option !== C.OPT_EXPORT_NAME) {
        replyError(option, C.REP_ERR_TOO_BIG, `option length ${length} exceeds the limit of ${settings.maxOptionLength}`);
      }
      throw new HandshakeClose('oversized option');
    }
    const data = await reader.read(length);
    const name = C.OPTION_NAMES[option] ?? `unknown option ${option}`;
    settings.debug(`client option ${name} (length ${length})`);
    if (settings.shuttingDown?.() && option !== C.OPT_ABORT) {
      // Options that arrive while the server shuts down (ABORT is still acknowledged below).
      // Found by the fuzzer: a client's own EOF must not count as that (it also aborts the
      // connection's signal): the options it sent before EOF are answered normally.
      if (option !== C.OPT_EXPORT_NAME) replyError(option, C.REP_ERR_SHUTDOWN, 'the server is shutting down');
      throw new HandshakeClose('the server is shutting down');
    }
    if (count > settings.maxOptions) {
      // Found by the fuzzer: EXPORT_NAME has no error reply, only hanging up (as above).
      if (option !== C.OPT_EXPORT_NAME) replyError(option, C.REP_ERR_POLICY, `too many options (the limit is ${settings.maxOptions})`);
      throw new HandshakeClose(`client sent more than ${settings.maxOptions} options without choosing an export`);
    }

    if (settings.tls.mode === 'require' && !isTls && option !== C.OPT_STARTTLS && option !== C.OPT_ABORT) {
      if (option === C.OPT_EXPORT_NAME) throw new HandshakeClose('EXPORT_NAME before TLS');
      replyError(option, C.REP_ERR_TLS_REQD, 'TLS is required: send STARTTLS first');
      continue;
    }

    switch (option) {
      case C.OPT_EXPORT_NAME: {
        const exportName = await canonicalName(data.toString('utf8'));
        let ctx: Context;
        try {
          ctx = await backend.open(settings.readonly, exportName, isTls, settings.abort?.signal);
        } catch (err) {
          const message = `cannot open export '${exportName}': ${(err as Error).message}`;
          settings.error(`${layerOf(err) ?? 'nbdx'}: error: ${message}`);
          throw new HandshakeClose(message);
        }
        const flags = await exportFlags(ctx, structured);
        const blockSize = await blockSizes(ctx, settings.maxPayload);
        writer.writeNow(encodeExportNameReply(ctx.size, flags, noZeroes));
        return { ctx, structured, extended, baseAllocation: metaOk(exportName) ? baseAllocation : null, flags, blockSize, stream, isTls };
      }
      case C.OPT_ABORT:
        // Any data is ignored; the client may or may not wait for the ACK.
        reply(option, C.REP_ACK);
        return null;
      case C.OPT_LIST: {
        if (length !== 0) {
          replyError(option, C.REP_ERR_INVALID, 'LIST takes no data');
          break;
        }
        try {
          const list = await backend.listExports(settings.readonly, isTls);
          for (const e of list) reply(option, C.REP_SERVER, encodeServerReply(e.name, e.description ?? ''));
          reply(option, C.REP_ACK);
        } catch (err) {
          replyError(option, C.REP_ERR_PLATFORM, `cannot list exports: ${(err as Error).message}`);
        }
        break;
      }
      case C.OPT_STARTTLS: {
        if (length !== 0) {
          replyError(option, C.REP_ERR_INVALID, 'STARTTLS takes no data');
          break;
        }
        if (settings.tls.mode === 'off') {
          replyError(option, C.REP_ERR_POLICY, 'TLS is not configured on this server');
          break;
        }
        if (isTls) {
          replyError(option, C.REP_ERR_INVALID, 'TLS is already on');
          break;
        }
        // Whatever the client sent after STARTTLS and before its TLS handshake would otherwise be
        // read later as if it had come through TLS: a man in the middle could inject options
        // into the encrypted session (CVE-2021-3716 in nbdkit). Such a client is dropped.
        if (reader.unread > 0) throw new HandshakeClose('client sent data after STARTTLS before the TLS handshake');
        reply(option, C.REP_ACK);
        stream = await startTls(settings, reader, writer);
        isTls = true;
        // Everything negotiated in clear is forgotten.
        structured = extended = false;
        metaExport = null;
        baseAllocation = null;
        break;
      }
      case C.OPT_STRUCTURED_REPLY:
      case C.OPT_EXTENDED_HEADERS: {
        if (length !== 0) replyError(option, C.REP_ERR_INVALID, `${name} takes no data`);
        else if (settings.noStructuredReplies) replyError(option, C.REP_ERR_UNSUP, `${name} is disabled on this server`);
        else if (option === C.OPT_STRUCTURED_REPLY && extended)
          replyError(option, C.REP_ERR_EXT_HEADER_REQD, 'extended headers are already negotiated');
        else if (option === C.OPT_STRUCTURED_REPLY ? structured : extended)
          replyError(option, C.REP_ERR_INVALID, `${name} was already negotiated`);
        else {
          structured = true;
          if (option === C.OPT_EXTENDED_HEADERS) extended = true;
          reply(option, C.REP_ACK);
        }
        break;
      }
      case C.OPT_LIST_META_CONTEXT:
      case C.OPT_SET_META_CONTEXT: {
        const isSet = option === C.OPT_SET_META_CONTEXT;
        // A SET replaces the selection even when it fails (the spec): forget it first.
        if (isSet) {
          baseAllocation = null;
          metaExport = null;
        }
        if (!structured) {
          replyError(option, C.REP_ERR_INVALID, `${name} needs structured replies first`);
          break;
        }
        const req = decodeMetaContextRequest(data);
        if (!req) {
          replyError(option, C.REP_ERR_INVALID, `${name}: malformed request`);
          break;
        }
        // A bare namespace ('base:') lists every context in it, but selects none: the spec
        // reserves namespace-wide queries for LIST. No queries at all: LIST shows everything,
        // SET selects nothing.
        const wantsBase =
          (!isSet && req.queries.length === 0) ||
          req.queries.some((q) => q === C.CONTEXT_BASE_ALLOCATION || (!isSet && q === 'base:'));
        if (isSet) {
          metaExport = await canonicalName(req.exportName);
          baseAllocation = wantsBase ? BASE_ALLOCATION_ID : null;
        }
        if (wantsBase) {
          reply(option, C.REP_META_CONTEXT, encodeMetaContextReply(isSet ? BASE_ALLOCATION_ID : 0, C.CONTEXT_BASE_ALLOCATION));
        }
        reply(option, C.REP_ACK);
        break;
      }
      case C.OPT_INFO:
      case C.OPT_GO: {
        const req = decodeInfoRequest(data);
        if (!req) {
          replyError(option, C.REP_ERR_INVALID, `${name}: malformed request`);
          break;
        }
        const exportName = await canonicalName(req.name);
        let ctx: Context;
        try {
          ctx = await backend.open(settings.readonly, exportName, isTls, settings.abort?.signal);
        } catch (err) {
          const message = `cannot open export '${exportName}': ${(err as Error).message}`;
          // The operator sees why (the client only gets the reply, if it shows it at all).
          settings.error(`${layerOf(err) ?? 'nbdx'}: error: ${message}`);
          replyError(option, C.REP_ERR_UNKNOWN, message);
          break;
        }
        let keep = false;
        try {
          const flags = await exportFlags(ctx, structured);
          reply(option, C.REP_INFO, encodeInfoExport(ctx.size, flags));
          if (req.infos.includes(C.INFO_NAME)) reply(option, C.REP_INFO, encodeInfoString(C.INFO_NAME, exportName));
          if (req.infos.includes(C.INFO_DESCRIPTION)) {
            const d = await ctx.exportDescription();
            if (d) reply(option, C.REP_INFO, encodeInfoString(C.INFO_DESCRIPTION, d));
          }
          const sizes = await blockSizes(ctx, settings.maxPayload);
          if (req.infos.includes(C.INFO_BLOCK_SIZE) || sizes.minimum > 1) {
            reply(option, C.REP_INFO, encodeInfoBlockSize(sizes.minimum, sizes.preferred, sizes.maximum));
          }
          reply(option, C.REP_ACK);
          if (option === C.OPT_GO) {
            keep = true;
            return { ctx, structured, extended, baseAllocation: metaOk(exportName) ? baseAllocation : null, flags, blockSize: sizes, stream, isTls };
          }
        } finally {
          if (!keep) await ctx.close().catch(() => {});
        }
        break;
      }
      default:
        replyError(option, C.REP_ERR_UNSUP, `option ${option} is not supported`);
    }
  }

  function metaOk(exportName: string): boolean {
    return metaExport === null || metaExport === exportName;
  }
}

async function startTls(settings: ProtocolSettings, reader: SocketReader, writer: ReplyWriter): Promise<Duplex> {
  // The ACK is handed to the socket at once and the socket changes hands in the same turn as the
  // caller's check for unread bytes: no plaintext can be read in between.
  writer.flush();
  reader.detach();
  const raw = reader.stream;
  const { requestCert, rejectUnauthorized, pskCallback, ...contextOptions } = settings.tls.socketOptions;
  const secure = new tls.TLSSocket(raw as import('node:net').Socket, {
    isServer: true,
    secureContext: tls.createSecureContext(contextOptions),
    requestCert: requestCert ?? false,
    rejectUnauthorized: rejectUnauthorized ?? false,
    ...(pskCallback ? { pskCallback: (_sock: tls.TLSSocket, id: string) => pskCallback(secure, id) } : {}),
  } as tls.TLSSocketOptions);
  try {
    await new Promise<void>((resolve, reject) => {
      const gone = () => reject(new HandshakeClose('connection closed during the TLS handshake'));
      secure.once('secure', resolve);
      secure.once('error', reject);
      secure.once('close', gone);
      // The sockets allow half-open connections, so a client that leaves mid-handshake shows
      // as EOF only (no close follows by itself).
      secure.once('end', gone);
      // The handshake timeout or a shutdown (reader.fail) ends the wait too.
      reader.onFail = reject;
    });
  } catch (err) {
    secure.destroy();
    throw err;
  } finally {
    reader.onFail = null;
  }
  if (requestCert && rejectUnauthorized !== false) {
    // A TLSSocket made by hand (not by tls.Server) never sets `authorized`: ask OpenSSL directly.
    const peer = secure.getPeerCertificate();
    const verifyError = (secure as unknown as { ssl?: { verifyError(): Error | null } }).ssl?.verifyError();
    if (!peer || Object.keys(peer).length === 0) throw new HandshakeClose('client sent no certificate');
    if (verifyError) throw new HandshakeClose(`client certificate rejected: ${verifyError.message}`);
  }
  reader.reattach(secure);
  writer.setStream(secure);
  return secure;
}
