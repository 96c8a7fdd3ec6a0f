import { createHash } from 'node:crypto';
import type { DB } from './db.js';
import { STATE_SEQUENCE, type ErrorInfo, type JobState } from '../domain.js';

/**
 * All SQL lives here. Every state change is one named function running one synchronous
 * `db.transaction` that updates the job, appends to its transition log and, when the job's
 * webhook wants the state, writes the outbox row. Nothing here awaits.
 */

export interface NewJob {
  id: string;
  model: string;
  request: Record<string, unknown>;
  metadata: Record<string, string> | null;
  webhookUrl: string | null;
  webhookEvents: JobState[] | null;
  maxAttempts: number;
  priority: number;
  deadlineAt: number | null;
  /** Idempotency-Key handling: the key, the hash of the request body, and when the key expires. */
  idempotency: { key: string; bodyHash: string; expiresAt: number } | null;
}

export interface ClaimedJob {
  seq: number;
  id: string;
  model: string;
  request: Record<string, unknown>;
  attempt: number;
  maxAttempts: number;
}

export interface ArtifactInput {
  name: string;
  contentType: string;
  body: Buffer;
}

export interface ArtifactMeta {
  name: string;
  contentType: string;
  size: number;
  sha256: string;
}

export interface Artifact extends ArtifactMeta {
  body: Buffer;
}

export interface DeliveryView {
  id: number;
  state: JobState;
  sequence: number;
  status: 'pending' | 'delivered' | 'failed';
  attempts: number;
  lastStatusCode: number | null;
  lastError: string | null;
  nextAttemptAt: number | null;
  deliveredAt: number | null;
  occurredAt: number;
}

export interface JobView {
  seq: number;
  id: string;
  state: JobState;
  model: string;
  attempt: number;
  maxAttempts: number;
  priority: number;
  deadlineAt: number | null;
  metadata: Record<string, string> | null;
  createdAt: number;
  startedAt: number | null;
  finishedAt: number | null;
  updatedAt: number;
  result: unknown;
  error: ErrorInfo | null;
  webhookUrl: string | null;
  webhookEvents: JobState[] | null;
  transitions: { state: JobState; at: number; attempt: number }[];
  artifacts: ArtifactMeta[];
  deliveries: DeliveryView[];
}

/** A due webhook delivery, with what the dispatcher needs to build the event body. */
export interface DueDelivery {
  id: number;
  jobSeq: number;
  jobId: string;
  state: JobState;
  sequence: number;
  url: string;
  occurredAt: number;
  attempts: number;
  metadata: Record<string, string> | null;
  errorCode: string | null;
  errorMessage: string | null;
}

/** A committed state change, as SSE watchers see it. `n` is its place in the job's transition log. */
export interface TransitionEvent {
  jobId: string;
  state: JobState;
  n: number;
  at: number;
  attempt: number;
}

export interface StoreSignals {
  /** A job became claimable (submitted, or re-queued). */
  jobReady(): void;
  /** An outbox row became due. */
  deliveryReady(): void;
  /** A state change committed. */
  transition?(e: TransitionEvent): void;
}

/** What a transaction did that somebody should hear about once it has committed. */
interface Effects {
  outbox: boolean;
  jobReady: boolean;
  transitions: TransitionEvent[];
}

export interface ListFilter {
  state?: JobState;
  model?: string;
  createdAfter?: number;
  createdBefore?: number;
  /** metadata.<key>=<value> filters; all must match. */
  metadata?: [string, string][];
  /** Only jobs with seq below this (the cursor). */
  beforeSeq?: number;
  limit: number;
}

export interface ListedJob {
  seq: number;
  id: string;
  state: JobState;
  model: string;
  priority: number;
  attempt: number;
  metadata: Record<string, string> | null;
  createdAt: number;
  finishedAt: number | null;
}

interface JobRow {
  seq: number;
  id: string;
  state: JobState;
  model: string;
  priority: number;
  deadline_at: number | null;
  request: string;
  metadata: string | null;
  webhook_url: string | null;
  webhook_events: string | null;
  webhook_gone: number;
  attempt: number;
  max_attempts: number;
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  updated_at: number;
  result: string | null;
  error_code: string | null;
  error_message: string | null;
}

/** The columns a transition needs to decide whether to write an outbox row. */
interface TransitionRow {
  seq: number;
  id: string;
  attempt: number;
  webhook_url: string | null;
  webhook_events: string | null;
  webhook_gone: number;
}

const TRANSITION_COLS = 'seq, id, attempt, webhook_url, webhook_events, webhook_gone';

