import { createHash } from 'node:crypto';
import os from 'node:os';
import pg from 'pg';
import { isTerminal, loadKey, type ErrorInfo, type JobState } from '../../domain.js';
import type {
  EngineView,
  InstanceEngineView,
  BatchRecord,
  BatchResultRow,
  FileLine,
  FileRecord,
  JobKind,
  NewBatch,
  NewFile,
  ApiKeyLimits,
  ApiKeyRecord,
  Artifact,
  ArtifactMeta,
  AuditAction,
  AuditEntry,
  CancelOutcome,
  ClaimedDelivery,
  ClaimedJob,
  ClaimHost,
  ConversationListed,
  ConversationView,
  DeliveryOutcome,
  DeliveryView,
  InsertOutcome,
  JobView,
  KeyUsage,
  ListedJob,
  ListFilter,
  NewJob,
  QueueDriver,
  QueueSnapshot,
  TransitionEvent,
} from '../driver.js';
import { claimedJobOf, EXPIRED_IDS_KEPT_MS, fairest, jobEventOf, LIST_SCAN_BUDGET, limitsOf, NEVER, originOf, pickByLoadCost, pickWithoutLookups, queuedWork, RESULT_IN_ARTIFACT, runOf, sameLoadProbes, storedResult, type Candidate, type JobEventRow, type RunRow } from '../shared.js';
import { LocalNotifier, type Notifier } from '../notifier.js';
import { StorageUnavailable, Validation } from '../../errors.js';
import { Conn, connectionConfig, domainError, isConnectionError, isRetryable, migrate, pgTypes, redactUrl, SqlCache } from './db.js';
import { ClusterNotifier, payloadsOf } from './notify.js';
import { LeaderElection } from './leader.js';
import { PgFilesBatches } from './files.js';

export interface PostgresDriverOptions {
  url: string;
  /** Connections in the pool (FOREMAN_DATABASE_POOL). */
  poolSize?: number;
  /** How long a request waits for a pooled connection before `StorageUnavailable`. */
  connectTimeoutMs?: number;
  /** This instance (FOREMAN_INSTANCE_ID): lease tokens and `jobs.instance` carry it. */
  instanceId?: string;
  /** How long a claimed webhook delivery stays claimed if its instance never records it. */
  deliveryLeaseMs?: number;
  /** Carries effects to the other instances (LISTEN/NOTIFY); off: in-process only. */
  crossInstance?: boolean;
  notifier?: Notifier;
  /** Observes each write transaction (metrics). */
  onCommit?: (size: number, ms: number) => void;
  /** How long a pooled statement may go unanswered (default 2 minutes; tests make it short). */
  queryTimeoutMs?: number;
  /** How often instances say on the channel that they are there (default 5 s; tests make it short). */
  heartbeatMs?: number;
  /** How long token deltas are gathered before they cross to other instances (default 75 ms). */
  deltaCoalesceMs?: number;
  /** Another live process was heard using this instance id. */
  onDuplicateId?: (instanceId: string) => void;
}

/** What one write did that somebody should hear about once it has committed. */
export interface Effects {
  jobReady: boolean;
  deliveryReady: boolean;
  /** A batch was created or cancelled (the leader's batch runner has work). */
  batchReady: boolean;
  transitions: TransitionEvent[];
  canceled: string[];
  /** Outbox rows this write claimed for this instance's dispatcher (ADR-0017). */
  claimed: number[];
}
const noEffects = (): Effects => ({ jobReady: false, deliveryReady: false, batchReady: false, transitions: [], canceled: [], claimed: [] });

interface TransitionRow {
  seq: number;
  id: string;
  attempt: number;
  webhook_url: string | null;
  webhook_events: string | null;
  webhook_gone: number;
  error_code: string | null;
  error_message: string | null;
  model: string;
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  conversation_id: string;
  load_ms: number | null;
  prompt_tokens: number | null;
  completion_tokens: number | null;
  key_id: string;
  kind: JobKind;
  webhook_origin: string | null;
  batch_seq: number | null;
  engine: string | null;
}

/** A claimed job's row, as the claim returns it. */
type ClaimRow = TransitionRow & Recorded & { request: string; max_attempts: number; lease_owner: string; prev_seq: number | null };

/** What `foreman_record_claim` (migration 0014) did for a transition. */
interface Recorded {
  rec_n: number;
  rec_due: number | null;
  rec_released: number;
  /** The outbox row's id when it was written claimed by this instance. */
  rec_claimed: number | null;
}

interface JobRow extends TransitionRow {
  scheduled_for: number | null;
  engine: string | null;
  instance: string | null;
  state: JobState;
  waits: number;
  prev_id: string | null;
  priority: number;
  deadline_at: number | null;
  request: string;
  metadata: string | null;
  max_attempts: number;
  updated_at: number;
  result: string | null;
}

interface DueRow extends JobEventRow {
  jobSeq: number;
  /** A batch's event (ADR-0015): its row has no job. */
  batchSeq: number | null;
  /** A `done` event's artifacts, read with the claim (ARTS); null for any other state. */
  arts: { name: string; contentType: string; size: number; sha256: string; body: string | null }[] | null;
}

/** The parameters of `insertJob` for one new job. */
function insertParams(
  j: NewJob,
  o: { now: number; state: JobState; request: string; keyId: string; waits: number; scheduledFor: number | null },
): Record<string, unknown> {
  const meta = Object.entries(j.metadata ?? {});
  return {
    id: j.id,
    model: j.model,
    request: o.request,
    metadata: j.metadata === null ? null : JSON.stringify(j.metadata),
    webhook_url: j.webhookUrl,
    webhook_origin: j.webhookUrl === null ? null : originOf(j.webhookUrl),
    webhook_events: j.webhookEvents === null ? null : JSON.stringify(j.webhookEvents),
    max_attempts: j.maxAttempts,
    priority: j.priority,
    deadline_at: j.deadlineAt,
    now: o.now,
    state: o.state,
    run_at: o.waits ? NEVER : (o.scheduledFor ?? o.now),
    conversation_id: j.conversationId ?? j.id,
    prev_seq: j.previous?.seq ?? null,
    waits: o.waits,
    key_id: o.keyId,
    scheduled_for: o.scheduledFor,
    kind: j.kind ?? 'chat',
    batch_seq: j.batchSeq ?? null,
    keys: meta.map(([k]) => k),
    values: meta.map(([, v]) => v),
  };
}

/** Submits in flight at once (every instance) that the queue caps' margin allows for. */
const CAP_MARGIN_JOBS = 1000;
const CAP_MARGIN_BYTES = 64 * 1024 * 1024;

const TRANSITION_COLS = `seq, id, attempt, webhook_url, webhook_events, webhook_gone, error_code, error_message, model,
  created_at, started_at, finished_at, conversation_id, load_ms, prompt_tokens, completion_tokens, key_id, kind, webhook_origin, batch_seq, engine`;
const RUN_COLS = 'j.created_at, j.started_at, j.finished_at, j.attempt, j.model, j.conversation_id, j.load_ms, j.prompt_tokens, j.completion_tokens';
const EFFECTIVE = '(priority + age_boost)';
const KEY_COLS = `id, name, concurrency, max_queued AS maxQueued, daily_limit AS dailyLimit, priority_max AS priorityMax,
  created_at AS createdAt, updated_at AS updatedAt, revoked_at AS revokedAt`;
const DUE_COLS = `d.id, d.job_seq AS jobSeq, d.batch_seq AS batchSeq, d.state, d.sequence, d.url, d.origin, d.occurred_at AS occurredAt,
  d.attempts, coalesce(j.id, b.id) AS jobId, j.metadata, j.error_code AS errorCode, j.error_message AS errorMessage, ${RUN_COLS}`;
/** A `done` event's artifacts, read with its claim (migration 0011): `[{name, contentType, size, sha256, body: base64 | null}]`. */
const ARTS = 'foreman_event_artifacts(d.job_seq, d.state, @inline) AS arts';
/** The first key of the engine hosts' advisory locks ('fmEH'). */
const HOST_LOCK_SPACE = 0x666d4548;
/**
 * The longest a pooled statement may go unanswered. Far above any statement's own time and any
 * lock wait a vanished instance can cause (its session ends ~25 s after its last packet, or after
 * a minute idle in a transaction: SESSION_DEFAULTS).
 */
const QUERY_TIMEOUT_MS = 120_000;
const NUM_CTX = `(j.request::jsonb #> '{options,num_ctx}')`;


// The SQL of the driver, one constant per statement (named @parameters; see SqlCache).
/** A model's moving average run time, merged into its row (`model_stats AS s`). */
const MODEL_STAT_MERGE = 'ON CONFLICT (model) DO UPDATE SET avg_ms = s.avg_ms + 0.2 * (excluded.avg_ms - s.avg_ms), samples = s.samples + 1';

