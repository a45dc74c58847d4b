import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';

/** Where a server listens. */
export type ListenTarget =
  | { kind: 'tcp'; port: number; host?: string }
  | { kind: 'unix'; path: string; temporary?: boolean }
  /** -U -: a private socket in a new temporary directory, removed at exit. */
  | { kind: 'unix-temp' }
  /** Socket activation: already-listening descriptors handed over by systemd (LISTEN_FDS). */
  | { kind: 'fds'; fds: number[] };

export interface BoundListener {
  server: net.Server;
  /** What to put in URIs: port for TCP, path for Unix sockets. */
  port?: number;
  host?: string;
  path?: string;
  cleanup(): void;
}

function listenOn(server: net.Server, arg: net.ListenOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error) => reject(err);
    server.once('error', onError);
    server.listen(arg, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

/** Bind every listener a target needs (TCP without -i listens on IPv4 and IPv6 both). */
export async function bind(target: ListenTarget, onConnection: (s: net.Socket) => void): Promise<BoundListener[]> {
  // allowHalfOpen: a client that shuts down its sending side after DISC (libnbd does) still gets
  // the replies to what it sent before; the connection closes our side when it is done.
  const make = () => net.createServer({ noDelay: true, pauseOnConnect: false, allowHalfOpen: true }, onConnection);
  switch (target.kind) {
    case 'tcp': {
      const server = make();
      await listenOn(server, { port: target.port, host: target.host, ipv6Only: false });
      const addr = server.address() as net.AddressInfo;
      return [{ server, port: addr.port, host: target.host, cleanup: () => {} }];
    }
    case 'unix':
    case 'unix-temp': {
      let dir: string | null = null;
      let p: string;
      if (target.kind === 'unix-temp') {
        dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-'));
        p = path.join(dir, 'socket');
      } else {
        p = target.path;
      }
      const server = make();
      await listenOn(server, { path: p });
      return [
        {
          server,
          path: p,
          cleanup: () => {
            try {
              fs.unlinkSync(p);
            } catch {}
            if (dir) fs.rmSync(dir, { recursive: true, force: true });
          },
        },
      ];
    }
    case 'fds': {
      const out: BoundListener[] = [];
      for (const fd of target.fds) {
        const server = make();
        await listenOn(server, { fd } as net.ListenOptions);
        const addr = server.address();
        out.push({
          server,
          ...(typeof addr === 'string' ? { path: addr } : addr ? { port: addr.port } : {}),
          cleanup: () => {},
        });
      }
      return out;
    }
  }
}

/** Descriptors passed by socket activation, if they are meant for this process. */
export function socketActivationFds(env: NodeJS.ProcessEnv = process.env): number[] | null {
  const pid = env.LISTEN_PID;
  const n = Number(env.LISTEN_FDS);
  if (!pid || Number(pid) !== process.pid || !Number.isInteger(n) || n < 1) return null;
  return Array.from({ length: n }, (_, i) => 3 + i);
}