export type SubmitOutcome =
  | { ok: true; jobId: string; replayed: boolean }
  | { ok: false; code: 'queue_full' }
  | { ok: false; code: 'idempotency_key_reused'; jobId: string };

export class Store {
  private readonly s;
  readonly createJobs: (jobs: NewJob[], now: number, maxQueued: number) => SubmitOutcome[];
  readonly claimJobs: (owner: string, n: number, now: number, leaseMs: number) => ClaimedJob[];
  readonly markWorking: (seq: number, owner: string, now: number, leaseMs: number) => boolean;
  readonly completeJob: (
    seq: number,
    owner: string,
    now: number,
    result: unknown,
    artifacts: ArtifactInput[],
    runMs: number,
  ) => boolean;
  readonly retryJob: (seq: number, owner: string, now: number, runAt: number) => boolean;
  readonly failJob: (seq: number, owner: string, now: number, error: ErrorInfo) => boolean;
  readonly releaseJob: (seq: number, owner: string, now: number) => boolean;
  readonly cancelJob: (seq: number, now: number) => { canceled: boolean; wasRunning: boolean; state: JobState };
  readonly requeueOrphans: (now: number, onlyExpired: boolean) => string[];
  readonly failStaleQueued: (createdBefore: number, now: number, error: ErrorInfo) => string[];
  readonly failPastDeadline: (now: number) => string[];
  readonly sweepExpired: (cutoff: number, limit: number, now: number) => number;
  readonly redeliver: (jobSeq: number, now: number, state: JobState | null) => string[];
  readonly markGone: (deliveryId: number, jobSeq: number, code: number, error: string) => void;

