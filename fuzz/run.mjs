#!/usr/bin/env node
/**
 * pnpm fuzz — nbdx's structure-aware network fuzzer.
 *
 *   node fuzz/run.mjs [--seconds N | --inputs N] [--seed S] [--stack NAME[,NAME]] [options]
 *
 *   --seconds N       total time, split evenly over the stacks (default 60)
 *   --inputs N        inputs per stack instead of a time budget
 *   --seed S          seed (default: random, printed); input I of seed S is always the same bytes
 *   --stack NAME      memory, file, nbd, cow, shared, readonly, tls, cache, readahead, retry,
 *                     retry-flaky, stats-log, http, http-flaky (repeatable or comma list;
 *                     default: all of these); s3 and rbd
 *                     (a throw-away Ceph cluster each) only when named; `all` = every one of them;
 *                     nbdkit-reference runs the same inputs against nbdkit, to calibrate
 *   --replay I[,J]    run only these input indices, one at a time, with details (needs --seed, --stack)
 *   --concurrency K   connections at once (default 8)
 *   --timeout MS      no reply for this long while one is owed = hang (default 5000)
 *   --check-every N   health check (probe + nbdsh + RSS) every N inputs (default 2000)
 *   --rss-limit MIB   server RSS above this is a finding (default 1024)
 *   --no-confirm      do not replay findings (and crash suspects) alone to confirm them
 *   --confirm-seconds N  time per stack for those replays (default 30)
 *   --json FILE       also write the results as JSON
 *
 * Every stack is a fresh nbdx CLI process (with an upstream where it proxies) on a Unix socket
 * in a private temporary directory. Findings: the server dies or stops accepting, hangs, breaks
 * the protocol (see oracle.mjs), damages the protected region, logs an internal error, or grows
 * past the RSS limit. Exit status 1 when anything was found, 2 on a usage or setup error.
 * Under CI=true a missing tool (nbdkit, nbdsh) is an error, not a reason to skip.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { randomInt } from 'node:crypto';
import { pathToFileURL } from 'node:url';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { probeCheck, realClientCheck } from './health.mjs';
import { buildInput, describeInput } from './input.mjs';
import { runSession } from './session.mjs';
import { ALL_STACKS, DEFAULT_STACKS, STACKS, Stack, hasTool, missingTools } from './stacks.mjs';

/** The usage text is the comment at the top of this file. */
const HELP = /\/\*\*\n([\s\S]*?)\n \*\//.exec(fs.readFileSync(new URL(import.meta.url), 'utf8'))[1].split('\n').map((l) => l.replace(/^ \*\s?/, '')).join('\n');

export function parseArgs(argv) {
  const o = { stacks: [], seconds: null, inputs: null, seed: null, replay: null, concurrency: 8, timeout: 5000, checkEvery: 2000, rssLimit: 1024, confirm: true, confirmSeconds: 30, json: null };
  for (let i = 0; i < argv.length; i++) {
    const [flag, inline] = argv[i].split(/=(.*)/s, 2);
    const value = () => inline ?? argv[++i];
    switch (flag) {
      case '--seconds': o.seconds = Number(value()); break;
      case '--inputs': o.inputs = Number(value()); break;
      case '--seed': o.seed = value(); break;
      case '--stack': o.stacks.push(...value().split(',').filter(Boolean).flatMap((n) => (n === 'all' ? ALL_STACKS : [n]))); break;
      case '--replay': o.replay = value().split(',').map(Number); break;
      case '--concurrency': o.concurrency = Number(value()); break;
      case '--timeout': o.timeout = Number(value()); break;
      case '--check-every': o.checkEvery = Number(value()); break;
      case '--rss-limit': o.rssLimit = Number(value()); break;
      case '--no-confirm': o.confirm = false; break;
      case '--confirm-seconds': o.confirmSeconds = Number(value()); break;
      case '--json': o.json = value(); break;
      case '--help': case '-h': o.help = true; break;
      default: throw new Error(`unknown argument ${argv[i]}`);
    }
  }
  if (!o.stacks.length) o.stacks = [...DEFAULT_STACKS];
  o.stacks = [...new Set(o.stacks)];
  for (const s of o.stacks) if (!STACKS[s]) throw new Error(`unknown stack ${s} (known: ${Object.keys(STACKS).join(', ')})`);
  if (o.seconds === null && o.inputs === null) o.seconds = 60;
  if (o.replay && o.seed === null) throw new Error('--replay needs the --seed of the run that found it');
  o.seed ??= String(randomInt(1, 2 ** 31));
  return o;
}

