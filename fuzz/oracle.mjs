/**
 * The oracle: a passive protocol checker that sees both directions of one connection. It frames
 * the client's bytes the way a correct server must (so it knows which options and requests the
 * server received, whatever the mutations did to them) and holds every byte the server sends
 * against what the specification allows at that point. It never predicts data it cannot know:
 * where the specification leaves the server a choice (an error or success for a zero-length
 * read, hanging up after a client broke a MUST), both are accepted.
 *
 * Rules come from the NBD specification (doc/proto.md, including the extended-headers
 * extension) and, where marked [nbdx], from the project's own contract in DESIGN.md and
 * shared/nbd-protocol.md ("bad input gets an error reply and the connection keeps working; only
 * broken framing closes it").
 */
import { ByteQueue } from './bytequeue.mjs';
import { classifyRequest } from './expect.mjs';
import {
  CF, CHUNK, CHUNK_NAME, CMD, DEFAULT_MAX_PAYLOAD, ERRNO, EXTENDED_REPLY_MAGIC, GREETING_SIZE, IHAVEOPT,
  INFO, KNOWN_REP_ERRORS, MAX_STRING, NBDMAGIC, OPT, OPTION_REPLY_MAGIC, OPT_NAME, REP, REP_NAME, REPLY_FLAG_DONE,
  SIMPLE_REPLY_MAGIC, SPEC_ERRNOS, STRUCTURED_REPLY_MAGIC, TF, cmdName, decodeRequestAt, errnoName, hex,
  isRepError, parseInfoRequest, parseMetaRequest, payloadOf,
} from './wire.mjs';

const MiB = 1024 * 1024;
/** No reply payload can legitimately be larger than this on our stacks (32 MiB + headers). */
const MAX_SANE_REPLY = 33 * MiB;
const isPow2 = (n) => n > 0 && (n & (n - 1)) === 0;
const validUtf8 = (b) => Buffer.from(b.toString('utf8'), 'utf8').equals(b);
const ZEROES = Buffer.alloc(65536);
/** Index of the first nonzero byte, or -1 (compared 64 KiB at a time, then located). */
function firstNonZero(b) {
  for (let at = 0; at < b.length; at += ZEROES.length) {
    const piece = b.subarray(at, at + ZEROES.length);
    if (!piece.equals(ZEROES.subarray(0, piece.length))) return at + piece.findIndex((x) => x !== 0);
  }
  return -1;
}

export class Oracle {
  /**
   * @param {object} o
   * @param {'off'|'on'|'require'} o.tls   the server's TLS mode
   * @param {boolean} o.readonly          the stack serves read-only
   * @param {{ offset: number, length: number, bytes: Buffer }} o.region  content known to be there
   * @param {boolean} o.immutable          nothing can change the export: everything outside the region is zero
   * @param {boolean} [o.flushMayFailAfterReopen] a valid FLUSH may fail with EIO (filter-retry's flush after a reopen)
   */
  constructor(o) {
    this.o = o;
    this.findings = [];
    this.log = [];
    this.c = new ByteQueue();
    this.s = new ByteQueue();
    this.phase = 'greeting';
    this.serverFlags = 0;
    this.neg = { fixed: false, noZeroes: false, tls: false, structured: false, extended: false, meta: null };
    this.current = null; // option fully received, final reply not yet seen
    this.partial = null; // option header received, data still arriving
    this.lastInfo = null;
    this.tx = null;
    this.serverClosedFlag = false;
    this.clientDone = false;
    this.unknownFlags = false;
    this.tlsAcked = false;
    this.progress = 0; // bumps on every server byte, for the hang timer
  }

  // ---- findings ----------------------------------------------------------------------------

  violation(rule, detail) {
    this.findings.push({ kind: 'violation', rule, detail });
  }

  note(msg) {
    if (this.log.length < 200) this.log.push(msg);
  }

  // ---- events from the session -------------------------------------------------------------

  clientSent(buf) {
    this.c.push(buf);
    this.advanceClient();
  }

  serverData(buf) {
    this.progress++;
    if (this.phase === 'dead') return;
    this.s.push(buf);
    try {
      this.advanceServer();
    } catch (err) {
      this.violation('oracle.internal', `checker error: ${err.stack}`);
      this.phase = 'dead';
    }
  }

  /**
   * @param {string|null} unclean set when the connection ended with a write error (EPIPE,
   *   ECONNRESET) before end-of-file: Node then drops the socket without reading what is still
   *   queued, so replies may have been sent and lost on our side. Nothing owed is judged then.
   */
  serverClosed(unclean = null) {
    if (this.serverClosedFlag) return;
    this.serverClosedFlag = true;
    this.progress++;
    if (this.phase === 'dead' || this.clientDone) return;
    const w = this.requiredNow(true);
    if (!w) return;
    if (w.rule === 'close') return; // closing was what we waited for
    if (unclean) {
      this.note(`connection ended by ${unclean} while ${w.text}: not judged`);
      return;
    }
    this.violation(w.closeRule ?? 'closed.outstanding', `server closed the connection while ${w.text}`);
  }

  /** The client half-closed or hung up: nothing is required from the server any more. */
  clientClosed() {
    this.clientDone = true;
  }

  /** The session finished a TLS handshake: a new plaintext epoch with all state forgotten. */
  tlsStarted() {
    this.c = new ByteQueue();
    this.s = new ByteQueue();
    this.neg = { ...this.neg, tls: true, structured: false, extended: false, meta: null };
    this.current = this.partial = this.lastInfo = null;
    this.phase = 'options';
    this.note('TLS up: negotiation state forgotten');
  }

  // ---- what is owed ------------------------------------------------------------------------

