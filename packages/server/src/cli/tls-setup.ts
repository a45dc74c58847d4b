import * as fs from 'node:fs';
import * as path from 'node:path';
import type { TlsSettings } from '../protocol/settings.js';
import { UsageError, type CliOptions } from './args.js';

/** Build TLS settings from --tls, --tls-certificates, --tls-psk and --tls-verify-peer. */
export function tlsSettings(o: CliOptions): TlsSettings {
  if (o.tls === 'off') {
    if (o.tlsCertificates || o.tlsPsk) throw new UsageError('--tls-certificates/--tls-psk need --tls=on or --tls=require');
    return { mode: 'off', socketOptions: {} };
  }
  if (!o.tlsCertificates && !o.tlsPsk) {
    throw new UsageError(`--tls=${o.tls} needs --tls-certificates=DIR or --tls-psk=FILE`);
  }
  if (o.tlsPsk) {
    const keys = readPskFile(o.tlsPsk);
    return {
      mode: o.tls,
      socketOptions: {
        // Node offers PSK with TLS 1.2 cipher suites only.
        ciphers: 'PSK',
        minVersion: 'TLSv1.2',
        maxVersion: 'TLSv1.2',
        pskCallback: (_socket, identity) => keys.get(identity) ?? null,
      },
    };
  }
  const dir = o.tlsCertificates!;
  const read = (name: string, required: boolean): Buffer | undefined => {
    const p = path.join(dir, name);
    if (!fs.existsSync(p)) {
      if (required) throw new UsageError(`--tls-certificates: ${p} is missing`);
      return undefined;
    }
    return fs.readFileSync(p);
  };
  const ca = read('ca-cert.pem', o.tlsVerifyPeer);
  return {
    mode: o.tls,
    socketOptions: {
      cert: read('server-cert.pem', true),
      key: read('server-key.pem', true),
      ...(ca ? { ca } : {}),
      requestCert: o.tlsVerifyPeer,
      rejectUnauthorized: o.tlsVerifyPeer,
    },
  };
}

/** psktool's format: `identity:hexkey` per line. */
export function readPskFile(file: string): Map<string, Buffer> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new UsageError(`--tls-psk: cannot read ${file}: ${(err as Error).message}`);
  }
  const keys = new Map<string, Buffer>();
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (!t || t.startsWith('#')) continue;
    const i = t.lastIndexOf(':');
    if (i <= 0 || !/^[0-9a-fA-F]+$/.test(t.slice(i + 1))) throw new UsageError(`--tls-psk: bad line in ${file}: '${t}'`);
    keys.set(t.slice(0, i), Buffer.from(t.slice(i + 1), 'hex'));
  }
  if (keys.size === 0) throw new UsageError(`--tls-psk: ${file} holds no keys`);
  return keys;
}
