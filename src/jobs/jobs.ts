import { iso, type Clock, type JobState } from '../domain.js';
import { Conflict, Forbidden, Gone, NotFound, QuotaExceeded, Unavailable, Validation } from '../errors.js';
import { uuidv7 } from '../ids.js';
import type { Artifact, CancelOutcome, JobKind, JobView, ListedJob, QueueDriver, TransitionEvent } from '../queue/driver.js';
import { ARTIFACT_NAME_RE } from '../domain.js';
import { actorOf, keyIdOf, scopeOf, type Principal } from './principal.js';
import { DAY_MS } from './keys.js';
import { bodyHash, decodeCursor, EMBED_FIELDS, encodeCursor, ENGINE_FIELDS, MAX_JSON_DEPTH, parseDeadline, tooDeep } from './rules.js';

export interface JobsSettings {
  maxQueued: number;
  maxQueuedBytes: number;
  /** Redeliveries of one job per minute (hardening finding 11). */
  redeliverPerMinute: number;
  jobMaxAttempts: number;
  idempotencyTtlMs: number;
  /** Jobs run at once (for the ETA): every host's slots, across the instances (ADR-0011). */
  concurrency: () => number;
}

export interface SubmitInput {
  body: Record<string, unknown> & { model?: string };
  /** What the job runs (ADR-0015); default chat. */
  kind?: JobKind;
  /** Continue the conversation of this job (ADR-0016). */
  continueFrom?: string;
  /** With `continueFrom`: queue now and wait for the earlier job to be done. */
  waitForPrevious?: boolean;
  webhookUrl: string | null;
  webhookEvents: JobState[] | null;
  metadata: Record<string, string> | null;
  priority: number;
  deadline: string | undefined;
  idempotencyKey: string | undefined;
  /** Pre-chosen id, so a caller can subscribe to the job's events before it exists. */
  id?: string;
  /** Past the key's daily_limit, refuse (429) instead of scheduling: the caller waits for the answer (/api/chat). */
  refuseOverDaily?: boolean;
}

export interface ListQuery {
  limit: number;
  /** Admin only: one key's jobs. */
  keyId?: string;
  engine?: string;
  conversationId?: string;
  state?: JobState;
  model?: string;
  createdAfter?: number;
  createdBefore?: number;
  metadata: [string, string][];
  cursor?: string;
}

/** At most this many `metadata.*` filters in one listing. */
export const MAX_METADATA_FILTERS = 8;

export interface QueueEstimate {
  position: number;
  estimatedStartAt: string | null;
}

const notFound = (id: string) => new NotFound('job_not_found', `no job with id ${JSON.stringify(id.slice(0, 80))}`);

/**
 * The application layer: what the HTTP routes (and tools) may do with jobs. It is the only caller
 * of the queue driver from HTTP, applies the rules the schemas cannot express, and throws domain
 * errors that `http/errors.ts` maps to status codes.
 */
export class Jobs {
  /** When each job's recent redeliveries were asked for (the last minute's). */
  private readonly redeliveries = new Map<string, number[]>();

  constructor(
    private readonly driver: QueueDriver,
    private readonly clock: Clock,
    private readonly settings: JobsSettings,
  ) {}

