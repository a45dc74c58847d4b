/**
 * Secrets on the command line, as nbdkit's password parameters take them, so that a secret never
 * has to appear in clear in a process listing or a shell history:
 *   `+FILE` reads the file (one trailing newline dropped), `-` asks on the terminal (or reads one
 *   line from stdin when stdin is not a terminal), `-FD` reads from an inherited file descriptor.
 * Anything else is the secret itself (accepted, but the README says why not to).
 */
import * as fs from 'node:fs';
import { Errno, NbdError, logWarning } from '@nbdx/server/api';

function stripNewline(text: string): string {
  return text.replace(/\r?\n$/, '');
}

/** Read a line from a TTY with echo off (raw mode), writing the prompt to stderr. */
function promptTty(prompt: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const stdin = process.stdin;
    process.stderr.write(prompt);
    stdin.setRawMode(true);
    stdin.resume();
    stdin.setEncoding('utf8');
    let text = '';
    const done = (err: Error | null) => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write('\n');
      if (err) reject(err);
      else resolve(text);
    };
    const onData = (chunk: string) => {
      for (const ch of chunk) {
        if (ch === '\r' || ch === '\n') return done(null);
        if (ch === '\u0003' || ch === '\u0004') return done(new NbdError(Errno.EINVAL, `${prompt.trim()} no secret entered`));
        if (ch === '\u007f' || ch === '\b') text = text.slice(0, -1);
        else text += ch;
      }
    };
    stdin.on('data', onData);
  });
}

/** The first line of stdin (the secret piped in). */
function readStdinLine(stdin: NodeJS.ReadableStream): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = '';
    const finish = () => {
      stdin.off('data', onData);
      stdin.off('end', finish);
      stdin.off('error', onError);
      stdin.pause();
      const nl = text.indexOf('\n');
      resolve(stripNewline(nl >= 0 ? text.slice(0, nl + 1) : text));
    };
    const onData = (d: string) => {
      text += d;
      if (text.includes('\n')) finish();
    };
    const onError = (e: Error) => reject(e);
    stdin.setEncoding('utf8');
    stdin.on('data', onData);
    stdin.once('end', finish);
    stdin.once('error', onError);
    stdin.resume();
  });
}

/** `stdin` is for tests; the command line's secret comes from the process's stdin. */
export async function readSecret(key: string, value: string, stdin: NodeJS.ReadableStream = process.stdin): Promise<string> {
  let secret: string;
  if (value.startsWith('+')) {
    const file = value.slice(1);
    try {
      secret = stripNewline(fs.readFileSync(file, 'utf8'));
    } catch (err) {
      throw new NbdError(Errno.EINVAL, `${key}: cannot read '${file}': ${(err as Error).message}`);
    }
  } else if (value === '-') {
    secret = stdin === process.stdin && process.stdin.isTTY ? await promptTty(`${key}: `) : await readStdinLine(stdin);
  } else if (/^-\d+$/.test(value)) {
    const fd = Number(value.slice(1));
    if (fd <= 2) throw new NbdError(Errno.EINVAL, `${key}: file descriptor ${fd} is stdin/stdout/stderr; use ${key}=- for stdin`);
    try {
      secret = stripNewline(fs.readFileSync(fd, 'utf8'));
    } catch (err) {
      throw new NbdError(Errno.EINVAL, `${key}: cannot read file descriptor ${fd}: ${(err as Error).message}`);
    }
  } else {
    secret = value;
    if (secret !== '') {
      logWarning('s3', `${key}= given in clear: other users can read it in the process list; use ${key}=+FILE, ${key}=- or ${key}=-FD`);
    }
  }
  if (secret === '') throw new NbdError(Errno.EINVAL, `${key}: the secret is empty`);
  return secret;
}