  /**
   * @param agingMs a queued job's effective priority grows by one for every `agingMs` it has
   *   waited, so low-priority work is never starved (ADR-0009).
   */
  constructor(
    readonly db: DB,
    private readonly signals: StoreSignals = { jobReady() {}, deliveryReady() {} },
    private readonly agingMs = 60_000,
  ) {
    const p = (sql: string) => db.prepare(sql);
    // The claim order, also used for queue positions: effective priority, then FIFO (jobs_claim).
    const EFFECTIVE = `(priority + age_boost)`;
    this.s = {
      countQueued: p(`SELECT count(*) AS n FROM jobs WHERE state = 'queued'`).pluck(),
      insertJob: p(`INSERT INTO jobs (id, state, model, request, metadata, webhook_url, webhook_events,
          max_attempts, priority, deadline_at, run_at, created_at, updated_at)
        VALUES (@id, 'queued', @model, @request, @metadata, @webhook_url, @webhook_events,
          @max_attempts, @priority, @deadline_at, @now, @now, @now)
        RETURNING ${TRANSITION_COLS}`),
      insertMetadata: p(`INSERT INTO job_metadata (key, value, job_seq) VALUES (?, ?, ?)`),
      idemGet: p(`SELECT body_hash AS bodyHash, job_seq AS jobSeq, expires_at AS expiresAt FROM idempotency_keys WHERE key = ?`),
      idemDelete: p(`DELETE FROM idempotency_keys WHERE key = ?`),
      idemInsert: p(`INSERT INTO idempotency_keys (key, body_hash, job_seq, expires_at) VALUES (?, ?, ?, ?)`),
      idemSweep: p(`DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys WHERE expires_at <= ? LIMIT ?)`),
      idBySeq: p(`SELECT id FROM jobs WHERE seq = ?`).pluck(),
      insertTransition: p(`INSERT INTO job_transitions (job_seq, n, state, at, attempt)
        VALUES (@seq, (SELECT coalesce(max(n), 0) + 1 FROM job_transitions WHERE job_seq = @seq), @state, @at, @attempt)
        RETURNING n`).pluck(),
      insertDelivery: p(`INSERT OR IGNORE INTO webhook_deliveries (job_seq, state, sequence, url, occurred_at, next_attempt_at)
        VALUES (?, ?, ?, ?, ?, ?)`),
      claim: p(`UPDATE jobs SET state = 'loading', attempt = attempt + 1, lease_owner = @owner,
          lease_expires_at = @lease, started_at = coalesce(started_at, @now), updated_at = @now
        WHERE seq IN (SELECT seq FROM jobs INDEXED BY jobs_claim WHERE state = 'queued' AND run_at <= @now
            AND (deadline_at IS NULL OR deadline_at > @now)
          ORDER BY ${EFFECTIVE} DESC, seq LIMIT @n)
        RETURNING ${TRANSITION_COLS}, model, request, max_attempts`),
      heartbeat: p(`UPDATE jobs SET lease_expires_at = @lease WHERE seq = @seq AND lease_owner = @owner
          AND state IN ('loading', 'working')`),
      toWorking: p(`UPDATE jobs SET state = 'working', lease_expires_at = @lease, updated_at = @now
        WHERE seq = @seq AND state = 'loading' AND lease_owner = @owner RETURNING ${TRANSITION_COLS}`),
      toDone: p(`UPDATE jobs SET state = 'done', result = @result, finished_at = @now, updated_at = @now,
          lease_owner = NULL, lease_expires_at = NULL
        WHERE seq = @seq AND state = 'working' AND lease_owner = @owner RETURNING ${TRANSITION_COLS}, model`),
      modelStat: p(`INSERT INTO model_stats (model, avg_ms, samples) VALUES (@model, @ms, 1)
        ON CONFLICT (model) DO UPDATE SET avg_ms = avg_ms + 0.2 * (@ms - avg_ms), samples = samples + 1`),
      toFailed: p(`UPDATE jobs SET state = 'failed', error_code = @code, error_message = @message,
          finished_at = @now, updated_at = @now, lease_owner = NULL, lease_expires_at = NULL
        WHERE seq = @seq AND state IN ('loading', 'working') AND lease_owner = @owner RETURNING ${TRANSITION_COLS}`),
      toQueuedRetry: p(`UPDATE jobs SET state = 'queued', run_at = @run_at, updated_at = @now,
          lease_owner = NULL, lease_expires_at = NULL
        WHERE seq = @seq AND state IN ('loading', 'working') AND lease_owner = @owner RETURNING ${TRANSITION_COLS}`),
      // An interrupted attempt (shutdown, crash) was not the engine's fault: it does not count.
      toQueuedRelease: p(`UPDATE jobs SET state = 'queued', run_at = @now, updated_at = @now,
          attempt = max(attempt - 1, 0), lease_owner = NULL, lease_expires_at = NULL
        WHERE seq = @seq AND state IN ('loading', 'working') AND lease_owner = @owner RETURNING ${TRANSITION_COLS}`),
      stateOf: p(`SELECT state FROM jobs WHERE seq = ?`).pluck(),
      toCanceled: p(`UPDATE jobs SET state = 'canceled', finished_at = @now, updated_at = @now,
          lease_owner = NULL, lease_expires_at = NULL
        WHERE seq = @seq AND state IN ('queued', 'loading', 'working') RETURNING ${TRANSITION_COLS}`),
      orphans: p(`UPDATE jobs SET state = 'queued', run_at = @now, updated_at = @now,
          attempt = max(attempt - 1, 0), lease_owner = NULL, lease_expires_at = NULL
        WHERE state IN ('loading', 'working') AND (@all = 1 OR lease_expires_at < @now)
        RETURNING ${TRANSITION_COLS}`),
      staleQueued: p(`UPDATE jobs SET state = 'failed', error_code = @code, error_message = @message,
          finished_at = @now, updated_at = @now
        WHERE state = 'queued' AND created_at < @cutoff RETURNING ${TRANSITION_COLS}`),
      pastDeadline: p(`UPDATE jobs SET state = 'failed', error_code = 'deadline_exceeded',
          error_message = 'the job was still queued at its deadline', finished_at = @now, updated_at = @now
        WHERE state = 'queued' AND deadline_at IS NOT NULL AND deadline_at <= @now RETURNING ${TRANSITION_COLS}`),
      insertArtifact: p(`INSERT INTO artifacts (job_seq, name, content_type, size, sha256, body, created_at)
        VALUES (?, ?, ?, ?, ?, ?, ?)`),
      // Aging: whole intervals waited (CAST: Date.now() is bound as a REAL).
      age: p(`UPDATE jobs SET age_boost = CAST((@now - created_at) / @aging AS INTEGER)
        WHERE state = 'queued' AND age_boost <> CAST((@now - created_at) / @aging AS INTEGER)`),
      nextRunAt: p(`SELECT run_at FROM jobs INDEXED BY jobs_run_at WHERE state = 'queued' ORDER BY run_at LIMIT 1`).pluck(),
      nextDeadline: p(`SELECT deadline_at FROM jobs INDEXED BY jobs_deadline
        WHERE state = 'queued' AND deadline_at IS NOT NULL ORDER BY deadline_at LIMIT 1`).pluck(),
      jobById: p(`SELECT seq, id, state, model, priority, deadline_at, request, metadata, webhook_url, webhook_events,
          webhook_gone, attempt, max_attempts, created_at, started_at, finished_at, updated_at, result, error_code, error_message
        FROM jobs WHERE id = ?`),
      seqById: p(`SELECT seq FROM jobs WHERE id = ?`).pluck(),
      transitions: p(`SELECT state, at, attempt FROM job_transitions WHERE job_seq = ? ORDER BY n`),
      transitionsSince: p(`SELECT n, state, at, attempt FROM job_transitions WHERE job_seq = ? AND n > ? ORDER BY n`),
      artifactMetas: p(`SELECT name, content_type AS contentType, size, sha256 FROM artifacts WHERE job_seq = ? ORDER BY name`),
      artifact: p(`SELECT a.name, a.content_type AS contentType, a.size, a.sha256, a.body
        FROM artifacts a JOIN jobs j ON j.seq = a.job_seq WHERE j.id = ? AND a.name = ?`),
      // Bodies only for the artifacts small enough to travel inline in an event.
      artifactsForEvent: p(`SELECT name, content_type AS contentType, size, sha256, CASE WHEN size <= ? THEN body END AS body
        FROM artifacts WHERE job_seq = ? ORDER BY name`),
      deliveries: p(`SELECT id, state, sequence, status, attempts, last_status_code AS lastStatusCode, last_error AS lastError,
          next_attempt_at AS nextAttemptAt, delivered_at AS deliveredAt, occurred_at AS occurredAt
        FROM webhook_deliveries WHERE job_seq = ? ORDER BY sequence, id`),
      // Queue position: queued jobs that the claim would pick before this one.
      queueAhead: p(`SELECT model, count(*) AS n FROM jobs INDEXED BY jobs_claim
        WHERE state = 'queued' AND (${EFFECTIVE} > @eff OR (${EFFECTIVE} = @eff AND seq < @seq))
        GROUP BY model`),
      effectiveOf: p(`SELECT priority + age_boost FROM jobs WHERE seq = ?`).pluck(),
      running: p(`SELECT model, started_at AS startedAt FROM jobs WHERE state IN ('loading', 'working')`),
      modelStats: p(`SELECT model, avg_ms AS avgMs FROM model_stats`),
      // Sweep: finished long enough ago, and no delivery still owed.
      sweepPick: p(`SELECT seq FROM jobs j WHERE state IN ('done', 'failed', 'canceled') AND finished_at < ?
          AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.job_seq = j.seq AND d.status = 'pending')
        ORDER BY finished_at LIMIT ?`).pluck(),
      deleteJob: p(`DELETE FROM jobs WHERE seq = ?`),
      // Listing helpers: created_at bounds become seq bounds through the created_at index.
      // (created_at, seq) is the index's order, so each is one index probe.
      seqCreatedBefore: p(`SELECT seq FROM jobs WHERE created_at < ? ORDER BY created_at DESC, seq DESC LIMIT 1`).pluck(),
      seqCreatedAtOrAfter: p(`SELECT seq FROM jobs WHERE created_at >= ? ORDER BY created_at, seq LIMIT 1`).pluck(),
      // --- webhook outbox ---
      // Due deliveries: only the head of each job's pending line, none already in flight (the
      // dispatcher's in-memory set), none to a URL already at its concurrency cap. A read: which
      // attempts are in flight is not worth a durable write.
      dueDeliveries: p(`SELECT d.id, d.job_seq AS jobSeq, d.state, d.sequence, d.url, d.occurred_at AS occurredAt, d.attempts
        FROM webhook_deliveries d
        WHERE d.status = 'pending' AND d.next_attempt_at <= @now
          AND d.id NOT IN (SELECT value FROM json_each(@busy))
          AND d.url NOT IN (SELECT value FROM json_each(@saturated))
          AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e
            WHERE e.job_seq = d.job_seq AND e.status = 'pending' AND e.sequence < d.sequence)
        ORDER BY d.next_attempt_at, d.id LIMIT @n`),
      jobForEvent: p(`SELECT id, metadata, error_code, error_message FROM jobs WHERE seq = ?`),
      delivered: p(`UPDATE webhook_deliveries SET status = 'delivered', attempts = attempts + 1, delivered_at = @now,
          next_attempt_at = NULL, last_status_code = @code, last_error = NULL
        WHERE id = @id AND status = 'pending'`),
      attemptFailed: p(`UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_at = @next,
          last_status_code = @code, last_error = @error
        WHERE id = @id AND status = 'pending'`),
      deliveryFailed: p(`UPDATE webhook_deliveries SET status = 'failed', attempts = attempts + 1, next_attempt_at = NULL,
          last_status_code = @code, last_error = @error
        WHERE id = @id AND status = 'pending'`),
      goneJob: p(`UPDATE jobs SET webhook_gone = 1 WHERE seq = ?`),
      goneRest: p(`UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL,
          last_error = 'not sent: the receiver answered 410 Gone for an earlier event'
        WHERE job_seq = ? AND status = 'pending'`),
      redeliver: p(`UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = @now,
          delivered_at = NULL
        WHERE job_seq = @seq AND status <> 'pending' AND (@state IS NULL AND status = 'failed' OR state = @state)
        RETURNING state`).pluck(),
      ungone: p(`UPDATE jobs SET webhook_gone = 0 WHERE seq = ?`),
      // Only each job's head-of-line row can become due; later rows wait for it.
      nextDeliveryAt: p(`SELECT min(d.next_attempt_at) FROM webhook_deliveries d
        WHERE d.status = 'pending' AND d.id NOT IN (SELECT value FROM json_each(@busy)) AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e
          WHERE e.job_seq = d.job_seq AND e.status = 'pending' AND e.sequence < d.sequence)`).pluck(),
      pendingDeliveries: p(`SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'`).pluck(),
      ping: p(`SELECT 1`).pluck(),
    };
    this.listCache = new Map();

    const s = this.s;

    /**
     * Wraps `fn` in a transaction; once it has committed, tells the loops and watchers what it did.
     */
    const tx = <A extends unknown[], R>(fn: (fx: Effects, ...a: A) => R): ((...a: A) => R) => {
      const t = db.transaction(fn);
      return (...a: A) => {
        const fx: Effects = { outbox: false, jobReady: false, transitions: [] };
        const r = t(fx, ...a);
        // Inside a group commit this was only a savepoint: announce it once the group commits.
        if (this.deferred) this.deferred.push(fx);
        else this.announce(fx);
        return r;
      };
    };

    /** Appends the transition and, if the job's webhook wants this state, the outbox row. */
    const record = (fx: Effects, row: TransitionRow, state: JobState, now: number): void => {
      const n = s.insertTransition.get({ seq: row.seq, state, at: now, attempt: row.attempt }) as number;
      fx.transitions.push({ jobId: row.id, state, n, at: now, attempt: row.attempt });
      if (state === 'queued') fx.jobReady = true;
      if (row.webhook_url === null || row.webhook_gone === 1) return;
      if (row.webhook_events !== null && !(JSON.parse(row.webhook_events) as string[]).includes(state)) return;
      if (s.insertDelivery.run(row.seq, state, STATE_SEQUENCE[state], row.webhook_url, now, now).changes > 0) fx.outbox = true;
    };

    /** Runs a single-row transition statement and records it; returns whether the job moved. */
    const move = (fx: Effects, stmt: { get(p: object): unknown }, params: object, state: JobState, now: number) => {
      const row = stmt.get(params) as TransitionRow | undefined;
      if (row) record(fx, row, state, now);
      return row;
    };
    /** Runs a many-row transition statement and records each; returns the job ids. */
    const moveAll = (fx: Effects, stmt: { all(p: object): unknown[] }, params: object, state: JobState, now: number) => {
      const rows = stmt.all(params) as TransitionRow[];
      for (const r of rows) record(fx, r, state, now);
      return rows.map((r) => r.id);
    };

    this.createJobs = tx((fx, jobs: NewJob[], now: number, maxQueued: number) => {
      let queued = s.countQueued.get() as number;
      const out: SubmitOutcome[] = [];
      for (const j of jobs) {
        if (j.idempotency) {
          const prior = s.idemGet.get(j.idempotency.key) as { bodyHash: string; jobSeq: number; expiresAt: number } | undefined;
          if (prior && prior.expiresAt > now) {
            const jobId = s.idBySeq.get(prior.jobSeq) as string;
            out.push(
              prior.bodyHash === j.idempotency.bodyHash
                ? { ok: true, jobId, replayed: true }
                : { ok: false, code: 'idempotency_key_reused', jobId },
            );
            continue;
          }
          if (prior) s.idemDelete.run(j.idempotency.key);
        }
        if (queued >= maxQueued) {
          out.push({ ok: false, code: 'queue_full' });
          continue;
        }
        const row = s.insertJob.get({
          id: j.id,
          model: j.model,
          request: JSON.stringify(j.request),
          metadata: j.metadata === null ? null : JSON.stringify(j.metadata),
          webhook_url: j.webhookUrl,
          webhook_events: j.webhookEvents === null ? null : JSON.stringify(j.webhookEvents),
          max_attempts: j.maxAttempts,
          priority: j.priority,
          deadline_at: j.deadlineAt,
          now,
        }) as TransitionRow;
        if (j.metadata) for (const [k, v] of Object.entries(j.metadata)) s.insertMetadata.run(k, v, row.seq);
        if (j.idempotency) s.idemInsert.run(j.idempotency.key, j.idempotency.bodyHash, row.seq, j.idempotency.expiresAt);
        record(fx, row, 'queued', now);
        queued++;
        out.push({ ok: true, jobId: j.id, replayed: false });
      }
      return out;
    });

    this.claimJobs = tx((fx, owner: string, n: number, now: number, leaseMs: number) => {
      const rows = s.claim.all({ owner, n, now, lease: now + leaseMs }) as (TransitionRow & {
        model: string;
        request: string;
        max_attempts: number;
      })[];
      for (const r of rows) record(fx, r, 'loading', now);
      return rows.map((r) => ({
        seq: r.seq,
        id: r.id,
        model: r.model,
        request: JSON.parse(r.request) as Record<string, unknown>,
        attempt: r.attempt,
        maxAttempts: r.max_attempts,
      }));
    });

    this.markWorking = tx(
      (fx, seq: number, owner: string, now: number, leaseMs: number) =>
        move(fx, s.toWorking, { seq, owner, now, lease: now + leaseMs }, 'working', now) !== undefined,
    );

    this.completeJob = tx((fx, seq: number, owner: string, now: number, result: unknown, artifacts: ArtifactInput[], runMs: number) => {
      const row = move(fx, s.toDone, { seq, owner, now, result: JSON.stringify(result) }, 'done', now) as
        | (TransitionRow & { model: string })
        | undefined;
      if (!row) return false;
      for (const a of artifacts) {
        const sha = createHash('sha256').update(a.body).digest('hex');
        s.insertArtifact.run(seq, a.name, a.contentType, a.body.length, sha, a.body, now);
      }
      s.modelStat.run({ model: row.model, ms: runMs });
      return true;
    });

    this.retryJob = tx(
      (fx, seq: number, owner: string, now: number, runAt: number) =>
        move(fx, s.toQueuedRetry, { seq, owner, now, run_at: runAt }, 'queued', now) !== undefined,
    );

    this.failJob = tx(
      (fx, seq: number, owner: string, now: number, error: ErrorInfo) =>
        move(fx, s.toFailed, { seq, owner, now, code: error.code, message: error.message }, 'failed', now) !== undefined,
    );

    this.releaseJob = tx(
      (fx, seq: number, owner: string, now: number) => move(fx, s.toQueuedRelease, { seq, owner, now }, 'queued', now) !== undefined,
    );

    this.cancelJob = tx((fx, seq: number, now: number) => {
      const before = s.stateOf.get(seq) as JobState;
      const canceled = move(fx, s.toCanceled, { seq, now }, 'canceled', now) !== undefined;
      return { canceled, wasRunning: canceled && (before === 'loading' || before === 'working'), state: canceled ? 'canceled' : before };
    });

    this.requeueOrphans = tx((fx, now: number, onlyExpired: boolean) =>
      moveAll(fx, s.orphans, { now, all: onlyExpired ? 0 : 1 }, 'queued', now),
    );

    this.failStaleQueued = tx((fx, createdBefore: number, now: number, error: ErrorInfo) =>
      moveAll(fx, s.staleQueued, { cutoff: createdBefore, now, code: error.code, message: error.message }, 'failed', now),
    );

    this.failPastDeadline = tx((fx, now: number) => moveAll(fx, s.pastDeadline, { now }, 'failed', now));

    this.sweepExpired = tx((_fx, cutoff: number, limit: number, now: number) => {
      const seqs = s.sweepPick.all(cutoff, limit) as number[];
      for (const seq of seqs) s.deleteJob.run(seq);
      s.idemSweep.run(now, limit);
      return seqs.length;
    });

    this.redeliver = tx((fx, jobSeq: number, now: number, state: JobState | null) => {
      const states = s.redeliver.all({ seq: jobSeq, now, state }) as JobState[];
      if (states.length > 0) {
        s.ungone.run(jobSeq);
        fx.outbox = true;
      }
      return states;
    });

    this.markGone = tx((_fx, deliveryId: number, jobSeq: number, code: number, error: string) => {
      s.deliveryFailed.run({ id: deliveryId, code, error });
      s.goneJob.run(jobSeq);
      s.goneRest.run(jobSeq);
    });
  }