  /**
   * Validates, then commits the job; resolves once it is durable. Under an API key: the key's
   * `priority_max` clamps the priority, `max_queued` refuses with 429, and past `daily_limit` the
   * job is accepted `scheduled` for the next UTC midnight (ADR-0013).
   */
  async submit(
    input: SubmitInput,
    who: Principal,
  ): Promise<{ jobId: string; replayed: boolean; state: JobState; scheduledFor: number | null; priority: number; clampedFrom: number | null }> {
    const { settings, clock } = this;
    // A continuation: the earlier job must exist (410 once the TTL removed it); the model
    // defaults to its model. Whether it is done is decided again in the insert's transaction.
    let previous: { seq: number; wait: boolean } | null = null;
    let conversationId: string | undefined;
    let model = input.body.model;
    if (input.waitForPrevious !== undefined && input.continueFrom === undefined) {
      throw new Validation('wait_for_previous needs continue_from', 'wait_for_previous');
    }
    if (input.continueFrom !== undefined) {
      const prev = this.visible(await this.driver.jobGet({ id: input.continueFrom }), who);
      if (!prev) {
        if (await this.driver.jobExpired({ id: input.continueFrom })) {
          throw new Gone('conversation_expired', `job ${input.continueFrom} has been removed by FOREMAN_JOB_TTL: its conversation can no longer be continued`, 'continue_from');
        }
        throw new NotFound('job_not_found', `no job with id ${JSON.stringify(input.continueFrom.slice(0, 80))}`, 'continue_from');
      }
      previous = { seq: prev.seq, wait: input.waitForPrevious === true };
      conversationId = prev.conversationId;
      model ??= prev.model;
    }
    if (model === undefined) throw new Validation('model is required (it may be left out only with continue_from)', 'model');
    const kind = input.kind ?? 'chat';
    const request: Record<string, unknown> = {};
    if (kind === 'embed') {
      // An embedding job (ADR-0015): Ollama's /api/embed request; chat fields have no meaning here.
      for (const k of ['messages', 'tools', 'format', 'think', 'continue_from', 'wait_for_previous'] as const) {
        if (input.body[k] !== undefined) throw new Validation(`${k} is not a field of an embed job`, k);
      }
      if (input.body.input === undefined) throw new Validation('input is required for an embed job (a string or an array of strings)', 'input');
      for (const k of EMBED_FIELDS) if (input.body[k] !== undefined) request[k] = input.body[k];
    } else {
      if (input.body.messages === undefined) throw new Validation('messages is required', 'messages');
      for (const k of ['input', 'truncate', 'dimensions'] as const) {
        if (input.body[k] !== undefined) throw new Validation(`${k} is a field of an embed job: send "kind": "embed"`, k);
      }
      for (const k of ENGINE_FIELDS) if (input.body[k] !== undefined) request[k] = input.body[k];
    }
    request.model = model;
    const deep = tooDeep(request, MAX_JSON_DEPTH);
    if (deep !== null) throw new Validation(`${deep} is nested deeper than ${MAX_JSON_DEPTH} levels`, deep);
    if (input.webhookEvents !== null && input.webhookUrl === null) {
      throw new Validation('webhook_events needs state_webhook_url', 'webhook_events');
    }
    const now = clock.now();
    const deadlineAt = input.deadline === undefined ? null : parseDeadline(input.deadline, now);
    const key = who.kind === 'key' ? who.key : null;
    let priority = input.priority;
    let clampedFrom: number | null = null;
    if (key?.priorityMax != null && priority > key.priorityMax) {
      clampedFrom = priority;
      priority = key.priorityMax;
    }
    const day = Math.floor(now / DAY_MS);
    const [outcome] = await this.driver.jobsInsert({
      now,
      maxQueued: settings.maxQueued,
      maxQueuedBytes: settings.maxQueuedBytes,
      jobs: [
        {
          id: input.id ?? uuidv7(),
          model,
          kind,
          request,
          previous,
          ...(conversationId !== undefined ? { conversationId } : {}),
          metadata: input.metadata,
          webhookUrl: input.webhookUrl,
          webhookEvents: input.webhookEvents,
          maxAttempts: settings.jobMaxAttempts,
          priority,
          deadlineAt,
          // Idempotency keys are scoped per API key: two tenants' equal keys are two jobs.
          idempotency:
            input.idempotencyKey === undefined
              ? null
              : { key: key ? `${key.id}\n${input.idempotencyKey}` : input.idempotencyKey, bodyHash: bodyHash(input.body), expiresAt: now + settings.idempotencyTtlMs },
          keyId: keyIdOf(who),
          ...(key
            ? { quota: { maxQueued: key.maxQueued, dailyLimit: key.dailyLimit, day, nextDayAt: (day + 1) * DAY_MS, refuseOverDaily: input.refuseOverDaily === true } }
            : {}),
          ...(clampedFrom !== null ? { clampedFrom: { priority: clampedFrom, actor: actorOf(who) } } : {}),
        },
      ],
    });
    if (outcome!.ok) return { ...outcome!, priority, clampedFrom: outcome!.replayed ? null : clampedFrom };
    if (outcome!.code === 'key_daily_limit') {
      const wait = Math.max(1, Math.ceil((outcome!.nextDayAt - now) / 1000));
      throw new QuotaExceeded('quota_exceeded', `this API key reached its daily_limit (${key?.dailyLimit}); a waiting call can't be scheduled for the next UTC day (POST /jobs schedules it)`, undefined, wait);
    }
    if (outcome!.code === 'key_queue_full') {
      throw new QuotaExceeded('quota_exceeded', `this API key has max_queued (${key?.maxQueued}) jobs queued or scheduled; try again once some have started`, undefined, 5);
    }
    if (outcome!.code === 'idempotency_key_reused') {
      throw new Conflict('idempotency_key_reused', 'this Idempotency-Key was already used with a different body', 'Idempotency-Key');
    }
    if (outcome!.code === 'previous_not_ready') {
      throw new Conflict(
        'conversation_not_ready',
        `the job this continues (${input.continueFrom}) is ${outcome!.state}: it must be done${outcome!.state === 'queued' || outcome!.state === 'loading' || outcome!.state === 'working' ? ', or send wait_for_previous: true' : ''}`,
        'continue_from',
      );
    }
    if (outcome!.code === 'queue_bytes_full') {
      throw new Unavailable('queue_full', `the queued jobs hold FOREMAN_MAX_QUEUED_BYTES (${settings.maxQueuedBytes}) bytes of requests; try again later`, undefined, 5);
    }
    throw new Unavailable('queue_full', `the queue holds FOREMAN_MAX_QUEUED (${settings.maxQueued}) jobs; try again later`, undefined, 5);
  }

