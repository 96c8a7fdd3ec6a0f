import type { ArtifactMeta, BatchRecord, ClaimedDelivery, RunSummary } from '../queue/driver.js';
import { eventId, iso, type JobState } from '../domain.js';
import { batchObject } from '../jobs/openai.js';

/** The event body (ADR-0005). `event_id` is `<job_id>:<state>`, stable across retries and restarts. */
export interface WebhookEvent {
  event_id: string;
  type: 'job.state_changed';
  job_id: string;
  state: JobState;
  sequence: number;
  occurred_at: string;
  metadata: Record<string, string>;
  error?: { code: string; message: string };
  artifacts?: EventArtifact[];
}

/** What a terminal event says about how the run went (ADR-0005, ADR-0016). */
export interface RunFields {
  started_at: string | null;
  finished_at: string | null;
  duration_ms: number | null;
  queue_ms: number | null;
  load_ms: number | null;
  attempt: number;
  model: string;
  usage: { prompt_tokens: number | null; completion_tokens: number | null };
  conversation_id: string;
}

export function runFields(r: RunSummary): RunFields {
  const waitedUntil = r.startedAt ?? r.finishedAt;
  return {
    started_at: iso(r.startedAt),
    finished_at: iso(r.finishedAt),
    duration_ms: r.startedAt !== null && r.finishedAt !== null ? r.finishedAt - r.startedAt : null,
    queue_ms: waitedUntil !== null ? waitedUntil - r.createdAt : null,
    load_ms: r.loadMs,
    attempt: r.attempt,
    model: r.model,
    usage: { prompt_tokens: r.promptTokens, completion_tokens: r.completionTokens },
    conversation_id: r.conversationId,
  };
}

export interface EventArtifact {
  name: string;
  content_type: string;
  size: number;
  sha256: string;
  url: string;
  /** true when the bytes travel in `content` (UTF-8 text) or `content_base64` (anything else). */
  inline: boolean;
  content?: string;
  content_base64?: string;
}


const TEXTUAL = /^(text\/|application\/(json|x-ndjson|xml)\b)/;

/** An artifact URL: plain, or signed with an expiry when authentication is on (ArtifactUrls). */
export type ArtifactUrlOf = (jobId: string, name: string, issuedAt?: number) => string;

export function eventArtifact(a: ArtifactMeta & { body?: Buffer | null }, urlOf: ArtifactUrlOf, jobId: string, inlineMax: number, issuedAt?: number): EventArtifact {
  const out: EventArtifact = {
    name: a.name,
    content_type: a.contentType,
    size: a.size,
    sha256: a.sha256,
    url: urlOf(jobId, a.name, issuedAt),
    inline: false,
  };
  if (a.body && a.size <= inlineMax) {
    out.inline = true;
    if (TEXTUAL.test(a.contentType)) out.content = a.body.toString('utf8');
    else out.content_base64 = a.body.toString('base64');
  }
  return out;
}

/**
 * A batch's terminal event (ADR-0015), in OpenAI's webhook event shape (`object: "event"`, `type`,
 * `created_at`, `data`), with the whole batch object as `data` and Foreman's stable `event_id`.
 */
export interface BatchWebhookEvent {
  event_id: string;
  object: 'event';
  id: string;
  type: string;
  created_at: number;
  occurred_at: string;
  data: ReturnType<typeof batchObject>;
}

export function buildBatchEvent(type: string, batch: BatchRecord, occurredAt: number): BatchWebhookEvent {
  const id = `${batch.id}:${type}`;
  return { event_id: id, object: 'event', id, type, created_at: Math.floor(occurredAt / 1000), occurred_at: iso(occurredAt) as string, data: batchObject(batch) };
}

/** The event body; artifact URLs are issued at the event's own time, so every retry sends the same body. */
export function buildEvent(d: ClaimedDelivery, urlOf: ArtifactUrlOf, inlineMax: number): (WebhookEvent & Partial<RunFields>) | BatchWebhookEvent {
  if (d.batch) return buildBatchEvent(d.state, d.batch, d.occurredAt);
  const state = d.state as JobState;
  const ev: WebhookEvent & Partial<RunFields> = {
    event_id: eventId(d.jobId, state),
    type: 'job.state_changed',
    job_id: d.jobId,
    state,
    sequence: d.sequence,
    occurred_at: iso(d.occurredAt) as string,
    metadata: d.metadata ?? {},
  };
  if (d.state === 'failed') ev.error = d.error ?? { code: 'unknown', message: '' };
  if (d.state === 'done') ev.artifacts = d.artifacts.map((a) => eventArtifact(a, urlOf, d.jobId, inlineMax, d.occurredAt));
  if (d.run) Object.assign(ev, runFields(d.run));
  return ev;
}
