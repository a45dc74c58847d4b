#!/usr/bin/env node
// The `nbdx` command. Plain JavaScript kept in git rather than built, so that package managers
// can link it when the workspace is installed, before anything is built.
import { main } from '@nbdx/server/cli';

main(process.argv.slice(2)).then(
  (status) => {
    process.exitCode = status;
    // Whatever the plugin left open (timers, sockets), the command is done.
    setImmediate(() => process.exit(status));
  },
  (err) => {
    // main() reports its own errors in one line; this is for a bug in it.
    process.stderr.write(`nbdx: ${err?.stack ?? err}\n`);
    process.exit(1);
  },
);