  /**
   * Cancels a queued or running job. The transition commits first; the driver then announces a
   * running job's cancel, and whoever runs it closes the engine request (which stops Ollama).
   */
  async cancel(id: string, who: Principal): Promise<CancelOutcome> {
    const scope = scopeOf(who);
    const r = await this.driver.jobCancel({ id, now: this.clock.now(), actor: actorOf(who), ...(scope !== undefined ? { keyId: scope } : {}) });
    if (r === null) throw notFound(id);
    if (!r.canceled) throw new Conflict('job_finished', `the job is already ${r.state}`);
    return r;
  }

  /** Cancels if possible; never throws for a job that is gone or finished (clients that went away). */
  async cancelQuietly(id: string): Promise<boolean> {
    const r = await this.driver.jobCancel({ id, now: this.clock.now() });
    return r?.canceled ?? false;
  }

  async get(id: string, who: Principal): Promise<JobView & { queue: QueueEstimate | null }> {
    const j = this.visible(await this.driver.jobGet({ id }), who);
    if (!j) throw notFound(id);
    return { ...j, queue: j.state === 'queued' ? await this.estimate(j) : null };
  }

  /** Null when the job does not exist, or is another key's (no estimate needed: SSE, /api/chat). */
  async find(id: string, who: Principal): Promise<JobView | null> {
    return this.visible(await this.driver.jobGet({ id }), who);
  }

  /** A key sees only its own jobs; another key's job is, to it, a job that does not exist (404, never 403). */
  private visible<T extends { keyId: string | null }>(j: T | null, who: Principal): T | null {
    if (j === null) return null;
    const scope = scopeOf(who);
    return scope === undefined || (j.keyId ?? '') === scope ? j : null;
  }

  async list(q: ListQuery, who: Principal): Promise<{ jobs: ListedJob[]; nextCursor: string | null }> {
    if (!(q.limit >= 1 && q.limit <= 100)) throw new Validation('limit must be 1 to 100', 'limit');
    if (q.keyId !== undefined && who.kind === 'key') throw new Forbidden('forbidden', 'key_id filters need the admin token', 'key_id');
    const keyId = scopeOf(who) ?? q.keyId;
    if (q.metadata.length > MAX_METADATA_FILTERS) {
      throw new Validation(`at most ${MAX_METADATA_FILTERS} metadata.* filters may be combined`, `metadata.${q.metadata[MAX_METADATA_FILTERS]![0]}`);
    }
    const beforeSeq = q.cursor === undefined ? undefined : decodeCursor(q.cursor);
    // One more than asked, to know whether another page exists.
    const rows = await this.driver.jobsList({
      limit: q.limit + 1,
      ...(q.state ? { state: q.state } : {}),
      ...(keyId !== undefined ? { keyId } : {}),
      ...(q.engine !== undefined ? { engine: q.engine } : {}),
      ...(q.model ? { model: q.model } : {}),
      ...(q.conversationId ? { conversationId: q.conversationId } : {}),
      ...(q.createdAfter !== undefined ? { createdAfter: q.createdAfter } : {}),
      ...(q.createdBefore !== undefined ? { createdBefore: q.createdBefore } : {}),
      ...(q.metadata.length ? { metadata: q.metadata } : {}),
      ...(beforeSeq !== undefined ? { beforeSeq } : {}),
    });
    const more = rows.length > q.limit;
    if (more) rows.pop();
    return { jobs: rows, nextCursor: more ? encodeCursor(rows[rows.length - 1]!.seq) : null };
  }

  /** `who` null: the caller presented a valid signed URL for exactly this artifact. */
  async artifact(jobId: string, name: string, who: Principal | null): Promise<Artifact> {
    if (who !== null && scopeOf(who) !== undefined && this.visible(await this.driver.jobGet({ id: jobId }), who) === null) throw notFound(jobId);
    // The name is a lookup key, never a path; anything outside the allowed alphabet cannot exist.
    const a = ARTIFACT_NAME_RE.test(name) ? await this.driver.artifactGet({ jobId, name }) : null;
    if (a) return a;
    if ((await this.driver.jobGet({ id: jobId })) === null) throw notFound(jobId);
    throw new NotFound('artifact_not_found', `job ${jobId} has no artifact named ${JSON.stringify(name.slice(0, 80))}`);
  }