const Q = {
  // The committed counts (kept at COMMIT by a deferred trigger, migration 0003).
  countQueued: `SELECT n, bytes FROM job_counts WHERE state = 'queued'`,
  // Near the cap, submits take turns (a transaction advisory lock) and read the counts again.
  capLock: `SELECT pg_advisory_xact_lock(7466371099999) AS x`,
  // A key at a concurrency limit: claims of it take turns, and count its running jobs exactly.
  keyLock: `SELECT pg_advisory_xact_lock(hashtextextended('foreman-key:' || @key, 0)) AS x`,
  keyRunning: `SELECT count(*) AS n FROM jobs WHERE key_id = @key AND state IN ('loading', 'working')`,
  // A new job with its metadata and its conversation's row (wrapped by \`move\`: and its record).
  insertJob: `WITH u AS (INSERT INTO jobs (id, state, model, request, metadata, webhook_url, webhook_events,
        max_attempts, priority, deadline_at, run_at, created_at, updated_at, conversation_id, prev_seq, waits, key_id, scheduled_for, kind, webhook_origin,
        batch_seq)
      VALUES (@id, @state, @model, @request, @metadata, @webhook_url, @webhook_events,
        @max_attempts, @priority, @deadline_at::bigint, @run_at, @now, @now, @conversation_id, @prev_seq::bigint, @waits, @key_id, @scheduled_for::bigint, @kind,
        @webhook_origin::text, @batch_seq::bigint)
      RETURNING ${TRANSITION_COLS}),
    m AS (INSERT INTO job_metadata (key, value, job_seq) SELECT k, v, u.seq FROM u, unnest(@keys::text[], @values::text[]) AS t(k, v)),
    c AS (INSERT INTO conversations AS c (id, last_seq, created_at) SELECT u.conversation_id, u.seq, @now FROM u
      ON CONFLICT (id) DO UPDATE SET last_seq = greatest(c.last_seq, excluded.last_seq))
    SELECT * FROM u`,
  keyQueued: `SELECT queued + scheduled AS n FROM key_counts WHERE key_id = @key`,
  keyDayJobs: `SELECT jobs FROM key_days WHERE key_id = @key AND day = @day`,
  keyDayAddJob: `INSERT INTO key_days AS d (key_id, day, jobs) VALUES (@key, @day, 1)
    ON CONFLICT (key_id, day) DO UPDATE SET jobs = d.jobs + 1`,
  keyInsert: `INSERT INTO api_keys (id, name, key_hash, concurrency, max_queued, daily_limit, priority_max, created_at, updated_at)
    VALUES (@id, @name, @hash, @concurrency::integer, @maxQueued::integer, @dailyLimit::integer, @priorityMax::integer, @createdAt, @createdAt)`,
  keyByHash: `SELECT ${KEY_COLS} FROM api_keys WHERE key_hash = @hash`,
  keyById: `SELECT ${KEY_COLS} FROM api_keys WHERE id = @id`,
  keysAll: `SELECT ${KEY_COLS} FROM api_keys ORDER BY created_at, id`,
  keyUpdate: `UPDATE api_keys SET name = coalesce(@name::text, name),
      concurrency = CASE WHEN @set_concurrency::boolean THEN @concurrency::integer ELSE concurrency END,
      max_queued = CASE WHEN @set_max_queued::boolean THEN @max_queued::integer ELSE max_queued END,
      daily_limit = CASE WHEN @set_daily_limit::boolean THEN @daily_limit::integer ELSE daily_limit END,
      priority_max = CASE WHEN @set_priority_max::boolean THEN @priority_max::integer ELSE priority_max END,
      updated_at = @now
    WHERE id = @id RETURNING ${KEY_COLS}`,
  keyRevoke: `UPDATE api_keys SET revoked_at = coalesce(revoked_at, @now), updated_at = @now WHERE id = @id RETURNING ${KEY_COLS}`,
  keyUsage: `SELECT coalesce(c.queued, 0) AS queued, coalesce(c.running, 0) AS running, coalesce(c.scheduled, 0) AS scheduled,
      coalesce(d.jobs, 0) AS jobsToday, coalesce(d.tokens, 0) AS tokensToday
    FROM (SELECT @key::text AS key_id) x LEFT JOIN key_counts c ON c.key_id = x.key_id
      LEFT JOIN key_days d ON d.key_id = x.key_id AND d.day = @day`,
  auditInsert: `INSERT INTO audit_log (at, actor, action, target, detail) VALUES (@at, @actor, @action, @target, @detail::text)`,
  auditPage: `SELECT id, at, actor, action, target, detail FROM audit_log WHERE id < @before ORDER BY id DESC LIMIT @limit`,
  secretInsert: `INSERT INTO server_secrets (name, value) VALUES (@name, @value) ON CONFLICT (name) DO NOTHING`,
  secretGet: `SELECT value FROM server_secrets WHERE name = @name`,
  turnBySeq: `SELECT seq, prev_seq AS prevSeq, request, result FROM jobs WHERE seq = @seq`,
  failWaiting: `UPDATE jobs SET state = 'failed', waits = 0, error_code = 'previous_failed', error_message = @message,
      finished_at = @now, updated_at = @now
    WHERE prev_seq = @seq AND state = 'queued' AND waits = 1 RETURNING ${TRANSITION_COLS}`,
  conversationTurns: `SELECT seq, id, state, request, result, error_code AS errorCode, error_message AS errorMessage,
      created_at AS createdAt, finished_at AS finishedAt
    FROM jobs WHERE conversation_id = @id ORDER BY seq`,
  conversationById: `SELECT c.id, c.created_at AS createdAt,
      (SELECT key_id FROM jobs WHERE conversation_id = c.id ORDER BY seq LIMIT 1) AS keyId
    FROM conversations c WHERE c.id = @id`,
  conversationsPage: `SELECT c.id, c.created_at AS createdAt, c.last_seq AS lastSeq, j.id AS lastJobId, j.state AS lastState,
      (SELECT count(*) FROM jobs k WHERE k.conversation_id = c.id) AS turns
    FROM conversations c JOIN jobs j ON j.seq = c.last_seq
    WHERE c.last_seq < @before AND (@key::text IS NULL OR j.key_id = @key::text) ORDER BY c.last_seq DESC LIMIT @limit`,
  expiredById: `SELECT 1 AS x FROM expired_jobs WHERE id = @id`,
  expiredInsert: `INSERT INTO expired_jobs (id, at) VALUES (@id, @at) ON CONFLICT (id) DO NOTHING`,
  expiredSweep: `DELETE FROM expired_jobs WHERE id IN (SELECT id FROM expired_jobs WHERE at < @before ORDER BY at LIMIT @limit)`,
  conversationDropIfEmpty: `DELETE FROM conversations WHERE id = @id AND NOT EXISTS (SELECT 1 FROM jobs WHERE conversation_id = @id)`,
  idemGet: `SELECT body_hash AS bodyHash, job_seq AS jobSeq, expires_at AS expiresAt FROM idempotency_keys WHERE key = @key`,
  idemDelete: `DELETE FROM idempotency_keys WHERE key = @key`,
  idemInsert: `INSERT INTO idempotency_keys (key, body_hash, job_seq, expires_at) VALUES (@key, @hash, @seq, @expires)`,
  idemSweep: `DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys WHERE expires_at <= @now LIMIT @limit)`,
  idStateBySeq: `SELECT id, state, scheduled_for AS scheduledFor FROM jobs WHERE seq = @seq`,

  // --- claim (FOR UPDATE SKIP LOCKED: what another instance is claiming is passed over) ---
  claimPick: `SELECT j.seq, k.key_id AS keyId, a.concurrency FROM key_counts k
      LEFT JOIN api_keys a ON a.id = k.key_id
      LEFT JOIN key_served s ON s.key_id = k.key_id
      CROSS JOIN LATERAL (SELECT q.seq, q.priority + q.age_boost AS eff FROM jobs q
        WHERE q.key_id = k.key_id AND q.state = 'queued' AND q.run_at <= @now AND (q.deadline_at IS NULL OR q.deadline_at > @now)
        ORDER BY q.priority + q.age_boost DESC, q.seq LIMIT 1 FOR UPDATE SKIP LOCKED) j
    WHERE k.queued > 0 AND (a.concurrency IS NULL OR k.running < a.concurrency) AND NOT (k.key_id = ANY(@skip::text[]))
    ORDER BY j.eff DESC, coalesce(s.last_served, 0), j.seq LIMIT 1`,
  claimCandidates: `SELECT j.seq, k.key_id AS keyId, j.model, j.eff, coalesce(s.last_served, 0) AS served, j.num_ctx AS numCtx, j.since, a.concurrency
    FROM key_counts k
      LEFT JOIN api_keys a ON a.id = k.key_id
      LEFT JOIN key_served s ON s.key_id = k.key_id
      JOIN model_queue mq ON mq.queued > 0 AND (@any::boolean OR mq.model = ANY(@models::text[]))
      CROSS JOIN LATERAL (SELECT j.seq, j.model, j.priority + j.age_boost AS eff, ${NUM_CTX} AS num_ctx,
          greatest(j.created_at, coalesce(j.scheduled_for, 0)) AS since FROM jobs j
        WHERE j.key_id = k.key_id AND j.model = mq.model AND j.state = 'queued' AND j.run_at <= @now
          AND (j.deadline_at IS NULL OR j.deadline_at > @now)
        ORDER BY j.priority + j.age_boost DESC, j.seq LIMIT 1 FOR UPDATE SKIP LOCKED) j
    WHERE k.queued > 0 AND (a.concurrency IS NULL OR k.running < a.concurrency) AND NOT (k.key_id = ANY(@skip::text[]))`,
  claimSameLoad: `SELECT seq FROM (SELECT j.seq, j.request FROM jobs j
      WHERE j.key_id = @key AND j.model = @model AND j.state = 'queued' AND j.run_at <= @now
        AND (j.deadline_at IS NULL OR j.deadline_at > @now) AND j.priority + j.age_boost = @eff
      ORDER BY j.priority + j.age_boost DESC, j.seq LIMIT 64) x
    WHERE (x.request::jsonb #> '{options,num_ctx}') IS NOT DISTINCT FROM to_jsonb(@ctx::numeric) LIMIT 1`,
  lockQueued: `SELECT seq FROM jobs WHERE seq = @seq AND state = 'queued' FOR UPDATE SKIP LOCKED`,
  // An engine host's slots are counted across instances under this transaction lock (the two-key
  // form: its own key space, apart from the job lines' one-key locks), by its running jobs
  // (jobs_running: at most the cluster's slots, whatever the table holds).
  hostLock: `SELECT pg_advisory_xact_lock(${HOST_LOCK_SPACE}, hashtext(@name)) AS x`,
  hostRunning: `SELECT count(*)::integer AS n FROM jobs WHERE state IN ('loading', 'working') AND lease_expires_at IS NOT NULL AND engine = @name`,
  // The key's slot, checked under its row lock: two instances never both take a key's last slot.
  queuedModels: `SELECT model FROM model_queue WHERE queued > 0 ORDER BY model`,
  failQueuedModel: `UPDATE jobs SET state = 'failed', error_code = @code, error_message = @message, finished_at = @now, updated_at = @now
    WHERE seq IN (SELECT seq FROM jobs WHERE state = 'queued' AND model = @model AND waits = 0 ORDER BY seq LIMIT @limit FOR UPDATE SKIP LOCKED)
    RETURNING ${TRANSITION_COLS}`,
  // What a model's queue holds, for the load-cost tiebreak: its queued count and mean run time.
  modelWork: `SELECT (SELECT queued FROM model_queue WHERE model = @model) AS queued, (SELECT avg_ms FROM model_stats WHERE model = @model) AS avgMs`,
  // A claim, and its key's turn in the fair share (wrapped by \`move\`'s \`recorded\`: and its record).
  claimOne: `WITH u AS (UPDATE jobs SET state = 'loading', attempt = attempt + 1,
        lease_owner = @owner || ':' || seq || ':' || (attempt + 1),
        lease_expires_at = @lease, started_at = coalesce(started_at, @now), updated_at = @now,
        engine = coalesce(@engine::text, engine), instance = @instance
      WHERE seq = @seq AND state = 'queued' AND run_at <= @now AND waits = 0 AND (deadline_at IS NULL OR deadline_at > @now)
      RETURNING ${TRANSITION_COLS}, request, max_attempts, lease_owner, prev_seq),
    s AS (INSERT INTO key_served AS s (key_id, last_served)
        SELECT u.key_id, (SELECT coalesce(max(last_served), 0) + 1 FROM key_served) FROM u
      ON CONFLICT (key_id) DO UPDATE SET last_served = excluded.last_served)
    SELECT * FROM u`,
  heartbeat: `UPDATE jobs SET lease_expires_at = @until WHERE seq = @seq AND lease_owner = @lease AND state IN ('loading', 'working')`,
  toWorking: `UPDATE jobs SET state = 'working', lease_expires_at = @lease_until, updated_at = @now
    WHERE seq = @seq AND state = 'loading' AND lease_owner = @lease RETURNING ${TRANSITION_COLS}`,
  // A finished job with its artifacts and the key's tokens of the day (wrapped by `move`).
  complete: `WITH u AS (UPDATE jobs SET state = 'done', result = @result, finished_at = @now, updated_at = @now,
        lease_owner = NULL, lease_expires_at = NULL, load_ms = @load_ms::double precision, prompt_tokens = @prompt_tokens::integer,
        completion_tokens = @completion_tokens::integer
      WHERE seq = @seq AND state = 'working' AND lease_owner = @lease RETURNING ${TRANSITION_COLS}),
    a AS (INSERT INTO artifacts (job_seq, name, content_type, size, sha256, body, created_at)
      SELECT u.seq, x.name, x.type, x.size, x.sha, x.body, @now FROM u,
        unnest(@names::text[], @types::text[], @sizes::integer[], @shas::text[], @bodies::bytea[]) AS x(name, type, size, sha, body)),
    t AS (INSERT INTO key_days AS d (key_id, day, tokens) SELECT u.key_id, @day, @tokens::bigint FROM u
        WHERE u.key_id <> '' AND @tokens::bigint > 0
      ON CONFLICT (key_id, day) DO UPDATE SET tokens = d.tokens + excluded.tokens)
    SELECT * FROM u`,
  modelStat: `INSERT INTO model_stats AS s (model, avg_ms, samples) VALUES (@model, @ms, 1) ${MODEL_STAT_MERGE}`,
  toFailed: `UPDATE jobs SET state = 'failed', error_code = @code, error_message = @message,
      finished_at = @now, updated_at = @now, lease_owner = NULL, lease_expires_at = NULL
    WHERE seq = @seq AND state IN ('loading', 'working') AND lease_owner = @lease RETURNING ${TRANSITION_COLS}`,
  toQueuedRetry: `UPDATE jobs SET state = 'queued', run_at = @run_at, updated_at = @now, lease_owner = NULL, lease_expires_at = NULL
    WHERE seq = @seq AND state IN ('loading', 'working') AND lease_owner = @lease RETURNING ${TRANSITION_COLS}`,
  toQueuedRelease: `UPDATE jobs SET state = 'queued', run_at = @now, updated_at = @now,
      attempt = greatest(attempt - 1, 0), lease_owner = NULL, lease_expires_at = NULL
    WHERE seq = @seq AND state IN ('loading', 'working') AND lease_owner = @lease RETURNING ${TRANSITION_COLS}`,
  seqStateById: `SELECT seq, state, key_id AS keyId FROM jobs WHERE id = @id`,
  seqStateByIdLocked: `SELECT seq, state, key_id AS keyId FROM jobs WHERE id = @id FOR UPDATE`,
  toCanceled: `UPDATE jobs SET state = 'canceled', finished_at = @now, updated_at = @now, lease_owner = NULL, lease_expires_at = NULL
    WHERE seq = @seq AND state IN ('scheduled', 'queued', 'loading', 'working') RETURNING ${TRANSITION_COLS}`,
  artifactBody: `SELECT body FROM artifacts WHERE job_seq = @seq AND name = @name`,

  // --- maintenance ---
  rescueMine: `UPDATE jobs SET state = 'queued', run_at = @now, updated_at = @now,
      attempt = greatest(attempt - 1, 0), lease_owner = NULL, lease_expires_at = NULL
    WHERE state IN ('loading', 'working') AND lease_owner LIKE @prefix RETURNING ${TRANSITION_COLS}`,
  rescueExpired: `UPDATE jobs SET state = 'queued', run_at = @now, updated_at = @now,
      attempt = greatest(attempt - 1, 0), lease_owner = NULL, lease_expires_at = NULL
    WHERE seq IN (SELECT seq FROM jobs WHERE state IN ('loading', 'working') AND lease_expires_at < @now FOR UPDATE SKIP LOCKED)
    RETURNING ${TRANSITION_COLS}`,
  deliveriesUnclaimExpired: `UPDATE webhook_deliveries SET claimed_by = NULL, claimed_until = NULL
    WHERE claimed_by IS NOT NULL AND claimed_until < @now`,
  staleQueued: `UPDATE jobs SET state = 'failed', error_code = @code, error_message = @message, finished_at = @now, updated_at = @now
    WHERE seq IN (SELECT seq FROM jobs WHERE state = 'queued' AND created_at < @cutoff ORDER BY seq LIMIT @limit FOR UPDATE SKIP LOCKED) RETURNING ${TRANSITION_COLS}`,
  pastDeadline: `UPDATE jobs SET state = 'failed', error_code = 'deadline_exceeded',
      error_message = 'the job was still queued at its deadline', finished_at = @now, updated_at = @now
    WHERE seq IN (SELECT seq FROM jobs WHERE state = 'queued' AND deadline_at IS NOT NULL AND deadline_at <= @now
      ORDER BY deadline_at, seq LIMIT @limit FOR UPDATE SKIP LOCKED)
    RETURNING ${TRANSITION_COLS}`,
  age: `UPDATE jobs SET age_boost = greatest(0, floor((@now - greatest(created_at, coalesce(scheduled_for, 0)))::numeric / @aging)::integer)
    WHERE state = 'queued' AND age_boost <> greatest(0, floor((@now - greatest(created_at, coalesce(scheduled_for, 0)))::numeric / @aging)::integer)`,
  promoteScheduled: `UPDATE jobs SET state = 'queued', run_at = @now, updated_at = @now
    WHERE seq IN (SELECT seq FROM jobs WHERE state = 'scheduled' AND scheduled_for <= @now
      ORDER BY scheduled_for, seq LIMIT 500 FOR UPDATE SKIP LOCKED) RETURNING ${TRANSITION_COLS}`,
  nextScheduled: `SELECT scheduled_for FROM jobs WHERE state = 'scheduled' ORDER BY scheduled_for LIMIT 1`,
  nextRunAt: `SELECT run_at FROM jobs WHERE state = 'queued' AND run_at > @now ORDER BY run_at LIMIT 1`,
  nextDeadline: `SELECT deadline_at FROM jobs WHERE state = 'queued' AND deadline_at IS NOT NULL ORDER BY deadline_at LIMIT 1`,
  // Batch jobs are not the TTL cleaner's: they go with their batch (ADR-0015; index jobs_finished_solo).
  oldestFinished: `SELECT finished_at FROM jobs WHERE state IN ('done', 'failed', 'canceled') AND batch_seq IS NULL ORDER BY finished_at LIMIT 1`,
  sweepPick: `SELECT seq, id, conversation_id AS conversationId FROM jobs j
    WHERE state IN ('done', 'failed', 'canceled') AND batch_seq IS NULL
      AND finished_at < greatest(@cutoff::bigint, @failedCutoff::bigint)
      AND (CASE WHEN state = 'failed' THEN finished_at < @failedCutoff::bigint ELSE finished_at < @cutoff::bigint END)
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.job_seq = j.seq AND d.status = 'pending')
      AND NOT EXISTS (SELECT 1 FROM jobs k WHERE k.prev_seq = j.seq)
    ORDER BY finished_at LIMIT @limit FOR UPDATE SKIP LOCKED`,
  deleteJob: `DELETE FROM jobs WHERE seq = @seq`,

  // --- reads ---
  jobById: `SELECT seq, id, state, model, priority, deadline_at, request, metadata, webhook_url, webhook_events,
      webhook_gone, attempt, max_attempts, created_at, started_at, finished_at, updated_at, result, error_code, error_message,
      conversation_id, waits, load_ms, prompt_tokens, completion_tokens, key_id, scheduled_for, engine, instance, kind,
      (SELECT p.id FROM jobs p WHERE p.seq = jobs.prev_seq) AS prev_id,
      -- Its transitions, artifacts and deliveries in the same statement: one snapshot (a claim
      -- committed between two reads could otherwise show its transition without its instance).
      (SELECT coalesce(json_agg(json_build_object('state', t.state, 'at', t.at, 'attempt', t.attempt) ORDER BY t.n), '[]')
        FROM job_transitions t WHERE t.job_seq = jobs.seq) AS transitions_json,
      (SELECT coalesce(json_agg(json_build_object('name', a.name, 'contentType', a.content_type, 'size', a.size, 'sha256', a.sha256)
          ORDER BY a.name), '[]')
        FROM artifacts a WHERE a.job_seq = jobs.seq) AS artifacts_json,
      (SELECT coalesce(json_agg(json_build_object('id', d.id, 'state', d.state, 'sequence', d.sequence, 'status', d.status,
          'attempts', d.attempts, 'lastStatusCode', d.last_status_code, 'lastError', d.last_error, 'nextAttemptAt', d.next_attempt_at,
          'deliveredAt', d.delivered_at, 'occurredAt', d.occurred_at) ORDER BY d.sequence, d.id), '[]')
        FROM webhook_deliveries d WHERE d.job_seq = jobs.seq) AS deliveries_json
    FROM jobs WHERE id = @id`,
  transitionsSince: `SELECT t.n, t.state, t.at, t.attempt, j.error_code, j.error_message, j.created_at, j.started_at, j.finished_at,
      j.attempt AS run_attempt, j.model, j.conversation_id, j.load_ms, j.prompt_tokens, j.completion_tokens
    FROM job_transitions t JOIN jobs j ON j.seq = t.job_seq WHERE j.id = @id AND t.n > @after ORDER BY t.n`,
  artifact: `SELECT a.name, a.content_type AS contentType, a.size, a.sha256, a.body
    FROM artifacts a JOIN jobs j ON j.seq = a.job_seq WHERE j.id = @id AND a.name = @name`,
  queueAheadHigher: `SELECT model, count(*) AS n FROM jobs WHERE state = 'queued' AND ${EFFECTIVE} > @eff GROUP BY model`,
  queueAheadMine: `SELECT model, count(*) AS n FROM jobs
    WHERE key_id = @key AND state = 'queued' AND ${EFFECTIVE} = @eff AND seq < @seq GROUP BY model`,
  queueAheadOthers: `SELECT x.model, count(*) AS n FROM (
      SELECT model, key_id, row_number() OVER (PARTITION BY key_id ORDER BY seq) AS rn, min(seq) OVER (PARTITION BY key_id) AS head
      FROM jobs WHERE state = 'queued' AND ${EFFECTIVE} = @eff AND key_id <> @key) x
    LEFT JOIN key_served k ON k.key_id = x.key_id
    WHERE x.rn <= @mine + (coalesce(k.last_served, 0) < @served OR (coalesce(k.last_served, 0) = @served AND x.head < @head))::int GROUP BY x.model`,
  queueHeadOf: `SELECT min(seq) AS head FROM jobs WHERE key_id = @key AND state = 'queued' AND ${EFFECTIVE} = @eff`,
  queueOf: `SELECT j.priority + j.age_boost AS eff, j.key_id AS key, coalesce(k.last_served, 0) AS served
    FROM jobs j LEFT JOIN key_served k ON k.key_id = j.key_id WHERE j.seq = @seq`,
  running: `SELECT model, started_at AS startedAt FROM jobs WHERE state IN ('loading', 'working')`,
  modelStats: `SELECT model, avg_ms AS avgMs FROM model_stats`,
  seqCreatedBefore: `SELECT seq FROM jobs WHERE created_at < @at ORDER BY created_at DESC, seq DESC LIMIT 1`,
  seqCreatedAtOrAfter: `SELECT seq FROM jobs WHERE created_at >= @at ORDER BY created_at, seq LIMIT 1`,
  activeByStateModel: `SELECT state, model, count(*) AS n FROM jobs
    WHERE state IN ('scheduled', 'queued', 'loading', 'working') GROUP BY state, model`,
  pendingStats: `SELECT count(*) AS count, min(occurred_at) AS oldestOccurredAt FROM webhook_deliveries WHERE status = 'pending'`,

  // --- webhook outbox: heads of each job's line are due; a claim is a lease in the row ---
  // The whole claim in one statement: the origins with an unclaimed head and room below the cap
  // (the distinct origins by a loose index scan of webhook_deliveries_origin_due, one step per
  // origin, then each one's first unclaimed head; cost: origins, not the backlog, ADR-0010), each
  // one's due heads up to its room claimed (SKIP LOCKED, the lease condition), what their sends
  // need, and, on every row, when the first head not due yet falls due (nextDue). One row with a
  // NULL id when nothing was claimed.
  claimDue: `WITH RECURSIVE o(origin) AS (
      (SELECT origin FROM webhook_deliveries WHERE due_at IS NOT NULL ORDER BY origin LIMIT 1)
      UNION ALL
      SELECT (SELECT w.origin FROM webhook_deliveries w WHERE w.due_at IS NOT NULL AND w.origin > o.origin ORDER BY w.origin LIMIT 1)
      FROM o WHERE o.origin IS NOT NULL),
    every AS MATERIALIZED (SELECT o.origin, h.due_at, a.n AS active FROM o
      CROSS JOIN LATERAL (SELECT w.due_at FROM webhook_deliveries w
        WHERE w.origin = o.origin AND w.due_at IS NOT NULL AND (w.claimed_by IS NULL OR w.claimed_until <= @now)
        ORDER BY w.due_at, w.id LIMIT 1) h
      CROSS JOIN LATERAL (SELECT count(*) AS n FROM webhook_deliveries c
        WHERE c.origin = o.origin AND c.claimed_by IS NOT NULL AND c.claimed_until > @now) a
      WHERE o.origin IS NOT NULL),
    heads AS (SELECT * FROM every WHERE active < @cap),
    pick AS (SELECT x.id, hh.origin FROM (SELECT * FROM heads WHERE due_at <= @now ORDER BY due_at LIMIT @n) hh
      CROSS JOIN LATERAL (SELECT w.id, w.due_at FROM webhook_deliveries w
        WHERE w.origin = hh.origin AND w.due_at IS NOT NULL AND w.due_at <= @now AND (w.claimed_by IS NULL OR w.claimed_until <= @now)
        ORDER BY w.due_at, w.id LIMIT least(@cap - hh.active, @n) FOR UPDATE SKIP LOCKED) x
      ORDER BY x.due_at, x.id LIMIT @n),
    got AS (UPDATE webhook_deliveries w SET claimed_by = @by, claimed_until = @until FROM pick WHERE w.id = pick.id RETURNING w.*)
    SELECT (SELECT min(due_at) FROM heads WHERE due_at > @now) AS nextDue,
      EXISTS (SELECT 1 FROM every e WHERE e.active + (SELECT count(*) FROM pick p WHERE p.origin = e.origin) >= @cap) AS capped,
      ${DUE_COLS}, ${ARTS}
    FROM (SELECT 1) one LEFT JOIN (got d LEFT JOIN jobs j ON j.seq = d.job_seq LEFT JOIN batches b ON b.seq = d.batch_seq) ON true
    ORDER BY d.due_at, d.id`,
  // Rows this instance claimed on write (ADR-0017), still its own for at least half the lease, with what their sends need.
  claimedMine: `SELECT ${DUE_COLS}, ${ARTS} FROM webhook_deliveries d JOIN jobs j ON j.seq = d.job_seq LEFT JOIN batches b ON b.seq = d.batch_seq
    WHERE d.id = ANY(@ids::bigint[]) AND d.status = 'pending' AND d.claimed_by = @by AND d.claimed_until >= @fresh
    ORDER BY array_position(@ids::bigint[], d.id)`,
  // One statement: the instance's view, and the views long out of use gone (ADR-0011).
  instanceEnginesPut: `WITH gone AS (DELETE FROM instance_engines WHERE seen_at < @deleteBefore AND instance_id <> @id),
    put AS (INSERT INTO instance_engines (instance_id, seen_at, all_up, down_since, any_model, models, hosts, tags)
      VALUES (@id, @now, @allUp, @downSince::bigint, @anyModel, @models::text[], @hosts::jsonb, @tags::jsonb)
      ON CONFLICT (instance_id) DO UPDATE SET seen_at = excluded.seen_at, all_up = excluded.all_up,
        down_since = excluded.down_since, any_model = excluded.any_model, models = excluded.models, hosts = excluded.hosts,
        tags = excluded.tags)
    SELECT count(*)::integer AS others FROM instance_engines WHERE instance_id <> @id AND seen_at >= @freshSince`,
  instanceEnginesList: `SELECT instance_id AS instance, seen_at AS seenAt, all_up AS allUp, down_since AS downSince,
      any_model AS anyModel, models, hosts, tags
    FROM instance_engines WHERE instance_id <> @id AND seen_at >= @since ORDER BY instance_id`,
  // A delivery's outcome and its line's next head, in one call (migrations 0006, 0012, 0017): only
  // the claim's holder (or anyone, when nobody holds it) records an outcome.
  recordDelivery: `SELECT foreman_delivery_outcome(@id, @now, @kind, @code::integer, @next::bigint, @error::text, @notify::text, @by) AS seq`,
  recordDeliveredClaimNext: `SELECT recorded, id, job_seq AS jobSeq, state, sequence, url, origin, occurred_at AS occurredAt,
      attempts, job_id AS jobId, metadata, error_code AS errorCode, error_message AS errorMessage, created_at, started_at,
      finished_at, attempt, model, conversation_id, load_ms, prompt_tokens, completion_tokens, arts, head_left AS headLeft
    FROM foreman_delivered_claim_next(@id, @now, @code::integer, @notify::text, @by, @until, @inline)`,
  // The job's next event once the one before it is recorded, claimed, with what its send needs.
  // The event right after the acknowledged one in its job's line: the lowest pending event other
  // than it, and only if that comes after it and is due by now (never one past an earlier event
  // that is not due yet, or pending again after a redelivery).
  claimNextOfJob: `WITH cur AS (SELECT id, job_seq, sequence FROM webhook_deliveries WHERE id = @id),
      nxt AS (SELECT d.id, d.sequence, d.next_attempt_at FROM cur JOIN webhook_deliveries d ON d.job_seq = cur.job_seq AND d.id <> cur.id
        WHERE d.status = 'pending'
        ORDER BY d.sequence, d.id LIMIT 1 FOR UPDATE OF d),
      got AS (UPDATE webhook_deliveries w SET claimed_by = @by, claimed_until = @until FROM nxt, cur
        WHERE w.id = nxt.id AND nxt.sequence > cur.sequence AND nxt.next_attempt_at <= @now
          AND (w.claimed_by IS NULL OR w.claimed_until <= @now) RETURNING w.*)
    SELECT ${DUE_COLS}, ${ARTS} FROM got d JOIN jobs j ON j.seq = d.job_seq LEFT JOIN batches b ON b.seq = d.batch_seq`,
  // When the next unclaimed head of an origin below its cap becomes due (same loose scan).
  nextDue: `WITH RECURSIVE o(origin) AS (
      (SELECT origin FROM webhook_deliveries WHERE due_at IS NOT NULL ORDER BY origin LIMIT 1)
      UNION ALL
      SELECT (SELECT w.origin FROM webhook_deliveries w WHERE w.due_at IS NOT NULL AND w.origin > o.origin ORDER BY w.origin LIMIT 1)
      FROM o WHERE o.origin IS NOT NULL)
    SELECT h.due_at AS dueAt FROM o
      CROSS JOIN LATERAL (SELECT w.due_at FROM webhook_deliveries w
        WHERE w.origin = o.origin AND w.due_at IS NOT NULL AND (w.claimed_by IS NULL OR w.claimed_until <= @now)
        ORDER BY w.due_at, w.id LIMIT 1) h
    WHERE o.origin IS NOT NULL
      AND (SELECT count(*) FROM webhook_deliveries c WHERE c.origin = o.origin AND c.claimed_by IS NOT NULL AND c.claimed_until > @now) < @cap
    ORDER BY h.due_at LIMIT 1`,
  deliveryUnclaim: `UPDATE webhook_deliveries SET claimed_by = NULL, claimed_until = NULL WHERE id = @id AND claimed_by = @by`,
  redeliver: `UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = @now, delivered_at = NULL
    WHERE job_seq = @seq AND status <> 'pending' AND ((@state::text IS NULL AND status = 'failed') OR state = @state::text)
    RETURNING state, origin`,
  ungone: `UPDATE jobs SET webhook_gone = 0 WHERE seq = @seq`,
  // A job's delivery line (which row is its head) changes under this transaction lock: a new event
  // and the outcome of the one before it never commit past each other unseen (under READ
  // COMMITTED each could miss the other and leave the new row never due). An advisory lock, not
  // the job's row lock, so a claim's SKIP LOCKED never passes over a queued job because of it.
  lineRefresh: `SELECT foreman_line_refresh(@seq) AS x`,
  lineLock: `SELECT pg_advisory_xact_lock(-(@seq::bigint)) AS x`,
};

