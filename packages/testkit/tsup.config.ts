import { defineConfig } from 'tsup';

export default defineConfig({
  // ceph.js on its own too: benchmarks and scripts outside vitest start clusters with it.
  entry: ['src/index.ts', 'src/ceph.ts'],
  format: ['esm'],
  dts: true,
  sourcemap: true,
  clean: true,
  target: 'node20',
});