  private readonly listCache: Map<string, import('better-sqlite3').Statement>;
  private deferred: Effects[] | null = null;
  private lastAged = -Infinity;

  /**
   * Aging: refreshes queued jobs' `age_boost` (whole aging intervals waited) at most four times
   * per interval: one pass over the queued jobs, instead of a sort on every claim.
   */
  ageQueue(now: number): void {
    if (now - this.lastAged < this.agingMs / 4) return;
    this.lastAged = now;
    this.s.age.run({ now, aging: this.agingMs });
  }

  private announce(fx: Effects): void {
    if (fx.outbox) this.signals.deliveryReady();
    if (fx.jobReady) this.signals.jobReady();
    if (this.signals.transition) for (const e of fx.transitions) this.signals.transition(e);
  }

  /**
   * Group commit: runs `fn` in one transaction in which every store write is a savepoint (one
   * failing write rolls back only itself), and announces their effects after the one commit.
   */
  group<T>(fn: () => T): T {
    if (this.deferred) return fn();
    this.deferred = [];
    let effects: Effects[] = [];
    try {
      const r = this.db.transaction(fn)();
      effects = this.deferred;
      return r;
    } finally {
      this.deferred = null;
      for (const fx of effects) this.announce(fx);
    }
  }

  /** The earliest run_at of a queued job (delayed retries), or null. */
  nextRunAt(): number | null {
    return (this.s.nextRunAt.get() as number | null) ?? null;
  }