/**
 * `complete` with the model's average run time in the same statement, for an instance alone on
 * the database (one statement, its own transaction: the stat row's lock lasts to its commit, no
 * longer, and the completion saves a round trip; see jobComplete).
 */
const COMPLETE_WITH_STAT = (() => {
  const sql = Q.complete.replace(/\n    SELECT \* FROM u$/, `,
    s AS (INSERT INTO model_stats AS s (model, avg_ms, samples) SELECT u.model, @ms::double precision, 1 FROM u ${MODEL_STAT_MERGE})
    SELECT * FROM u`);
  if (sql === Q.complete) throw new Error('complete does not end with SELECT * FROM u');
  return sql;
})();

/**
 * `insertJob` that inserts only far from the caps (FOREMAN_MAX_QUEUED, _BYTES, less the margin
 * for submits in flight): the one-statement submit. No row back: the general path decides.
 */
const INSERT_FAR_FROM_CAPS = (() => {
  const sql = Q.insertJob.replace(/VALUES \(([\s\S]*?)\)\n      RETURNING/,
      `SELECT @id::text, @state::text, @model::text, @request::text, @metadata::text, @webhook_url::text, @webhook_events::text,
        @max_attempts::integer, @priority::integer, @deadline_at::bigint, @run_at::bigint, @now::bigint, @now::bigint, @conversation_id::text,
        @prev_seq::bigint, @waits::integer, @key_id::text, @scheduled_for::bigint, @kind::text, @webhook_origin::text,
        @batch_seq::bigint
      FROM job_counts q WHERE q.state = 'queued' AND q.n + 1 + @margin_jobs::bigint < @max_queued::bigint
        AND (@max_bytes::bigint IS NULL OR q.bytes + @size::bigint + @margin_bytes::bigint < @max_bytes::bigint)
      RETURNING`,
  );
  if (sql === Q.insertJob) throw new Error('insertJob has no VALUES list to turn into a guarded SELECT');
  return sql;
})();

