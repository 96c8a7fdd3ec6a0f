import { loadKey } from '../domain.js';
import type { ApiKeyLimits, ClaimHost, RunSummary } from './driver.js';

/**
 * What both drivers share that is not SQL: stored markers, row mappings, and the model-aware
 * scheduling policy of ADR-0012 (each driver fetches the candidates and answers the policy's
 * lookups with its own queries; the decisions are made here, once).
 */

/** run_at of a turn waiting for its predecessor: never claimable until released. */
export const NEVER = 253402300799000; // 9999-12-31
/** How long the ids of expired jobs are remembered (a continuation of one answers 410). */
export const EXPIRED_IDS_KEPT_MS = 30 * 86_400_000;
/** `jobs.result` when the result is the job's `completion` artifact, stored once there. */
export const RESULT_IN_ARTIFACT = '{"$foreman":"completion-artifact"}';

/**
 * What `jobs.result` stores for a completion: the result's JSON, or RESULT_IN_ARTIFACT when the
 * `completion` artifact is that very text (the completion is stored once, hardening finding 12).
 */
export function storedResult(result: unknown, artifacts: { name: string; body: Buffer }[]): string {
  const text = JSON.stringify(result);
  const same = artifacts.some((a) => a.name === 'completion' && a.body.length === Buffer.byteLength(text) && a.body.equals(Buffer.from(text)));
  return same ? RESULT_IN_ARTIFACT : text;
}
/** At most this many index entries are read to answer one listing (hardening finding 10). */
export const LIST_SCAN_BUDGET = 20_000;

/** The origin (scheme://host[:port]) of a normalised webhook URL: the per-receiver cap's key. */
export const originOf = (url: string): string => new URL(url).origin;

/** The job columns a run summary is made of. */
export interface RunRow {
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  attempt: number;
  model: string;
  conversation_id: string;
  load_ms: number | null;
  prompt_tokens: number | null;
  completion_tokens: number | null;
}

export const runOf = (r: RunRow): RunSummary => ({
  createdAt: r.created_at,
  startedAt: r.started_at,
  finishedAt: r.finished_at,
  attempt: r.attempt,
  model: r.model,
  loadMs: r.load_ms,
  promptTokens: r.prompt_tokens,
  completionTokens: r.completion_tokens,
  conversationId: r.conversation_id,
});

export const limitsOf = (k: ApiKeyLimits): ApiKeyLimits => ({
  concurrency: k.concurrency,
  maxQueued: k.maxQueued,
  dailyLimit: k.dailyLimit,
  priorityMax: k.priorityMax,
});

// --- the model-aware pick (ADR-0012) ---

/** Each key's next job of each model the host may run: what a claim for one host chooses from. */
export interface Candidate {
  seq: number;
  keyId: string;
  model: string;
  /** Effective priority. */
  eff: number;
  /** The key's fair-share mark (lower: served less recently). */
  served: number;
  /** Queued since (created, or scheduled for). */
  since: number;
  /** The job's `options.num_ctx`, if any. */
  numCtx: unknown;
}

/** The fair share among equals: the key served least recently, then FIFO. */
export const fairest = <C extends Candidate>(cs: C[]): C =>
  cs.reduce((a, b) => (b.served < a.served || (b.served === a.served && b.seq < a.seq) ? b : a));

/**
 * The policy's first steps: only the best effective priority; among those, a job queued longer
 * than the max wait (no starvation), else one whose load is resident (no swap). Without such a
 * pick, `atTop` is what the later steps choose from.
 */
export function pickWithoutLookups<C extends Candidate>(all: C[], host: ClaimHost, resident: Set<string>, now: number): { pick: C } | { atTop: C[] } {
  const top = Math.max(...all.map((c) => c.eff));
  const atTop = all.filter((c) => c.eff === top);
  const overdue = atTop.filter((c) => now - c.since >= host.affinityMaxWaitMs);
  if (overdue.length > 0) return { pick: fairest(overdue) };
  const warm = atTop.filter((c) => resident.has(loadKey(c.model, c.numCtx)));
  if (warm.length > 0) return { pick: fairest(warm) };
  return { atTop };
}

/**
 * A key's next job of a resident model may ask for another context size than the one loaded: the
 * (candidate, model, num_ctx) pairs for which a later job of the same key and model that matches
 * what is loaded would be warm. The driver looks each up.
 */
export function sameLoadProbes<C extends Candidate>(atTop: C[], resident: Set<string>): { cand: C; model: string; ctx: number | null }[] {
  const out: { cand: C; model: string; ctx: number | null }[] = [];
  for (const cand of atTop) {
    for (const k of resident) {
      const m = /^(.*)#num_ctx=(\d+)$/.exec(k);
      const [model, ctx] = m ? [m[1]!, Number(m[2])] : [k, null];
      if (model !== cand.model || ctx === (typeof cand.numCtx === 'number' ? cand.numCtx : null)) continue;
      out.push({ cand, model, ctx });
    }
  }
  return out;
}

/**
 * The last step, when the host must load: the model with the most queued work per second of its
 * load time on the host (`work(model)` = queued jobs × average run time), then the fair share.
 */
export function pickByLoadCost<C extends Candidate>(atTop: C[], host: ClaimHost, work: Map<string, number>): C {
  const known = Object.values(host.loadMs);
  const defaultLoad = known.length ? known.reduce((a, b) => a + b, 0) / known.length : 1000;
  const score = new Map<string, number>();
  for (const c of atTop) score.set(c.model, (work.get(c.model) ?? 1000) / Math.max(1, host.loadMs[c.model] ?? defaultLoad));
  const best = Math.max(...score.values());
  return fairest(atTop.filter((c) => score.get(c.model) === best));
}

/** The work a model's queue holds, as the load-cost step weighs it (unknown counts as one job of 1 s). */
export const queuedWork = (queued: number | undefined, avgRunMs: number | undefined): number => (queued ?? 1) * (avgRunMs ?? 1000);