  /**
   * What the server owes us right now, or null. `rule: 'close'` means it owes us a hang-up.
   * Used for hang detection and for judging a close. [nbdx] A close is judged by the project's
   * contract: the spec lets a server hang up on any client that broke a MUST, nbdx promises to
   * answer bad requests with errors and to hang up only on broken framing.
   */
  requiredNow(forClose = false) {
    if (this.clientDone || this.phase === 'dead' || this.phase === 'stopped') return null;
    switch (this.phase) {
      case 'greeting':
        return { text: 'waiting for the greeting', closeRule: 'closed.before-greeting' };
      case 'flags':
      case 'options':
        if (this.unknownFlags) return { rule: 'close', text: 'waiting for the server to hang up after unknown client flags' };
        if (this.hangupAllowed) return null;
        // Bytes behind the waiting option (pipelined options, or requests after GO) break "MUST
        // NOT send any option until it has received a final reply": the server may have hung up
        // over what came later (a bad request magic after the GO it was about to answer, with
        // the answer still queued), so only a client that waited can demand the reply.
        const pipelined = forClose && this.c.length > 0;
        if (this.current && this.current.required && !this.current.closeOk && !pipelined) {
          return {
            text: `waiting for the reply to ${this.current.label}`,
            closeRule: this.current.code === OPT.ABORT ? 'opt.abort-no-ack' : 'opt.closed-instead-of-reply',
          };
        }
        return null;
      case 'export-reply':
        return { text: 'waiting for the EXPORT_NAME reply or a hang-up', closeRule: null, rule: 'close' };
      case 'closing':
        return this.unknownFlags ? { rule: 'close', text: 'waiting for the server to hang up after client flags with unknown bits' } : null;
      case 'tls-pending':
        return null;
      case 'transmission': {
        const tx = this.tx;
        if (tx.lenient || tx.framingBroken) return null;
        const owed = this.outstanding();
        if (owed.length) {
          const list = owed.slice(0, 6).map((r) => `${cmdName(r.type)} cookie ${hex(r.cookie)}`).join(', ');
          return {
            text: `${owed.length} request(s) unanswered (${list}${owed.length > 6 ? ', ...' : ''})`,
            closeRule: tx.disc ? 'tx.disc-dropped-requests' : 'tx.closed-with-requests',
          };
        }
        if (tx.disc) return { rule: 'close', text: 'waiting for the hang-up after DISC' };
        return null;
      }
      default:
        return null;
    }
  }

  /** Requests fully received by the server and not answered yet. */
  outstanding() {
    const out = [];
    for (const list of this.tx.reqs.values()) for (const r of list) if (!r.done && r.complete) out.push(r);
    return out;
  }

  /** True while a fully sent option waits for its final reply (sessions wait on this). */
  optionBusy() {
    if (this.clientDone || this.serverClosedFlag) return false;
    if (this.phase === 'greeting') return true; // the option cannot even be framed yet
    // (in 'flags' the client has not sent its four flag bytes: no option can be waiting)
    return this.phase === 'options' && this.current !== null;
  }

  // ---- the client's bytes, framed as the server must frame them ----------------------------

  advanceClient() {
    for (;;) {
      if (this.phase === 'flags') {
        if (this.c.length < 4) return;
        const f = this.c.take(4).readUInt32BE(0);
        this.neg.fixed = (f & 1) !== 0;
        this.neg.noZeroes = (f & 2) !== 0 && (this.serverFlags & 2) !== 0;
        this.note(`client flags ${hex(f)}`);
        if (f & ~3) {
          // "the server MUST close the TCP connection if it does not recognize the client's flags"
          this.unknownFlags = true;
          this.phase = 'closing';
          return;
        }
        this.phase = 'options';
        continue;
      }
      if (this.phase === 'options') {
        if (this.current) return;
        if (!this.readOption()) return;
        continue;
      }
      if (this.phase === 'transmission') {
        this.parseRequests();
        return;
      }
      return;
    }
  }

  /** Frame the next option; returns true when one became `current`. */
  readOption() {
    if (this.c.length < 16) return false;
    const h = this.c.peek(16);
    if (h.readBigUInt64BE(0) !== IHAVEOPT) {
      this.note('client option magic broken: server may hang up');
      this.phase = 'stopped';
      return false;
    }
    const code = h.readUInt32BE(8);
    const length = h.readUInt32BE(12);
    if (this.c.length < 16 + length) {
      this.partial = { code, length };
      return false;
    }
    this.c.skip(16);
    const data = this.c.take(length);
    this.partial = null;
    this.current = this.expectOption(code, data);
    this.note(`option ${this.current.label}`);
    if (code === OPT.EXPORT_NAME && this.current.exportName) {
      this.current = null;
      this.phase = 'export-reply';
      this.exportNameData = data;
    }
    return this.phase === 'options';
  }