  /** Makes the job's failed deliveries (or the one for `state`) pending again. */
  async redeliver(id: string, state: JobState | null, who: Principal): Promise<JobState[]> {
    const j = this.visible(await this.driver.jobGet({ id }), who);
    if (!j) throw notFound(id);
    if (j.webhookUrl === null) throw new Conflict('no_webhook', 'this job has no state_webhook_url');
    if (state !== null && !j.deliveries.some((d) => d.state === state)) {
      throw new Conflict('no_such_event', `this job has no ${state} event to redeliver`, 'state');
    }
    // Redelivery floods (hardening finding 11): one at a time per job, and a few per minute.
    if (j.deliveries.some((d) => d.status === 'pending')) {
      throw new QuotaExceeded('redeliver_rate_limited', "this job's earlier events are still being delivered; try again once they are done", undefined, 1);
    }
    const now = this.clock.now();
    const recent = (this.redeliveries.get(id) ?? []).filter((t) => t > now - 60_000);
    if (recent.length >= this.settings.redeliverPerMinute) {
      const wait = Math.max(1, Math.ceil((recent[0]! + 60_000 - now) / 1000));
      throw new QuotaExceeded('redeliver_rate_limited', `at most FOREMAN_REDELIVER_PER_MINUTE (${this.settings.redeliverPerMinute}) redeliveries of one job per minute`, undefined, wait);
    }
    recent.push(now);
    this.redeliveries.set(id, recent);
    if (this.redeliveries.size > 10_000) {
      for (const [k, ts] of this.redeliveries) if (ts[ts.length - 1]! <= now - 60_000) this.redeliveries.delete(k);
    }
    return this.driver.deliveriesRedeliver({ jobId: id, now, state, actor: actorOf(who) });
  }

  /**
   * A conversation: its turns in order, and its status: `active` while a turn is queued or
   * running, `failed` if the last turn failed, `idle` otherwise.
   */
  async conversation(id: string, who: Principal) {
    const c = this.visible(await this.driver.conversationGet({ id }), who);
    if (!c || c.turns.length === 0) throw new NotFound('conversation_not_found', `no conversation with id ${JSON.stringify(id.slice(0, 80))}`);
    const last = c.turns[c.turns.length - 1]!;
    const active = c.turns.some((t) => t.state === 'scheduled' || t.state === 'queued' || t.state === 'loading' || t.state === 'working');
    return { ...c, status: active ? ('active' as const) : last.state === 'failed' ? ('failed' as const) : ('idle' as const) };
  }

  /** Newest activity first, with the same opaque cursors as the job listing. */
  async conversations(q: { limit: number; cursor?: string }, who: Principal) {
    if (!(q.limit >= 1 && q.limit <= 100)) throw new Validation('limit must be 1 to 100', 'limit');
    const scope = scopeOf(who);
    const rows = await this.driver.conversationsList({
      limit: q.limit + 1,
      ...(scope !== undefined ? { keyId: scope } : {}),
      ...(q.cursor !== undefined ? { beforeSeq: decodeCursor(q.cursor) } : {}),
    });
    const more = rows.length > q.limit;
    if (more) rows.pop();
    return { conversations: rows, nextCursor: more ? encodeCursor(rows[rows.length - 1]!.lastSeq) : null };
  }

  transitionsSince(id: string, after: number): Promise<TransitionEvent[]> {
    return this.driver.jobTransitionsSince({ id, after });
  }

  /**
   * Queue position and start estimate for a queued job (README "Queue position and ETA"):
   * position = queued jobs the claim takes first (effective priority, then FIFO);
   * estimate = now + (Σ ahead of each model's average run time + the remaining average time of
   * running jobs) / concurrency. Averages are per-model moving averages (α = 0.2) of recent runs;
   * a model with none uses the mean over models; with no history at all the estimate is null.
   */
  async estimate(j: { seq: number }): Promise<QueueEstimate> {
    const now = this.clock.now();
    const concurrency = this.settings.concurrency();
    const snap = await this.driver.jobQueueSnapshot({ seq: j.seq });
    const position = snap.ahead.reduce((a, r) => a + r.n, 0);
    const all = [...snap.stats.values()];
    const fallback = all.length ? all.reduce((a, b) => a + b, 0) / all.length : null;
    const avg = (m: string) => snap.stats.get(m) ?? fallback;
    if (position === 0 && snap.running.length < concurrency) return { position, estimatedStartAt: iso(now) };
    let work = 0;
    for (const r of snap.ahead) {
      const a = avg(r.model);
      if (a === null) return { position, estimatedStartAt: null };
      work += a * r.n;
    }
    for (const r of snap.running) {
      const a = avg(r.model);
      if (a === null) return { position, estimatedStartAt: null };
      work += Math.max(0, a - (now - r.startedAt));
    }
    return { position, estimatedStartAt: iso(now + Math.round(work / concurrency)) };
  }
}
