import { isTerminal, loadKey, type JobState } from '../domain.js';
import type { ApiKeyLimits, ArtifactMeta, BatchEventType, BatchRecord, BatchResultRow, ClaimedDelivery, ClaimedJob, ClaimHost, JobKind, RunSummary } from './driver.js';

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

/** A claimed job's row, as both drivers' claims return it. */
export interface ClaimedJobRow {
  seq: number;
  id: string;
  kind: JobKind;
  model: string;
  request: string;
  attempt: number;
  max_attempts: number;
  lease_owner: string;
  prev_seq: number | null;
}

export const claimedJobOf = (r: ClaimedJobRow, history: Record<string, unknown>[]): ClaimedJob => ({
  seq: r.seq,
  id: r.id,
  kind: r.kind,
  model: r.model,
  request: JSON.parse(r.request) as Record<string, unknown>,
  attempt: r.attempt,
  maxAttempts: r.max_attempts,
  lease: r.lease_owner,
  history,
});

/** A job event's outbox row joined to its job: what its send needs. */
export interface JobEventRow extends RunRow {
  id: number;
  jobId: string;
  state: JobState;
  sequence: number;
  url: string;
  origin: string;
  occurredAt: number;
  attempts: number;
  metadata: string | null;
  errorCode: string | null;
  errorMessage: string | null;
}

/** A job event's send; `artifacts`: a `done` event's (ignored for any other state). */
export const jobEventOf = (r: JobEventRow, artifacts: (ArtifactMeta & { body: Buffer | null })[]): ClaimedDelivery => ({
  id: r.id,
  jobId: r.jobId,
  state: r.state,
  sequence: r.sequence,
  url: r.url,
  origin: r.origin,
  occurredAt: r.occurredAt,
  attempts: r.attempts,
  metadata: r.metadata === null ? null : (JSON.parse(r.metadata) as Record<string, string>),
  error: r.state === 'failed' ? { code: r.errorCode ?? 'unknown', message: r.errorMessage ?? '' } : null,
  artifacts: r.state === 'done' ? artifacts : [],
  run: isTerminal(r.state) ? runOf(r) : null,
});

/** A batch's row as both stores keep it: metadata and errors as JSON text. */
export type BatchRow = Omit<BatchRecord, 'metadata' | 'errors'> & { metadata: string | null; errors: string | null };

export const batchOf = (row: BatchRow | null | undefined): BatchRecord | null =>
  row == null
    ? null
    : {
        ...row,
        metadata: row.metadata === null ? null : (JSON.parse(row.metadata) as Record<string, string>),
        errors: row.errors === null ? null : (JSON.parse(row.errors) as BatchRecord['errors']),
      };

/** A batch's terminal event's send (ADR-0015): its row has no job; the batch, as it ended, is its body. */
export const batchEventOf = (
  r: { id: number; jobId: string; state: string; sequence: number; url: string; origin: string; occurredAt: number; attempts: number },
  batch: BatchRecord | null,
): ClaimedDelivery => ({
  id: r.id,
  jobId: r.jobId,
  state: r.state as BatchEventType,
  sequence: r.sequence,
  url: r.url,
  origin: r.origin,
  occurredAt: r.occurredAt,
  attempts: r.attempts,
  metadata: null,
  error: null,
  artifacts: [],
  run: null,
  batch,
});

/** A batch job's row, as both drivers read a page of a batch's results. */
export type BatchResultDbRow = Omit<BatchResultRow, 'metadata' | 'error' | 'result'> & {
  metadata: string | null;
  errorCode: string | null;
  errorMessage: string | null;
};

/** One result line; `result`: the job's stored result, read by the driver (it may be an artifact). */
export const batchResultOf = (r: BatchResultDbRow, result: unknown): BatchResultRow => ({
  seq: r.seq,
  jobId: r.jobId,
  metadata: r.metadata === null ? null : (JSON.parse(r.metadata) as Record<string, string>),
  state: r.state,
  model: r.model,
  result,
  error: r.errorCode === null ? null : { code: r.errorCode, message: r.errorMessage ?? '' },
  createdAt: r.createdAt,
  finishedAt: r.finishedAt,
  promptTokens: r.promptTokens,
  completionTokens: r.completionTokens,
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
 * pick, `atTop` is what the later steps choose from. When every job at the top asks for one
 * model and none could share a resident load, the later steps have nothing to weigh (one model,
 * one load cost): the fair share picks here, without their lookups.
 */
export function pickWithoutLookups<C extends Candidate>(all: C[], host: ClaimHost, resident: Set<string>, now: number): { pick: C } | { atTop: C[] } {
  const top = Math.max(...all.map((c) => c.eff));
  const atTop = all.filter((c) => c.eff === top);
  const overdue = atTop.filter((c) => now - c.since >= host.affinityMaxWaitMs);
  if (overdue.length > 0) return { pick: fairest(overdue) };
  const warm = atTop.filter((c) => resident.has(loadKey(c.model, c.numCtx)));
  if (warm.length > 0) return { pick: fairest(warm) };
  if (atTop.every((c) => c.model === atTop[0]!.model) && sameLoadProbes(atTop, resident).length === 0) return { pick: fairest(atTop) };
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
