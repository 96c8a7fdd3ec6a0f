/**
 * The model-aware pick's first steps (ADR-0012), as both drivers run them before any lookup:
 * which picks need no further statement, and which leave the later steps (same-load probes, the
 * load cost) something to weigh.
 */
import { describe, expect, it } from 'vitest';
import { loadKey } from '../src/domain.js';
import type { ClaimHost } from '../src/queue/driver.js';
import { pickWithoutLookups, type Candidate } from '../src/queue/shared.js';

const host: ClaimHost = { name: 'gpu1', models: [], anyModel: true, resident: [], loadMs: {}, affinityMaxWaitMs: 30_000 };
const NOW = 1_000_000;
const cand = (seq: number, model: string, over: Partial<Candidate> = {}): Candidate => ({
  seq,
  keyId: `k${seq}`,
  model,
  eff: 0,
  served: 0,
  since: NOW - 1_000,
  numCtx: null,
  ...over,
});

describe('pickWithoutLookups', () => {
  it('picks by the fair share when every job at the top asks for one model that is not resident', () => {
    const all = [cand(3, 'llama3.2', { served: 5 }), cand(4, 'llama3.2', { served: 2 }), cand(5, 'mistral', { eff: -1 })];
    expect(pickWithoutLookups(all, host, new Set(), NOW)).toEqual({ pick: all[1] });
  });

  it('leaves two models at the top to the load-cost step', () => {
    const all = [cand(3, 'llama3.2'), cand(4, 'mistral')];
    expect(pickWithoutLookups(all, host, new Set(), NOW)).toEqual({ atTop: all });
  });

  it('leaves one model to the same-load probe when it is resident with another context size', () => {
    const all = [cand(3, 'llama3.2', { numCtx: 8192 })];
    expect(pickWithoutLookups(all, host, new Set([loadKey('llama3.2', 4096)]), NOW)).toEqual({ atTop: all });
  });

  it('still prefers a resident load, and before it a job waiting past the bound', () => {
    const warm = cand(4, 'mistral', { served: 9 });
    const cold = cand(3, 'llama3.2');
    expect(pickWithoutLookups([cold, warm], host, new Set([loadKey('mistral', null)]), NOW)).toEqual({ pick: warm });
    const overdue = cand(2, 'llama3.2', { since: NOW - 31_000 });
    expect(pickWithoutLookups([cold, warm, overdue], host, new Set([loadKey('mistral', null)]), NOW)).toEqual({ pick: overdue });
  });
});
