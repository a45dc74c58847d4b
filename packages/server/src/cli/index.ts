/** The nbdx command line, as a library: `main(argv)` resolves with the exit status. */
export { main, VERSION } from './main.js';
export { parseArgs, applyMagicKey, UsageError, USAGE, type CliOptions } from './args.js';
