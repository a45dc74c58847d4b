import { describe, expect, it } from 'vitest';
import { decodeErrorPayload, encodeErrorPayload, utf8Within } from './codec.js';

describe('strings sent to clients', () => {
  it('are cut to 4096 bytes at a UTF-8 character boundary', () => {
    // 4095 ASCII bytes, then a 3-byte character that would straddle the limit.
    const text = 'a'.repeat(4095) + '€' + 'tail';
    const b = utf8Within(text);
    expect(b.length).toBe(4095);
    expect(b.toString('utf8')).toBe('a'.repeat(4095));
    // Exactly at the limit: kept whole.
    expect(utf8Within('é'.repeat(2048)).length).toBe(4096);
    expect(utf8Within('short').toString()).toBe('short');
  });

  it('error payloads carry the cut message', () => {
    const p = decodeErrorPayload(encodeErrorPayload(22, '😀'.repeat(2000)));
    expect(p.errno).toBe(22);
    expect(Buffer.byteLength(p.message)).toBe(4096);
    expect(p.message).toBe('😀'.repeat(1024));
  });
});
