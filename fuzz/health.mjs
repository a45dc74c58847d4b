/**
 * Between rounds: is the server alive, does a fresh client still get the protected region back
 * intact, and is its memory bounded? The fresh client is a real one from the ecosystem (nbdsh,
 * i.e. libnbd), not our own code, so a server that only fools our oracle is still caught; our
 * plain probe client runs too, because it is cheap and does not depend on Python.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readRegion } from './probe.mjs';
import { ENV, REGION, SIZE } from './stacks.mjs';

const sha256 = (b) => createHash('sha256').update(b).digest('hex');

function run(cmd, args, timeoutMs) {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { env: ENV, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    const t = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('exit', (code, signal) => {
      clearTimeout(t);
      resolve({ code, signal, out, err });
    });
    child.on('error', (e) => {
      clearTimeout(t);
      resolve({ code: -1, signal: null, out, err: e.message });
    });
  });
}

/**
 * nbdsh (libnbd) connects afresh, reads the region and hashes it. Returns null when all is well,
 * otherwise { text, unresponsive } (unresponsive: it could not be served at all).
 */
export async function realClientCheck(stack) {
  const uri = `nbd+unix:///?socket=${stack.socket}`;
  const code = [
    'import hashlib',
    `print(h.get_size())`,
    `print(hashlib.sha256(h.pread(${REGION.length}, ${REGION.offset})).hexdigest())`,
  ].join('; ');
  const r = await run('nbdsh', ['-u', uri, '-c', code], 60000);
  if (r.code !== 0) return { unresponsive: true, text: `nbdsh failed (${r.signal ?? r.code}): ${r.err.trim().split('\n').slice(-3).join(' | ')}` };
  const [size, digest] = r.out.trim().split('\n');
  if (Number(size) !== SIZE) return { text: `nbdsh sees size ${size}, expected ${SIZE}` };
  if (digest !== sha256(stack.regionBytes)) return { text: `nbdsh reads a protected region with sha256 ${digest}, expected ${sha256(stack.regionBytes)}` };
  return null;
}

/** Our own probe: the region through a plain simple-reply client. */
export async function probeCheck(stack) {
  try {
    const got = await readRegion(stack.socket, REGION.offset, REGION.length);
    if (!got.equals(stack.regionBytes)) {
      let i = 0;
      while (got[i] === stack.regionBytes[i]) i++;
      return { text: `probe reads a damaged protected region (first difference at export offset ${REGION.offset + i})` };
    }
    return null;
  } catch (err) {
    return { unresponsive: true, text: `probe client failed: ${err.message}` };
  }
}
