import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';
import { LoadError } from './loader/resolve.js';
import { loadMetricsExporter } from './metrics.js';

describe('finding the metrics endpoint package', () => {
  it('without @nbdx/metrics: a one-line LoadError with the install command', async () => {
    const empty = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-metrics-'));
    try {
      const err = await loadMetricsExporter([empty]).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(LoadError);
      expect((err as Error).message).toMatch(/^metrics need the @nbdx\/metrics package, which is not installed \(looked in .*\)\. Install it with: npm install @nbdx\/metrics@\d+\.\d+\.\d+$/);
    } finally {
      fs.rmSync(empty, { recursive: true, force: true });
    }
  });

  it('from a project that has it: startMetrics', async () => {
    const exporter = await loadMetricsExporter([process.cwd()]);
    expect(typeof exporter.startMetrics).toBe('function');
  });
});
