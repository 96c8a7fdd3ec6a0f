/**
 * The job lifecycle: a closed union. `done`, `failed` and `canceled` are terminal. `scheduled`
 * comes first only for a job over its API key's daily limit (ADR-0013).
 */
export const JOB_STATES = ['scheduled', 'queued', 'loading', 'working', 'done', 'failed', 'canceled'] as const;
export type JobState = (typeof JOB_STATES)[number];
export type TerminalState = 'done' | 'failed' | 'canceled';

export function isTerminal(s: JobState): s is TerminalState {
  return s === 'done' || s === 'failed' || s === 'canceled';
}

/** A state's place in the lifecycle order; the webhook event's `sequence`. */
export const STATE_SEQUENCE: Record<JobState, number> = {
  scheduled: 0,
  queued: 1,
  loading: 2,
  working: 3,
  done: 4,
  failed: 4,
  canceled: 4,
};

export interface ErrorInfo {
  code: string;
  message: string;
}

export interface Clock {
  now(): number;
}

export const systemClock: Clock = { now: () => Date.now() };

/** Artifact names: lowercase, no path separators, no leading dot. Checked again by a CHECK in the schema. */
export const ARTIFACT_NAME_RE = /^[a-z0-9][a-z0-9._-]{0,63}$/;

export function iso(ms: number | null | undefined): string | null {
  return ms === null || ms === undefined ? null : new Date(ms).toISOString();
}

/** A webhook event's id: stable across retries, restarts and redeliveries (ADR-0005). */
export function eventId(jobId: string, state: JobState): string {
  return `${jobId}:${state}`;
}

/**
 * What Ollama loads a model as (ADR-0012): the model, and the context size when the job asks for
 * one (`options.num_ctx`; Ollama reloads the model for another). Affinity compares load keys.
 */
export function loadKey(model: string, numCtx: unknown): string {
  return typeof numCtx === 'number' ? `${model}#num_ctx=${numCtx}` : model;
}