/**
 * The PostgreSQL driver (ADR-0011): any number of instances share one database. Every write is
 * one transaction on a pooled connection; claims take rows with FOR UPDATE SKIP LOCKED; webhook
 * claims are leases in the table. Effects are announced in process after COMMIT, and to the other
 * instances by NOTIFY (sent in the same transaction, so delivered only if it commits).
 */
export class PostgresDriver implements QueueDriver {
  readonly name = 'postgres';
  readonly notifier: Notifier;
  readonly instanceId: string;
  readonly pool: pg.Pool;
  /** Settles once the schema is migrated; rejects with a start-up error naming the variable. */
  readonly ready: Promise<void>;
  private readonly sql = new SqlCache();
  private readonly conn: Conn;
  private readonly cluster: ClusterNotifier | null;
  private readonly local: LocalNotifier;
  private readonly deliveryLeaseMs: number;
  /** The local dispatcher, while it takes rows claimed on write (ADR-0017). */
  private claimOnWrite: { perOriginLimit: number; want: () => boolean } | null = null;
  private closed = false;
  private claims = 0;
  private readonly wrapped = new Map<string, string>();
  /** The NOTIFY payload that tells the other instances a webhook slot is free (null: no cluster). */
  private readonly slotFreed: string | null;
  /** Files and batches (ADR-0015): their SQL and method bodies are in files.ts, in this driver's transactions. */
  private readonly fb = new PgFilesBatches({
    tx: (op) => this.tx(op),
    read: (fn) => this.read(fn),
    moveAll: (c, fx, sql, params, state, now) => this.moveAll(c, fx, sql, params, state, now),
    insertJobs: (c, fx, p, stopAtRefusal) => this.insertJobs(c, fx, p, stopAtRefusal),
    transitionCols: TRANSITION_COLS,
  });

  constructor(private readonly opts: PostgresDriverOptions) {
    this.instanceId = opts.instanceId ?? `${os.hostname()}-${process.pid}`;
    this.deliveryLeaseMs = opts.deliveryLeaseMs ?? 60_000;
    this.pool = new pg.Pool({
      // Its session options include jit=off: short OLTP statements, and JIT compiling one (the
      // planner's guess of a claim's cost on a young table crosses jit_above_cost) took ~100 ms
      // per claim. ADR-0011.
      ...connectionConfig(opts.url),
      max: opts.poolSize ?? 10,
      connectionTimeoutMillis: opts.connectTimeoutMs ?? 5_000,
      // A statement with no answer by then fails (StorageUnavailable) and its connection is thrown
      // away: a connection gone silent (a failover, a firewall that lost its state) would
      // otherwise hold a request until TCP gives up, ~15 minutes (ADR-0011, "Bad conditions").
      query_timeout: opts.queryTimeoutMs ?? QUERY_TIMEOUT_MS,
      idleTimeoutMillis: 30_000,
      types: pgTypes,
      application_name: `foreman ${this.instanceId}`.slice(0, 63),
    });
    // An idle client's connection dropping (server restart) must not crash the process.
    this.pool.on('error', () => {});
    // A checked-out connection the server ends between two statements (a restart) errors on the
    // client itself: its transaction's next query fails (StorageUnavailable); nothing is thrown
    // unhandled.
    this.pool.on('connect', (client) => client.on('error', () => {}));
    this.conn = new Conn(this.pool, this.sql);
    this.local = opts.notifier instanceof LocalNotifier ? opts.notifier : new LocalNotifier();
    this.cluster =
      opts.crossInstance === false
        ? null
        : new ClusterNotifier({
            url: opts.url,
            instanceId: this.instanceId,
            local: this.local,
            types: pgTypes,
            ...(opts.heartbeatMs !== undefined ? { heartbeatMs: opts.heartbeatMs } : {}),
            ...(opts.deltaCoalesceMs !== undefined ? { deltaCoalesceMs: opts.deltaCoalesceMs } : {}),
            ...(opts.onDuplicateId ? { onDuplicateId: opts.onDuplicateId } : {}),
          });
    this.notifier = this.local;
    this.local.on('stateChanged', (e) => {
      // A job that ends or goes back to the queue (here or on another instance) frees a slot of
      // its host: wake the worker if it waits for that host.
      if (e.engine !== undefined && this.hostWaiting.delete(e.engine)) this.local.emit('jobReady');
    });
    this.slotFreed = this.cluster ? payloadsOf(this.cluster.sender, { ...noEffects(), deliveryReady: true })[0]! : null;
    this.ready = this.init();
    this.ready.catch(() => {}); // observed by recover() and every call
  }

  private async init(): Promise<void> {
    // Migrations on a connection of their own: they may wait for another instance's (the
    // advisory lock) and take longer than the pool's query timeout allows a statement.
    const client = new pg.Client({ ...connectionConfig(this.opts.url), connectionTimeoutMillis: this.opts.connectTimeoutMs ?? 5_000 });
    client.on('error', () => {});
    try {
      await client.connect();
    } catch (err) {
      await client.end().catch(() => {});
      throw new StorageUnavailable(`FOREMAN_DATABASE_URL: cannot connect to ${redactUrl(this.opts.url)}: ${(err as Error).message}`, err);
    }
    try {
      await migrate(client);
    } finally {
      await client.end().catch(() => {});
    }
    if (this.cluster) await this.cluster.start();
  }

  /** Hosts a claim was cut short on (their slots in use elsewhere): a job that frees one wakes the worker. */
  private readonly hostWaiting = new Set<string>();

  /** Whether the last engine view this instance put found another instance's fresh one. */
  private othersInTable = false;

  /**
   * No other instance is there: none is heard on the channel (or none can be: crossInstance off),
   * and none keeps a fresh engine view. Writes need not NOTIFY, and claims need not count a host's
   * slots elsewhere.
   */
  private get alone(): boolean {
    return (this.cluster === null || !this.cluster.peers) && !this.othersInTable;
  }

  /** Whether the LISTEN connection is up (a lost one means wake-ups fall back to polling). */
  get listening(): boolean {
    return this.cluster?.connected ?? false;
  }

  private announce(fx: Effects): void {
    const n = this.local;
    if (fx.deliveryReady) n.emit('deliveryReady');
    if (fx.batchReady) n.emit('batchReady');
    if (fx.claimed.length > 0) n.emit('deliveriesClaimed', fx.claimed);
    if (fx.jobReady) n.emit('jobReady');
    for (const e of fx.transitions) n.emit('stateChanged', e);
    for (const id of fx.canceled) n.emit('cancelRequested', id);
  }

  /**
   * A write: one transaction on one pooled connection; deadlocks and serialization failures run
   * it again (a few times). Effects go to the other instances by NOTIFY inside the transaction, and
   * to this one's listeners after COMMIT.
   */
  private async tx<T>(op: (c: Conn, fx: Effects) => Promise<T>): Promise<T> {
    await this.ready;
    for (let attempt = 0; ; attempt++) {
      const t0 = performance.now();
      let client: pg.PoolClient;
      try {
        client = await this.pool.connect();
      } catch (err) {
        throw new StorageUnavailable(`storage unavailable: ${(err as Error).message}`, err);
      }
      const c = new Conn(client, this.sql);
      const fx = noEffects();
      let broken = false;
      let deltas: Map<string, unknown[]> | null = null;
      try {
        await client.query('BEGIN');
        const out = await op(c, fx);
        if (this.cluster?.peers) {
          // A job's last tokens reach other instances' watchers before its next state does: both
          // are sent at this commit, the tokens first.
          if (fx.transitions.length > 0 && this.cluster.deltasPending) {
            deltas = await this.cluster.sendDeltasIn(client, fx.transitions.map((t) => t.jobId));
          }
          await this.cluster.publish(client, fx);
        }
        await client.query('COMMIT');
        client.release();
        this.opts.onCommit?.(1, performance.now() - t0);
        this.announce(fx);
        return out;
      } catch (err) {
        if (deltas) this.cluster?.restoreDeltas(deltas);
        broken = isConnectionError(err);
        if (!broken) await client.query('ROLLBACK').catch(() => (broken = true));
        client.release(broken ? (err as Error) : undefined);
        const again = isRetryable(err) || isIdempotencyRace(err);
        if (again && attempt < 5) continue;
        throw domainError(err);
      }
    }
  }

  /** A read on any pooled connection, outside a transaction. */
  private async read<T>(fn: (c: Conn) => Promise<T>): Promise<T> {
    await this.ready;
    try {
      return await fn(this.conn);
    } catch (err) {
      throw domainError(err);
    }
  }

  /**
   * One statement on any pooled connection, in its own (implicit) transaction: a write that is a
   * single statement needs no BEGIN and COMMIT round trips. Deadlocks run it again.
   */
  private async single<T>(fn: (c: Conn) => Promise<T>): Promise<T> {
    await this.ready;
    for (let attempt = 0; ; attempt++) {
      const t0 = performance.now();
      try {
        const out = await fn(this.conn);
        this.opts.onCommit?.(1, performance.now() - t0);
        return out;
      } catch (err) {
        if (isRetryable(err) && attempt < 5) continue;
        throw domainError(err);
      }
    }
  }

  /**
   * A write that is one statement, when no other instance listens (nothing to NOTIFY): in its own
   * implicit transaction, without the BEGIN and COMMIT round trips. Effects as after a commit.
   */
  private async solo<T>(op: (c: Conn, fx: Effects) => Promise<T>): Promise<T> {
    let fx = noEffects();
    const out = await this.single((c) => {
      fx = noEffects();
      return op(c, fx);
    });
    this.announce(fx);
    return out;
  }

