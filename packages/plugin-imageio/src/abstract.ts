/**
 * Linux abstract Unix socket names (a leading NUL), which is where an oVirt host's imageio
 * daemon serves its local service ("\0/org/ovirt/imageio").
 *
 * Node.js 22 and later reach them through the ordinary `net.connect({ path })` (libuv passes
 * the name's real length to connect(2)), which is what src/wire.ts uses. Node 20's libuv passed
 * the whole NUL-padded sockaddr_un, which is a different abstract name: the connect is refused
 * and the plugin falls back to the URL's HTTPS (see index.ts).
 */

/** Is this socket name abstract (leading NUL)? */
export function isAbstract(name: string): boolean {
  return name.startsWith('\0');
}

/** How a name is shown in messages: abstract names as "@name", as ss(8) and socat write them. */
export function showSocket(name: string): string {
  return isAbstract(name) ? `@${name.slice(1)}` : name;
}

/** Whether this Node.js connects to abstract names correctly (22 and later). */
export function nodeReachesAbstract(version = process.versions.node): boolean {
  return Number(version.split('.')[0]) >= 22;
}