/** Findings of one stack, grouped by kind and rule; the first few inputs of each are kept. */
class Findings {
  constructor() {
    this.groups = new Map();
  }
  add(f) {
    const key = `${f.kind}|${f.rule}`;
    let g = this.groups.get(key);
    if (!g) {
      g = { kind: f.kind, rule: f.rule, count: 0, examples: [], reproduced: null };
      this.groups.set(key, g);
    }
    g.count++;
    if (g.examples.length < 5) g.examples.push({ index: f.index ?? null, detail: f.detail, input: f.input ?? null });
  }
  count(kind) {
    let n = 0;
    for (const g of this.groups.values()) if (kind(g.kind)) n += g.count;
    return n;
  }
  get size() {
    return this.groups.size;
  }
  list() {
    return [...this.groups.values()];
  }
}

const isCrash = (k) => k === 'crash' || k === 'accept';
const isHang = (k) => k === 'hang';
const isViolation = (k) => !isCrash(k) && !isHang(k);

function log(...a) {
  console.log(...a);
}

/** Run one input; returns the session result. */
async function runOne(stack, seed, index, o, giveUpAt = null) {
  const { plan, input } = buildInput(seed, index, stack.profile);
  const res = await runSession(input, { socket: stack.socket, profile: stack.profile, timeoutMs: o.timeout, end: plan.end, tlsClient: stack.tlsClient, giveUpAt });
  return { ...res, plan, input };
}

async function health(stack, o, findings, stats, when) {
  stats.checks++;
  for (const p of stack.processes()) {
    const rss = p.rssKiB();
    if (rss !== null) {
      stats.rss[p.label] ??= { start: rss, peak: rss, last: rss };
      const r = stats.rss[p.label];
      r.peak = Math.max(r.peak, rss);
      r.last = rss;
      (r.history ??= []).push(Math.round(rss / 1024));
      if (rss > o.rssLimit * 1024 && !r.reported) {
        r.reported = true;
        findings.add({ kind: 'rss', rule: `rss.over-limit:${p.label}`, detail: `${p.label} RSS ${(rss / 1024).toFixed(0)} MiB exceeds ${o.rssLimit} MiB (${when})` });
      }
    }
    if (!p.alive) return; // the crash path reports and restarts
  }
  // A damaged region is corruption; a server that cannot serve a fresh client at all is a hang.
  const report = (r, who) => findings.add(r.unresponsive
    ? { kind: 'hang', rule: `health.unresponsive:${who}`, detail: `${when}: ${r.text}` }
    : { kind: 'corruption', rule: `health.region:${who}`, detail: `${when}: ${r.text}` });
  const probe = await probeCheck(stack);
  if (probe) report(probe, 'probe');
  if (stats.realClient) {
    const real = await realClientCheck(stack);
    stats.realClientChecks++;
    if (real) report(real, 'nbdsh');
  }
  if (probe && !probe.unresponsive) await stack.restoreRegion().catch(() => {});
  const changed = stack.imageChanged();
  if (changed && !stats.imageReported) {
    stats.imageReported = true;
    findings.add({ kind: 'corruption', rule: 'health.image-changed', detail: `${when}: ${changed}` });
  }
}

/** A dead server: find which input killed it by replaying the suspects one at a time. */
async function crashed(stack, o, seed, findings, stats, suspects) {
  const dead = stack.processes().filter((p) => !p.alive);
  const how = dead.map((p) => `${p.label} exited ${JSON.stringify(p.exit)}; stderr: ${p.stderrTail.slice(-6).join(' | ')}`).join('; ');
  stats.crashes++;
  await stack.restart();
  let culprit = null;
  if (o.confirm) {
    const until = Date.now() + o.confirmSeconds * 1000; // bounded: a crash that needs company is reported as such
    for (const idx of suspects) {
      if (Date.now() > until) break;
      await runOne(stack, seed, idx, o, Math.min(until, Date.now() + 15000));
      await new Promise((r) => setTimeout(r, 200));
      if (stack.processes().some((p) => !p.alive)) {
        culprit = idx;
        await stack.restart();
        break;
      }
    }
  }
  findings.add({
    kind: 'crash',
    rule: `crash:${dead.map((p) => p.label).join('+')}`,
    index: culprit,
    detail: `${how}${culprit === null ? ` (suspects: ${suspects.join(',')}; none crashed the server again alone)` : ` (input ${culprit} crashes it again alone)`}`,
  });
}

