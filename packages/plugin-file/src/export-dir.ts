import { opendir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Errno, NbdError } from '@nbdx/server/api';

/** NBD limits export names to 4096 bytes. */
const MAX_NAME_BYTES = 4096;

/**
 * Why `name` cannot name a file directly inside the directory, or undefined if it can. Anything
 * that could reach outside the directory (a `/`, `.` or `..`) is refused before touching the disk.
 */
export function badExportName(name: string): string | undefined {
  if (name === '') return 'the export name is empty';
  if (name.includes('/')) return `export name '${name}' contains '/'`;
  if (name === '.' || name === '..') return `export name '${name}' is not a file`;
  if (name.includes('\0')) return 'export name contains a NUL byte';
  if (Buffer.byteLength(name) > MAX_NAME_BYTES) return 'export name is longer than 4096 bytes';
  return undefined;
}

/** The path an export name stands for inside `dir`, or an NbdError saying why it does not exist. */
export function exportPath(dir: string, name: string): string {
  const why = badExportName(name);
  if (why) throw new NbdError(Errno.EINVAL, why);
  return join(dir, name);
}

/**
 * Every regular file and block device directly inside `dir` (symbolic links followed), in the
 * order the directory gives them (readdir order, not sorted): the order nbdkit lists them in, so
 * scripts that take "the first export" get the same one from both.
 */
export async function listDirExports(dir: string): Promise<string[]> {
  const names: string[] = [];
  // opendir reads entries as the kernel returns them (fs.readdir sorts them by name).
  const handle = await opendir(dir);
  for await (const e of handle) {
    if (badExportName(e.name)) continue;
    let usable = e.isFile() || e.isBlockDevice();
    if (!usable && (e.isSymbolicLink() || !(e.isDirectory() || e.isFIFO() || e.isSocket() || e.isCharacterDevice()))) {
      try {
        const st = await stat(join(dir, e.name));
        usable = st.isFile() || st.isBlockDevice();
      } catch {
        usable = false; // a dangling link
      }
    }
    if (usable) names.push(e.name);
  }
  return names;
}
