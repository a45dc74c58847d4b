import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { PassThrough } from 'node:stream';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { Errno, NbdError, setLogSink } from './common.js';
import { readSecret, secretReadsOnce, type SecretInput } from './secret.js';

let dir: string;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-secret-'));
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

let logged: string[];
beforeEach(() => {
  logged = [];
  setLogSink((level, source, message) => logged.push(`${level} ${source}: ${message}`));
});
afterEach(() => {
  delete (globalThis as unknown as Record<symbol, unknown>)[Symbol.for('nbdx.logSink')];
});

function file(name: string, content: string): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, content, { mode: 0o600 });
  return f;
}

/** The error readSecret rejects with: always EINVAL, one line, never the value. */
async function failure(p: Promise<string>): Promise<NbdError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(NbdError);
  expect((err as NbdError).errno).toBe(Errno.EINVAL);
  expect((err as NbdError).message).not.toContain('\n');
  return err as NbdError;
}

function isOpen(fd: number): boolean {
  try {
    fs.fstatSync(fd);
    return true;
  } catch {
    return false;
  }
}

describe('readSecret: +FILE', () => {
  it('gives the first line without its line end (LF or CRLF), and logs nothing', async () => {
    expect(await readSecret('password', `+${file('lf', 'from-a-file\n')}`)).toBe('from-a-file');
    expect(await readSecret('password', `+${file('crlf', 'written on windows\r\n')}`)).toBe('written on windows');
    expect(await readSecret('password', `+${file('bare', 'no newline')}`)).toBe('no newline');
    expect(await readSecret('password', `+${file('two', 'first\nsecond\n')}`)).toBe('first');
    expect(await readSecret('password', `+${file('utf8', 'pässwörd ✓\n')}`)).toBe('pässwörd ✓');
    const long = 'x'.repeat(10_000);
    expect(await readSecret('cookie', `+${file('long', `${long}\n`)}`)).toBe(long);
    expect(logged).toEqual([]);
  });

  it('a missing file, a directory, "+" alone, an empty first line and a huge line are errors naming the key', async () => {
    expect((await failure(readSecret('secret-key', `+${path.join(dir, 'missing')}`))).message).toMatch(/^secret-key: cannot read '.*missing': ENOENT/);
    expect((await failure(readSecret('secret-key', `+${dir}`))).message).toMatch(/^secret-key: cannot read '.*': EISDIR/);
    expect((await failure(readSecret('secret-key', '+'))).message).toBe("secret-key: '+' must be followed by a file name");
    expect((await failure(readSecret('secret-key', `+${file('empty', '')}`))).message).toBe('secret-key: the secret is empty');
    expect((await failure(readSecret('secret-key', `+${file('blank', '\nsecond line\n')}`))).message).toBe('secret-key: the secret is empty');
    expect((await failure(readSecret('secret-key', '+/dev/zero'))).message).toMatch(/^secret-key: the first line of '\/dev\/zero' is longer than 1 MiB/);
  });
});

describe('readSecret: -FD', () => {
  it('reads the first line from the descriptor, then closes it', async () => {
    const fd = fs.openSync(file('fd', 'via-fd\nnot this\n'), 'r');
    try {
      expect(await readSecret('password', `-${fd}`)).toBe('via-fd');
      expect(isOpen(fd)).toBe(false);
    } finally {
      if (isOpen(fd)) fs.closeSync(fd);
    }
    expect(logged).toEqual([]);
  });

  it('returns at the newline, without waiting for the writer to close (a pipe)', async () => {
    const fifo = path.join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    // Opened read-write, the FIFO never sees EOF while this descriptor lives: reading to the end
    // would hang the test.
    const fd = fs.openSync(fifo, 'r+');
    try {
      fs.writeSync(fd, 'piped\nrest of the stream');
      expect(await readSecret('password', `-${fd}`)).toBe('piped');
      expect(isOpen(fd)).toBe(false);
    } finally {
      if (isOpen(fd)) fs.closeSync(fd);
    }
  });

  it('refuses 0, 1 and 2, a descriptor that is not open, non-numbers (without echoing them) and an empty line', async () => {
    for (const fd of [0, 1, 2]) {
      expect((await failure(readSecret('password', `-${fd}`))).message).toMatch(new RegExp(`^password=-${fd}: descriptors 0, 1 and 2 are standard input, output and error`));
    }
    const closed = fs.openSync(file('closed', 'x\n'), 'r');
    fs.closeSync(closed);
    expect((await failure(readSecret('password', `-${closed}`))).message).toMatch(new RegExp(`^password: cannot read file descriptor ${closed}: EBADF`));
    for (const value of ['-s3cret', '-3x', '--', '-99999999999', '- 3']) {
      const err = await failure(readSecret('password', value));
      expect(err.message).toMatch(/^password: a value starting with '-' must be '-' \(type it\) or '-FD'/);
      expect(err.message).not.toContain(value);
    }
    const fd = fs.openSync(file('fd-empty', ''), 'r');
    expect((await failure(readSecret('password', `-${fd}`))).message).toBe('password: the secret is empty');
    expect(isOpen(fd)).toBe(false);
  });
});

/** A stand-in terminal: what the prompt writes, and whether raw mode (echo off) was on. */
function terminal() {
  const stdin = Object.assign(new PassThrough(), {
    isTTY: true,
    raw: [] as boolean[],
    setRawMode(raw: boolean) {
      stdin.raw.push(raw);
      return stdin;
    },
  });
  const output = new PassThrough();
  let shown = '';
  output.on('data', (d: Buffer) => (shown += d.toString()));
  return { stdin, output, shown: () => shown };
}