  // --- transitions ---

  /**
   * A transition's effects, once the statement that changed the job has recorded it (`recorded`:
   * its transition row, what a `done` releases and its outbox row): the events, and what a failed
   * or canceled job's waiting turns become.
   */
  private async record(c: Conn, fx: Effects, row: TransitionRow & Recorded, state: JobState, now: number): Promise<void> {
    const ev: TransitionEvent = { jobId: row.id, state, model: row.model, n: row.rec_n, at: now, attempt: row.attempt };
    if (state === 'failed') ev.error = { code: row.error_code ?? 'unknown', message: row.error_message ?? '' };
    if (isTerminal(state)) ev.run = runOf(row);
    // A slot of this host is free now (if the job held one: it ran, and ends or is queued again).
    if ((isTerminal(state) || state === 'queued') && row.engine !== null && row.started_at !== null) ev.engine = row.engine;
    fx.transitions.push(ev);
    if (state === 'queued' || row.rec_released > 0) fx.jobReady = true;
    if (row.rec_claimed != null) fx.claimed.push(row.rec_claimed);
    else if (row.rec_due != null) fx.deliveryReady = true;
    if (state === 'failed' || state === 'canceled') {
      const message = `the job this one continues (${row.id}) ended ${state}`;
      await this.moveAll(c, fx, Q.failWaiting, { seq: row.seq, now, message }, 'failed', now);
    }
    // A batch's last job to end ended the batch in the same statement (ADR-0015, migration 0004): its event is due.
    if (row.batch_seq !== null && isTerminal(state)) {
      // A read after the transition; in a single-statement write (alone) that statement has
      // committed already, so a failure here must not fail the write: wake the dispatcher instead.
      await this.fb.jobEnded(c, fx, row.batch_seq).catch(() => {
        fx.deliveryReady = true;
      });
    }
  }

  /**
   * `sql` (an UPDATE … RETURNING the transition columns, or a WITH whose CTE `u` is that UPDATE and
   * whose main query is `SELECT * FROM u`) and each changed job's record, in one statement.
   */
  private recorded(sql: string, state: JobState): string {
    const key = `${state}\0${sql}`;
    let w = this.wrapped.get(key);
    if (w === undefined) {
      const select = `SELECT u.*, r.rec_n, r.rec_due, r.rec_released, r.rec_claimed FROM u
        CROSS JOIN LATERAL foreman_record_claim(u.seq, '${state}', @rec_now, u.attempt, u.webhook_url, u.webhook_origin, u.webhook_gone,
          u.webhook_events, @rec_by::text, @rec_until::bigint, @rec_cap::integer) r`;
      if (!sql.startsWith('WITH ')) w = `WITH u AS (${sql}) ${select}`;
      else if (sql.endsWith('SELECT * FROM u')) w = `${sql.slice(0, -'SELECT * FROM u'.length)}${select}`;
      else throw new Error('a recorded statement that is a WITH must end with SELECT * FROM u');
      this.wrapped.set(key, w);
    }
    return w;
  }

  /** The parameters of `foreman_record_claim` beyond the row's: who claims a due event on write, if anybody (ADR-0017). */
  private recordParams(now: number): Record<string, unknown> {
    const w = this.claimOnWrite;
    const by = w !== null && w.want() ? this.instanceId : null;
    return { rec_now: now, rec_by: by, rec_until: now + this.deliveryLeaseMs, rec_cap: w?.perOriginLimit ?? 0 };
  }

  private async move(c: Conn, fx: Effects, sql: string, params: Record<string, unknown>, state: JobState, now: number): Promise<TransitionRow | undefined> {
    const row = await c.get<TransitionRow & Recorded>(this.recorded(sql, state), { ...params, ...this.recordParams(now) });
    if (row) await this.record(c, fx, row, state, now);
    return row;
  }

  private async moveAll(c: Conn, fx: Effects, sql: string, params: Record<string, unknown>, state: JobState, now: number): Promise<string[]> {
    // Many rows at once (a sweep, a promotion, a rescue): the dispatcher's room is for a few, so
    // none of their events is claimed on write; they are announced due and claimed as it can.
    const rows = await c.all<TransitionRow & Recorded>(this.recorded(sql, state), { ...params, ...this.recordParams(now), rec_by: null });
    for (const r of rows) await this.record(c, fx, r, state, now);
    return rows.map((r) => r.id);
  }

  /**
   * Shared database: other instances' running jobs are left to the rescuer (after their lease
   * expires). Jobs whose lease carries this instance's id were this instance's before a restart
   * (a fixed FOREMAN_INSTANCE_ID): those are re-queued at once.
   */
  async recover(p: { now: number }): Promise<{ requeued: string[] }> {
    await this.ready;
    const requeued = await this.tx((c, fx) => this.moveAll(c, fx, Q.rescueMine, { now: p.now, prefix: `${likeEscape(this.instanceId)}/%` }, 'queued', p.now));
    return { requeued };
  }

  /** Token deltas of this instance's running jobs, coalesced, to watchers on the other instances. */
  relayDelta(jobId: string, chunk: unknown): void {
    this.cluster?.relayDelta(jobId, chunk);
  }

  /** Other instances' token deltas. */
  onRemoteDelta(fn: (jobId: string, chunk: unknown) => void): () => void {
    return this.cluster ? this.cluster.onDelta(fn) : () => {};
  }

  leadership(onChange: (leader: boolean) => void, intervalMs = 1000): () => Promise<void> {
    const e = new LeaderElection({ url: this.opts.url, instanceId: this.instanceId, intervalMs, onChange });
    e.start();
    return () => e.stop();
  }

  async ping(): Promise<boolean> {
    return this.read(async (c) => (await c.one<number>('SELECT 1 AS one')) === 1);
  }

  async serverTime(): Promise<number> {
    // clock_timestamp(): the time of this read, not of the transaction's start (now()).
    return this.read(async (c) => (await c.one<number>('SELECT (extract(epoch FROM clock_timestamp()) * 1000)::float8 AS ms'))!);
  }

  async instanceEnginesPut(p: { now: number; view: EngineView; deleteBefore: number; freshSince: number }): Promise<{ others: number }> {
    const v = p.view;
    const others = await this.single((c) =>
      c.one<number>(Q.instanceEnginesPut, {
        id: this.instanceId,
        now: p.now,
        allUp: v.allUp,
        downSince: v.downSince,
        anyModel: v.anyModel,
        models: v.models,
        hosts: JSON.stringify(v.hosts),
        tags: JSON.stringify(v.tags),
        deleteBefore: p.deleteBefore,
        freshSince: p.freshSince,
      }),
    );
    // Another instance keeps its view fresh: it is there even if this one does not hear its
    // heartbeats (its LISTEN connection, or ours, is down), so claims count a host's slots across
    // the cluster (ADR-0011).
    this.othersInTable = (others ?? 0) > 0;
    return { others: others ?? 0 };
  }

  instanceEnginesList(p: { now: number; maxAgeMs: number }): Promise<InstanceEngineView[]> {
    return this.read((c) => c.all<InstanceEngineView>(Q.instanceEnginesList, { id: this.instanceId, since: p.now - p.maxAgeMs }));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.ready.catch(() => {});
    await this.cluster?.stop();
    await this.pool.end();
  }

  async jobsInsert(p: { jobs: NewJob[]; now: number; maxQueued: number; maxQueuedBytes?: number }): Promise<InsertOutcome[]> {
    const j = p.jobs[0];
    if (p.jobs.length === 1 && j && !j.idempotency && !j.quota && !j.previous && !j.clampedFrom && this.alone) {
      // The common submit, with no other instance to tell: one statement, which inserts only far
      // from the caps (else nothing, and the general path below decides).
      const request = JSON.stringify(j.request);
      const fx = noEffects();
      const row = await this.single((c) =>
        c.get<TransitionRow & Recorded>(this.recorded(INSERT_FAR_FROM_CAPS, 'queued'), {
          ...insertParams(j, { now: p.now, state: 'queued', request, keyId: j.keyId ?? '', waits: 0, scheduledFor: null }),
          ...this.recordParams(p.now),
          max_queued: p.maxQueued,
          max_bytes: p.maxQueuedBytes ?? null,
          size: Buffer.byteLength(request, 'utf8'),
          margin_jobs: CAP_MARGIN_JOBS,
          margin_bytes: CAP_MARGIN_BYTES,
        }),
      );
      if (row) {
        await this.record(this.conn, fx, row, 'queued', p.now);
        this.announce(fx);
        return [{ ok: true, jobId: j.id, replayed: false, state: 'queued', scheduledFor: null }];
      }
    }
    return this.tx((c, fx) => this.insertJobs(c, fx, p));
  }

  /** Inserts jobs in the caller's transaction; `stopAtRefusal`: stop at the first refused one (a batch's chunk). */
  private async insertJobs(c: Conn, fx: Effects, p: { jobs: NewJob[]; now: number; maxQueued: number; maxQueuedBytes?: number }, stopAtRefusal = false): Promise<InsertOutcome[]> {
    {
      const { now } = p;
      let counts = (await c.get<{ n: number; bytes: number }>(Q.countQueued))!;
      const incoming = p.jobs.reduce((a, j) => a + Buffer.byteLength(JSON.stringify(j.request)), 0);
      // Near a cap, concurrent submits (from every instance) take turns, and the count is read
      // again once every earlier near-cap submit has committed. Far from it, the margin covers
      // the submits still in flight.
      if (counts.n + p.jobs.length + CAP_MARGIN_JOBS >= p.maxQueued || (p.maxQueuedBytes !== undefined && counts.bytes + incoming + CAP_MARGIN_BYTES >= p.maxQueuedBytes)) {
        await c.run(Q.capLock);
        counts = (await c.get<{ n: number; bytes: number }>(Q.countQueued))!;
      }
      let queued = counts.n;
      let bytes = counts.bytes;
      const out: InsertOutcome[] = [];
      for (const j of p.jobs) {
        if (stopAtRefusal && out.length > 0 && !out[out.length - 1]!.ok) break;
        if (j.idempotency) {
          const prior = await c.get<{ bodyHash: string; jobSeq: number; expiresAt: number }>(Q.idemGet, { key: j.idempotency.key });
          if (prior && prior.expiresAt > now) {
            const job = (await c.get<{ id: string; state: JobState; scheduledFor: number | null }>(Q.idStateBySeq, { seq: prior.jobSeq }))!;
            out.push(
              prior.bodyHash === j.idempotency.bodyHash
                ? { ok: true, jobId: job.id, replayed: true, state: job.state, scheduledFor: job.scheduledFor }
                : { ok: false, code: 'idempotency_key_reused' },
            );
            continue;
          }
          if (prior) await c.run(Q.idemDelete, { key: j.idempotency.key });
        }
        if (queued >= p.maxQueued) {
          out.push({ ok: false, code: 'queue_full' });
          continue;
        }
        const keyId = j.keyId ?? '';
        let scheduledFor: number | null = null;
        if (j.quota) {
          if (j.quota.maxQueued !== null && ((await c.one<number>(Q.keyQueued, { key: keyId })) ?? 0) >= j.quota.maxQueued) {
            out.push({ ok: false, code: 'key_queue_full' });
            continue;
          }
          if (j.quota.dailyLimit !== null && ((await c.one<number>(Q.keyDayJobs, { key: keyId, day: j.quota.day })) ?? 0) >= j.quota.dailyLimit) {
            if (j.quota.refuseOverDaily) {
              out.push({ ok: false, code: 'key_daily_limit', nextDayAt: j.quota.nextDayAt });
              continue;
            }
            scheduledFor = j.quota.nextDayAt;
          }
        }
        const request = JSON.stringify(j.request);
        const size = Buffer.byteLength(request, 'utf8');
        if (p.maxQueuedBytes !== undefined && bytes + size > p.maxQueuedBytes) {
          out.push({ ok: false, code: 'queue_bytes_full' });
          continue;
        }
        let waits = 0;
        if (j.previous) {
          const prevState = (await c.get<{ state: JobState }>(Q.idStateBySeq, { seq: j.previous.seq }))?.state;
          const running = prevState === 'queued' || prevState === 'loading' || prevState === 'working';
          if (prevState !== 'done' && !(running && j.previous.wait)) {
            out.push({ ok: false, code: 'previous_not_ready', state: prevState ?? 'canceled' });
            continue;
          }
          if (running) waits = 1;
        }
        const state = scheduledFor === null ? 'queued' : 'scheduled';
        const row = (await this.move(c, fx, Q.insertJob, insertParams(j, { now, state, request, keyId, waits, scheduledFor }), state, now))!;
        if (keyId !== '' && j.quota) await c.run(Q.keyDayAddJob, { key: keyId, day: j.quota.day });
        if (j.clampedFrom) {
          await this.audit(c, now, j.clampedFrom.actor, 'job.priority_clamped', j.id, { asked: j.clampedFrom.priority, given: j.priority });
        }
        if (j.idempotency) {
          await c.run(Q.idemInsert, { key: j.idempotency.key, hash: j.idempotency.bodyHash, seq: row.seq, expires: j.idempotency.expiresAt });
        }
        queued++;
        bytes += size;
        out.push({ ok: true, jobId: j.id, replayed: false, state, scheduledFor });
      }
      return out;
    }
  }