  /** What a correct server may answer to one option. */
  expectOption(code, data) {
    const n = this.neg;
    const label = `${OPT_NAME[code] ?? `option ${code}`}${data.length ? ` (${data.length} bytes)` : ''}`;
    const e = {
      code, label, data, required: true,
      ack: false, errs: 'any', notErrs: new Set(), why: '', nonFinal: new Set(),
      onAck: () => {}, onErr: () => {}, infos: [], metas: [],
    };
    const previousInfo = this.lastInfo;
    this.lastInfo = null;
    // A server MAY hang up on a client it takes for a denial of service: nbdx does after
    // --max-options options (default 32) without choosing an export.
    this.optionCount = (this.optionCount ?? 0) + 1;
    // Likewise for option data above its --max-option-length-like limit (ERR_TOO_BIG, then a hang-up).
    if (this.optionCount > this.o.maxOptions || data.length > this.o.maxOptionLength) {
      e.closeOk = true;
      e.overLimit = true;
    }
    const notls = this.o.tls === 'off' || !n.fixed; // the spec's NOTLS mode
    // "The server MUST NOT respond to any option request with NBD_REP_ERR_TLS_REQD" (NOTLS), nor once TLS is up.
    if (notls || n.tls) e.notErrs.add(REP.ERR_TLS_REQD);
    if (!n.fixed) {
      // Non-fixed newstyle knows only EXPORT_NAME: a server may answer or hang up.
      e.lenient = true;
      e.required = false;
    }
    if (this.o.tls === 'require' && n.fixed && !n.tls && code !== OPT.STARTTLS && code !== OPT.ABORT) {
      if (code === OPT.EXPORT_NAME) return { ...e, exportName: true, mustRefuse: true };
      e.errs = [REP.ERR_TLS_REQD];
      e.why = 'TLS is required and not negotiated';
      return e;
    }
    switch (code) {
      case OPT.EXPORT_NAME:
        e.exportName = true;
        break;
      case OPT.ABORT:
        // "The server MUST reply with NBD_REP_ACK" and "SHOULD ignore any data sent by the client".
        e.ack = true;
        e.errs = [];
        e.why = 'ABORT must be acknowledged';
        e.onAck = () => (this.phase = 'closing');
        break;
      case OPT.LIST:
        if (data.length) e.why = 'LIST takes no data';
        else {
          e.ack = true;
          e.nonFinal.add(REP.SERVER);
        }
        break;
      case OPT.STARTTLS:
        if (data.length) e.why = 'STARTTLS takes no data';
        else if (notls) e.why = n.fixed ? 'TLS is not configured' : 'no TLS without fixed newstyle (the spec\'s NOTLS mode)';
        else if (n.tls) {
          e.errs = [REP.ERR_INVALID];
          e.why = 'TLS is already on';
        } else {
          e.ack = true;
          e.errs = [];
          e.why = 'a TLS server MUST answer the first STARTTLS with ACK';
          // Bytes behind STARTTLS break "MUST NOT send any option until it has received a final
          // reply": the server may hang up on them instead of answering.
          if (this.c.length > 0) e.closeOk = true;
          e.onAck = () => {
            this.phase = 'tls-pending';
            this.tlsAcked = true;
          };
        }
        break;
      case OPT.INFO:
      case OPT.GO: {
        const req = parseInfoRequest(data);
        if (!req) {
          e.why = `${OPT_NAME[code]} data is malformed`;
          break;
        }
        e.ack = true;
        e.nonFinal.add(REP.INFO);
        if (req.trailing) e.why = `${req.trailing} bytes after the information requests`;
        // "if the server has acknowledged ... NBD_OPT_EXTENDED_HEADERS, the server MUST NOT fail NBD_OPT_GO with NBD_REP_ERR_UNSUP"
        if (n.extended) e.notErrs.add(REP.ERR_UNSUP);
        e.infoName = req.name;
        e.onAck = () => {
          const exp = e.infos.find((i) => i.type === INFO.EXPORT);
          if (!exp) {
            this.violation('opt.info-no-export', `${label}: ACK without NBD_INFO_EXPORT ("MUST send at least one NBD_REP_INFO with NBD_INFO_EXPORT")`);
            this.phase = 'dead';
            return;
          }
          if (previousInfo && previousInfo.data.equals(data) && code === OPT.GO) {
            const a = previousInfo.infos.map((i) => i.raw.toString('hex')).sort().join();
            const b = e.infos.map((i) => i.raw.toString('hex')).sort().join();
            if (a !== b) this.violation('opt.go-differs-from-info', `GO right after an identical successful INFO sent different information (INFO: ${a}; GO: ${b})`);
          }
          if (code === OPT.INFO) this.lastInfo = { data, infos: e.infos };
          else this.enterTransmission(exp, e.infos.find((i) => i.type === INFO.BLOCK_SIZE), req.name);
        };
        break;
      }
      case OPT.STRUCTURED_REPLY:
      case OPT.EXTENDED_HEADERS:
        if (data.length) {
          e.why = `${OPT_NAME[code]} takes no data ("the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID")`;
          break;
        }
        e.ack = true;
        e.onAck = () => {
          n.structured = true;
          if (code === OPT.EXTENDED_HEADERS) n.extended = true;
        };
        break;
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT: {
        const isSet = code === OPT.SET_META_CONTEXT;
        const req = parseMetaRequest(data);
        if (isSet) {
          // "Issuing this command replaces all previously-set metadata contexts (including when this command fails)"
          e.onErr = () => (n.meta = { name: req?.name ?? Buffer.alloc(0), ids: new Map() });
        }
        if (!req) {
          // "If an error is returned, the client MUST disregard any context replies that may have
          // been sent": a server may answer the queries it could read before failing.
          e.nonFinal.add(REP.META_CONTEXT);
          e.meta = { isSet, queries: [], malformed: true };
          if (n.structured) {
            e.errs = [REP.ERR_INVALID];
            e.why = 'syntactically invalid meta-context request ("the server MUST fail the request with NBD_REP_ERR_INVALID")';
          } else e.why = 'malformed meta-context request before structured replies';
          break;
        }
        e.ack = true;
        e.nonFinal.add(REP.META_CONTEXT);
        e.meta = { isSet, queries: req.queries.map((q) => q.toString('utf8')) };
        if (req.trailing) e.why = `${req.trailing} bytes after the queries`;
        if (isSet) {
          e.onAck = () => {
            const ids = new Map();
            for (const m of e.metas) ids.set(m.id, m.name);
            n.meta = { name: req.name, ids };
          };
        }
        break;
      }
      default:
        e.why = `option ${code} is unknown ("NBD_REP_ERR_UNSUP")`;
    }
    return e;
  }

  // ---- the server's bytes ------------------------------------------------------------------

  advanceServer() {
    for (;;) {
      const before = this.s.length;
      switch (this.phase) {
        case 'greeting':
          this.readGreeting();
          break;
        case 'flags':
        case 'options':
          this.readOptionReply();
          break;
        case 'export-reply':
          this.readExportReply();
          break;
        case 'closing':
          if (this.s.length) {
            this.violation(this.unknownFlags ? 'hs.talks-after-unknown-flags' : 'opt.data-after-abort',
              this.unknownFlags ? 'server sent data after client flags with unknown bits (it MUST close the connection)' : 'server sent data after acknowledging ABORT');
            this.phase = 'dead';
          }
          return;
        case 'tls-pending':
          this.readWhileTlsPending();
          return;
        case 'transmission':
          this.readReplies();
          break;
        default:
          // stopped / dead: nothing left to check
          this.s = new ByteQueue();
          return;
      }
      if (this.s.length === before || this.s.length === 0) return;
    }
  }

