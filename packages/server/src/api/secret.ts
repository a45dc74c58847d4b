/**
 * Secrets on the command line (passwords, keys, tokens, cookies) in the forms nbdkit's
 * nbdkit_read_password(3) takes, so that a secret never has to appear in a process listing or a
 * shell history:
 *
 *   `+FILE`  the first line of FILE
 *   `-FD`    the first line read from inherited file descriptor FD (3 or above), which is then closed
 *   `-`      typed at the terminal with echo off; refused when standard input is not a terminal
 *   other    the value itself, with a warning (other users can see it in `ps`)
 *
 * Where nbdkit says nothing, the safer choice is taken: an empty secret is refused (nbdkit
 * accepts one, but here it is almost always an empty file or a stray Enter), a line is at most
 * 1 MiB (so `+/dev/zero` fails instead of filling memory), and a CR before the final newline is
 * dropped as well (a file written on Windows).
 */
import * as fs from 'node:fs';
import { StringDecoder } from 'node:string_decoder';
import { Errno, NbdError, logWarning } from './common.js';

/** The stream `-` reads from: process.stdin, or a stand-in for tests. */
export type SecretInput = NodeJS.ReadableStream & { isTTY?: boolean; setRawMode?: (raw: boolean) => unknown };

export interface ReadSecretOptions {
  /** The plugin or filter asking: the warning about a secret given in clear names it. */
  plugin?: string;
  /** Where `-` reads from (default process.stdin); it must be a terminal. */
  stdin?: SecretInput;
  /** Where `-` writes its prompt (default process.stderr, so stdout stays free for data). */
  output?: NodeJS.WritableStream;
}

/** Longest secret line accepted: far above any real token, small enough to fail fast. */
const MAX_LINE = 1024 * 1024;

function invalid(message: string): NbdError {
  return new NbdError(Errno.EINVAL, message);
}

/**
 * Read the secret given as `key=value` in one of the forms above. Errors are NbdError(EINVAL)
 * with a one-line message starting with the key, and never contain the value (it may be the
 * secret itself).
 */
export async function readSecret(key: string, value: string, opts: ReadSecretOptions = {}): Promise<string> {
  let secret: string;
  if (value.startsWith('+')) {
    const file = value.slice(1);
    if (file === '') throw invalid(`${key}: '+' must be followed by a file name`);
    secret = readFileLine(key, file);
  } else if (value === '-') {
    if (!opts.stdin && inDetachedServer()) throw detached(key, '-');
    secret = await prompt(key, opts.stdin ?? process.stdin, opts.output ?? process.stderr);
  } else if (value.startsWith('-')) {
    // As nbdkit: anything else starting with '-' is a descriptor number, so a secret that
    // itself starts with '-' (or '+') has to come from a file.
    const fd = parseFd(key, value.slice(1));
    if (inDetachedServer()) throw detached(key, `-${fd}`);
    secret = readFdLine(key, fd);
  } else {
    secret = value;
    if (secret !== '') {
      logWarning(
        opts.plugin ?? 'nbdx',
        `${key}= given in clear on the command line, where other users can read it in the process list: use ${key}=+FILE, ${key}=- or ${key}=-FD`,
      );
    }
  }
  if (secret === '') throw invalid(`${key}: the secret is empty`);
  return secret;
}

/**
 * True for the forms that can be read only once (`-` and `-FD`): a layer that would read its
 * configuration again in each worker thread must say `workerThreads: false` for them.
 */
export function secretReadsOnce(value: string): boolean {
  return value.startsWith('-');
}

/**
 * True in the server process that `nbdx` (without -f, --run or -s) starts to go into the
 * background: it reads the parameters itself, with standard input on /dev/null and no inherited
 * descriptor but its IPC channel to the parent (fd 3, which `-3` must never read or close).
 */
function inDetachedServer(): boolean {
  return process.env.NBDX_DAEMON_CHILD === '1' && typeof process.send === 'function';
}

function detached(key: string, form: string): NbdError {
  return invalid(
    `${key}=${form}: nbdx reads its parameters after going into the background, where there is no terminal and no inherited descriptor: add -f (or use --run), or use ${key}=+FILE`,
  );
}