describe('readSecret: - (typed at the terminal)', () => {
  it('prompts with the key, echo off while typing, and gives the line typed', async () => {
    const t = terminal();
    const secret = readSecret('password', '-', { stdin: t.stdin, output: t.output });
    expect(t.stdin.raw).toEqual([true]);
    t.stdin.write('hun');
    t.stdin.write('ter2\r');
    expect(await secret).toBe('hunter2');
    expect(t.stdin.raw).toEqual([true, false]);
    expect(t.shown()).toBe('password: \n');
    expect(logged).toEqual([]);
  });

  it('Backspace and Ctrl-U erase; a character split across reads is whole; Ctrl-D ends the input', async () => {
    const t = terminal();
    const secret = readSecret('cookie', '-', { stdin: t.stdin, output: t.output });
    t.stdin.write('wrong\u0015ab\u007fc ');
    const e = Buffer.from('é');
    t.stdin.write(e.subarray(0, 1));
    t.stdin.write(Buffer.concat([e.subarray(1), Buffer.from('x\u0004ignored')]));
    expect(await secret).toBe('ac éx');
    expect(t.stdin.raw).toEqual([true, false]);
  });

  it('Ctrl-D or the end of input with nothing typed is an empty secret; Ctrl-C gives up', async () => {
    const a = terminal();
    const empty = readSecret('password', '-', { stdin: a.stdin, output: a.output });
    a.stdin.write('\u0004');
    expect((await failure(empty)).message).toBe('password: the secret is empty');
    const b = terminal();
    const ended = readSecret('password', '-', { stdin: b.stdin, output: b.output });
    b.stdin.end();
    expect((await failure(ended)).message).toBe('password: the secret is empty');
    const c = terminal();
    const interrupted = readSecret('password', '-', { stdin: c.stdin, output: c.output });
    c.stdin.write('half\u0003');
    expect((await failure(interrupted)).message).toBe('password: interrupted at the prompt');
    for (const t of [a, b, c]) expect(t.stdin.raw).toEqual([true, false]);
  });

  it('is refused when stdin is not a terminal (piped), and leaves stdin unread', async () => {
    const piped = new PassThrough();
    piped.write('piped-secret\n');
    const err = await failure(readSecret('secret-key', '-', { stdin: piped }));
    expect(err.message).toBe('secret-key=-: standard input is not a terminal, so the secret cannot be typed; pass it with secret-key=+FILE or secret-key=-FD');
    expect(piped.read()?.toString()).toBe('piped-secret\n');
    // A "terminal" that cannot turn echo off is no better.
    const noEcho = Object.assign(new PassThrough(), { isTTY: true }) as SecretInput;
    expect((await failure(readSecret('secret-key', '-', { stdin: noEcho }))).message).toBe('secret-key=-: cannot turn echo off on this terminal');
  });
});

describe('readSecret: in the server nbdx started in the background', () => {
  it('refuses - and -FD (no terminal there, and fd 3 is the channel to the parent), but not +FILE', async () => {
    const before = { env: process.env.NBDX_DAEMON_CHILD, send: process.send };
    process.env.NBDX_DAEMON_CHILD = '1';
    process.send = () => true;
    try {
      const fd = fs.openSync(file('bg', 'x\n'), 'r');
      try {
        expect((await failure(readSecret('password', `-${fd}`))).message).toBe(
          `password=-${fd}: nbdx reads its parameters after going into the background, where there is no terminal and no inherited descriptor: add -f (or use --run), or use password=+FILE`,
        );
        expect(isOpen(fd)).toBe(true);
      } finally {
        fs.closeSync(fd);
      }
      expect((await failure(readSecret('password', '-'))).message).toMatch(/^password=-: nbdx reads its parameters after going into the background/);
      expect(await readSecret('password', `+${file('bg2', 'fine\n')}`)).toBe('fine');
    } finally {
      if (before.env === undefined) delete process.env.NBDX_DAEMON_CHILD;
      else process.env.NBDX_DAEMON_CHILD = before.env;
      process.send = before.send;
    }
  });
});

describe('readSecret: a value in clear', () => {
  it('is the secret, with a warning naming the plugin and the key but not the value', async () => {
    expect(await readSecret('secret-key', 'in-clear', { plugin: 's3' })).toBe('in-clear');
    expect(logged).toEqual([
      'info s3: warning: secret-key= given in clear on the command line, where other users can read it in the process list: use secret-key=+FILE, secret-key=- or secret-key=-FD',
    ]);
    logged.length = 0;
    expect(await readSecret('password', 'p', {})).toBe('p');
    expect(logged).toEqual([expect.stringMatching(/^info nbdx: warning: password= given in clear/)]);
  });

  it('an empty value is an error (and no warning)', async () => {
    expect((await failure(readSecret('password', '', { plugin: 'http' }))).message).toBe('password: the secret is empty');
    expect(logged).toEqual([]);
  });
});

describe('secretReadsOnce', () => {
  it('is true for - and -FD (a second read would ask again or find the descriptor closed)', () => {
    expect(secretReadsOnce('-')).toBe(true);
    expect(secretReadsOnce('-3')).toBe(true);
    expect(secretReadsOnce('+/etc/pw')).toBe(false);
    expect(secretReadsOnce('clear')).toBe(false);
  });
});
