#!/usr/bin/env node
import { main } from '@nbdx/server/cli';

main(process.argv.slice(2)).then(
  (status) => {
    process.exitCode = status;
    // Whatever the plugin left open (timers, sockets), the command is done.
    setImmediate(() => process.exit(status));
  },
  (err) => {
    process.stderr.write(`nbdx: ${(err as Error).stack ?? err}\n`);
    process.exit(1);
  },
);
