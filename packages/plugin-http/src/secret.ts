import { closeSync, readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { Errno, NbdError, logWarning } from '@nbdx/server/api';
import type { SecretSource } from './config.js';

/** One trailing newline is the file's, not the secret's (echo writes one). */
function chomp(text: string): string {
  return text.replace(/\r?\n$/, '');
}

/**
 * Read a password or cookie the way nbdkit does: `+FILE` from a file, `-FD` from an inherited
 * file descriptor, `-` by asking on the terminal (without echo), or a value given in clear.
 */
export async function readSecret(source: SecretSource, what: string, name: string): Promise<string> {
  switch (source.kind) {
    case 'clear':
      if (what === 'password') {
        logWarning(name, 'password given in clear on the command line (others may see it in ps): prefer password=+FILE or password=-');
      }
      return source.value;
    case 'file':
      try {
        return chomp(await readFile(source.path, 'utf8'));
      } catch (err) {
        throw new NbdError(Errno.EINVAL, `${what}: cannot read '${source.path}': ${(err as Error).message}`);
      }
    case 'fd':
      try {
        return chomp(readFileSync(source.fd, 'utf8'));
      } catch (err) {
        throw new NbdError(Errno.EINVAL, `${what}: cannot read file descriptor ${source.fd}: ${(err as Error).message}`);
      } finally {
        try {
          closeSync(source.fd);
        } catch {
          // already closed
        }
      }
    case 'prompt':
      return prompt(what);
  }
}

/** Ask on the terminal with echo off. Standard input must be a terminal. */
function prompt(what: string): Promise<string> {
  const stdin = process.stdin;
  if (!stdin.isTTY) {
    return Promise.reject(
      new NbdError(Errno.EINVAL, `${what}=-: standard input is not a terminal, so it cannot be asked for: use ${what}=+FILE or ${what}=-FD`),
    );
  }
  return new Promise((resolve, reject) => {
    // Echo goes off before the prompt shows, so nothing typed after it is ever displayed.
    stdin.setRawMode(true);
    process.stderr.write(`${what}: `);
    let typed = '';
    const done = (err: Error | null) => {
      stdin.off('data', onData);
      stdin.setRawMode(false);
      stdin.pause();
      process.stderr.write('\n');
      if (err) reject(err);
      else resolve(typed);
    };
    const onData = (chunk: Buffer) => {
      for (const ch of chunk.toString('utf8')) {
        if (ch === '\r' || ch === '\n' || ch === '\u0004') return done(null);
        if (ch === '\u0003') return done(new NbdError(Errno.EINVAL, `${what}: interrupted`));
        if (ch === '\u007f' || ch === '\b') typed = typed.slice(0, -1);
        else typed += ch;
      }
    };
    stdin.resume();
    stdin.on('data', onData);
  });
}