  async jobsClaim(p: { owner: string; limit: number; now: number; leaseMs: number; engine?: ClaimHost }): Promise<ClaimedJob[]> {
    const owner = `${this.instanceId}/${p.owner}.${++this.claims}`;
    const host = p.engine;
    if (host?.slots !== undefined && !this.alone) {
      // Other instances may use this host too (by its name): its free slots are its slots less its jobs
      // running anywhere, counted and taken under the host's lock. A read first, without the
      // lock: when every instance waits for the one slot a job just freed, the losers stop here.
      const busy = (await this.read((c) => c.one<number>(Q.hostRunning, { name: host.name }))) ?? 0;
      if (busy >= host.slots!) {
        this.hostWaiting.add(host.name);
        return [];
      }
      return this.tx(async (c, fx) => {
        await c.run(Q.hostLock, { name: host.name });
        const room = Math.min(p.limit, host.slots! - ((await c.one<number>(Q.hostRunning, { name: host.name })) ?? 0));
        if (room < p.limit) this.hostWaiting.add(host.name);
        return room <= 0 ? [] : (await this.claimSome(c, fx, { ...p, limit: room }, owner, true))!;
      });
    }
    if (this.alone) {
      // Alone on the database: the pick is a read and each claim one statement, no transaction
      // (a job another claim of this instance took meanwhile is not claimable any more: the
      // claim's own WHERE says so). A key with a concurrency limit needs its lock: a transaction.
      const fx = noEffects();
      try {
        const got = await this.claimSome(this.conn, fx, p, owner, false);
        if (got !== null) return got;
      } catch (err) {
        throw domainError(err);
      } finally {
        this.announce(fx);
      }
    }
    return this.tx(async (c, fx) => (await this.claimSome(c, fx, p, owner, true))!);
  }

  /** Claims up to `p.limit` jobs; null when, outside a transaction, a key with a concurrency limit came first. */
  private async claimSome(
    c: Conn,
    fx: Effects,
    p: { limit: number; now: number; leaseMs: number; engine?: ClaimHost },
    owner: string,
    inTx: boolean,
  ): Promise<ClaimedJob[] | null> {
    const rows: ClaimRow[] = [];
    const host = p.engine;
    const resident = host ? new Set(host.resident) : null;
    // Keys found at their concurrency under lock (another instance took the last slot).
    const skip: string[] = [];
    for (let tries = 0; rows.length < p.limit && tries < p.limit * 3 + 10; tries++) {
      let step: 'claimed' | 'again' | 'none' | 'needs-tx';
      try {
        step = await this.claimStep(c, fx, p, owner, inTx, host, resident, skip, rows);
      } catch (err) {
        // Outside a transaction each claim has committed: hand those out rather than leave them
        // held until their lease expires. Inside one, the whole claim rolls back.
        if (inTx || rows.length === 0) throw err;
        break;
      }
      if (step === 'none') break;
      if (step === 'needs-tx') {
        if (rows.length === 0) return null;
        break;
      }
    }
    const out: ClaimedJob[] = [];
    try {
      for (const r of rows) {
        out.push(claimedJobOf(r, r.prev_seq === null ? [] : await this.historyBefore(c, r.prev_seq)));
      }
    } catch (err) {
      if (!inTx) {
        // Claimed and committed, but not runnable without their history: give them back now.
        for (const r of rows) await this.jobRelease({ seq: r.seq, lease: r.lease_owner, now: p.now }).catch(() => {});
      }
      throw err;
    }
    return out;
  }

  /** One pick and claim of `claimSome`. */
  private async claimStep(
    c: Conn,
    fx: Effects,
    p: { now: number; leaseMs: number },
    owner: string,
    inTx: boolean,
    host: ClaimHost | undefined,
    resident: Set<string> | null,
    skip: string[],
    rows: ClaimRow[],
  ): Promise<'claimed' | 'again' | 'none' | 'needs-tx'> {
    const pick = host
      ? await this.pickForHost(c, host, resident!, p.now, skip)
      : await c.get<{ seq: number; keyId: string; numCtx?: unknown; concurrency: number | null }>(Q.claimPick, { now: p.now, skip });
    if (!pick) return 'none';
    if (pick.concurrency !== null) {
      if (!inTx) return 'needs-tx';
      // The key's slots: exact under the key's lock (the counters are only committed state).
      await c.run(Q.keyLock, { key: pick.keyId });
      if (((await c.one<number>(Q.keyRunning, { key: pick.keyId })) ?? 0) >= pick.concurrency) {
        skip.push(pick.keyId);
        return 'again';
      }
    }
    const r = await c.get<ClaimRow>(this.recorded(Q.claimOne, 'loading'), {
      seq: pick.seq,
      owner,
      now: p.now,
      ...this.recordParams(p.now),
      lease: p.now + p.leaseMs,
      engine: host?.name ?? null,
      instance: this.instanceId,
    });
    if (!r) return 'again';
    if (host) resident!.add(loadKey(r.model, pick.numCtx));
    rows.push(r);
    await this.record(c, fx, r, 'loading', p.now);
    return 'claimed';
  }

  /** The model-aware pick for one host (ADR-0012): the policy is `shared.ts`'s; these are its lookups. */
  private async pickForHost(
    c: Conn,
    host: ClaimHost,
    resident: Set<string>,
    now: number,
    skip: string[],
  ): Promise<(Candidate & { concurrency: number | null }) | undefined> {
    type Cand = Candidate & { concurrency: number | null };
    const all = await c.all<Cand>(Q.claimCandidates, { models: host.models, any: host.anyModel === true, now, skip });
    if (all.length === 0) return undefined;
    const first = pickWithoutLookups(all, host, resident, now);
    if ('pick' in first) return first.pick;
    const sameLoad: Cand[] = [];
    for (const { cand, model, ctx } of sameLoadProbes(first.atTop, resident)) {
      const seq = await c.one<number>(Q.claimSameLoad, { key: cand.keyId, model, now, eff: cand.eff, ctx });
      if (seq !== undefined && (await c.one<number>(Q.lockQueued, { seq })) !== undefined) sameLoad.push({ ...cand, seq, numCtx: ctx });
    }
    if (sameLoad.length > 0) return fairest(sameLoad);
    const work = new Map<string, number>();
    for (const m of new Set(first.atTop.map((x) => x.model))) {
      const w = (await c.get<{ queued: number | null; avgMs: number | null }>(Q.modelWork, { model: m }))!;
      work.set(m, queuedWork(w.queued ?? undefined, w.avgMs ?? undefined));
    }
    return pickByLoadCost(first.atTop, host, work);
  }

  jobsQueuedModels(): Promise<string[]> {
    return this.read(async (c) => (await c.all<{ model: string }>(Q.queuedModels)).map((r) => r.model));
  }

  jobsFailQueuedModel(p: { model: string; now: number; error: ErrorInfo; limit: number }): Promise<string[]> {
    return this.tx((c, fx) =>
      this.moveAll(c, fx, Q.failQueuedModel, { model: p.model, now: p.now, code: p.error.code, message: p.error.message, limit: p.limit }, 'failed', p.now),
    );
  }

  private async historyBefore(c: Conn, prevSeq: number): Promise<Record<string, unknown>[]> {
    const turns: Record<string, unknown>[][] = [];
    for (let seq: number | null = prevSeq; seq !== null; ) {
      const t: { prevSeq: number | null; request: string; result: string | null } | undefined = await c.get(Q.turnBySeq, { seq });
      if (!t) break;
      const req = JSON.parse(t.request) as { messages?: Record<string, unknown>[] };
      const result = (await this.resultOf(c, seq, t.result)) as { message?: Record<string, unknown> } | null;
      turns.push([...(req.messages ?? []), ...(result?.message ? [result.message] : [])]);
      seq = t.prevSeq;
    }
    return turns.reverse().flat();
  }

  jobLeaseRenew(p: { seq: number; lease: string; until: number }): Promise<boolean> {
    return this.tx(async (c) => (await c.run(Q.heartbeat, p)) > 0);
  }

  jobSetWorking(p: { seq: number; lease: string; now: number; leaseMs: number }): Promise<boolean> {
    const op = async (c: Conn, fx: Effects) =>
      (await this.move(c, fx, Q.toWorking, { seq: p.seq, lease: p.lease, now: p.now, lease_until: p.now + p.leaseMs }, 'working', p.now)) !== undefined;
    return this.alone ? this.solo(op) : this.tx(op);
  }

  async jobComplete(p: {
    seq: number;
    lease: string;
    now: number;
    result: unknown;
    artifacts: { name: string; contentType: string; body: Buffer }[];
    runMs: number;
    loadMs?: number;
    usage?: { promptTokens: number | null; completionTokens: number | null };
  }): Promise<boolean> {
    const tokens = (p.usage?.promptTokens ?? 0) + (p.usage?.completionTokens ?? 0);
    // The job, its artifacts, the key's tokens of the day and the transition's record: one statement
    // (alone on the database: with the model's average run time too).
    const alone = this.alone;
    const op = async (c: Conn, fx: Effects) =>
      (
        await this.move(
          c,
          fx,
          alone ? COMPLETE_WITH_STAT : Q.complete,
          {
            ...(alone ? { ms: p.runMs } : {}),
            seq: p.seq,
            lease: p.lease,
            now: p.now,
            result: storedResult(p.result, p.artifacts),
            load_ms: p.loadMs ?? null,
            prompt_tokens: p.usage?.promptTokens ?? null,
            completion_tokens: p.usage?.completionTokens ?? null,
            names: p.artifacts.map((a) => a.name),
            types: p.artifacts.map((a) => a.contentType),
            sizes: p.artifacts.map((a) => a.body.length),
            shas: p.artifacts.map((a) => createHash('sha256').update(a.body).digest('hex')),
            bodies: p.artifacts.map((a) => a.body),
            day: Math.floor(p.now / 86_400_000),
            tokens,
          },
          'done',
          p.now,
        )
      )?.model ?? null;
    const model = alone ? await this.solo(op) : await this.tx(op);
    if (model === null) return false;
    // In a transaction, the model's average run time after the commit: its row is every job's of
    // the model, and a lock on it held through the transaction's other statements (and NOTIFY's
    // round trip) made the completions take turns.
    if (!alone) await this.single((c) => c.run(Q.modelStat, { model, ms: p.runMs })).catch(() => {}); // a statistic: the job is done either way
    return true;
  }

  jobRetry(p: { seq: number; lease: string; now: number; runAt: number }): Promise<boolean> {
    return this.tx(async (c, fx) => (await this.move(c, fx, Q.toQueuedRetry, { seq: p.seq, lease: p.lease, now: p.now, run_at: p.runAt }, 'queued', p.now)) !== undefined);
  }

  jobFail(p: { seq: number; lease: string; now: number; error: ErrorInfo }): Promise<boolean> {
    return this.tx(
      async (c, fx) =>
        (await this.move(c, fx, Q.toFailed, { seq: p.seq, lease: p.lease, now: p.now, code: p.error.code, message: p.error.message }, 'failed', p.now)) !==
        undefined,
    );
  }

  jobRelease(p: { seq: number; lease: string; now: number }): Promise<boolean> {
    return this.tx(async (c, fx) => (await this.move(c, fx, Q.toQueuedRelease, p, 'queued', p.now)) !== undefined);
  }

  jobCancel(p: { id: string; now: number; keyId?: string; actor?: string }): Promise<CancelOutcome | null> {
    return this.tx(async (c, fx) => {
      const before = await c.get<{ seq: number; state: JobState; keyId: string }>(Q.seqStateByIdLocked, { id: p.id });
      if (!before || (p.keyId !== undefined && before.keyId !== p.keyId)) return null;
      const canceled = (await this.move(c, fx, Q.toCanceled, { seq: before.seq, now: p.now }, 'canceled', p.now)) !== undefined;
      const wasRunning = canceled && (before.state === 'loading' || before.state === 'working');
      if (wasRunning) fx.canceled.push(p.id);
      if (canceled && p.actor !== undefined) await this.audit(c, p.now, p.actor, 'job.canceled', p.id, { was: before.state });
      return { canceled, wasRunning, state: canceled ? 'canceled' : before.state };
    });
  }

  // --- maintenance ---

  jobsRescue(p: { now: number }): Promise<string[]> {
    return this.tx(async (c, fx) => {
      const ids = await this.moveAll(c, fx, Q.rescueExpired, p, 'queued', p.now);
      // A dead instance's webhook claims: their rows are claimable again.
      if ((await c.run(Q.deliveriesUnclaimExpired, p)) > 0) fx.deliveryReady = true;
      return ids;
    });
  }

  jobsFailPastDeadline(p: { now: number; limit: number }): Promise<string[]> {
    return this.tx((c, fx) => this.moveAll(c, fx, Q.pastDeadline, p, 'failed', p.now));
  }

  jobsFailStale(p: { createdBefore: number; now: number; error: ErrorInfo; limit: number }): Promise<string[]> {
    return this.tx((c, fx) =>
      this.moveAll(c, fx, Q.staleQueued, { cutoff: p.createdBefore, now: p.now, code: p.error.code, message: p.error.message, limit: p.limit }, 'failed', p.now),
    );
  }

  jobsAge(p: { now: number; agingMs: number }): Promise<number> {
    return this.tx((c) => c.run(Q.age, { now: p.now, aging: p.agingMs }));
  }

