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

export interface StoreSignals {
  /** A job became claimable (submitted, or re-queued). */
  jobReady(): void;
  /** An outbox row became due. */
  deliveryReady(): void;
}

interface JobRow {
  seq: number;
  id: string;
  state: JobState;
  model: string;
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
  attempt: number;
  webhook_url: string | null;
  webhook_events: string | null;
  webhook_gone: number;
}

const TRANSITION_COLS = 'seq, attempt, webhook_url, webhook_events, webhook_gone';

export type SubmitOutcome = { ok: true } | { ok: false; code: 'queue_full' };

export class Store {
  private readonly s;
  readonly createJobs: (jobs: NewJob[], now: number, maxQueued: number) => SubmitOutcome[];
  readonly claimJobs: (owner: string, n: number, now: number, leaseMs: number) => ClaimedJob[];
  readonly markWorking: (seq: number, owner: string, now: number, leaseMs: number) => boolean;
  readonly completeJob: (seq: number, owner: string, now: number, result: unknown, artifacts: ArtifactInput[]) => boolean;
  readonly retryJob: (seq: number, owner: string, now: number, runAt: number) => boolean;
  readonly failJob: (seq: number, owner: string, now: number, error: ErrorInfo) => boolean;
  readonly releaseJob: (seq: number, owner: string, now: number) => boolean;
  readonly requeueOrphans: (now: number, onlyExpired: boolean) => string[];
  readonly failStaleQueued: (createdBefore: number, now: number, error: ErrorInfo) => string[];
  readonly sweepExpired: (cutoff: number, limit: number) => number;
  readonly redeliver: (jobSeq: number, now: number, state: JobState | null) => string[];