async function fuzzStack(name, o, dir, budget) {
  const seed = o.seed;
  const stack = new Stack(name, dir, seed);
  const findings = new Findings();
  const stats = { stack: name, describe: STACKS[name].describe, inputs: 0, seconds: 0, crashes: 0, checks: 0, realClientChecks: 0, rss: {}, realClient: hasTool('nbdsh'), restarts: 0, connectStalls: 0 };
  const lag = monitorEventLoopDelay({ resolution: 20 });
  lag.enable();
  await stack.start();
  const inFlight = new Set();
  const recent = [];
  for (const p of stack.processes()) {
    p.onInternalError = (line) => findings.add({ kind: 'server-error', rule: `server-error:${line.replace(/\d+/g, '#').slice(0, 120)}`, index: [...inFlight][0] ?? null, detail: `${p.label}: ${line} (inputs in flight: ${[...inFlight].join(',')})` });
  }
  await health(stack, o, findings, stats, 'before fuzzing');
  // RSS between health checks too: a spike that a check would miss still counts, and the inputs
  // in flight at that moment are named.
  const sampler = setInterval(() => {
    for (const p of stack.processes()) {
      const rss = p.rssKiB();
      const r = stats.rss[p.label];
      if (rss === null || !r) continue;
      r.peak = Math.max(r.peak, rss);
      if (rss > o.rssLimit * 1024 && !r.reported) {
        r.reported = true;
        findings.add({ kind: 'rss', rule: `rss.over-limit:${p.label}`, index: [...inFlight][0] ?? null, detail: `${p.label} RSS ${(rss / 1024).toFixed(0)} MiB exceeds ${o.rssLimit} MiB (inputs in flight: ${[...inFlight].join(',')})` });
      }
    }
  }, 200);
  const t0 = Date.now();
  const deadline = budget.seconds !== null ? t0 + budget.seconds * 1000 : Infinity;
  let next = 0;
  const more = () => Date.now() < deadline && (budget.inputs === null || next < budget.inputs);
  const anyDead = () => stack.processes().some((p) => !p.alive);
  const onCrash = async () => {
    // everything that ran last is a suspect, newest first
    const suspects = [...new Set([...recent].reverse())].slice(0, 16);
    await crashed(stack, o, seed, findings, stats, suspects);
  };
  while (more()) {
    const roundEnd = next + o.checkEvery;
    const worker = async () => {
      while (!anyDead() && next < roundEnd && more()) {
        const idx = next++;
        inFlight.add(idx);
        // Sessions still running well past the budget are abandoned without a verdict.
        const res = await runOne(stack, seed, idx, o, deadline + 2 * o.timeout);
        inFlight.delete(idx);
        recent.push(idx);
        if (recent.length > 24) recent.shift();
        stats.inputs++;
        // Once a process is gone, what the sessions saw belongs to the crash, reported below.
        if (anyDead()) continue;
        let described = null; // described once per input, and only when something was found
        for (const f of res.findings) {
          // A failed connect counts only if a second, patient attempt fails too: a busy fuzzer
          // process (two CPUs, eight sessions, the server) can miss a 3 s connect deadline.
          if (f.kind === 'accept') {
            if (await stack.acceptsWithin(10000)) {
              stats.connectStalls++;
              continue;
            }
            await new Promise((r) => setTimeout(r, 500));
            if (anyDead()) continue; // refused because it was dying: the crash tells the story
          }
          described ??= describeInput(res.plan, res.input);
          findings.add({ ...f, index: idx, input: described });
        }
      }
    };
    await Promise.all(Array.from({ length: o.concurrency }, worker));
    await new Promise((r) => setTimeout(r, 50)); // let an exit that is under way be noticed
    if (anyDead()) {
      await onCrash();
      continue;
    }
    await health(stack, o, findings, stats, `after input ${next - 1}`);
  }
  await new Promise((r) => setTimeout(r, 200));
  if (anyDead()) await onCrash();
  stats.seconds = (Date.now() - t0) / 1000;
  clearInterval(sampler);
  lag.disable();
  stats.fuzzerMaxLagMs = Math.round(lag.max / 1e6);
  await health(stack, o, findings, stats, 'at the end');
  if (o.confirm) await confirm(stack, o, seed, findings);
  stats.restarts = stack.restarts;
  stats.counted = { ...stack.server.counted };
  await stack.stop();
  const fileRegion = stack.imageRegionAfterStop();
  if (fileRegion) findings.add({ kind: 'corruption', rule: 'health.image-region-after-stop', detail: fileRegion });
  stats.files = stack.fileSizes(); // after the stop: the final reports are written then
  for (const [f, size] of Object.entries(stats.files)) {
    if (size <= 0) findings.add({ kind: 'violation', rule: `files.not-written:${f}`, detail: `${f} is ${size < 0 ? 'missing' : 'empty'} after the server stopped (a filter of this stack writes it)` });
  }
  return { stats, findings };
}

