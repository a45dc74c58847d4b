import { readFile, realpath } from 'node:fs/promises';

/** Linux encodes dev_t as major:minor with the minor split around the major (see <sys/sysmacros.h>). */
export function majorMinor(dev: number): string {
  const d = BigInt(dev);
  const major = ((d >> 8n) & 0xfffn) | ((d >> 32n) & ~0xfffn);
  const minor = (d & 0xffn) | ((d >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

async function readNumber(path: string): Promise<number | undefined> {
  try {
    const n = Number((await readFile(path, 'utf8')).trim());
    return Number.isFinite(n) ? n : undefined;
  } catch {
    return undefined;
  }
}

/**
 * A queue attribute of the disk holding `dev`. Partitions have no queue/ of their own, so look
 * one folder up (the whole disk) when the first try finds nothing.
 */
async function queueAttribute(dev: number, name: string): Promise<number | undefined> {
  let dir: string;
  try {
    dir = await realpath(`/sys/dev/block/${majorMinor(dev)}`);
  } catch {
    return undefined;
  }
  return (await readNumber(`${dir}/queue/${name}`)) ?? (await readNumber(`${dir}/../queue/${name}`));
}

/** Whether the block device `dev` (st_rdev of a device, st_dev of a file) spins; false if unknown. */
export async function isRotationalDevice(dev: number): Promise<boolean> {
  return (await queueAttribute(dev, 'rotational')) === 1;
}

/** Size of a block device from sysfs (512-byte sectors), for when the addon is missing. */
export async function blockDeviceSizeFromSysfs(rdev: number): Promise<number | undefined> {
  const sectors = await readNumber(`/sys/dev/block/${majorMinor(rdev)}/size`);
  return sectors === undefined ? undefined : sectors * 512;
}
