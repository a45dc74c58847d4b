import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { NbdClient } from '@nbdx/client';
import { createMemoryPlugin } from '@nbdx/plugin-memory';
import { serve } from '@nbdx/server';
import { MAX_EXPORT_LABELS, OTHER_EXPORT } from '@nbdx/server';
import { wantsOpenMetrics } from './index.js';

describe('content negotiation', () => {
  it.each([
    [undefined, false],
    ['*/*', false],
    ['text/plain', false],
    ['application/openmetrics-text', true],
    ['application/openmetrics-text; version=1.0.0; charset=utf-8', true],
    // Prometheus 2.x and 3.x
    ['application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1', true],
    ['text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5', false],
    ['application/openmetrics-text;q=0', false],
    ['application/openmetrics-text;q=nonsense', false],
  ])('Accept: %s → OpenMetrics %s', (accept, expected) => {
    expect(wantsOpenMetrics(accept)).toBe(expected);
  });
});

/** The `export` label values of one metric in a plain-text scrape. */
function exportLabels(body: string, metric: string): string[] {
  const out: string[] = [];
  for (const line of body.split('\n')) {
    if (!line.startsWith(`${metric}{`)) continue;
    const m = /export="((?:[^"\\]|\\.)*)"/.exec(line);
    if (m) out.push(m[1]!);
  }
  return out;
}

describe('the embedding API', () => {
  it('serve({ metrics }) listens where asked, counts, and close() ends the endpoint', async () => {
    const server = await serve({ plugin: createMemoryPlugin(), config: { size: '1M' }, metrics: { port: 0 } });
    const addr = server.metricsAddress!;
    expect(addr.host).toBe('127.0.0.1');
    expect(addr.port).toBeGreaterThan(0);
    expect(addr.url).toBe(`http://127.0.0.1:${addr.port}/metrics`);
    try {
      const c = await NbdClient.connect(server.uri);
      await c.pwrite(Buffer.alloc(4096, 1), 0);
      await c.pread(8192, 0);
      await c.zero(65536, 65536);
      await c.flush();
      const body = await (await fetch(addr.url)).text();
      expect(body).toMatch(/^nbdx_requests_total\{op="write",export=""\} 1$/m);
      expect(body).toMatch(/^nbdx_bytes_total\{op="read",export=""\} 8192$/m);
      expect(body).toMatch(/^nbdx_bytes_total\{op="zero",export=""\} 65536$/m);
      expect(body).toMatch(/^nbdx_requests_total\{op="flush",export=""\} 1$/m);
      expect(body).toMatch(/^nbdx_export_connections_open\{export=""\} 1$/m);
      expect(body).toMatch(/^nbdx_connections_open 1$/m);
      expect(body).toMatch(/^nbdx_request_duration_seconds_count\{op="zero",export=""\} 1$/m);
      await c.disconnect();
    } finally {
      await server.close();
    }
    await expect(fetch(addr.url)).rejects.toThrow();
  });

  it('processMetrics: false leaves out the process and Node.js metrics', async () => {
    const server = await serve({ plugin: createMemoryPlugin(), config: { size: '1M' }, metrics: { port: 0, processMetrics: false } });
    try {
      const body = await (await fetch(server.metricsAddress!.url)).text();
      expect(body).toMatch(/^nbdx_connections_open 0$/m);
      expect(body).not.toMatch(/process_cpu|nodejs_/);
    } finally {
      await server.close();
    }
  });

  it('without metrics nothing is counted and there is no endpoint', async () => {
    const server = await serve({ plugin: createMemoryPlugin(), config: { size: '1M' } });
    try {
      expect(server.metricsAddress).toBeNull();
      expect(server.settings.stats ?? null).toBeNull();
    } finally {
      await server.close();
    }
  });

  it('prom-client is only loaded when metrics are asked for', async () => {
    // A fresh process: the test runner's module cache cannot tell.
    const probe = (metrics: boolean) => `
      import { createRequire } from 'node:module';
      import { serve } from '@nbdx/server';
      import { createMemoryPlugin } from '@nbdx/plugin-memory';
      const s = await serve({ plugin: createMemoryPlugin(), config: { size: '1M' }${metrics ? ', metrics: { port: 0 }' : ''} });
      await s.close();
      const loaded = Object.keys(createRequire(import.meta.url).cache).some((f) => f.includes('prom-client'));
      console.log(loaded ? 'loaded' : 'not loaded');`;
    const run = async (metrics: boolean) =>
      (await promisify(execFile)(process.execPath, ['--input-type=module', '-e', probe(metrics)], { cwd: process.cwd() })).stdout.trim();
    expect(await run(false)).toBe('not loaded');
    expect(await run(true)).toBe('loaded');
  });

  it(`export labels are bounded: ${MAX_EXPORT_LABELS} names, then everything else under ${OTHER_EXPORT}`, async () => {
    // The memory plugin accepts any export name, as many plugins do: a client could make up
    // millions of them.
    const server = await serve({ plugin: createMemoryPlugin(), config: { size: '1M' }, metrics: { port: 0, processMetrics: false } });
    try {
      const names = [...Array.from({ length: MAX_EXPORT_LABELS + 8 }, (_, i) => `e${i}`), 'x'.repeat(200), OTHER_EXPORT, 'e0'];
      for (const exportName of names) {
        const c = await NbdClient.connect(server.uri, { exportName });
        await c.pread(512, 0);
        await c.disconnect();
      }
      const body = await (await fetch(server.metricsAddress!.url)).text();
      const labels = exportLabels(body, 'nbdx_export_connections_total');
      expect(labels).toEqual([...Array.from({ length: MAX_EXPORT_LABELS }, (_, i) => `e${i}`), OTHER_EXPORT]);
      expect(body).toMatch(/^nbdx_export_connections_total\{export="e0"\} 2$/m);
      // 8 past the limit, the long name and a client's own "(other)".
      expect(body).toMatch(/^nbdx_export_connections_total\{export="\(other\)"\} 10$/m);
      expect(body).toMatch(/^nbdx_requests_total\{op="read",export="\(other\)"\} 10$/m);
      expect(new Set(exportLabels(body, 'nbdx_request_duration_seconds_count')).size).toBe(MAX_EXPORT_LABELS + 1);
    } finally {
      await server.close();
    }
  });
});
