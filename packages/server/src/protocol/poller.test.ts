import { describe, expect, it } from 'vitest';
import { POLL_EMPTY, POLL_STOP, Poller } from './poller.js';

const tick = () => new Promise((r) => setImmediate(r));
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('Poller', () => {
  it('does not poll until it has seen the client come back quickly', async () => {
    let calls = 0;
    const p = new Poller(50_000, () => (calls++, POLL_EMPTY));
    p.idle();
    await tick();
    expect(calls).toBe(0);
    expect(p.window).toBe(0);
  });

  it('learns a window from a short sleep, polls until data comes, then polls on', async () => {
    let calls = 0;
    let idleAfterData = 0;
    const p = new Poller(50_000_000, () => {
      calls++;
      if (calls < 3) return POLL_EMPTY;
      // Data: the handler answers it and calls idle() while the poll is still running.
      idleAfterData++;
      p.idle();
      return 100;
    });
    p.idle();
    await sleep(3);
    p.woke(); // back after a few ms (timers may fire early): poll that long next time
    expect(p.window).toBeGreaterThan(1_000_000);
    p.idle();
    await tick();
    expect(calls).toBe(3);
    expect(idleAfterData).toBe(1);
    // It scheduled the next poll by itself.
    await tick();
    expect(calls).toBeGreaterThan(3);
  });

  it('halves the window when a poll finds nothing, and stops for slow clients', async () => {
    let calls = 0;
    const p = new Poller(50_000_000, () => (calls++, POLL_EMPTY));
    p.idle();
    await sleep(3);
    p.woke(); // slept a few ms: well within the limit, so the window is that long
    const learnt = p.window;
    expect(learnt).toBeGreaterThan(1_000_000);
    p.idle();
    await tick();
    expect(calls).toBeGreaterThan(0);
    expect(p.window).toBe(learnt / 2);
    const slow = new Poller(50_000, () => POLL_EMPTY);
    slow.idle();
    await sleep(5);
    slow.woke(); // 5 ms is far beyond twice 50 us: no polling for this client
    expect(slow.window).toBe(0);
  });

  it('ends a poll at once, window kept, when the read says stop (connection paused or ending)', async () => {
    let calls = 0;
    const p = new Poller(50_000_000, () => (calls++, POLL_STOP));
    p.idle();
    await sleep(3);
    p.woke();
    const learnt = p.window;
    p.idle();
    await tick();
    expect(calls).toBe(1);
    expect(p.window).toBe(learnt);
  });
});