  jobsDeleteExpired(p: { finishedBefore: number; failedFinishedBefore?: number; limit: number; now: number }): Promise<number> {
    return this.tx(async (c) => {
      const picked = await c.all<{ seq: number; id: string; conversationId: string }>(Q.sweepPick, {
        cutoff: p.finishedBefore,
        failedCutoff: p.failedFinishedBefore ?? p.finishedBefore,
        limit: p.limit,
      });
      for (const j of picked) {
        await c.run(Q.deleteJob, { seq: j.seq });
        await c.run(Q.expiredInsert, { id: j.id, at: p.now });
        await c.run(Q.conversationDropIfEmpty, { id: j.conversationId });
      }
      await c.run(Q.idemSweep, { now: p.now, limit: p.limit });
      await c.run(Q.expiredSweep, { before: p.now - EXPIRED_IDS_KEPT_MS, limit: p.limit });
      return picked.length;
    });
  }

  jobsNextRunAt(p: { now: number }): Promise<number | null> {
    return this.read(async (c) => (await c.one<number>(Q.nextRunAt, { now: p.now })) ?? null);
  }

  jobsNextDeadlineAt(): Promise<number | null> {
    return this.read(async (c) => (await c.one<number>(Q.nextDeadline)) ?? null);
  }

  jobsPromoteScheduled(p: { now: number }): Promise<string[]> {
    return this.tx((c, fx) => this.moveAll(c, fx, Q.promoteScheduled, p, 'queued', p.now));
  }

  jobsNextScheduledAt(): Promise<number | null> {
    return this.read(async (c) => (await c.one<number>(Q.nextScheduled)) ?? null);
  }

  jobsOldestFinishedAt(): Promise<number | null> {
    return this.read(async (c) => (await c.one<number>(Q.oldestFinished)) ?? null);
  }

  // --- reads ---

  jobGet(p: { id: string }): Promise<JobView | null> {
    return this.read(async (c) => {
      const r = await c.get<
        JobRow & { transitions_json: JobView['transitions']; artifacts_json: ArtifactMeta[]; deliveries_json: DeliveryView[] }
      >(Q.jobById, { id: p.id });
      if (!r) return null;
      const result = await this.resultOf(c, r.seq, r.result);
      const { transitions_json: transitions, artifacts_json: artifacts, deliveries_json: deliveries } = r;
      const view: JobView = {
        seq: r.seq,
        id: r.id,
        kind: r.kind,
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
        result,
        error: r.error_code === null ? null : { code: r.error_code, message: r.error_message ?? '' },
        webhookUrl: r.webhook_url,
        webhookEvents: r.webhook_events === null ? null : (JSON.parse(r.webhook_events) as JobState[]),
        transitions,
        artifacts,
        deliveries,
        conversationId: r.conversation_id,
        continueFrom: r.prev_id,
        waiting: r.waits === 1,
        loadMs: r.load_ms,
        usage: { promptTokens: r.prompt_tokens, completionTokens: r.completion_tokens },
        keyId: r.key_id === '' ? null : r.key_id,
        scheduledFor: r.scheduled_for,
        engine: r.engine,
        instance: r.instance,
      };
      return view;
    });
  }

  private async resultOf(c: Conn, seq: number, stored: string | null): Promise<unknown> {
    if (stored === null) return null;
    if (stored !== RESULT_IN_ARTIFACT) return JSON.parse(stored) as unknown;
    const body = await c.one<Buffer>(Q.artifactBody, { seq, name: 'completion' });
    return body === undefined ? null : (JSON.parse(body.toString('utf8')) as unknown);
  }

  jobTransitionsSince(p: { id: string; after: number }): Promise<TransitionEvent[]> {
    return this.read(async (c) =>
      (await c.all<Record<string, unknown>>(Q.transitionsSince, { id: p.id, after: p.after })).map((t) => {
        const state = t.state as JobState;
        const e: TransitionEvent = { jobId: p.id, state, model: t.model as string, n: t.n as number, at: t.at as number, attempt: t.attempt as number };
        if (state === 'failed') e.error = { code: (t.error_code as string | null) ?? 'unknown', message: (t.error_message as string | null) ?? '' };
        if (isTerminal(state)) e.run = runOf({ ...(t as unknown as RunRow), attempt: t.run_attempt as number });
        return e;
      }),
    );
  }

  jobsCountActive(): Promise<{ state: JobState; model: string; n: number }[]> {
    return this.read((c) => c.all<{ state: JobState; model: string; n: number }>(Q.activeByStateModel));
  }

  deliveriesPendingStats(): Promise<{ count: number; oldestOccurredAt: number | null }> {
    return this.read(async (c) => (await c.get<{ count: number; oldestOccurredAt: number | null }>(Q.pendingStats))!);
  }

  jobQueueSnapshot(p: { seq: number }): Promise<QueueSnapshot> {
    return this.read(async (c) => {
      const me = await c.get<{ eff: number; key: string; served: number }>(Q.queueOf, { seq: p.seq });
      const byModel = new Map<string, number>();
      const add = (rows: { model: string; n: number }[]) => rows.forEach((r) => byModel.set(r.model, (byModel.get(r.model) ?? 0) + r.n));
      if (me) {
        add(await c.all<{ model: string; n: number }>(Q.queueAheadHigher, { eff: me.eff }));
        const mine = await c.all<{ model: string; n: number }>(Q.queueAheadMine, { key: me.key, eff: me.eff, seq: p.seq });
        add(mine);
        const head = (await c.one<number | null>(Q.queueHeadOf, { key: me.key, eff: me.eff })) ?? 0;
        add(
          await c.all<{ model: string; n: number }>(Q.queueAheadOthers, {
            eff: me.eff,
            key: me.key,
            served: me.served,
            head,
            mine: mine.reduce((a, r) => a + r.n, 0),
          }),
        );
      }
      const ahead = [...byModel].map(([model, n]) => ({ model, n }));
      const running = await c.all<{ model: string; startedAt: number }>(Q.running);
      const stats = new Map((await c.all<{ model: string; avgMs: number }>(Q.modelStats)).map((r) => [r.model, r.avgMs]));
      return { ahead, running, stats };
    });
  }

  jobExpired(p: { id: string }): Promise<boolean> {
    return this.read(async (c) => (await c.one<number>(Q.expiredById, { id: p.id })) === 1);
  }

  conversationGet(p: { id: string }): Promise<ConversationView | null> {
    return this.read(async (c) => {
      const conv = await c.get<{ id: string; createdAt: number; keyId: string | null }>(Q.conversationById, { id: p.id });
      if (!conv) return null;
      const rows = await c.all<{
        seq: number;
        id: string;
        state: JobState;
        request: string;
        result: string | null;
        errorCode: string | null;
        errorMessage: string | null;
        createdAt: number;
        finishedAt: number | null;
      }>(Q.conversationTurns, { id: p.id });
      const turns = [];
      for (const t of rows) {
        turns.push({
          jobId: t.id,
          state: t.state,
          messages: (JSON.parse(t.request) as { messages?: unknown[] }).messages ?? [],
          reply: ((await this.resultOf(c, t.seq, t.result)) as { message?: unknown } | null)?.message ?? null,
          error: t.errorCode === null ? null : { code: t.errorCode, message: t.errorMessage ?? '' },
          createdAt: t.createdAt,
          finishedAt: t.finishedAt,
        });
      }
      return { id: conv.id, createdAt: conv.createdAt, keyId: conv.keyId === '' ? null : conv.keyId, turns };
    });
  }

  conversationsList(p: { limit: number; beforeSeq?: number; keyId?: string }): Promise<ConversationListed[]> {
    return this.read((c) => c.all<ConversationListed>(Q.conversationsPage, { before: p.beforeSeq ?? Number.MAX_SAFE_INTEGER, limit: p.limit, key: p.keyId ?? null }));
  }

  artifactGet(p: { jobId: string; name: string }): Promise<Artifact | null> {
    return this.read(async (c) => (await c.get<Artifact>(Q.artifact, { id: p.jobId, name: p.name })) ?? null);
  }

  /** Newest first, keyset-paginated on seq (never OFFSET). */
  jobsList(f: ListFilter): Promise<ListedJob[]> {
    return this.read((c) => this.list(c, f));
  }

  private async list(c: Conn, f: ListFilter): Promise<ListedJob[]> {
    let upper = f.beforeSeq ?? null;
    let lower: number | null = null;
    if (f.createdBefore !== undefined) {
      const b = (await c.one<number>(Q.seqCreatedBefore, { at: f.createdBefore })) ?? null;
      if (b === null) return [];
      upper = upper === null ? b + 1 : Math.min(upper, b + 1);
    }
    if (f.createdAfter !== undefined) {
      lower = (await c.one<number>(Q.seqCreatedAtOrAfter, { at: f.createdAfter })) ?? null;
      if (lower === null) return [];
    }
    const where: string[] = [];
    const params: Record<string, unknown> = { limit: f.limit };
    let from = 'jobs j';
    const meta = f.metadata ?? [];
    const inner: string[] = ['key = @mk0', 'value = @mv0'];
    if (upper !== null) {
      inner.push('job_seq < @upper');
      params.upper = upper;
    }
    if (lower !== null) {
      inner.push('job_seq >= @lower');
      params.lower = lower;
    }
    meta.forEach(([k, v], i) => {
      params[`mk${i}`] = k;
      params[`mv${i}`] = v;
      if (i > 0) where.push(`EXISTS (SELECT 1 FROM job_metadata m${i} WHERE m${i}.key = @mk${i} AND m${i}.value = @mv${i} AND m${i}.job_seq = j.seq)`);
    });
    const innerSql = `SELECT job_seq FROM job_metadata WHERE ${inner.join(' AND ')} ORDER BY job_seq DESC LIMIT ${LIST_SCAN_BUDGET}`;
    if (meta.length > 0) from = `(${innerSql}) m JOIN jobs j ON j.seq = m.job_seq`;
    const seqCol = meta.length > 0 ? 'm.job_seq' : 'j.seq';
    if (meta.length === 0 && upper !== null) where.push('j.seq < @upper');
    if (meta.length === 0 && lower !== null) where.push('j.seq >= @lower');
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
    if (f.conversationId) {
      where.push('j.conversation_id = @conversation');
      params.conversation = f.conversationId;
    }
    if (f.keyId !== undefined) {
      where.push('j.key_id = @key');
      params.key = f.keyId;
    }
    if (f.engine !== undefined) {
      where.push('j.engine = @engine');
      params.engine = f.engine;
    }
    const sql = `SELECT j.seq, j.id, j.state, j.model, j.priority, j.attempt, j.metadata, j.created_at AS createdAt,
        j.finished_at AS finishedAt, nullif(j.key_id, '') AS keyId, j.engine, j.instance
      FROM ${from} ${where.length ? `WHERE ${where.join(' AND ')}` : ''}
      ORDER BY ${seqCol} DESC LIMIT @limit`;
    const rows = (await c.all<Omit<ListedJob, 'metadata'> & { metadata: string | null }>(sql, params)).map((r) => ({
      ...r,
      metadata: r.metadata === null ? null : (JSON.parse(r.metadata) as Record<string, string>),
    }));
    if (meta.length > 0 && rows.length < f.limit) {
      const innerParams = Object.fromEntries(Object.entries(params).filter(([k]) => ['mk0', 'mv0', 'upper', 'lower'].includes(k)));
      const scanned = (await c.one<number>(`SELECT count(*) AS n FROM (${innerSql}) x`, innerParams)) ?? 0;
      if (scanned >= LIST_SCAN_BUDGET && (f.metadata!.length > 1 || f.state || f.model || f.createdAfter !== undefined || f.createdBefore !== undefined)) {
        throw new Validation(
          `this filter combination would scan more than ${LIST_SCAN_BUDGET} jobs of metadata.${meta[0]![0]}=${JSON.stringify(meta[0]![1].slice(0, 40))}: narrow it (created_after/created_before, or a rarer metadata filter first)`,
          `metadata.${meta[0]![0]}`,
          'filter_too_broad',
        );
      }
    }
    return rows;
  }

  // --- webhook outbox (a claim is a lease in the row: claimed_by, claimed_until) ---

  /** A job event's send: its row carries its artifacts (`arts`, read with the claim). */
  private jobEvent(r: DueRow): ClaimedDelivery {
    return jobEventOf(r, (r.arts ?? []).map((a) => ({ ...a, body: a.body === null ? null : Buffer.from(a.body, 'base64') })));
  }

  /** The sends of claimed rows: at once for job events, with a read for a batch's (the batch as it ended). */
  private async claimedOf(rows: DueRow[]): Promise<ClaimedDelivery[]> {
    if (rows.every((r) => r.batchSeq == null)) return rows.map((r) => this.jobEvent(r));
    try {
      return await this.read(async (c) => {
        const out: ClaimedDelivery[] = [];
        for (const r of rows) out.push(r.batchSeq == null ? this.jobEvent(r) : await this.fb.batchEvent(c, { ...r, batchSeq: r.batchSeq }));
        return out;
      });
    } catch (err) {
      // Claimed (committed) but not sendable: give them back at once rather than at lease expiry.
      await this.unclaim(rows.map((r) => r.id));
      throw err;
    }
  }

