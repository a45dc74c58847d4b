/**
 * Deterministic randomness. Every input gets its own generator derived from (seed, index) alone,
 * so input 1234 of seed 42 is the same bytes whether it runs first, last, alone (--replay) or
 * next to fifteen others: that is what makes a finding replayable by seed and index.
 */

/** 128-bit string hash (cyrb128-style mixing) used only to spread seeds over the state. */
function hash128(text) {
  let h1 = 1779033703, h2 = 3144134277, h3 = 1013904242, h4 = 2773480762;
  for (let i = 0; i < text.length; i++) {
    const k = text.charCodeAt(i);
    h1 = h2 ^ Math.imul(h1 ^ k, 597399067);
    h2 = h3 ^ Math.imul(h2 ^ k, 2869860233);
    h3 = h4 ^ Math.imul(h3 ^ k, 951274213);
    h4 = h1 ^ Math.imul(h4 ^ k, 2716044179);
  }
  h1 = Math.imul(h3 ^ (h1 >>> 18), 597399067);
  h2 = Math.imul(h4 ^ (h2 >>> 22), 2869860233);
  h3 = Math.imul(h1 ^ (h3 >>> 17), 951274213);
  h4 = Math.imul(h2 ^ (h4 >>> 19), 2716044179);
  return [(h1 ^ h2 ^ h3 ^ h4) >>> 0, (h2 ^ h1) >>> 0, (h3 ^ h1) >>> 0, (h4 ^ h1) >>> 0];
}

export class Rng {
  /** @param {string} key anything that identifies the stream, e.g. `${seed}/${index}` */
  constructor(key) {
    [this.a, this.b, this.c, this.d] = hash128(String(key));
    for (let i = 0; i < 12; i++) this.next32();
  }

  /** sfc32: small, fast, and good enough for choosing test inputs. */
  next32() {
    this.a >>>= 0; this.b >>>= 0; this.c >>>= 0; this.d >>>= 0;
    const t = (((this.a + this.b) | 0) + this.d) | 0;
    this.d = (this.d + 1) | 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) | 0;
    this.c = (this.c << 21) | (this.c >>> 11);
    this.c = (this.c + t) | 0;
    return t >>> 0;
  }

  /** Uniform integer in [0, n). */
  int(n) {
    return n <= 1 ? 0 : Math.floor((this.next32() / 4294967296) * n);
  }

  /** Uniform integer in [lo, hi]. */
  range(lo, hi) {
    return lo + this.int(hi - lo + 1);
  }

  chance(p) {
    return this.next32() / 4294967296 < p;
  }

  pick(list) {
    return list[this.int(list.length)];
  }

  /** Pick from [[weight, value], ...]. */
  weighted(table) {
    let total = 0;
    for (const [w] of table) total += w;
    let r = this.int(total);
    for (const [w, v] of table) {
      if (r < w) return v;
      r -= w;
    }
    return table[table.length - 1][1];
  }

  u64() {
    return (BigInt(this.next32()) << 32n) | BigInt(this.next32());
  }

  /** Small counts: mostly 1-3, occasionally many (geometric-ish). */
  small(max = 64) {
    let n = 1;
    while (n < max && this.chance(0.45)) n *= 2;
    return this.range(Math.max(1, n >> 1), n);
  }

  bytes(n) {
    const b = Buffer.allocUnsafe(n);
    let i = 0;
    for (; i + 4 <= n; i += 4) b.writeUInt32LE(this.next32(), i);
    for (; i < n; i++) b[i] = this.next32() & 0xff;
    return b;
  }
}