/** Replay the first input of every finding alone: does the same rule show up again? */
async function confirm(stack, o, seed, findings) {
  const until = Date.now() + o.confirmSeconds * 1000;
  for (const g of findings.list().slice(0, 40)) {
    if (Date.now() > until) break;
    const idx = g.examples.find((e) => e.index !== null)?.index;
    if (idx === undefined || g.kind === 'crash' || g.kind === 'rss' || g.kind === 'corruption') continue;
    if (stack.processes().some((p) => !p.alive)) await stack.restart();
    let again = false;
    for (let attempt = 0; attempt < (g.kind === 'hang' ? 1 : 3) && !again; attempt++) {
      const before = stack.server.internalErrors.length;
      const res = await runOne(stack, seed, idx, o, Date.now() + 15000);
      again = g.kind === 'server-error' ? stack.server.internalErrors.length > before : res.findings.some((f) => f.kind === g.kind && f.rule === g.rule);
      if (stack.processes().some((p) => !p.alive)) await stack.restart();
    }
    g.reproduced = again;
  }
}

function report(results, o) {
  log('');
  log(`=== nbdx fuzz summary (seed ${o.seed}) ===`);
  log('stack        inputs  inputs/s  crashes  hangs  violations  health-checks  server RSS MiB (start/peak/end)');
  let total = 0;
  for (const { stats: s, findings: f } of results) {
    const rss = Object.entries(s.rss).map(([k, r]) => `${k.replace(/^nbdx /, '')}: ${(r.start / 1024).toFixed(0)}/${(r.peak / 1024).toFixed(0)}/${(r.last / 1024).toFixed(0)}`).join(', ');
    log(`${s.stack.padEnd(11)} ${String(s.inputs).padStart(7)} ${(s.inputs / Math.max(s.seconds, 0.001)).toFixed(0).padStart(9)} ${String(f.count(isCrash)).padStart(8)} ${String(f.count(isHang)).padStart(6)} ${String(f.count(isViolation)).padStart(11)} ${String(`${s.checks} (${s.realClientChecks} nbdsh)`).padStart(14)}  ${rss}`);
    total += f.size;
  }
  for (const { stats: s } of results) {
    for (const [k, r] of Object.entries(s.rss)) if (r.history?.length > 2) log(`  ${s.stack}: ${k} RSS MiB at each health check: ${r.history.join(' ')}`);
  }
  for (const { stats: s } of results) {
    if (s.files && Object.keys(s.files).length) log(`  ${s.stack}: files written: ${Object.entries(s.files).map(([k, n]) => `${k} ${n < 0 ? 'MISSING' : `${(n / 1024).toFixed(0)} KiB`}`).join(', ')}`);
    if (s.counted && Object.keys(s.counted).length) log(`  ${s.stack}: server stderr lines: ${Object.entries(s.counted).map(([k, n]) => `${k} ${n}`).join(', ')}`);
  }
  for (const { stats: s } of results) {
    if (s.connectStalls || s.fuzzerMaxLagMs > 1000) log(`  (${s.stack}: fuzzer event loop stalled up to ${s.fuzzerMaxLagMs} ms; ${s.connectStalls} slow connect(s) that a second attempt got through)`);
  }
  for (const { stats: s, findings: f } of results) {
    if (!f.size) continue;
    log('');
    log(`--- ${s.stack} (${s.describe}): ${f.size} distinct finding(s) ---`);
    for (const g of f.list()) {
      const first = g.examples[0];
      const rep = g.reproduced === null ? '' : g.reproduced ? ' [reproduced alone]' : ' [NOT reproduced alone]';
      log(`* ${g.kind}: ${g.rule} — ${g.count}x${rep}`);
      log(`    ${first.detail}`);
      const idx = g.examples.map((e) => e.index).filter((x) => x !== null);
      if (idx.length) {
        log(`    seed ${o.seed}, input(s) ${idx.join(', ')}${first.input ? `: ${first.input}` : ''}`);
        log(`    replay: node fuzz/run.mjs --stack ${s.stack} --seed ${o.seed} --replay ${idx[0]}`);
      }
    }
  }
  log('');
  log(total ? `FOUND ${total} distinct problem(s).` : 'No findings.');
  return total;
}

