/**
 * Input number `index` of seed `seed`: generate, mutate, serialize, all from one generator
 * derived from (seed, index). Nothing else feeds in except the stack's profile, whose size,
 * region and TLS mode are fixed, so a replay sends exactly the bytes the original run sent.
 */
import { generate } from './generate.mjs';
import { mutate } from './mutate.mjs';
import { Rng } from './rng.mjs';
import { serialize } from './serialize.mjs';

export function buildInput(seed, index, profile) {
  const rng = new Rng(`${seed}/${index}`);
  const plan = generate(rng, profile);
  mutate(rng, plan, profile);
  const input = serialize(plan, profile, rng);
  return { plan, input };
}

/** A one-line description of an input for reports. */
export function describeInput(plan, input) {
  const opts = plan.msgs.filter((m) => m.t === 'opt').length;
  const reqs = plan.msgs.filter((m) => m.t === 'req').length;
  return `${plan.notes.join('+')}; ${opts} options, ${reqs} requests, ${input.bytes} bytes in ${input.steps.filter((s) => s.send).length} writes (${plan.split}), end ${plan.end}${plan.cut ? `, cut ${plan.cut}` : ''}`;
}