function parseFd(key: string, digits: string): number {
  const fd = /^\d{1,10}$/.test(digits) ? Number(digits) : NaN;
  if (!Number.isSafeInteger(fd) || fd > 0x7fffffff) {
    throw invalid(`${key}: a value starting with '-' must be '-' (type it) or '-FD' (a file descriptor number); put a secret that starts with '-' in a file and use ${key}=+FILE`);
  }
  if (fd <= 2) {
    throw invalid(`${key}=-${fd}: descriptors 0, 1 and 2 are standard input, output and error; use ${key}=- to type the secret, or a descriptor from 3 up`);
  }
  return fd;
}

function readFileLine(key: string, file: string): string {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (err) {
    throw invalid(`${key}: cannot read '${file}': ${(err as Error).message}`);
  }
  try {
    return firstLine(fd, key, `'${file}'`);
  } finally {
    fs.closeSync(fd);
  }
}

/** As nbdkit, the descriptor is closed once read (also after an error): it was handed over for this. */
function readFdLine(key: string, fd: number): string {
  try {
    return firstLine(fd, key, `file descriptor ${fd}`);
  } finally {
    try {
      fs.closeSync(fd);
    } catch {
      // not open (the error above already says so)
    }
  }
}

/**
 * The first line of what `fd` gives, without its line end. Stops at the first newline, so a pipe
 * whose writer stays open does not hang here once the line has come.
 */
function firstLine(fd: number, key: string, what: string): string {
  const chunk = Buffer.allocUnsafe(4096);
  const parts: Buffer[] = [];
  let length = 0;
  for (;;) {
    let n: number;
    try {
      n = fs.readSync(fd, chunk, 0, chunk.length, null);
    } catch (err) {
      // A descriptor opened non-blocking (O_NONBLOCK, shared with the process that passed it):
      // wait for the writer instead of failing.
      if ((err as NodeJS.ErrnoException).code === 'EAGAIN') {
        Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 10);
        continue;
      }
      throw invalid(`${key}: cannot read ${what}: ${(err as Error).message}`);
    }
    if (n === 0) break;
    const nl = chunk.subarray(0, n).indexOf(0x0a);
    const end = nl >= 0 ? nl : n;
    parts.push(Buffer.from(chunk.subarray(0, end)));
    length += end;
    if (length > MAX_LINE) throw invalid(`${key}: the first line of ${what} is longer than 1 MiB, which is no secret`);
    if (nl >= 0) break;
  }
  return Buffer.concat(parts, length).toString('utf8').replace(/\r$/, '');
}

/**
 * Ask on the terminal with echo off. Raw mode is how Node turns echo off, so the line editing
 * the terminal would do is done here: Enter ends the line, Ctrl-D ends the input (as EOF does for
 * nbdkit), Backspace and Ctrl-U erase, Ctrl-C gives up (raw mode also stops the signal).
 */
function prompt(key: string, stdin: SecretInput, output: NodeJS.WritableStream): Promise<string> {
  if (!stdin.isTTY) {
    return Promise.reject(
      invalid(`${key}=-: standard input is not a terminal, so the secret cannot be typed; pass it with ${key}=+FILE or ${key}=-FD`),
    );
  }
  const setRawMode = stdin.setRawMode?.bind(stdin);
  if (!setRawMode) return Promise.reject(invalid(`${key}=-: cannot turn echo off on this terminal`));
  return new Promise((resolve, reject) => {
    const decoder = new StringDecoder('utf8');
    let typed = '';
    const finish = (err: Error | null) => {
      stdin.off('data', onData);
      stdin.off('end', onEnd);
      stdin.off('error', onError);
      setRawMode(false);
      stdin.pause();
      output.write('\n');
      if (err) reject(err);
      else resolve(typed);
    };
    const onData = (data: Buffer | string) => {
      const text = typeof data === 'string' ? data : decoder.write(data);
      for (const ch of text) {
        if (ch === '\r' || ch === '\n' || ch === '\u0004') return finish(null);
        if (ch === '\u0003') return finish(invalid(`${key}: interrupted at the prompt`));
        if (ch === '\u007f' || ch === '\b') typed = Array.from(typed).slice(0, -1).join('');
        else if (ch === '\u0015') typed = '';
        else if (ch >= ' ') typed += ch;
      }
    };
    const onEnd = () => finish(null);
    const onError = (err: Error) => finish(invalid(`${key}: cannot read the terminal: ${err.message}`));
    // Echo goes off before the prompt shows, so nothing typed after it is ever displayed.
    setRawMode(true);
    output.write(`${key}: `);
    stdin.on('data', onData);
    stdin.once('end', onEnd);
    stdin.once('error', onError);
    stdin.resume();
  });
}
