/** Types for the parts of check-packages.mjs that tests import. */
export function satisfies(version: string, range: string): boolean;