  /** The earliest deadline of a queued job, or null. */
  nextDeadlineAt(): number | null {
    return (this.s.nextDeadline.get() as number | null) ?? null;
  }

  /** A job's state-change log after transition `n` (for SSE resumption). */
  transitionsSince(jobSeq: number, n: number): { n: number; state: JobState; at: number; attempt: number }[] {
    return this.s.transitionsSince.all(jobSeq, n) as { n: number; state: JobState; at: number; attempt: number }[];
  }

  /**
   * For a queued job: how many queued jobs the claim would take first (by effective priority,
   * then FIFO), broken down by model, plus what is running and each model's average run time.
   */
  queueSnapshot(job: { seq: number }) {
    const eff = this.s.effectiveOf.get(job.seq) as number;
    const ahead = this.s.queueAhead.all({ eff, seq: job.seq }) as { model: string; n: number }[];
    const running = this.s.running.all() as { model: string; startedAt: number }[];
    const stats = new Map((this.s.modelStats.all() as { model: string; avgMs: number }[]).map((r) => [r.model, r.avgMs]));
    return { ahead, running, stats };
  }

  /** Newest first, keyset-paginated on seq (never OFFSET). */
  listJobs(f: ListFilter): ListedJob[] {
    let upper = f.beforeSeq ?? null; // exclusive
    let lower: number | null = null; // inclusive
    if (f.createdBefore !== undefined) {
      const b = (this.s.seqCreatedBefore.get(f.createdBefore) as number | undefined) ?? null;
      if (b === null) return [];
      upper = upper === null ? b + 1 : Math.min(upper, b + 1);
    }
    if (f.createdAfter !== undefined) {
      lower = (this.s.seqCreatedAtOrAfter.get(f.createdAfter) as number | undefined) ?? null;
      if (lower === null) return [];
    }
    const where: string[] = [];
    const params: Record<string, unknown> = { limit: f.limit };
    let from = 'jobs j';
    const meta = f.metadata ?? [];
    meta.forEach(([k, v], i) => {
      params[`mk${i}`] = k;
      params[`mv${i}`] = v;
      if (i === 0) {
        // The first metadata filter drives the scan through its (key, value, job_seq) index.
        from = 'job_metadata m JOIN jobs j ON j.seq = m.job_seq';
        where.push('m.key = @mk0 AND m.value = @mv0');
      } else {
        where.push(`EXISTS (SELECT 1 FROM job_metadata m${i} WHERE m${i}.key = @mk${i} AND m${i}.value = @mv${i} AND m${i}.job_seq = j.seq)`);
      }
    });
    const seqCol = meta.length > 0 ? 'm.job_seq' : 'j.seq';
    if (upper !== null) {
      where.push(`${seqCol} < @upper`);
      params.upper = upper;
    }
    if (lower !== null) {
      where.push(`${seqCol} >= @lower`);
      params.lower = lower;
    }
    // seq bounds narrow the scan; the created_at checks keep the result exact even if the clock
    // ever stepped back between two submissions.
    if (f.createdBefore !== undefined) {
      where.push('j.created_at < @cbefore');
      params.cbefore = f.createdBefore;
    }
    if (f.createdAfter !== undefined) {
      where.push('j.created_at >= @cafter');
      params.cafter = f.createdAfter;
    }
    if (f.state) {
      where.push('j.state = @state');
      params.state = f.state;
    }
    if (f.model) {
      where.push('j.model = @model');
      params.model = f.model;
    }
    const sql = `SELECT j.seq, j.id, j.state, j.model, j.priority, j.attempt, j.metadata, j.created_at AS createdAt,
        j.finished_at AS finishedAt
      FROM ${from} ${where.length ? `WHERE ${where.join(' AND ')}` : ''}
      ORDER BY ${seqCol} DESC LIMIT @limit`;
    // A handful of shapes: each is prepared once and kept.
    let stmt = this.listCache.get(sql);
    if (!stmt) {
      stmt = this.db.prepare(sql);
      this.listCache.set(sql, stmt);
    }
    return (stmt.all(params) as (Omit<ListedJob, 'metadata'> & { metadata: string | null })[]).map((r) => ({
      ...r,
      metadata: r.metadata === null ? null : (JSON.parse(r.metadata) as Record<string, string>),
    }));
  }

