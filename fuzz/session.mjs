/**
 * Runs one input against a server: connects to its Unix socket, performs the serialized steps
 * (writes, waits, the TLS handshake), feeds both directions to the oracle, and decides about
 * hangs. A hang is "the server owes us something (oracle.requiredNow) and sends nothing for
 * `timeoutMs`": the timer restarts on every byte, so a slow but moving server is not a hang.
 */
import * as net from 'node:net';
import * as tls from 'node:tls';
import { Oracle } from './oracle.mjs';

/**
 * @param {{ steps: object[] }} input serialized input
 * @param {object} o
 * @param {string} o.socket       the server's Unix socket
 * @param {object} o.profile      the stack's profile (tls, readonly, region, immutable)
 * @param {number} o.timeoutMs    hang threshold
 * @param {string} o.end          'keep' | 'close' | 'halfclose'
 * @param {object} [o.tlsClient]  options for tls.connect (PSK)
 */
export async function runSession(input, o) {
  const oracle = new Oracle(o.profile);
  const findings = [];
  let closed = false;
  let wakeup = () => {};
  const poke = () => wakeup();

  const raw = net.createConnection(o.socket);
  raw.setNoDelay?.(true);
  let writer = raw;
  let sawEnd = false;
  const onClose = (err) => {
    if (closed) return;
    closed = true;
    oracle.serverClosed(err && !sawEnd ? err.code ?? 'error' : null);
    poke();
  };
  raw.on('data', (d) => {
    oracle.serverData(d);
    poke();
  });
  raw.on('end', () => ((sawEnd = true), onClose()));
  raw.on('close', () => onClose());
  raw.on('error', (err) => onClose(err));

  const connected = await new Promise((resolve) => {
    const t = setTimeout(() => resolve('timeout'), 3000);
    raw.once('connect', () => (clearTimeout(t), resolve('ok')));
    raw.once('error', (err) => (clearTimeout(t), resolve(err.code ?? err.message)));
  });
  if (connected !== 'ok') {
    raw.destroy();
    return { findings: [{ kind: 'accept', rule: 'server.not-accepting', detail: `connect: ${connected}` }], oracle };
  }

  /**
   * Wait until `done()` holds or the server hangs up. Returns false on a stall (no server bytes
   * for timeoutMs while the oracle says something is owed).
   */
  const waitUntil = async (done) => {
    let seen = oracle.progress;
    let since = Date.now();
    while (!closed && !done()) {
      await new Promise((resolve) => {
        wakeup = resolve;
        setTimeout(resolve, 100);
      });
      wakeup = () => {};
      if (oracle.progress !== seen) {
        seen = oracle.progress;
        since = Date.now();
      } else if (Date.now() - since > o.timeoutMs) {
        return false;
      }
      if (o.giveUpAt && Date.now() > o.giveUpAt) {
        // the run is over: leave quietly, this is no verdict on the server
        o.gaveUp = true;
        return true;
      }
    }
    return true;
  };

  const hang = (where) => {
    if (o.gaveUp) return false;
    const w = oracle.requiredNow();
    if (!w) return false;
    const what = oracle.phase === 'transmission' ? (w.rule === 'close' ? 'no hang-up after DISC' : 'requests unanswered') : oracle.phase;
    findings.push({ kind: 'hang', rule: `hang.${what} (${where})`, detail: `${where}: no progress for ${o.timeoutMs} ms, ${w.text}` });
    return true;
  };

  /** Returns false when the server stopped reading and answering (a hang). */
  const write = async (buf) => {
    oracle.clientSent(buf);
    if (closed) return true;
    if (!writer.write(buf)) {
      const ok = await waitUntil(() => writer.writableLength === 0 || writer.writableNeedDrain === false);
      if (!ok) return !hang('writing');
    }
    return true;
  };

  let stalled = false;
  let stoppedEarly = false;
  for (const step of input.steps) {
    if (closed || stalled) {
      stoppedEarly = true;
      break;
    }
    if (step.send) {
      if (!(await write(step.send))) stalled = true;
    } else if (step.waitOption) {
      if (!(await waitUntil(() => !oracle.optionBusy()))) stalled = hang('waiting for an option reply');
    } else if (step.waitReplies) {
      const idle = () => oracle.phase !== 'transmission' || oracle.tx.lenient || oracle.tx.framingBroken || oracle.outstanding().length === 0;
      if (!(await waitUntil(idle))) stalled = hang('waiting for replies');
    } else if (step.pause) {
      await new Promise((r) => setTimeout(r, step.pause));
    } else if (step.tls) {
      if (!oracle.tlsAcked || oracle.phase !== 'tls-pending' || !o.tlsClient) {
        stoppedEarly = true;
        break;
      }
      // Bytes sent behind STARTTLS (in its write or after its ACK) were meant to reach the TLS layer.
      const injected = oracle.c.length > 0;
      raw.removeAllListeners('data');
      const secure = tls.connect({ socket: raw, ...o.tlsClient });
      const up = await new Promise((resolve) => {
        const t = setTimeout(() => resolve('timeout'), o.timeoutMs);
        secure.once('secureConnect', () => (clearTimeout(t), resolve('ok')));
        secure.once('error', (err) => (clearTimeout(t), resolve(err.code ?? err.message)));
        secure.once('close', () => (clearTimeout(t), resolve('closed')));
      });
      if (up !== 'ok') {
        // With plaintext injected behind STARTTLS a correct server fails the handshake; without, it must succeed.
        if (!injected) findings.push({ kind: 'violation', rule: 'tls.handshake-failed', detail: `TLS handshake after STARTTLS ACK failed: ${up}` });
        secure.destroy();
        closed = true;
        break;
      }
      oracle.tlsStarted();
      writer = secure;
      secure.on('data', (d) => {
        oracle.serverData(d);
        poke();
      });
      secure.on('end', () => ((sawEnd = true), onClose()));
      secure.on('close', () => onClose());
      secure.on('error', (err) => onClose(err));
    }
  }

  if (!closed && !stalled) {
    if (o.end === 'keep' || stoppedEarly) {
      if (!(await waitUntil(() => !oracle.requiredNow()))) hang('at the end');
    } else if (o.end === 'halfclose') {
      oracle.clientClosed();
      writer.end();
      // Replies may still come for a moment; they are checked, not required.
      const until = Date.now() + 300;
      await waitUntil(() => Date.now() > until);
    } else {
      oracle.clientClosed();
    }
  }
  oracle.clientClosed();
  writer.destroy();
  raw.destroy();
  return { findings: [...findings, ...oracle.findings], oracle };
}