  constructor(
    readonly db: DB,
    private readonly signals: StoreSignals = { jobReady() {}, deliveryReady() {} },
  ) {
    const p = (sql: string) => db.prepare(sql);
    this.s = {
      countQueued: p(`SELECT count(*) AS n FROM jobs WHERE state = 'queued'`).pluck(),
      insertJob: p(`INSERT INTO jobs (id, state, model, request, metadata, webhook_url, webhook_events,
          max_attempts, run_at, created_at, updated_at)
        VALUES (@id, 'queued', @model, @request, @metadata, @webhook_url, @webhook_events,
          @max_attempts, @now, @now, @now)
        RETURNING ${TRANSITION_COLS}`),
      insertTransition: p(`INSERT INTO job_transitions (job_seq, n, state, at, attempt)
        VALUES (@seq, (SELECT coalesce(max(n), 0) + 1 FROM job_transitions WHERE job_seq = @seq), @state, @at, @attempt)`),
      insertDelivery: p(`INSERT OR IGNORE INTO webhook_deliveries (job_seq, state, sequence, url, occurred_at, next_attempt_at)
        VALUES (?, ?, ?, ?, ?, ?)`),
      claim: p(`UPDATE jobs SET state = 'loading', attempt = attempt + 1, lease_owner = @owner,
          lease_expires_at = @lease, started_at = coalesce(started_at, @now), updated_at = @now
        WHERE seq IN (SELECT seq FROM jobs WHERE state = 'queued' AND run_at <= @now ORDER BY seq LIMIT @n)
        RETURNING ${TRANSITION_COLS}, id, model, request, max_attempts`),
      heartbeat: p(`UPDATE jobs SET lease_expires_at = @lease WHERE seq = @seq AND lease_owner = @owner
          AND state IN ('loading', 'working')`),
      toWorking: p(`UPDATE jobs SET state = 'working', lease_expires_at = @lease, updated_at = @now
        WHERE seq = @seq AND state = 'loading' AND lease_owner = @owner RETURNING ${TRANSITION_COLS}`),
      toDone: p(`UPDATE jobs SET state = 'done', result = @result, finished_at = @now, updated_at = @now,
          lease_owner = NULL, lease_expires_at = NULL
        WHERE seq = @seq AND state = 'working' AND lease_owner = @owner RETURNING ${TRANSITION_COLS}`),
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
      orphans: p(`UPDATE jobs SET state = 'queued', run_at = @now, updated_at = @now,
          attempt = max(attempt - 1, 0), lease_owner = NULL, lease_expires_at = NULL
        WHERE state IN ('loading', 'working') AND (@all = 1 OR lease_expires_at < @now)
        RETURNING ${TRANSITION_COLS}, id`),
      staleQueued: p(`UPDATE jobs SET state = 'failed', error_code = @code, error_message = @message,
          finished_at = @now, updated_at = @now
        WHERE state = 'queued' AND created_at < @cutoff RETURNING ${TRANSITION_COLS}, id`),
      insertArtifact: p(`INSERT INTO artifacts (job_seq, name, content_type, size, sha256, body, created_at)
        VALUES (?, ?, ?, ?, ?, ?, ?)`),
      nextRunAt: p(`SELECT min(run_at) FROM jobs WHERE state = 'queued'`).pluck(),
      jobById: p(`SELECT seq, id, state, model, request, metadata, webhook_url, webhook_events, webhook_gone, attempt,
          max_attempts, created_at, started_at, finished_at, updated_at, result, error_code, error_message
        FROM jobs WHERE id = ?`),
      seqById: p(`SELECT seq FROM jobs WHERE id = ?`).pluck(),
      transitions: p(`SELECT state, at, attempt FROM job_transitions WHERE job_seq = ? ORDER BY n`),
      artifactMetas: p(`SELECT name, content_type AS contentType, size, sha256 FROM artifacts WHERE job_seq = ? ORDER BY name`),
      artifact: p(`SELECT a.name, a.content_type AS contentType, a.size, a.sha256, a.body
        FROM artifacts a JOIN jobs j ON j.seq = a.job_seq WHERE j.id = ? AND a.name = ?`),
      // Bodies only for the artifacts small enough to travel inline in an event.
      artifactsForEvent: p(`SELECT name, content_type AS contentType, size, sha256, CASE WHEN size <= ? THEN body END AS body
        FROM artifacts WHERE job_seq = ? ORDER BY name`),
      deliveries: p(`SELECT id, state, sequence, status, attempts, last_status_code AS lastStatusCode, last_error AS lastError,
          next_attempt_at AS nextAttemptAt, delivered_at AS deliveredAt, occurred_at AS occurredAt
        FROM webhook_deliveries WHERE job_seq = ? ORDER BY sequence, id`),
      // Sweep: finished long enough ago, and no delivery still owed.
      sweepPick: p(`SELECT seq FROM jobs j WHERE state IN ('done', 'failed') AND finished_at < ?
          AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.job_seq = j.seq AND d.status = 'pending')
        ORDER BY finished_at LIMIT ?`).pluck(),
      deleteJob: p(`DELETE FROM jobs WHERE seq = ?`),
      // --- webhook outbox ---
      claimDeliveries: p(`UPDATE webhook_deliveries SET locked_until = @lock
        WHERE id IN (
          SELECT d.id FROM webhook_deliveries d
          WHERE d.status = 'pending' AND d.next_attempt_at <= @now AND d.locked_until <= @now
            AND d.url NOT IN (SELECT value FROM json_each(@saturated))
            AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e
              WHERE e.job_seq = d.job_seq AND e.status = 'pending' AND e.sequence < d.sequence)
          ORDER BY d.next_attempt_at, d.id LIMIT @n)
        RETURNING id, job_seq AS jobSeq, state, sequence, url, occurred_at AS occurredAt, attempts`),
      jobForEvent: p(`SELECT id, metadata, error_code, error_message FROM jobs WHERE seq = ?`),
      delivered: p(`UPDATE webhook_deliveries SET status = 'delivered', attempts = attempts + 1, delivered_at = @now,
          next_attempt_at = NULL, locked_until = 0, last_status_code = @code, last_error = NULL
        WHERE id = @id AND status = 'pending'`),
      attemptFailed: p(`UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_at = @next, locked_until = 0,
          last_status_code = @code, last_error = @error
        WHERE id = @id AND status = 'pending'`),
      deliveryFailed: p(`UPDATE webhook_deliveries SET status = 'failed', attempts = attempts + 1, next_attempt_at = NULL,
          locked_until = 0, last_status_code = @code, last_error = @error
        WHERE id = @id AND status = 'pending'`),
      goneJob: p(`UPDATE jobs SET webhook_gone = 1 WHERE seq = ?`),
      goneRest: p(`UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, locked_until = 0,
          last_error = 'not sent: the receiver answered 410 Gone for an earlier event'
        WHERE job_seq = ? AND status = 'pending'`),
      redeliver: p(`UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = @now, locked_until = 0,
          delivered_at = NULL
        WHERE job_seq = @seq AND status <> 'pending' AND (@state IS NULL AND status = 'failed' OR state = @state)
        RETURNING state`).pluck(),
      ungone: p(`UPDATE jobs SET webhook_gone = 0 WHERE seq = ?`),
      unlockDeliveries: p(`UPDATE webhook_deliveries SET locked_until = 0 WHERE locked_until <> 0`),
      unlockDelivery: p(`UPDATE webhook_deliveries SET locked_until = 0 WHERE id = ?`),
      // Only each job's head-of-line row can become due; later rows wait for it.
      nextDeliveryAt: p(`SELECT min(max(d.next_attempt_at, d.locked_until)) FROM webhook_deliveries d
        WHERE d.status = 'pending' AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e
          WHERE e.job_seq = d.job_seq AND e.status = 'pending' AND e.sequence < d.sequence)`).pluck(),
      pendingDeliveries: p(`SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'`).pluck(),
      ping: p(`SELECT 1`).pluck(),
    };

    const s = this.s;
    const tx = <A extends unknown[], R>(fn: (...a: A) => R) => db.transaction(fn) as unknown as (...a: A) => R;

    /** Appends the transition and, if the webhook wants this state, the outbox row. Returns true if an outbox row was written. */
    const recordTransition = (row: TransitionRow, state: JobState, now: number): boolean => {
      s.insertTransition.run({ seq: row.seq, state, at: now, attempt: row.attempt });
      if (row.webhook_url === null || row.webhook_gone === 1) return false;
      if (row.webhook_events !== null && !(JSON.parse(row.webhook_events) as string[]).includes(state)) return false;
      return s.insertDelivery.run(row.seq, state, STATE_SEQUENCE[state], row.webhook_url, now, now).changes > 0;
    };

    /** Runs a single-row transition statement; records it; returns whether the job moved. */
    const move = (stmt: { get(p: object): unknown }, params: object, state: JobState, now: number) => {
      const row = stmt.get(params) as TransitionRow | undefined;
      if (!row) return { moved: false, outbox: false };
      return { moved: true, outbox: recordTransition(row, state, now) };
    };
    const after = (r: { moved: boolean; outbox: boolean }, jobReady = false) => {
      if (r.outbox) this.signals.deliveryReady();
      if (r.moved && jobReady) this.signals.jobReady();
      return r.moved;
    };

    const createTx = tx((jobs: NewJob[], now: number, maxQueued: number) => {
      let queued = s.countQueued.get() as number;
      let outbox = false;
      const out: SubmitOutcome[] = [];
      for (const j of jobs) {
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
          now,
        }) as TransitionRow;
        outbox = recordTransition(row, 'queued', now) || outbox;
        queued++;
        out.push({ ok: true });
      }
      return { out, outbox };
    });
    this.createJobs = (jobs, now, maxQueued) => {
      const { out, outbox } = createTx(jobs, now, maxQueued);
      if (outbox) this.signals.deliveryReady();
      if (out.some((o) => o.ok)) this.signals.jobReady();
      return out;
    };

    const claimTx = tx((owner: string, n: number, now: number, leaseMs: number) => {
      const rows = s.claim.all({ owner, n, now, lease: now + leaseMs }) as (TransitionRow & {
        id: string;
        model: string;
        request: string;
        max_attempts: number;
      })[];
      rows.sort((a, b) => a.seq - b.seq);
      let outbox = false;
      for (const r of rows) outbox = recordTransition(r, 'loading', now) || outbox;
      return { rows, outbox };
    });
    this.claimJobs = (owner, n, now, leaseMs) => {
      const { rows, outbox } = claimTx(owner, n, now, leaseMs);
      if (outbox) this.signals.deliveryReady();
      return rows.map((r) => ({
        seq: r.seq,
        id: r.id,
        model: r.model,
        request: JSON.parse(r.request) as Record<string, unknown>,
        attempt: r.attempt,
        maxAttempts: r.max_attempts,
      }));
    };

    const workingTx = tx((seq: number, owner: string, now: number, leaseMs: number) =>
      move(s.toWorking, { seq, owner, now, lease: now + leaseMs }, 'working', now),
    );
    this.markWorking = (...a) => after(workingTx(...a));

    const doneTx = tx((seq: number, owner: string, now: number, result: unknown, artifacts: ArtifactInput[]) => {
      const r = move(s.toDone, { seq, owner, now, result: JSON.stringify(result) }, 'done', now);
      if (r.moved) {
        for (const a of artifacts) {
          const sha = createHash('sha256').update(a.body).digest('hex');
          s.insertArtifact.run(seq, a.name, a.contentType, a.body.length, sha, a.body, now);
        }
      }
      return r;
    });
    this.completeJob = (...a) => after(doneTx(...a));

    const retryTx = tx((seq: number, owner: string, now: number, runAt: number) =>
      move(s.toQueuedRetry, { seq, owner, now, run_at: runAt }, 'queued', now),
    );
    this.retryJob = (...a) => after(retryTx(...a), true);

    const failTx = tx((seq: number, owner: string, now: number, error: ErrorInfo) =>
      move(s.toFailed, { seq, owner, now, code: error.code, message: error.message }, 'failed', now),
    );
    this.failJob = (...a) => after(failTx(...a));

    const releaseTx = tx((seq: number, owner: string, now: number) =>
      move(s.toQueuedRelease, { seq, owner, now }, 'queued', now),
    );
    this.releaseJob = (...a) => after(releaseTx(...a), true);

    const orphanTx = tx((now: number, onlyExpired: boolean) => {
      const rows = s.orphans.all({ now, all: onlyExpired ? 0 : 1 }) as (TransitionRow & { id: string })[];
      for (const r of rows) recordTransition(r, 'queued', now);
      return rows.map((r) => r.id);
    });
    this.requeueOrphans = (now, onlyExpired) => {
      const ids = orphanTx(now, onlyExpired);
      if (ids.length > 0) this.signals.jobReady();
      return ids;
    };

    const staleTx = tx((createdBefore: number, now: number, error: ErrorInfo) => {
      const rows = s.staleQueued.all({ cutoff: createdBefore, now, code: error.code, message: error.message }) as (TransitionRow & {
        id: string;
      })[];
      let outbox = false;
      for (const r of rows) outbox = recordTransition(r, 'failed', now) || outbox;
      return { ids: rows.map((r) => r.id), outbox };
    });
    this.failStaleQueued = (createdBefore, now, error) => {
      const { ids, outbox } = staleTx(createdBefore, now, error);
      if (outbox) this.signals.deliveryReady();
      return ids;
    };

    const sweepTx = tx((cutoff: number, limit: number) => {
      const seqs = s.sweepPick.all(cutoff, limit) as number[];
      for (const seq of seqs) s.deleteJob.run(seq);
      return seqs.length;
    });
    this.sweepExpired = sweepTx;

    const redeliverTx = tx((jobSeq: number, now: number, state: JobState | null) => {
      const states = s.redeliver.all({ seq: jobSeq, now, state }) as JobState[];
      if (states.length > 0) s.ungone.run(jobSeq);
      return states;
    });
    this.redeliver = (jobSeq, now, state) => {
      const states = redeliverTx(jobSeq, now, state);
      if (states.length > 0) this.signals.deliveryReady();
      return states;
    };
    this.markGone = tx((deliveryId: number, jobSeq: number, code: number, error: string) => {
      s.deliveryFailed.run({ id: deliveryId, code, error });
      s.goneJob.run(jobSeq);
      s.goneRest.run(jobSeq);
    });
  }

  readonly markGone: (deliveryId: number, jobSeq: number, code: number, error: string) => void;

  /** The smallest run_at of a queued job (for the worker's wake-up timer), or null. */
  nextRunAt(): number | null {
    return (this.s.nextRunAt.get() as number | null) ?? null;
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

  /** Locks up to n due deliveries (only the head of each job's pending line) until `lockUntil`. */
  claimDeliveries(now: number, n: number, lockUntil: number, saturatedUrls: string[] = []): DueDelivery[] {
    const rows = this.s.claimDeliveries.all({ now, n, lock: lockUntil, saturated: JSON.stringify(saturatedUrls) }) as Omit<
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

  /** At start-up: no attempt is in flight, whatever the rows say. */
  unlockDeliveries(): number {
    return this.s.unlockDeliveries.run().changes;
  }

  /** Gives back a claimed delivery without attempting it. */
  unlockDelivery(id: number): void {
    this.s.unlockDelivery.run(id);
  }

  nextDeliveryAt(): number | null {
    return (this.s.nextDeliveryAt.get() as number | null) ?? null;
  }

  pendingDeliveries(): number {
    return this.s.pendingDeliveries.get() as number;
  }

  ping(): boolean {
    return this.s.ping.get() === 1;
  }
}
