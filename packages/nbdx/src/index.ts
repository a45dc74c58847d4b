/** The `nbdx` package is the command; for the library, use @nbdx/server. */
export { main } from '@nbdx/server/cli';