  heartbeat(seq: number, owner: string, until: number): boolean {
    return this.s.heartbeat.run({ seq, owner, lease: until }).changes > 0;
  }

  seqOf(jobId: string): number | null {
    return (this.s.seqById.get(jobId) as number | undefined) ?? null;
  }

  getJob(jobId: string): JobView | null {
    const r = this.s.jobById.get(jobId) as JobRow | undefined;
    if (!r) return null;
    return {
      seq: r.seq,
      id: r.id,
      state: r.state,
      model: r.model,
      attempt: r.attempt,
      maxAttempts: r.max_attempts,
      priority: r.priority,
      deadlineAt: r.deadline_at,
      metadata: r.metadata === null ? null : (JSON.parse(r.metadata) as Record<string, string>),
      createdAt: r.created_at,
      startedAt: r.started_at,
      finishedAt: r.finished_at,
      updatedAt: r.updated_at,
      result: r.result === null ? null : (JSON.parse(r.result) as unknown),
      error: r.error_code === null ? null : { code: r.error_code, message: r.error_message ?? '' },
      webhookUrl: r.webhook_url,
      webhookEvents: r.webhook_events === null ? null : (JSON.parse(r.webhook_events) as JobState[]),
      transitions: this.s.transitions.all(r.seq) as JobView['transitions'],
      artifacts: this.s.artifactMetas.all(r.seq) as ArtifactMeta[],
      deliveries: this.s.deliveries.all(r.seq) as DeliveryView[],
    };
  }

