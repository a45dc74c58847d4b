/**
 * `nbdx --metrics`: the real command with the memory plugin, scraped while nbdcopy copies into it.
 * Byte counters and latency histograms must move during the copy, gauges must say what is going
 * on and fall back to zero after it, errors are counted by errno, and the endpoint speaks both
 * text formats.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NBDSH_HELPERS, nbdshOk, nbdxBin, needNbdx, needTools, run, spawnTool, startCli, tmpDir, waitFor, type CliServer } from '@nbdx/testkit';

const have = needTools('nbdcopy', 'nbdsh') && needNbdx();
const MiB = 1024 * 1024;
const COPY_SIZE = 256 * MiB;

/** One scrape: `name{labels}` exactly as written, to its value. */
type Scrape = Map<string, number>;

function parseScrape(body: string): Scrape {
  const m: Scrape = new Map();
  for (const line of body.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const at = line.lastIndexOf(' ');
    m.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return m;
}

async function scrape(url: string): Promise<Scrape> {
  const res = await fetch(url);
  expect(res.status).toBe(200);
  return parseScrape(await res.text());
}

/** The value of a series that must be there. */
function get(s: Scrape, key: string): number {
  const v = s.get(key);
  if (v === undefined) throw new Error(`no series ${key} in the scrape`);
  return v;
}

const series = {
  writeBytes: 'nbdx_bytes_total{op="write",export=""}',
  writeRequests: 'nbdx_requests_total{op="write",export=""}',
  writeCount: 'nbdx_request_duration_seconds_count{op="write",export=""}',
  writeSum: 'nbdx_request_duration_seconds_sum{op="write",export=""}',
  inFlight: 'nbdx_requests_in_flight{export=""}',
  open: 'nbdx_connections_open',
  exportOpen: 'nbdx_export_connections_open{export=""}',
  accepted: 'nbdx_connections_accepted_total',
};

describe.skipIf(!have)('nbdx --metrics', () => {
  let dir: string;
  let srv: CliServer;
  let url: string;
  let src: string;
  beforeAll(async () => {
    dir = tmpDir();
    // Writes take at least 10 ms, so the copy lasts long enough to be watched, and its latency
    // histogram has somewhere to be.
    srv = await startCli(['-v', '-U', path.join(dir, 'sock'), '--metrics=127.0.0.1:0', '--filter=delay', 'memory', '256M', 'delay-write=10ms']);
    const found = /metrics: serving (http:\/\/127\.0\.0\.1:(\d+)\/metrics)/.exec(srv.stderr());
    expect(found, srv.stderr()).not.toBeNull();
    expect(Number(found![2])).toBeGreaterThan(0); // port 0: the one chosen is logged
    url = found![1]!;
    src = path.join(dir, 'src.raw');
    const fd = fs.openSync(src, 'w');
    const block = randomBytes(MiB);
    for (let i = 0; i < COPY_SIZE / MiB; i++) fs.writeSync(fd, block);
    fs.closeSync(fd);
  });
  afterAll(async () => {
    expect(await srv?.stop()).toBe(0);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('a scrape during nbdcopy shows bytes and latency moving; after it the gauges are back to 0', async () => {
    // Before any client, there is no export to show yet.
    const before = await scrape(url);
    expect(before.has(series.writeBytes)).toBe(false);
    expect(get(before, series.open)).toBe(0);
    expect(get(before, series.accepted)).toBe(0);

    // One connection, four writes in flight: 1024 writes of 256 KiB at 10 ms each take 2.5 s.
    const copy = spawnTool('nbdcopy', ['--connections=1', '--requests=4', '--request-size=262144', src, srv.uri]);
    let exited = false;
    void copy.done.then(() => (exited = true));
    const during: Scrape[] = [];
    while (!exited) {
      const s = await scrape(url);
      // The latency histogram shows an operation once one has finished (the counters show every
      // operation from the connection on).
      if (!exited && s.has(series.writeCount)) during.push(s);
      await new Promise((r) => setTimeout(r, 100));
    }
    const result = await copy.done;
    expect(result.code, result.output).toBe(0);

    // Several scrapes while copying, and the counters went up between them.
    const moving = during.filter((s) => get(s, series.writeBytes) > 0 && get(s, series.writeBytes) < COPY_SIZE);
    expect(moving.length, `${during.length} scrapes during the copy`).toBeGreaterThanOrEqual(3);
    for (let i = 1; i < during.length; i++) {
      for (const key of [series.writeBytes, series.writeCount, series.writeSum, series.accepted]) {
        expect(get(during[i]!, key), key).toBeGreaterThanOrEqual(get(during[i - 1]!, key));
      }
    }
    const first = moving[0]!;
    const last = moving[moving.length - 1]!;
    expect(get(last, series.writeBytes)).toBeGreaterThan(get(first, series.writeBytes));
    expect(get(last, series.writeCount)).toBeGreaterThan(get(first, series.writeCount));
    expect(get(last, series.writeSum)).toBeGreaterThan(get(first, series.writeSum));
    // While copying: nbdcopy's one connection is open, with at most its four writes in flight.
    for (const s of moving) {
      expect(get(s, series.open)).toBeGreaterThanOrEqual(1);
      expect(get(s, series.exportOpen)).toBeGreaterThanOrEqual(1);
      expect(get(s, series.inFlight)).toBeLessThanOrEqual(4);
    }
    expect(Math.max(...moving.map((s) => get(s, series.inFlight)))).toBeGreaterThan(0);

    // Once nbdcopy has gone and the server has seen it go, nothing is open or in flight.
    let after = await scrape(url);
    await waitFor(async () => {
      after = await scrape(url);
      return get(after, series.open) === 0;
    }, 10_000, 'the connection to close');
    expect(get(after, series.writeBytes)).toBe(COPY_SIZE);
    expect(get(after, series.writeRequests)).toBe(COPY_SIZE / (256 * 1024));
    expect(get(after, series.writeCount)).toBe(COPY_SIZE / (256 * 1024));
    expect(get(after, series.inFlight)).toBe(0);
    expect(get(after, series.exportOpen)).toBe(0);
    expect(get(after, 'nbdx_export_connections_total{export=""}')).toBeGreaterThanOrEqual(1);
    // Every write waited at least the 10 ms delay: none in the buckets below, the mean above.
    expect(get(after, 'nbdx_request_duration_seconds_bucket{op="write",export="",le="0.005"}')).toBe(0);
    expect(get(after, 'nbdx_request_duration_seconds_bucket{op="write",export="",le="+Inf"}')).toBe(get(after, series.writeCount));
    expect(get(after, series.writeSum) / get(after, series.writeCount)).toBeGreaterThanOrEqual(0.0095);
    expect(get(after, 'nbdx_handshake_failures_total')).toBe(0);
    // The default process metrics come along.
    expect(after.has('process_cpu_seconds_total')).toBe(true);
  });

  it('counts failed requests by operation and errno', async () => {
    const size = 256 * MiB;
    await nbdshOk(
      srv.uri,
      `${NBDSH_HELPERS}
h.set_strict_mode(0)
expect_err("ENOSPC", lambda: h.pwrite(b"x" * 512, ${size}))
expect_err("ENOSPC", lambda: h.pwrite(b"x" * 512, ${size} - 256))
expect_err("EINVAL", lambda: h.pread(512, ${size}))
h.pread(4096, 0)
`,
    );
    const s = await scrape(url);
    expect(get(s, 'nbdx_errors_total{op="write",errno="ENOSPC",export=""}')).toBe(2);
    expect(get(s, 'nbdx_errors_total{op="read",errno="EINVAL",export=""}')).toBe(1);
    // Rejected requests count as requests, not as bytes.
    expect(get(s, 'nbdx_requests_total{op="read",export=""}')).toBeGreaterThanOrEqual(2);
    expect(get(s, 'nbdx_bytes_total{op="read",export=""}')).toBeGreaterThanOrEqual(4096);
    expect(get(s, series.writeBytes)).toBe(COPY_SIZE);
  });

  it('answers OpenMetrics to scrapers that ask for it, plain text otherwise; other paths are 404', async () => {
    const plain = await fetch(url);
    expect(plain.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
    const text = await plain.text();
    expect(text).toMatch(/^# TYPE nbdx_bytes_total counter$/m);
    expect(text).not.toMatch(/# EOF/);

    // What Prometheus sends.
    const accept =
      'application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1';
    const om = await fetch(url, { headers: { accept } });
    expect(om.headers.get('content-type')).toMatch(/^application\/openmetrics-text; version=1\.0\.0/);
    const body = await om.text();
    expect(body).toMatch(/^# TYPE nbdx_bytes counter$/m);
    expect(body).toMatch(/^nbdx_bytes_total\{op="write",export=""\} 268435456$/m);
    expect(body).toMatch(/^# TYPE nbdx_request_duration_seconds histogram$/m);
    expect(body.endsWith('# EOF\n')).toBe(true);
    // Plain text again afterwards: one format does not change the other's names.
    expect(await (await fetch(url)).text()).toMatch(/^# TYPE nbdx_bytes_total counter$/m);

    const base = url.replace(/\/metrics$/, '');
    for (const p of ['/', '/metricsx', '/favicon.ico']) expect((await fetch(base + p)).status, p).toBe(404);
    expect((await fetch(url, { method: 'POST' })).status).toBe(405);
    const head = await fetch(url, { method: 'HEAD' });
    expect(head.status).toBe(200);
    expect(await head.text()).toBe('');
  });

  it('a bad --metrics value, or a port in use, is one line and exit 1', async () => {
    const nbdx = (args: string[]) => run(process.execPath, [nbdxBin(), '-f', '--no-install', ...args]);
    for (const [value, msg] of [
      ['nope', /^nbdx: --metrics: 'nope' has 'nope', which is not a port number/],
      ['::1:9100', /^nbdx: --metrics: '::1:9100' has an IPv6 address without brackets/],
      ['70000', /^nbdx: --metrics: '70000' has '70000', which is not a port number \(0 to 65535\)/],
    ] as const) {
      const r = await nbdx([`--metrics=${value}`, '-U', path.join(dir, 'bad.sock'), 'memory', '1M']);
      expect(r.code).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(msg);
    }
    const taken = net.createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    try {
      const port = (taken.address() as net.AddressInfo).port;
      const r = await nbdx([`--metrics=${port}`, '-U', path.join(dir, 'busy.sock'), 'memory', '1M']);
      expect(r.code).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(new RegExp(`^nbdx: metrics: cannot listen on 127\\.0\\.0\\.1:${port}: the port is in use\\n`));
      expect(fs.existsSync(path.join(dir, 'busy.sock'))).toBe(false);
    } finally {
      taken.close();
    }
  });
});