  readGreeting() {
    if (this.s.length < GREETING_SIZE) return;
    const g = this.s.take(GREETING_SIZE);
    if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) {
      this.violation('hs.bad-greeting', `greeting ${g.toString('hex')} is not NBDMAGIC IHAVEOPT`);
      this.phase = 'dead';
      return;
    }
    this.serverFlags = g.readUInt16BE(16);
    if (!(this.serverFlags & 1)) this.violation('hs.no-fixed-newstyle', 'server handshake flags lack FIXED_NEWSTYLE');
    this.phase = 'flags';
    this.advanceClient();
  }

  readOptionReply() {
    if (this.s.length < 20) return;
    const h = this.s.peek(20);
    if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) {
      this.violation('opt.bad-reply-magic', `option reply magic ${h.subarray(0, 8).toString('hex')}`);
      this.phase = 'dead';
      return;
    }
    const option = h.readUInt32BE(8);
    const type = h.readUInt32BE(12);
    const length = h.readUInt32BE(16);
    if (length > 16 * MiB) {
      this.violation('opt.reply-too-long', `option reply of ${length} bytes`);
      this.phase = 'dead';
      return;
    }
    if (this.s.length < 20 + length) return;
    this.s.skip(20);
    const payload = this.s.take(length);
    const tname = REP_NAME[type] ?? hex(type);
    if (this.phase === 'flags' && !this.unknownFlags) {
      this.violation('opt.reply-before-flags', `option reply ${tname} before the client flags arrived`);
    }
    if (!this.current) this.advanceClient();
    const e = this.current;
    if (!e) {
      // An early refusal of an option whose data is still arriving (ERR_TOO_BIG), or an early
      // ACK to ABORT, whose data a server "SHOULD ignore".
      if (this.partial && this.partial.code === OPT.EXPORT_NAME) {
        this.violation('hs.option-reply-to-export-name', `an option reply (${tname}) answers an EXPORT_NAME whose data is still arriving; EXPORT_NAME can only be answered with size and flags or a hang-up`);
        this.phase = 'dead';
        return;
      }
      if (this.partial && (isRepError(type) || (type === REP.ACK && this.partial.code === OPT.ABORT && option === OPT.ABORT))) {
        this.note(`early ${tname} to an incomplete option ${this.partial.code}`);
        this.phase = 'stopped';
        return;
      }
      this.violation('opt.reply-to-nothing', `option reply ${tname} for option ${option} although no complete option is waiting for an answer${this.neg.tls ? ' (bytes injected before STARTTLS processed inside TLS?)' : ''}`);
      this.phase = 'dead';
      return;
    }
    if (option !== e.code) this.violation('opt.wrong-option-number', `reply ${tname} carries option ${option}, but answers ${e.label}`);
    if (isRepError(type)) {
      if (!KNOWN_REP_ERRORS.has(type)) this.violation('opt.unknown-error-type', `error reply type ${hex(type)} to ${e.label} is not defined`);
      else if (e.notErrs.has(type)) this.violation('opt.forbidden-error', `${tname} to ${e.label} is forbidden here (${type === REP.ERR_TLS_REQD ? 'TLS_REQD without TLS required, or after TLS' : 'UNSUP to GO after extended headers'})`);
      else if (e.errs !== 'any' && !e.errs.includes(type) && !e.lenient && !e.overLimit) {
        this.violation(`opt.wrong-error:${OPT_NAME[e.code] ?? 'unknown'}`, `${e.label} answered ${tname}; expected ${e.errs.length ? e.errs.map((t) => REP_NAME[t]).join(' or ') : 'ACK'}: ${e.why}`);
      }
      if (e.closeOk) this.hangupAllowed = true;
      if (payload.length > MAX_STRING) this.violation('opt.error-message-too-long', `error message of ${payload.length} bytes (strings MUST be at most 4096)`);
      else if (!validUtf8(payload)) this.violation('opt.error-message-not-utf8', `error message is not UTF-8: ${payload.toString('hex')}`);
      e.onErr();
      this.finishOption();
      return;
    }
    if (type === REP.ACK) {
      if (length !== 0) this.violation('opt.ack-with-data', `ACK to ${e.label} carries ${length} bytes ("No data")`);
      if (!e.ack && !e.lenient) {
        // The server's state now differs from the spec's: later checks would only repeat this.
        this.violation(`opt.ack-forbidden:${OPT_NAME[e.code] ?? 'unknown'}`, `${e.label} was acknowledged: ${e.why}`);
        this.phase = 'dead';
        return;
      }
      this.current = null;
      e.onAck();
      if (this.phase === 'options') this.finishOption();
      return;
    }
    if (!e.nonFinal.has(type) && !e.lenient) {
      this.violation('opt.unexpected-reply-type', `${tname} is not a valid reply to ${e.label}`);
      return;
    }
    this.checkNonFinal(e, type, payload);
  }

  finishOption() {
    this.current = null;
    this.advanceClient();
  }

  checkNonFinal(e, type, p) {
    if (type === REP.SERVER) {
      if (p.length < 4 || p.readUInt32BE(0) > p.length - 4) this.violation('opt.server-reply-malformed', `REP_SERVER payload ${p.toString('hex').slice(0, 64)}`);
      else if (p.readUInt32BE(0) > MAX_STRING) this.violation('opt.server-name-too-long', 'export name over 4096 bytes');
    } else if (type === REP.INFO) {
      if (p.length < 2) {
        this.violation('opt.info-malformed', 'REP_INFO shorter than its type');
        return;
      }
      const it = p.readUInt16BE(0);
      const info = { type: it, raw: p };
      if (it === INFO.EXPORT) {
        if (p.length !== 12) return this.violation('opt.info-export-length', `NBD_INFO_EXPORT of ${p.length} bytes (MUST be 12)`);
        info.size = p.readBigUInt64BE(2);
        info.flags = p.readUInt16BE(10);
        this.checkTransmissionFlags(info.flags, `NBD_INFO_EXPORT to ${e.label}`);
      } else if (it === INFO.BLOCK_SIZE) {
        if (p.length !== 14) return this.violation('opt.info-block-size-length', `NBD_INFO_BLOCK_SIZE of ${p.length} bytes (MUST be 14)`);
        info.min = p.readUInt32BE(2);
        info.pref = p.readUInt32BE(6);
        info.max = p.readUInt32BE(10);
        const { min, pref, max } = info;
        if (!isPow2(min) || min > 65536) this.violation('opt.block-size-min', `minimum block size ${min} (MUST be a power of 2 <= 65536)`);
        if (!isPow2(pref) || pref < Math.max(min, 512)) this.violation('opt.block-size-preferred', `preferred block size ${pref} with minimum ${min}`);
        if (max !== 0xffffffff && max < pref) this.violation('opt.block-size-max', `maximum payload ${max} below preferred ${pref}`);
      } else if (it === INFO.NAME || it === INFO.DESCRIPTION) {
        // (a name echoed back as the client sent it is the client's problem, not the server's)
        const echoed = it === INFO.NAME && e.infoName && p.subarray(2).equals(e.infoName);
        if (!echoed && (p.length - 2 > MAX_STRING || !validUtf8(p.subarray(2)))) this.violation('opt.info-string', `NBD_INFO ${it === INFO.NAME ? 'NAME' : 'DESCRIPTION'} is not a valid string (${p.length - 2} bytes)`);
      }
      e.infos.push(info);
    } else if (type === REP.META_CONTEXT) {
      if (!e.meta) return;
      if (p.length < 5) return this.violation('opt.meta-reply-malformed', `REP_META_CONTEXT of ${p.length} bytes`);
      const id = p.readUInt32BE(0);
      const nameBytes = p.subarray(4);
      const name = nameBytes.toString('utf8');
      if (!validUtf8(nameBytes) || nameBytes.length > MAX_STRING || !/^[^:]+:/.test(name)) {
        this.violation('opt.meta-name', `context name ${JSON.stringify(name)} is not namespace:...`);
      }
      const { isSet, queries, malformed } = e.meta;
      if (malformed) return;
      if (isSet && queries.length === 0) this.violation('opt.meta-set-empty-query', `SET_META_CONTEXT with no queries returned ${name} ("If zero queries are sent, the server MUST select no metadata contexts")`);
      if (queries.length > 0 && !queries.some((q) => q === name || (q.endsWith(':') && name.startsWith(q)))) {
        this.violation('opt.meta-unrequested', `context ${name} matches none of the queries ${JSON.stringify(queries.slice(0, 5))}`);
      }
      if (isSet && e.metas.some((m) => m.id === id && m.name !== name)) this.violation('opt.meta-duplicate-id', `context id ${id} given to two contexts by SET_META_CONTEXT`);
      e.metas.push({ id, name });
    }
  }

  checkTransmissionFlags(f, where) {
    if (!(f & TF.HAS_FLAGS)) this.violation('flags.no-has-flags', `${where}: transmission flags ${hex(f)} lack HAS_FLAGS`);
    if (f & TF.SEND_DF && !this.neg.structured) this.violation('flags.df-without-sr', `${where}: SEND_DF without structured replies ("MUST leave this flag clear")`);
    if (f & TF.SEND_FAST_ZERO && !(f & TF.SEND_WRITE_ZEROES)) this.violation('flags.fast-zero-without-zeroes', `${where}: SEND_FAST_ZERO without SEND_WRITE_ZEROES`);
    if (f & TF.BLOCK_STATUS_PAYLOAD && !this.neg.extended) this.violation('flags.bs-payload-without-ext', `${where}: BLOCK_STATUS_PAYLOAD without extended headers`);
    if (this.o.readonly && !(f & TF.READ_ONLY)) this.violation('flags.readonly-missing', `${where}: the export is served read-only but READ_ONLY is clear`);
  }

  readExportReply() {
    if (this.s.length >= 8 && this.s.peek(8).readBigUInt64BE(0) === OPTION_REPLY_MAGIC) {
      // "The server will reply to any option apart from NBD_OPT_EXPORT_NAME with reply packets":
      // an EXPORT_NAME client reads these bytes as export size and flags.
      const h = this.s.peek(Math.min(this.s.length, 20));
      this.violation('hs.option-reply-to-export-name', `an option reply (type ${h.length >= 16 ? REP_NAME[h.readUInt32BE(12)] ?? hex(h.readUInt32BE(12)) : '?'}) answers EXPORT_NAME, which can only be answered with size and flags or a hang-up`);
      this.phase = 'dead';
      return;
    }
    const need = this.neg.noZeroes ? 10 : 134;
    if (this.s.length < need) return;
    const b = this.s.take(need);
    const size = b.readBigUInt64BE(0);
    const flags = b.readUInt16BE(8);
    if (need === 134 && b.subarray(10).some((x) => x !== 0)) this.violation('hs.export-name-zeroes', 'the 124 reserved bytes after the EXPORT_NAME reply are not zero');
    this.checkTransmissionFlags(flags, 'EXPORT_NAME reply');
    if (this.neg.extended) {
      // The client broke "MUST NOT use NBD_OPT_EXPORT_NAME" after extended headers.
      this.note('EXPORT_NAME after extended headers accepted: not checking the transmission phase');
      this.phase = 'stopped';
      return;
    }
    this.enterTransmission({ size, flags }, null, this.exportNameData);
  }

  readWhileTlsPending() {
    // After STARTTLS's ACK only TLS records may follow: a plaintext option reply means bytes the
    // client sent before the handshake were acted upon.
    const b = this.s.peek(Math.min(this.s.length, 8));
    const looksTls = b[0] >= 0x14 && b[0] <= 0x17 && (b.length < 2 || b[1] === 0x03);
    if (!looksTls) {
      const opt = b.length >= 8 && b.readBigUInt64BE(0) === OPTION_REPLY_MAGIC;
      this.violation('tls.plaintext-after-starttls', `after acknowledging STARTTLS the server sent ${opt ? 'a plaintext option reply' : 'non-TLS bytes'}: ${b.toString('hex')}`);
      this.phase = 'dead';
      return;
    }
    // TLS bytes belong to the session's TLS layer, not to us; the session hands them over.
    this.s = new ByteQueue();
  }

  // ---- transmission ------------------------------------------------------------------------

  enterTransmission(exp, bs, name) {
    const n = this.neg;
    let contexts = null;
    let exact = false;
    if (n.meta && n.meta.ids.size > 0) {
      contexts = n.meta.ids;
      // "referred to the same export name used to enter transmission phase"
      exact = Buffer.compare(n.meta.name, name) === 0;
    }
    this.tx = {
      size: exp.size,
      flags: exp.flags,
      ext: n.extended,
      structured: n.structured,
      minBlock: bs ? BigInt(bs.min) : 1n,
      maxPayload: bs ? Math.min(bs.max, 0xffffffff) : DEFAULT_MAX_PAYLOAD,
      contexts,
      exact,
      reqs: new Map(),
      done: new Set(),
      pending: null, // payload still to skip: { req, left }
      stopped: null,
      lenient: null,
      framingBroken: false,
      disc: null,
      readData: null,
      maxRead: 0n,
    };
    this.phase = 'transmission';
    this.note(`transmission: size ${exp.size} flags ${hex(exp.flags)} ${n.extended ? 'extended' : n.structured ? 'structured' : 'simple'}${contexts ? ` contexts ${[...contexts.values()]}${exact ? '' : ' (other export name)'}` : ''}`);
    this.parseRequests();
  }

  parseRequests() {
    const tx = this.tx;
    const hsize = tx.ext ? 32 : 28;
    while (!tx.stopped) {
      if (tx.pending) {
        const m = Math.min(this.c.length, tx.pending.left);
        this.c.skip(m);
        tx.pending.left -= m;
        if (tx.pending.left > 0) return;
        tx.pending.req.complete = true;
        tx.pending = null;
        continue;
      }
      if (this.c.length < hsize) return;
      const h = decodeRequestAt(this.c.take(hsize), 0, tx.ext);
      if (!h.magicOk) {
        tx.stopped = 'bad request magic';
        tx.framingBroken = true;
        this.note('request magic broken: the server may hang up; earlier replies optional');
        return;
      }
      if (h.type === CMD.DISC) {
        const clean = h.offset === 0n && h.length === 0n && (h.flags & ~(tx.flags & TF.SEND_FUA ? CF.FUA : 0)) === 0;
        tx.stopped = 'DISC';
        if (clean) tx.disc = h;
        else {
          tx.lenient = 'DISC with flags, offset or length';
          this.note('malformed DISC: server may refuse it or disconnect');
        }
        return;
      }
      const pl = payloadOf(h, tx.ext, tx.maxPayload);
      if (h.type === CMD.READ && h.length > tx.maxRead && h.length <= 1n << 32n) tx.maxRead = h.length;
      const req = { ...h, expect: this.classify(h), complete: pl.bytes === 0n, done: false, chunks: [], content: [], errno: 0, contextsSeen: new Set(), dfContent: 0 };
      const list = tx.reqs.get(h.cookie) ?? [];
      list.push(req);
      tx.reqs.set(h.cookie, list);
      if (pl.ambiguous) {
        tx.stopped = tx.lenient = pl.ambiguous;
        this.note(`${pl.ambiguous}: framing past this point is the server's choice`);
        return;
      }
      if (pl.bytes > 0n) tx.pending = { req, left: Number(pl.bytes) };
    }
  }

  classify(h) {
    return classifyRequest(h, this.tx);
  }

  /** The request a reply belongs to, or null (with a finding when that is wrong). */
  attribute(cookie, what) {
    const tx = this.tx;
    const list = tx.reqs.get(cookie);
    const r = list?.find((x) => !x.done);
    if (r) return r;
    if (tx.lenient) return null; // replies to requests framed by the server's own choice
    if (list?.length) this.violation('tx.answered-twice', `${what} for cookie ${hex(cookie)} (${cmdName(list[0].type)}) that was already answered`);
    else this.violation('tx.unknown-cookie', `${what} for cookie ${hex(cookie)} that was never sent${tx.disc || tx.stopped ? ` (or only after ${tx.stopped})` : ''}`);
    return null;
  }

  readReplies() {
    const tx = this.tx;
    for (;;) {
      if (tx.readData) {
        const rd = tx.readData;
        const m = Math.min(this.s.length, rd.left);
        if (m === 0) return;
        const data = this.s.take(m);
        this.checkData(rd.req, rd.req.offset + BigInt(rd.at), data, 'simple reply data');
        rd.at += m;
        rd.left -= m;
        if (rd.left === 0) tx.readData = null;
        continue;
      }
      if (this.s.length < 4) return;
      const magic = this.s.peek(4).readUInt32BE(0);
      if (magic === SIMPLE_REPLY_MAGIC) {
        if (this.s.length < 16) return;
        const b = this.s.take(16);
        this.simpleReply(b.readUInt32BE(4), b.readBigUInt64BE(8));
      } else if (magic === STRUCTURED_REPLY_MAGIC || magic === EXTENDED_REPLY_MAGIC) {
        const ext = magic === EXTENDED_REPLY_MAGIC;
        const hs = ext ? 32 : 20;
        if (this.s.length < hs) return;
        const b = this.s.peek(hs);
        const len = ext ? b.readBigUInt64BE(24) : BigInt(b.readUInt32BE(16));
        // A server may serve a READ above the maximum payload in one chunk: allow what was asked.
        if (len > BigInt(MAX_SANE_REPLY) && len > tx.maxRead + 64n) {
          this.violation('tx.chunk-too-long', `reply chunk claims ${len} payload bytes`);
          this.phase = 'dead';
          return;
        }
        if (this.s.length < hs + Number(len)) return;
        this.s.skip(hs);
        const payload = this.s.take(Number(len));
        this.chunk(ext, b.readUInt16BE(4), b.readUInt16BE(6), b.readBigUInt64BE(8), ext ? b.readBigUInt64BE(16) : null, payload);
      } else {
        this.violation('tx.bad-reply-magic', `reply magic ${hex(magic)} (${tx.ext ? 'extended' : tx.structured ? 'structured' : 'simple'} mode)`);
        this.phase = 'dead';
        return;
      }
      if (this.phase === 'dead') return;
    }
  }

  simpleReply(error, cookie) {
    const tx = this.tx;
    if (tx.ext) this.violation('tx.simple-in-extended', 'simple reply although extended headers were negotiated ("the server MUST NOT use simple replies")');
    const req = this.attribute(cookie, 'simple reply');
    if (!req) {
      if (!tx.structured && error === 0) {
        // we cannot know whether READ data follows: stop checking this connection
        this.phase = 'dead';
      }
      return;
    }
    if (req.type === CMD.READ && tx.structured) {
      this.violation('tx.simple-read-in-structured', `simple reply to READ although structured replies were negotiated ("MUST NOT use a simple reply for NBD_CMD_READ")`);
      if (error === 0) {
        this.phase = 'dead'; // whether data follows is anybody's guess
        return;
      }
    }
    req.done = true;
    if (error !== 0) {
      this.judge(req, error);
      return;
    }
    this.judge(req, 0);
    if (req.type === CMD.READ && !tx.structured) {
      if (req.length > BigInt(MAX_SANE_REPLY) && req.length > 1n << 31n) {
        this.phase = 'dead';
        return;
      }
      if (req.length > 0n) tx.readData = { req, at: 0, left: Number(req.length) };
    }
  }

  chunk(ext, flags, type, cookie, offsetField, p) {
    const tx = this.tx;
    const tname = CHUNK_NAME[type] ?? hex(type);
    if (!tx.structured) this.violation('tx.chunk-without-sr', `structured reply chunk (${tname}) although structured replies were not negotiated`);
    else if (ext !== tx.ext) this.violation('tx.chunk-wrong-header', `${ext ? 'extended' : 'compact structured'} chunk in ${tx.ext ? 'extended' : 'structured'} mode`);
    if (flags & ~REPLY_FLAG_DONE) this.violation('tx.chunk-flags', `chunk flags ${hex(flags)} (only DONE is defined)`);
    const req = this.attribute(cookie, `${tname} chunk`);
    if (!req) return;
    const what = `${tname} for ${cmdName(req.type)} ${req.offset}+${req.length}`;
    if (ext && offsetField !== req.offset) {
      this.violation('tx.ext-offset-mismatch', `extended reply offset ${offsetField} differs from the request's ${req.offset} ("offset (MUST match the request)") in ${what}`);
    }
    const done = (flags & REPLY_FLAG_DONE) !== 0;
    const reqEnd = req.offset + req.length;
    const content = (start, len, kind) => {
      if (start < req.offset || start + len > reqEnd) this.violation('tx.content-outside-request', `${kind} ${start}+${len} outside the request ${req.offset}+${req.length}`);
      for (const [s, l] of req.content) {
        if (start < s + l && s < start + len) this.violation('tx.content-overlap', `${kind} ${start}+${len} overlaps ${s}+${l}`);
      }
      req.content.push([start, len]);
      if (req.flags & CF.DF && this.tx.flags & TF.SEND_DF && req.content.length > 1) this.violation('tx.df-fragmented', `${req.content.length} content chunks for a DF read`);
    };
    switch (type) {
      case CHUNK.NONE:
        if (p.length !== 0) this.violation('tx.none-with-payload', `NONE chunk with ${p.length} bytes`);
        if (!done) this.violation('tx.none-without-done', 'NONE chunk without DONE ("MUST always be used with NBD_REPLY_FLAG_DONE")');
        break;
      case CHUNK.OFFSET_DATA: {
        if (req.type !== CMD.READ) this.violation('tx.chunk-wrong-command', `${what}`);
        if (p.length < 9) {
          this.violation('tx.data-chunk-short', `OFFSET_DATA of ${p.length} bytes (MUST be at least 9)`);
          break;
        }
        const start = p.readBigUInt64BE(0);
        content(start, BigInt(p.length - 8), 'OFFSET_DATA');
        if (req.type === CMD.READ) this.checkData(req, start, p.subarray(8), 'OFFSET_DATA');
        break;
      }
      case CHUNK.OFFSET_HOLE: {
        if (req.type !== CMD.READ) this.violation('tx.chunk-wrong-command', `${what}`);
        if (p.length !== 12) {
          this.violation('tx.hole-chunk-length', `OFFSET_HOLE of ${p.length} bytes (MUST be 12)`);
          break;
        }
        const start = p.readBigUInt64BE(0);
        const len = BigInt(p.readUInt32BE(8));
        if (len === 0n) this.violation('tx.hole-zero', 'OFFSET_HOLE with hole size 0');
        content(start, len, 'OFFSET_HOLE');
        this.checkZeroes(req, start, len, 'OFFSET_HOLE');
        break;
      }
      case CHUNK.BLOCK_STATUS:
      case CHUNK.BLOCK_STATUS_EXT:
        this.blockStatusChunk(req, type, p);
        break;
      case CHUNK.ERROR:
      case CHUNK.ERROR_OFFSET: {
        const min = type === CHUNK.ERROR ? 6 : 14;
        if (p.length < min) {
          this.violation('tx.error-chunk-short', `${tname} of ${p.length} bytes (MUST be at least ${min})`);
          req.errno = req.errno || -1;
          break;
        }
        const errno = p.readUInt32BE(0);
        const mlen = p.readUInt16BE(4);
        if (errno === 0) this.violation('tx.error-zero', `${tname} with error 0 ("MUST be nonzero") for ${cmdName(req.type)}`);
        if (mlen > p.length - min) this.violation('tx.error-message-length', `${tname} message length ${mlen} exceeds the chunk (${p.length} bytes)`);
        else if (mlen > MAX_STRING) this.violation('tx.error-message-too-long', `error message of ${mlen} bytes`);
        else if (!validUtf8(p.subarray(6, 6 + mlen))) this.violation('tx.error-message-not-utf8', 'error message is not UTF-8');
        if (type === CHUNK.ERROR_OFFSET && mlen <= p.length - min) {
          const at = p.readBigUInt64BE(6 + mlen);
          if (at < req.offset || at >= reqEnd) this.violation('tx.error-offset-outside', `ERROR_OFFSET ${at} outside the request ${req.offset}+${req.length}`);
          if (req.type === CMD.FLUSH) this.violation('tx.chunk-wrong-command', `ERROR_OFFSET for FLUSH`);
        }
        req.errno = req.errno || errno || -1;
        break;
      }
      default:
        this.violation('tx.unknown-chunk-type', `chunk type ${hex(type)} for ${cmdName(req.type)}`);
        if (type & 0x8000) req.errno = req.errno || -1;
    }
    if (done) this.finishChunked(req);
  }

  blockStatusChunk(req, type, p) {
    const tx = this.tx;
    if (req.type !== CMD.BLOCK_STATUS) return this.violation('tx.chunk-wrong-command', `${CHUNK_NAME[type]} for ${cmdName(req.type)}`);
    if ((type === CHUNK.BLOCK_STATUS_EXT) !== tx.ext) this.violation('tx.bs-wrong-type', `${CHUNK_NAME[type]} in ${tx.ext ? 'extended' : 'structured'} mode`);
    const ext = type === CHUNK.BLOCK_STATUS_EXT;
    const head = ext ? 8 : 4;
    const each = ext ? 16 : 8;
    if (p.length < head + each || (p.length - head) % each !== 0) {
      return this.violation('tx.bs-length', `${CHUNK_NAME[type]} payload of ${p.length} bytes (MUST be ${head} + a positive multiple of ${each})`);
    }
    const id = p.readUInt32BE(0);
    const n = (p.length - head) / each;
    if (ext && p.readUInt32BE(4) !== n) this.violation('tx.bs-count', `descriptor count ${p.readUInt32BE(4)} but ${n} descriptors`);
    if (!tx.contexts?.has(id)) this.violation('tx.bs-unknown-context', `block status for context id ${id}, which the final SET_META_CONTEXT did not select`);
    if (req.contextsSeen.has(id)) this.violation('tx.bs-duplicate-context', `two block status chunks for context ${id}`);
    req.contextsSeen.add(id);
    let pos = req.offset;
    const end = req.offset + req.length;
    for (let i = 0; i < n; i++) {
      const at = head + i * each;
      const len = ext ? p.readBigUInt64BE(at) : BigInt(p.readUInt32BE(at));
      const status = ext ? p.readBigUInt64BE(at + 8) : BigInt(p.readUInt32BE(at + 4));
      if (len === 0n) this.violation('tx.bs-zero-length', `descriptor ${i} has length 0 ("MUST be nonzero")`);
      if (i > 0 && pos >= end) this.violation('tx.bs-past-request', `descriptor ${i} starts at ${pos}, past the request end ${end} (only the last may run past it)`);
      if (status & ~3n) this.violation('tx.bs-status-bits', `base:allocation status ${hex(status)} has undefined bits`);
      if (tx.minBlock > 1n && len % tx.minBlock && pos + len < tx.size) this.violation('tx.bs-unaligned', `descriptor length ${len} not a multiple of the minimum block size ${tx.minBlock}`);
      if (status & 2n) this.checkZeroes(req, pos, len < end - pos ? len : end - pos, 'block status ZERO');
      pos += len;
    }
    if (req.flags & CF.REQ_ONE) {
      if (n !== 1) this.violation('tx.bs-req-one-count', `${n} descriptors with REQ_ONE ("exactly one descriptor")`);
      const first = ext ? p.readBigUInt64BE(head) : BigInt(p.readUInt32BE(head));
      if (first > req.length) this.violation('tx.bs-req-one-length', `REQ_ONE descriptor of ${first} bytes exceeds the request length ${req.length}`);
    }
  }

  finishChunked(req) {
    req.done = true;
    if (req.errno) {
      this.judge(req, req.errno);
      return;
    }
    if (req.type === CMD.READ) {
      let covered = 0n;
      for (const [, l] of req.content) covered += l;
      if (covered !== req.length) this.violation('tx.read-not-covered', `successful READ ${req.offset}+${req.length} covered by ${covered} bytes of content chunks`);
    }
    if (req.type === CMD.BLOCK_STATUS && this.tx.contexts && req.expect.must !== 'fail') {
      const missing = [...this.tx.contexts.keys()].filter((id) => !req.contextsSeen.has(id));
      if (missing.length && !(req.flags & CF.PAYLOAD_LEN)) this.violation('tx.bs-missing-context', `successful BLOCK_STATUS without a chunk for context(s) ${missing}`);
    }
    if (req.type === CMD.BLOCK_STATUS && req.contextsSeen.size === 0 && req.expect.must !== 'fail') {
      this.violation('tx.bs-no-chunk', 'successful BLOCK_STATUS with no status chunk');
    }
    this.judge(req, 0);
  }

  /** Judge the outcome of a request against classify(). errno 0 = success, -1 = malformed error. */
  judge(req, errno) {
    const x = req.expect;
    const name = cmdName(req.type);
    const what = `${name} flags ${hex(req.flags)} offset ${req.offset} length ${req.length}`;
    if (!req.complete && errno === 0) this.violation('tx.success-before-payload', `${what} succeeded before its payload arrived`);
    if (errno === 0) {
      if (x.must === 'fail') this.violation(`tx.success-must-fail:${name}:${x.reasons[0]}`, `${what} succeeded, but must fail: ${x.reasons.join('; ')}`);
      return;
    }
    if (errno === -1) return;
    if (!SPEC_ERRNOS.has(errno)) {
      this.violation('tx.errno-not-in-spec', `${what} failed with ${errno}, which is not an NBD error value`);
      return;
    }
    // A connection that is ending (the client sent DISC or half-closed) may see in-flight
    // requests failed with ESHUTDOWN, the error the spec names for a server on its way out.
    if (errno === ERRNO.ESHUTDOWN && (this.clientDone || this.tx.disc)) return;
    // [nbdx] filter-retry over a flaky upstream: "when the layer below was reopened while
    // [unflushed] writes existed, the next flush ... fails with EIO" (its README), by design.
    if (x.must === 'ok' && req.type === CMD.FLUSH && errno === ERRNO.EIO && this.o.flushMayFailAfterReopen) {
      this.note(`${what} failed with EIO: allowed after a reopen on this stack`);
      return;
    }
    // [nbdx] every stack is healthy (memory, a local file, a local upstream): a valid request
    // has no reason to fail.
    if (x.must === 'ok') {
      this.violation(`tx.valid-request-failed:${name}${req.flags & CF.FUA ? ':FUA' : ''}`, `${what} failed with ${errnoName(errno)}, but the request is valid`);
      return;
    }
    if (x.errnos && !x.errnos.has(errno)) {
      this.violation(`tx.wrong-errno:${name}:${x.reasons[0]}`, `${what} failed with ${errnoName(errno)}; the spec says ${[...x.errnos].map(errnoName).join(' or ')} for: ${x.reasons.join('; ')}`);
    }
  }

  /** Compare READ data with what is known to be on the export. */
  checkData(req, start, data, where) {
    const r = this.o.region;
    const rStart = BigInt(r.offset);
    const rEnd = rStart + BigInt(r.length);
    const end = start + BigInt(data.length);
    const lo = start > rStart ? start : rStart;
    const hi = end < rEnd ? end : rEnd;
    if (lo < hi) {
      const got = data.subarray(Number(lo - start), Number(hi - start));
      const want = r.bytes.subarray(Number(lo - rStart), Number(hi - rStart));
      if (!got.equals(want)) {
        let i = 0;
        while (got[i] === want[i]) i++;
        this.violation('data.region-mismatch', `${where}: protected region differs at export offset ${lo + BigInt(i)} (got ${got.subarray(i, i + 8).toString('hex')}, want ${want.subarray(i, i + 8).toString('hex')})`);
        return;
      }
    }
    if (this.o.immutable) {
      // outside the region the image holds zeroes: check the parts before and after it
      const parts = [[start, start < rStart ? (end < rStart ? end : rStart) : start], [end > rEnd ? (start > rEnd ? start : rEnd) : end, end]];
      for (const [a, b] of parts) {
        if (a >= b) continue;
        const at = firstNonZero(data.subarray(Number(a - start), Number(b - start)));
        if (at >= 0) {
          this.violation('data.immutable-mismatch', `${where}: byte at ${a + BigInt(at)} is ${data[Number(a - start) + at]} on a read-only export that holds zeroes there`);
          return;
        }
      }
    }
  }

  /** A range the server says reads as zeroes. */
  checkZeroes(req, start, len, where) {
    const r = this.o.region;
    const rStart = BigInt(r.offset);
    const rEnd = rStart + BigInt(r.length);
    const lo = start > rStart ? start : rStart;
    const end = start + len;
    const hi = end < rEnd ? end : rEnd;
    if (lo < hi) {
      const slice = r.bytes.subarray(Number(lo - rStart), Number(hi - rStart));
      if (slice.some((b) => b !== 0)) this.violation('data.zero-over-data', `${where} claims ${lo}..${hi} reads as zeroes, but the protected region holds data there`);
    }
  }
}
