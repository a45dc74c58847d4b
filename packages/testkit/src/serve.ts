import { serve, type ServeOptions } from '@nbdx/server';
import type { Filter, Plugin } from '@nbdx/server/api';
import { NbdClient, type ConnectOptions } from '@nbdx/client';

export interface TestServerOptions {
  filters?: readonly Filter[];
  config?: ServeOptions['config'];
  readonly?: boolean;
  /** Anything else serve() takes. */
  serve?: Partial<ServeOptions>;
}

export interface TestServer {
  uri: string;
  /** Open a client connection (closed for you by close()). */
  connect(options?: ConnectOptions): Promise<NbdClient>;
  close(): Promise<void>;
}

/** Serve a plugin (and filters) in-process on a private Unix socket, for tests. */
export async function servePlugin(plugin: Plugin, options: TestServerOptions = {}): Promise<TestServer> {
  const server = await serve({
    plugin,
    filters: options.filters ?? [],
    config: options.config ?? [],
    readonly: options.readonly ?? false,
    ...options.serve,
  });
  const clients = new Set<NbdClient>();
  return {
    uri: server.uri,
    async connect(connectOptions) {
      const c = await NbdClient.connect(server.uri, connectOptions);
      clients.add(c);
      c.once('close', () => clients.delete(c));
      return c;
    },
    async close() {
      await Promise.all([...clients].map((c) => c.disconnect().catch(() => c.close())));
      await server.close();
    },
  };
}