/** --replay: one input at a time, with the oracle's view of the conversation. */
async function replay(o, dir) {
  let found = 0;
  for (const name of o.stacks) {
    const stack = new Stack(name, dir, o.seed);
    await stack.start();
    for (const idx of o.replay) {
      const before = stack.server.internalErrors.length;
      const res = await runOne(stack, o.seed, idx, o);
      await new Promise((r) => setTimeout(r, 300));
      log(`--- ${name} seed ${o.seed} input ${idx}: ${describeInput(res.plan, res.input)}`);
      for (const l of res.oracle.log) log(`    oracle: ${l}`);
      if (res.input.patches.length) log(`    guard: ${res.input.patches.join('; ')}`);
      for (const f of res.findings) log(`  ${f.kind}: ${f.rule}\n      ${f.detail}`);
      for (const e of stack.server.internalErrors.slice(before)) log(`  server-error: ${e.line}`);
      found += res.findings.length + stack.server.internalErrors.length - before;
      for (const p of stack.processes()) {
        if (!p.alive) {
          log(`  crash: ${p.label} exited ${JSON.stringify(p.exit)}\n      ${p.stderrTail.slice(-10).join('\n      ')}`);
          found++;
          await stack.restart();
        }
      }
      if (!res.findings.length) log('  no findings');
    }
    log(`  server stderr (last lines): ${stack.server.stderrTail.slice(-5).join(' | ')}`);
    await stack.stop();
  }
  return found;
}

export async function main(argv) {
  let o;
  try {
    o = parseArgs(argv);
  } catch (err) {
    console.error(`fuzz: ${err.message}\n\n${HELP}`);
    return 2;
  }
  if (o.help) {
    console.log(HELP);
    return 0;
  }
  const strict = process.env.CI === 'true';
  const missing = new Set();
  for (const s of o.stacks) for (const t of missingTools(s)) missing.add(`${t} (stack ${s})`);
  if (!hasTool('nbdsh')) missing.add('nbdsh (real-client health checks)');
  if (missing.size) {
    if (strict) {
      console.error(`fuzz: required tools missing under CI=true: ${[...missing].join(', ')}`);
      return 2;
    }
    console.error(`fuzz: warning: missing ${[...missing].join(', ')}; skipping what needs them`);
    o.stacks = o.stacks.filter((s) => missingTools(s).length === 0);
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbdx-fuzz-'));
  const cleanup = () => fs.rmSync(dir, { recursive: true, force: true });
  process.on('exit', cleanup); // also when interrupted (stacks.mjs exits on SIGINT/SIGTERM)
  try {
    log(`nbdx fuzz: seed ${o.seed}, stacks ${o.stacks.join(', ')}, ${o.inputs !== null ? `${o.inputs} inputs per stack` : `${o.seconds} s in total`}, concurrency ${o.concurrency}`);
    if (o.replay) return (await replay(o, dir)) ? 1 : 0;
    const results = [];
    const perStack = o.seconds !== null ? o.seconds / o.stacks.length : null;
    for (const name of o.stacks) {
      const t = Date.now();
      const r = await fuzzStack(name, o, dir, { seconds: o.inputs !== null ? null : perStack, inputs: o.inputs });
      log(`  ${name}: ${r.stats.inputs} inputs in ${r.stats.seconds.toFixed(1)} s (${(r.stats.inputs / r.stats.seconds).toFixed(0)}/s), ${r.findings.size} distinct finding(s), ${((Date.now() - t) / 1000).toFixed(1)} s with start-up and checks`);
      results.push(r);
    }
    const total = report(results, o);
    if (o.json) {
      fs.writeFileSync(o.json, JSON.stringify({
        seed: o.seed,
        stacks: results.map(({ stats, findings }) => ({
          ...stats,
          rate: stats.inputs / stats.seconds,
          crashes: findings.count(isCrash),
          hangs: findings.count(isHang),
          violations: findings.count(isViolation),
          findings: findings.list(),
        })),
      }, null, 2));
    }
    return total ? 1 : 0;
  } catch (err) {
    console.error(`fuzz: ${err.stack}`);
    return 2;
  } finally {
    cleanup();
  }
}

if (import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).then((code) => process.exit(code));
}