  /**
   * One statement, no transaction around it (claimDue): the claim is atomic by itself (SKIP
   * LOCKED, the lease condition), and says when the first head not claimed falls due.
   */
  async deliveriesClaim(p: {
    now: number;
    limit: number;
    perOriginLimit: number;
    inlineMax: number;
  }): Promise<{ deliveries: ClaimedDelivery[]; nextDueAt: number | null; capped?: boolean }> {
    if (p.limit <= 0) return { deliveries: [], nextDueAt: null };
    const got = await this.single((c) =>
      c.all<Omit<DueRow, 'id'> & { id: number | null; nextDue: number | null; capped: boolean }>(Q.claimDue, {
        now: p.now,
        n: p.limit,
        cap: p.perOriginLimit,
        by: this.instanceId,
        until: p.now + this.deliveryLeaseMs,
        inline: p.inlineMax,
      }),
    );
    const rows = got.filter((r): r is typeof r & { id: number } => r.id !== null);
    const nextDueAt = rows.length < p.limit ? (got[0]?.nextDue ?? null) : null;
    return { deliveries: rows.length === 0 ? [] : await this.claimedOf(rows), nextDueAt, capped: got[0]?.capped ?? true };
  }

  deliveriesClaimOnWrite(p: { perOriginLimit: number; want: () => boolean }): () => void {
    this.claimOnWrite = p;
    return () => {
      if (this.claimOnWrite === p) this.claimOnWrite = null;
    };
  }

  /** A read, no commit: the claim was made by the write that inserted each row. */
  async deliveriesClaimed(p: { ids: number[]; now: number; inlineMax: number }): Promise<ClaimedDelivery[]> {
    if (p.ids.length === 0) return [];
    const rows = await this.read((c) =>
      c.all<DueRow>(Q.claimedMine, { ids: p.ids, by: this.instanceId, fresh: p.now + this.deliveryLeaseMs / 2, inline: p.inlineMax }),
    );
    return this.claimedOf(rows);
  }

  /** Best effort: this instance's claims of these deliveries are dropped (they stay due). */
  private async unclaim(ids: number[]): Promise<void> {
    for (const id of ids) await this.single((c) => c.run(Q.deliveryUnclaim, { id, by: this.instanceId })).catch(() => {});
    this.local.emit('deliveryReady');
  }

  /** One statement, no transaction around it (its own), a `done` event's artifacts included. */
  async deliveryClaimNext(p: { afterId: number; now: number; inlineMax: number }): Promise<ClaimedDelivery | null> {
    const r = await this.single((c) =>
      c.get<DueRow>(Q.claimNextOfJob, { id: p.afterId, now: p.now, by: this.instanceId, until: p.now + this.deliveryLeaseMs, inline: p.inlineMax }),
    );
    return r === undefined ? null : ((await this.claimedOf([r]))[0] ?? null);
  }

  deliveriesNextDueAt(p: { now: number; perOriginLimit: number }): Promise<number | null> {
    return this.read(async (c) => (await c.get<{ dueAt: number }>(Q.nextDue, { now: p.now, cap: p.perOriginLimit }))?.dueAt ?? null);
  }

  async deliveryRecord(p: { id: number; now: number; outcome: DeliveryOutcome }): Promise<void> {
    const o = p.outcome;
    const seq = await this.single((c) =>
      c.one<number | null>(Q.recordDelivery, {
        id: p.id,
        now: p.now,
        kind: o.kind,
        code: o.status,
        next: o.kind === 'retry' ? o.at : null,
        error: o.kind === 'delivered' ? null : o.error,
        notify: this.cluster?.peers ? this.slotFreed : null,
        by: this.instanceId,
      }),
    );
    // A slot of its origin is free (here; the other instances were told by the NOTIFY).
    if (seq != null) this.local.emit('deliveryReady');
  }

  /** The record of a delivered event and the claim of its job's next one: one statement (migration 0007). */
  async deliveryRecordClaimNext(p: { id: number; now: number; status: number; inlineMax: number }): Promise<{ recorded: boolean; next: ClaimedDelivery | null }> {
    const r = (await this.single((c) =>
      c.get<DueRow & { recorded: boolean; id: number | null; headLeft: boolean }>(Q.recordDeliveredClaimNext, {
        id: p.id,
        now: p.now,
        code: p.status,
        notify: this.cluster?.peers ? this.slotFreed : null,
        by: this.instanceId,
        until: p.now + this.deliveryLeaseMs,
        inline: p.inlineMax,
      }),
    ))!;
    // No local wake for the slot this frees: the dispatcher's chain either goes on with `next`
    // (the origin's count is unchanged) or ends, and its end wakes the dispatcher. A head of the
    // line left unclaimed (after a redelivery, or held elsewhere) is due for the ordinary claim.
    if (r.headLeft) this.local.emit('deliveryReady');
    if (r.id === null) return { recorded: r.recorded, next: null };
    // A next event not sendable is given back at once; it stays due, for the ordinary claim.
    return { recorded: r.recorded, next: (await this.claimedOf([r]))[0] ?? null };
  }

  async deliveryRelease(p: { id: number }): Promise<void> {
    await this.tx(async (c, fx) => {
      if ((await c.run(Q.deliveryUnclaim, { id: p.id, by: this.instanceId })) > 0) fx.deliveryReady = true;
    });
  }

  deliveriesRedeliver(p: { jobId: string; now: number; state: JobState | null; actor?: string }): Promise<JobState[]> {
    return this.tx(async (c, fx) => {
      const job = await c.get<{ seq: number }>(Q.seqStateByIdLocked, { id: p.jobId });
      if (!job) return [];
      await c.run(Q.lineLock, { seq: job.seq });
      const rows = await c.all<{ state: JobState; origin: string }>(Q.redeliver, { seq: job.seq, now: p.now, state: p.state });
      if (rows.length === 0) return [];
      await c.run(Q.ungone, { seq: job.seq });
      await c.run(Q.lineRefresh, { seq: job.seq });
      fx.deliveryReady = true;
      if (p.actor !== undefined) await this.audit(c, p.now, p.actor, 'job.redelivered', p.jobId, { states: rows.map((r) => r.state) });
      return rows.map((r) => r.state);
    });
  }

  // --- API keys, usage and audit (ADR-0013) ---

  private async audit(c: Conn, at: number, actor: string, action: AuditAction, target: string, detail: Record<string, unknown> | null): Promise<void> {
    await c.run(Q.auditInsert, { at, actor, action, target, detail: detail === null ? null : JSON.stringify(detail) });
  }

  keyInsert(p: { key: ApiKeyRecord; hash: string; actor: string }): Promise<void> {
    const k = p.key;
    return this.tx(async (c) => {
      await c.run(Q.keyInsert, {
        id: k.id,
        name: k.name,
        hash: p.hash,
        concurrency: k.concurrency,
        maxQueued: k.maxQueued,
        dailyLimit: k.dailyLimit,
        priorityMax: k.priorityMax,
        createdAt: k.createdAt,
      });
      await this.audit(c, k.createdAt, p.actor, 'key.created', k.id, { name: k.name, ...limitsOf(k) });
    });
  }

  keyByHash(p: { hash: string }): Promise<ApiKeyRecord | null> {
    return this.read(async (c) => (await c.get<ApiKeyRecord>(Q.keyByHash, { hash: p.hash })) ?? null);
  }

  keyGet(p: { id: string }): Promise<ApiKeyRecord | null> {
    return this.read(async (c) => (await c.get<ApiKeyRecord>(Q.keyById, { id: p.id })) ?? null);
  }

  keysList(): Promise<ApiKeyRecord[]> {
    return this.read((c) => c.all<ApiKeyRecord>(Q.keysAll));
  }

  keyUpdate(p: { id: string; changes: Partial<ApiKeyLimits> & { name?: string }; now: number; actor: string }): Promise<ApiKeyRecord | null> {
    const ch = p.changes;
    const has = (k: keyof ApiKeyLimits) => k in ch;
    return this.tx(async (c, fx) => {
      const r = await c.get<ApiKeyRecord>(Q.keyUpdate, {
        id: p.id,
        now: p.now,
        name: ch.name ?? null,
        set_concurrency: has('concurrency'),
        concurrency: ch.concurrency ?? null,
        set_max_queued: has('maxQueued'),
        max_queued: ch.maxQueued ?? null,
        set_daily_limit: has('dailyLimit'),
        daily_limit: ch.dailyLimit ?? null,
        set_priority_max: has('priorityMax'),
        priority_max: ch.priorityMax ?? null,
      });
      if (!r) return null;
      await this.audit(c, p.now, p.actor, 'key.updated', p.id, { ...ch });
      fx.jobReady = true; // a raised concurrency may make queued jobs claimable
      return r;
    });
  }

  keyRevoke(p: { id: string; now: number; actor: string }): Promise<ApiKeyRecord | null> {
    return this.tx(async (c) => {
      const before = await c.get<ApiKeyRecord>(`${Q.keyById} FOR UPDATE`, { id: p.id });
      if (!before) return null;
      if (before.revokedAt !== null) return before;
      const r = (await c.get<ApiKeyRecord>(Q.keyRevoke, { id: p.id, now: p.now }))!;
      await this.audit(c, p.now, p.actor, 'key.revoked', p.id, null);
      return r;
    });
  }

  keyUsage(p: { keyId: string; day: number }): Promise<KeyUsage> {
    return this.read(async (c) => (await c.get<KeyUsage>(Q.keyUsage, { key: p.keyId, day: p.day }))!);
  }

  auditList(p: { limit: number; beforeId?: number }): Promise<AuditEntry[]> {
    return this.read(async (c) =>
      (await c.all<Omit<AuditEntry, 'detail'> & { detail: string | null }>(Q.auditPage, { before: p.beforeId ?? Number.MAX_SAFE_INTEGER, limit: p.limit })).map(
        (r) => ({ ...r, detail: r.detail === null ? null : (JSON.parse(r.detail) as Record<string, unknown>) }),
      ),
    );
  }

  secretEnsure(p: { name: string; value: string }): Promise<string> {
    return this.tx(async (c) => {
      await c.run(Q.secretInsert, p);
      return (await c.one<string>(Q.secretGet, { name: p.name }))!;
    });
  }
  // --- files and batches (ADR-0015): in files.ts ---

  fileInsert(p: { file: NewFile; lines: FileLine[] }): Promise<number> {
    return this.fb.fileInsert(p);
  }

  fileLinesAppend(p: { fileSeq: number; lines: FileLine[] }): Promise<void> {
    return this.fb.fileLinesAppend(p);
  }

  fileFinish(p: { fileSeq: number; bytes: number; lines: number }): Promise<boolean> {
    return this.fb.fileFinish(p);
  }

  fileLinesDelete(p: { fileSeq: number; limit: number }): Promise<number> {
    return this.fb.fileLinesDelete(p);
  }

  fileDelete(p: { fileSeq: number }): Promise<boolean> {
    return this.fb.fileDelete(p);
  }

  fileGet(p: { id: string }): Promise<FileRecord | null> {
    return this.fb.fileGet(p);
  }

  filesList(p: { limit: number; beforeSeq?: number; keyId?: string; purpose?: string }): Promise<FileRecord[]> {
    return this.fb.filesList(p);
  }

  fileLinesPage(p: { fileSeq: number; afterN: number; limit: number }): Promise<FileLine[]> {
    return this.fb.fileLinesPage(p);
  }

  fileBytesSet(p: { fileSeq: number; bytes: number }): Promise<void> {
    return this.fb.fileBytesSet(p);
  }

  filesExpired(p: { now: number; uploadingBefore: number; limit: number }): Promise<FileRecord[]> {
    return this.fb.filesExpired(p);
  }

  batchInsert(p: { batch: NewBatch; now: number }): Promise<BatchRecord | null> {
    return this.fb.batchInsert(p);
  }

  batchGet(p: { id: string } | { seq: number }): Promise<BatchRecord | null> {
    return this.fb.batchGet(p);
  }

  batchesList(p: { limit: number; beforeSeq?: number; keyId?: string }): Promise<BatchRecord[]> {
    return this.fb.batchesList(p);
  }

  batchJobsInsert(p: { batchSeq: number; jobs: (NewJob & { line: number })[]; now: number; maxQueued: number; maxQueuedBytes?: number }): Promise<{ inserted: number; stopped: InsertOutcome | null }> {
    return this.fb.batchJobsInsert(p);
  }

  batchCancel(p: { id: string; now: number; keyId?: string }): Promise<{ batch: BatchRecord; changed: boolean } | null> {
    return this.fb.batchCancel(p);
  }

  batchExpire(p: { seq: number; now: number }): Promise<boolean> {
    return this.fb.batchExpire(p);
  }

  batchFail(p: { seq: number; now: number; error: ErrorInfo }): Promise<boolean> {
    return this.fb.batchFail(p);
  }

  batchJobsEnd(p: { batchSeq: number; now: number; limit: number }): Promise<number> {
    return this.fb.batchJobsEnd(p);
  }

  batchResultsPage(p: { batchSeq: number; role: 'output' | 'error'; afterSeq: number; limit: number }): Promise<BatchResultRow[]> {
    return this.fb.batchResultsPage(p);
  }

  batchesActive(p: { limit: number; afterSeq?: number }): Promise<BatchRecord[]> {
    return this.fb.batchesActive(p);
  }

  batchesNextExpiry(): Promise<{ seq: number; expiresAt: number } | null> {
    return this.fb.batchesNextExpiry();
  }

  batchesDeleteExpired(p: { endedBefore: number; limit: number; now: number }): Promise<number> {
    return this.fb.batchesDeleteExpired(p);
  }
}

const likeEscape = (s: string): string => s.replace(/[\\%_]/g, (ch) => `\\${ch}`);

/** Two instances inserting one Idempotency-Key at once: the loser runs again and replays. */
function isIdempotencyRace(err: unknown): boolean {
  const e = err as { code?: unknown; constraint?: unknown } | null;
  return e?.code === '23505' && e.constraint === 'idempotency_keys_pkey';
}