  getArtifact(jobId: string, name: string): Artifact | null {
    return (this.s.artifact.get(jobId, name) as Artifact | undefined) ?? null;
  }

  /** A job's artifacts for an event body: `body` is set only where `size <= inlineMax`. */
  artifactsForEvent(jobSeq: number, inlineMax: number): (ArtifactMeta & { body: Buffer | null })[] {
    return this.s.artifactsForEvent.all(inlineMax, jobSeq) as (ArtifactMeta & { body: Buffer | null })[];
  }

  // --- webhook outbox ---

  /** Up to n due deliveries, skipping those in flight (`busyIds`) and URLs at their cap. */
  dueDeliveries(now: number, n: number, busyIds: number[] = [], saturatedUrls: string[] = []): DueDelivery[] {
    const rows = this.s.dueDeliveries.all({ now, n, busy: JSON.stringify(busyIds), saturated: JSON.stringify(saturatedUrls) }) as Omit<
      DueDelivery,
      'jobId' | 'metadata' | 'errorCode' | 'errorMessage'
    >[];
    return rows.map((d) => {
      const j = this.s.jobForEvent.get(d.jobSeq) as {
        id: string;
        metadata: string | null;
        error_code: string | null;
        error_message: string | null;
      };
      return {
        ...d,
        jobId: j.id,
        metadata: j.metadata === null ? null : (JSON.parse(j.metadata) as Record<string, string>),
        errorCode: j.error_code,
        errorMessage: j.error_message,
      };
    });
  }

  markDelivered(id: number, now: number, statusCode: number): void {
    this.s.delivered.run({ id, now, code: statusCode });
    this.signals.deliveryReady(); // the job's next event may now be due
  }

  markAttemptFailed(id: number, next: number, statusCode: number | null, error: string): void {
    this.s.attemptFailed.run({ id, next, code: statusCode, error });
  }

  markDeliveryFailed(id: number, statusCode: number | null, error: string): void {
    this.s.deliveryFailed.run({ id, code: statusCode, error });
    this.signals.deliveryReady();
  }

  /** When the next delivery (not in flight, head of its job's line) becomes due, or null. */
  nextDeliveryAt(busyIds: number[] = []): number | null {
    return (this.s.nextDeliveryAt.get({ busy: JSON.stringify(busyIds) }) as number | null) ?? null;
  }

  pendingDeliveries(): number {
    return this.s.pendingDeliveries.get() as number;
  }

  ping(): boolean {
    return this.s.ping.get() === 1;
  }
}
