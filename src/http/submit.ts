import { createHash } from 'node:crypto';
import { parseDuration } from '../config.js';
import type { JobState } from '../domain.js';
import { uuidv7 } from '../ids.js';
import type { SubmitOutcome } from '../store/store.js';
import { ApiError } from './errors.js';
import type { AppDeps } from './app.js';

/** Fields passed through to the engine unchanged. `stream` is accepted but a job always streams. */
export const ENGINE_FIELDS = ['model', 'messages', 'format', 'options', 'tools', 'keep_alive', 'think'] as const;

/** How deeply a request's JSON may nest (Ollama's own payloads need a handful of levels). */
export const MAX_JSON_DEPTH = 64;

export interface SubmitInput {
  body: Record<string, unknown> & { model: string };
  webhookUrl: string | null;
  webhookEvents: JobState[] | null;
  metadata: Record<string, string> | null;
  priority: number;
  deadline: string | undefined;
  idempotencyKey: string | undefined;
  /** Pre-chosen id, so a caller can subscribe to the job's events before it exists. */
  id?: string;
}

/** Checks a webhook URL: absolute http(s), no credentials. Returns the normalised URL. */
export function checkWebhookUrl(raw: string): string {
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw new ApiError(400, 'validation_failed', 'state_webhook_url is not an absolute URL', 'state_webhook_url');
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new ApiError(400, 'validation_failed', 'state_webhook_url must be an http or https URL', 'state_webhook_url');
  }
  if (u.username !== '' || u.password !== '') {
    throw new ApiError(400, 'validation_failed', 'state_webhook_url must not carry credentials', 'state_webhook_url');
  }
  if (u.hostname === '') {
    throw new ApiError(400, 'validation_failed', 'state_webhook_url has no host', 'state_webhook_url');
  }
  return u.href;
}

/** Returns the top-level field holding JSON nested deeper than `limit`, or null. Iterative: no recursion. */
export function tooDeep(value: Record<string, unknown>, limit: number): string | null {
  for (const [field, v] of Object.entries(value)) {
    const stack: [unknown, number][] = [[v, 1]];
    while (stack.length > 0) {
      const [x, d] = stack.pop()!;
      if (x === null || typeof x !== 'object') continue;
      if (d > limit) return field;
      for (const child of Object.values(x)) if (child !== null && typeof child === 'object') stack.push([child, d + 1]);
    }
  }
  return null;
}

/** `deadline`: an ISO-8601 time, or a duration from now. */
export function parseDeadline(raw: string, now: number): number {
  const d = parseDuration(raw);
  if (d !== undefined) return now + d;
  if (/^\d{4}-\d{2}-\d{2}T/.test(raw)) {
    const t = Date.parse(raw);
    if (!Number.isNaN(t)) return t;
  }
  throw new ApiError(400, 'validation_failed', 'deadline must be an ISO-8601 time or a duration such as 10m', 'deadline');
}

/** JSON with object keys sorted, so equal bodies hash equally whatever their key order. */
function canonical(v: unknown): string {
  if (v === null || typeof v !== 'object') return JSON.stringify(v);
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  const o = v as Record<string, unknown>;
  return `{${Object.keys(o)
    .sort()
    .filter((k) => o[k] !== undefined)
    .map((k) => `${JSON.stringify(k)}:${canonical(o[k])}`)
    .join(',')}}`;
}

export function bodyHash(body: unknown): string {
  return createHash('sha256').update(canonical(body)).digest('hex');
}

/** Validates what the schema cannot, then commits the job (group commit). */
export async function submitJob(deps: AppDeps, input: SubmitInput): Promise<SubmitOutcome & { ok: true }> {
  const { config, clock } = deps;
  const request: Record<string, unknown> = {};
  for (const k of ENGINE_FIELDS) if (input.body[k] !== undefined) request[k] = input.body[k];
  const deep = tooDeep(request, MAX_JSON_DEPTH);
  if (deep !== null) throw new ApiError(400, 'validation_failed', `${deep} is nested deeper than ${MAX_JSON_DEPTH} levels`, deep);
  const now = clock.now();
  const deadlineAt = input.deadline === undefined ? null : parseDeadline(input.deadline, now);
  if (deadlineAt !== null && deadlineAt <= now) {
    throw new ApiError(400, 'validation_failed', 'deadline is in the past', 'deadline');
  }
  const outcome = await deps.submitter.submit({
    id: input.id ?? uuidv7(),
    model: input.body.model,
    request,
    metadata: input.metadata,
    webhookUrl: input.webhookUrl,
    webhookEvents: input.webhookEvents,
    maxAttempts: config.jobMaxAttempts,
    priority: input.priority,
    deadlineAt,
    idempotency:
      input.idempotencyKey === undefined
        ? null
        : { key: input.idempotencyKey, bodyHash: bodyHash(input.body), expiresAt: now + config.idempotencyTtlMs },
  });
  if (outcome.ok) return outcome;
  if (outcome.code === 'idempotency_key_reused') {
    throw new ApiError(409, 'idempotency_key_reused', `this Idempotency-Key was used for job ${outcome.jobId} with a different body`, 'Idempotency-Key');
  }
  throw new ApiError(503, 'queue_full', `the queue holds FOREMAN_MAX_QUEUED (${config.maxQueued}) jobs; try again later`, undefined, {
    'retry-after': '5',
  });
}

/**
 * Cancels a job: the store transition commits first, then a running job's engine request is
 * closed (which stops Ollama). Returns null for an unknown job.
 */
export function cancelJob(deps: AppDeps, jobId: string): ReturnType<AppDeps['store']['cancelJob']> | null {
  const seq = deps.store.seqOf(jobId);
  if (seq === null) return null;
  const r = deps.store.cancelJob(seq, deps.clock.now());
  if (r.wasRunning) deps.worker.abortJob(jobId);
  return r;
}
