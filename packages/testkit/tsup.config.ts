import { defineConfig } from 'tsup';

export default defineConfig({
  // ceph.js and http-server.js on their own too: benchmarks and scripts outside vitest (the
  // fuzzer's s3, rbd and http stacks) start clusters and range servers with them.
  entry: ['src/index.ts', 'src/ceph.ts', 'src/http-server.ts'],
  format: ['esm'],
  dts: true,
  sourcemap: true,
  clean: true,
  target: 'node20',
});
