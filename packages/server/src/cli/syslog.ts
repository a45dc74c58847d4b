import { spawn, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';

/**
 * Messages to the system log. Node's standard library cannot write to a Unix datagram socket,
 * so the lines go through util-linux's `logger` (in bsdutils, which every Debian and Ubuntu
 * system has), started once and fed one line per message with its priority in front: the
 * classic BSD format (RFC 3164) on the local socket, tagged `nbdx[PID]`, facility daemon.
 *
 * NBDX_SYSLOG_SOCKET names another socket than /dev/log (tests, chroots).
 */
export interface SyslogSink {
  /** `severity`: 3 error, 4 warning, 6 info, 7 debug. */
  write(severity: 3 | 4 | 6 | 7, message: string): void;
  close(): void;
}

const FACILITY_DAEMON = 3;

/** Open the system log, or return why it cannot be used. */
export function openSyslog(socket = process.env.NBDX_SYSLOG_SOCKET ?? '/dev/log'): SyslogSink | string {
  try {
    if (!fs.statSync(socket).isSocket()) return `${socket} is not a socket`;
  } catch {
    return `no syslog socket at ${socket}`;
  }
  let child: ChildProcess;
  try {
    child = spawn('logger', [`--id=${process.pid}`, '--tag', 'nbdx', '--prio-prefix', '--rfc3164', '--socket', socket], {
      stdio: ['pipe', 'ignore', 'ignore'],
    });
  } catch (err) {
    return `cannot start logger: ${(err as Error).message}`;
  }
  let broken = false;
  child.on('error', () => (broken = true));
  child.on('exit', () => (broken = true));
  child.stdin!.on('error', () => (broken = true));
  // The log must not keep the server alive, nor be what stops it.
  child.unref();
  (child.stdin as unknown as { unref?: () => void }).unref?.();
  return {
    write(severity, message) {
      if (broken) return;
      // One message per line: newlines inside a message would start bogus ones.
      child.stdin!.write(`<${FACILITY_DAEMON * 8 + severity}>${message.replace(/\n/g, ' ')}\n`);
    },
    close() {
      if (!broken) child.stdin!.end();
    },
  };
}
