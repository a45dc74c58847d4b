/**
 * Turns a (mutated) plan into the steps a session performs: bytes to write, split the way the
 * plan asks (one write per message, all at once, random chunks, byte by byte), with the waits
 * and the TLS handshake in between. The protected-region guard runs on the final bytes of each
 * TLS epoch, after every mutation, since only then is the server's framing known.
 */
import { guardEpoch } from './guard.mjs';
import { encodeOption, encodeRequest, lengthString, u16, u32 } from './wire.mjs';

/** Option data from its structured body. */
export function optionData(body) {
  let data;
  switch (body.k) {
    case 'empty':
      data = body.junk ?? Buffer.alloc(0);
      break;
    case 'raw':
      data = body.bytes;
      break;
    case 'info':
      data = Buffer.concat([
        u32(body.name.length + body.nameLenDelta), body.name,
        u16(body.infos.length + body.countDelta), ...body.infos.map(u16),
        body.extra ?? Buffer.alloc(0),
      ]);
      break;
    case 'meta':
      data = Buffer.concat([
        u32(body.name.length + body.nameLenDelta), body.name,
        u32(body.queries.length + body.countDelta),
        ...body.queries.map((q, i) => lengthString(q, body.qDelta[i] ?? 0)),
        body.extra ?? Buffer.alloc(0),
      ]);
      break;
    default:
      throw new Error(`unknown option body ${body.k}`);
  }
  return body.truncate ? data.subarray(0, Math.max(0, data.length - body.truncate)) : data;
}

function messageBytes(m) {
  if (m.t === 'opt') {
    const data = optionData(m.body);
    const lengthField = m.lenAbs ?? Math.max(0, Math.min(0xffffffff, data.length + m.lenDelta));
    return encodeOption(m.code, data, { magic: m.magic, lengthField });
  }
  if (m.t === 'req') {
    const header = encodeRequest(m);
    if (!m.send) return header;
    // Payload bytes are a cheap pattern tied to the cookie: recognisable in a capture, and
    // never an accidental request magic.
    const payload = m.payloadBytes && m.payloadBytes.length === m.send ? m.payloadBytes : Buffer.alloc(m.send, 0x5a ^ Number(m.cookie & 0xffn));
    return Buffer.concat([header, payload]);
  }
  if (m.t === 'raw') return m.bytes;
  throw new Error(`no bytes for ${m.t}`);
}

/**
 * @returns {{ steps: Array<{ send?: Buffer, waitOption?: true, waitReplies?: true, tls?: true, pause?: number }>, patches: string[], bytes: number }}
 */
export function serialize(plan, profile, rng) {
  // Parts per epoch: { bytes, after: 'option' | null, glue: boolean }; markers between them.
  const epochs = [{ items: [{ bytes: u32(plan.clientFlags), after: null }] }];
  let cur = epochs[0];
  let glue = false;
  for (const m of plan.msgs) {
    if (m.t === 'tls') {
      glue = false;
      cur.items.push({ tls: true });
      cur = { items: [] };
      epochs.push(cur);
      continue;
    }
    if (m.t === 'wait') {
      cur.items.push({ waitReplies: true });
      continue;
    }
    if (m.t === 'pause') {
      cur.items.push({ pause: m.ms });
      continue;
    }
    cur.items.push({ bytes: messageBytes(m), after: m.t === 'opt' && m.sync ? 'option' : null, glue });
    if (m.injectAfter) glue = true; // what follows STARTTLS travels in the same write
    else if (m.t === 'opt' && m.sync) glue = false;
  }

  // Cut the end of the last epoch: hang up mid-header or mid-payload.
  if (plan.cut > 0) {
    let left = plan.cut;
    const items = epochs[epochs.length - 1].items;
    for (let i = items.length - 1; i >= 0 && left > 0; i--) {
      const it = items[i];
      if (!it.bytes) continue;
      const drop = Math.min(left, it.bytes.length);
      it.bytes = it.bytes.subarray(0, it.bytes.length - drop);
      left -= drop;
    }
  }

  // Guard each epoch on its final bytes, then write the patched bytes back into the parts.
  const patches = [];
  epochs.forEach((e, i) => {
    const parts = e.items.filter((it) => it.bytes);
    const buf = Buffer.concat(parts.map((p) => p.bytes));
    patches.push(...guardEpoch(buf, {
      hasClientFlags: i === 0,
      size: BigInt(profile.size),
      regionOffset: BigInt(profile.region.offset),
      regionLength: BigInt(profile.region.length),
    }));
    let at = 0;
    for (const p of parts) {
      p.bytes = buf.subarray(at, at + p.bytes.length);
      at += p.bytes.length;
    }
  });

  // Steps, grouped by the split mode.
  const steps = [];
  let pending = [];
  let total = 0;
  const flush = () => {
    if (!pending.length) return;
    const buf = pending.length === 1 ? pending[0] : Buffer.concat(pending);
    pending = [];
    total += buf.length;
    if (plan.split === 'random' || (plan.split === 'bytewise' && buf.length > 4096)) {
      for (let at = 0; at < buf.length; ) {
        // tiny pieces where headers are; big streams in pieces up to 64 KiB (tens of thousands of
        // one-byte writes would only measure the kernel)
        const max = buf.length > 65536 && at > 4096 ? 65536 : rng.chance(0.5) ? 16 : 700;
        const n = Math.min(buf.length - at, rng.range(1, max));
        steps.push({ send: buf.subarray(at, at + n) });
        at += n;
      }
    } else if (plan.split === 'bytewise') {
      for (let at = 0; at < buf.length; at++) steps.push({ send: buf.subarray(at, at + 1) });
    } else {
      steps.push({ send: buf });
    }
  };
  for (const e of epochs) {
    for (const it of e.items) {
      if (it.bytes) {
        if (plan.split === 'message' && !it.glue) flush();
        if (it.bytes.length) pending.push(it.bytes);
        if (it.after === 'option') {
          flush();
          steps.push({ waitOption: true });
        }
      } else {
        flush();
        if (it.tls) steps.push({ waitOption: true }, { tls: true });
        else if (it.waitReplies) steps.push({ waitReplies: true });
        else if (it.pause) steps.push({ pause: it.pause });
      }
    }
    flush();
  }
  return { steps, patches, bytes: total };
}
