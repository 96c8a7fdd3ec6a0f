import type { DB } from './db.js';

/** The columns a transition needs to log itself and decide whether to write an outbox row. */
export const TRANSITION_COLS = `seq, id, attempt, webhook_url, webhook_events, webhook_gone, error_code, error_message, model,
  created_at, started_at, finished_at, conversation_id, load_ms, prompt_tokens, completion_tokens, key_id, kind, batch_seq`;

/** The job columns a terminal event's run summary is made of (`runOf` in the driver). */
const RUN_COLS = 'j.created_at, j.started_at, j.finished_at, j.attempt, j.model, j.conversation_id, j.load_ms, j.prompt_tokens, j.completion_tokens';

/** The claim order, also used for queue positions: effective priority, then FIFO (index jobs_claim). */
const EFFECTIVE = '(priority + age_boost)';

const KEY_COLS = `id, name, concurrency, max_queued AS maxQueued, daily_limit AS dailyLimit, priority_max AS priorityMax,
  created_at AS createdAt, updated_at AS updatedAt, revoked_at AS revokedAt`;

/** Every fixed statement of the SQLite driver, prepared once. */
export function prepareStatements(db: DB) {
  const p = (sql: string) => db.prepare(sql);
  return {
    // --- submit ---
    countQueued: p(`SELECT n, bytes FROM job_counts WHERE state = 'queued'`),
    artifactBody: p(`SELECT body FROM artifacts WHERE job_seq = ? AND name = ?`).pluck(),
    insertJob: p(`INSERT INTO jobs (id, state, model, request, metadata, webhook_url, webhook_events,
        max_attempts, priority, deadline_at, run_at, created_at, updated_at, conversation_id, prev_seq, waits, key_id, scheduled_for,
        kind, batch_seq)
      VALUES (@id, @state, @model, @request, @metadata, @webhook_url, @webhook_events,
        @max_attempts, @priority, @deadline_at, @run_at, @now, @now, @conversation_id, @prev_seq, @waits, @key_id, @scheduled_for,
        @kind, @batch_seq)
      RETURNING ${TRANSITION_COLS}`),
    // --- API keys (ADR-0013) ---
    keyQueued: p(`SELECT queued + scheduled FROM key_counts WHERE key_id = ?`).pluck(),
    keyDayJobs: p(`SELECT jobs FROM key_days WHERE key_id = ? AND day = ?`).pluck(),
    keyDayAddJob: p(`INSERT INTO key_days (key_id, day, jobs) VALUES (?, ?, 1)
      ON CONFLICT (key_id, day) DO UPDATE SET jobs = jobs + 1`),
    keyDayAddTokens: p(`INSERT INTO key_days (key_id, day, tokens) VALUES (@key, @day, @tokens)
      ON CONFLICT (key_id, day) DO UPDATE SET tokens = tokens + @tokens`),
    keyInsert: p(`INSERT INTO api_keys (id, name, key_hash, concurrency, max_queued, daily_limit, priority_max, created_at, updated_at)
      VALUES (@id, @name, @hash, @concurrency, @maxQueued, @dailyLimit, @priorityMax, @createdAt, @createdAt)`),
    keyByHash: p(`SELECT ${KEY_COLS} FROM api_keys WHERE key_hash = ?`),
    keyById: p(`SELECT ${KEY_COLS} FROM api_keys WHERE id = ?`),
    keysAll: p(`SELECT ${KEY_COLS} FROM api_keys ORDER BY created_at, id`),
    // Each limit changes only when its set_ flag is 1 (a null value removes the limit).
    keyUpdate: p(`UPDATE api_keys SET name = coalesce(@name, name),
        concurrency = CASE WHEN @set_concurrency THEN @concurrency ELSE concurrency END,
        max_queued = CASE WHEN @set_max_queued THEN @max_queued ELSE max_queued END,
        daily_limit = CASE WHEN @set_daily_limit THEN @daily_limit ELSE daily_limit END,
        priority_max = CASE WHEN @set_priority_max THEN @priority_max ELSE priority_max END,
        updated_at = @now
      WHERE id = @id RETURNING ${KEY_COLS}`),
    keyRevoke: p(`UPDATE api_keys SET revoked_at = coalesce(revoked_at, @now), updated_at = @now WHERE id = @id RETURNING ${KEY_COLS}`),
    keyUsage: p(`SELECT coalesce(c.queued, 0) AS queued, coalesce(c.running, 0) AS running, coalesce(c.scheduled, 0) AS scheduled,
        coalesce(d.jobs, 0) AS jobsToday, coalesce(d.tokens, 0) AS tokensToday
      FROM (SELECT @key AS key_id) x LEFT JOIN key_counts c ON c.key_id = x.key_id
        LEFT JOIN key_days d ON d.key_id = x.key_id AND d.day = @day`),
    auditInsert: p(`INSERT INTO audit_log (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)`),
    auditPage: p(`SELECT id, at, actor, action, target, detail FROM audit_log WHERE id < @before ORDER BY id DESC LIMIT @limit`),
    secretInsert: p(`INSERT INTO server_secrets (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING`),
    secretGet: p(`SELECT value FROM server_secrets WHERE name = ?`).pluck(),
    // --- conversations ---
    conversationUpsert: p(`INSERT INTO conversations (id, last_seq, created_at) VALUES (@id, @seq, @now)
      ON CONFLICT (id) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)`),
    // The earlier turns of a continuation, one step back at a time (chains are short).
    turnBySeq: p(`SELECT prev_seq AS prevSeq, request, result FROM jobs WHERE seq = ?`),
    releaseWaiting: p(`UPDATE jobs SET waits = 0, run_at = @now, updated_at = @now
      WHERE prev_seq = @seq AND state = 'queued' AND waits = 1`),
    failWaiting: p(`UPDATE jobs SET state = 'failed', waits = 0, error_code = 'previous_failed', error_message = @message,
        finished_at = @now, updated_at = @now
      WHERE prev_seq = @seq AND state = 'queued' AND waits = 1 RETURNING ${TRANSITION_COLS}`),
    conversationTurns: p(`SELECT seq, id, state, request, result, error_code AS errorCode, error_message AS errorMessage,
        created_at AS createdAt, finished_at AS finishedAt
      FROM jobs INDEXED BY jobs_conversation WHERE conversation_id = ? ORDER BY seq`),
    conversationById: p(`SELECT c.id, c.created_at AS createdAt,
        (SELECT key_id FROM jobs INDEXED BY jobs_conversation WHERE conversation_id = c.id ORDER BY seq LIMIT 1) AS keyId
      FROM conversations c WHERE c.id = ?`),
    conversationsPage: p(`SELECT c.id, c.created_at AS createdAt, c.last_seq AS lastSeq, j.id AS lastJobId, j.state AS lastState,
        (SELECT count(*) FROM jobs k WHERE k.conversation_id = c.id) AS turns
      FROM conversations c INDEXED BY conversations_recent JOIN jobs j ON j.seq = c.last_seq
      WHERE c.last_seq < @before AND (@key IS NULL OR j.key_id = @key) ORDER BY c.last_seq DESC LIMIT @limit`),
    expiredById: p(`SELECT 1 FROM expired_jobs WHERE id = ?`).pluck(),
    expiredInsert: p(`INSERT OR IGNORE INTO expired_jobs (id, at) VALUES (?, ?)`),
    expiredSweep: p(`DELETE FROM expired_jobs WHERE id IN (SELECT id FROM expired_jobs INDEXED BY expired_jobs_at WHERE at < ? LIMIT ?)`),
    conversationDropIfEmpty: p(`DELETE FROM conversations WHERE id = @id
      AND NOT EXISTS (SELECT 1 FROM jobs INDEXED BY jobs_conversation WHERE conversation_id = @id)`),
    insertMetadata: p(`INSERT INTO job_metadata (key, value, job_seq) VALUES (?, ?, ?)`),
    idemGet: p(`SELECT body_hash AS bodyHash, job_seq AS jobSeq, expires_at AS expiresAt FROM idempotency_keys WHERE key = ?`),
    idemDelete: p(`DELETE FROM idempotency_keys WHERE key = ?`),
    idemInsert: p(`INSERT INTO idempotency_keys (key, body_hash, job_seq, expires_at) VALUES (?, ?, ?, ?)`),
    idemSweep: p(`DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys WHERE expires_at <= ? LIMIT ?)`),
    idStateBySeq: p(`SELECT id, state, scheduled_for AS scheduledFor FROM jobs WHERE seq = ?`),
    insertTransition: p(`INSERT INTO job_transitions (job_seq, n, state, at, attempt)
      VALUES (@seq, (SELECT coalesce(max(n), 0) + 1 FROM job_transitions WHERE job_seq = @seq), @state, @at, @attempt)
      RETURNING n`).pluck(),

    // --- claim and one attempt (every write after the claim is guarded by the attempt's lease) ---
    // The fair-share claim (ADR-0013): each key with queued work and a free slot offers its next
    // job (one probe of jobs_key_claim); the best effective priority wins, and among equals the
    // key served least recently. Cost: the number of keys with queued work, not the backlog.
    claimPick: p(`SELECT j.seq, k.key_id AS keyId FROM key_counts k
        LEFT JOIN api_keys a ON a.id = k.key_id
        JOIN jobs j ON j.seq = (SELECT q.seq FROM jobs q INDEXED BY jobs_key_claim
          WHERE q.key_id = k.key_id AND q.state = 'queued' AND q.run_at <= @now AND (q.deadline_at IS NULL OR q.deadline_at > @now)
          ORDER BY q.priority + q.age_boost DESC, q.seq LIMIT 1)
      WHERE k.queued > 0 AND (a.concurrency IS NULL OR k.running < a.concurrency)
      ORDER BY j.priority + j.age_boost DESC, k.last_served, j.seq LIMIT 1`),
    // The model-aware claim for one host (ADR-0012): each key's next job of each model that has
    // queued work and is installed on the host; the policy then picks among these few in code.
    claimCandidates: p(`SELECT j.seq, j.key_id AS keyId, j.model, j.priority + j.age_boost AS eff, k.last_served AS served,
        json_extract(j.request, '$.options.num_ctx') AS numCtx,
        max(j.created_at, coalesce(j.scheduled_for, 0)) AS since
      FROM key_counts k
        LEFT JOIN api_keys a ON a.id = k.key_id
        JOIN model_queue mq ON mq.queued > 0 AND (@any = 1 OR mq.model IN (SELECT value FROM json_each(@models)))
        JOIN jobs j ON j.seq = (SELECT q.seq FROM jobs q INDEXED BY jobs_key_model_claim
          WHERE q.key_id = k.key_id AND q.model = mq.model AND q.state = 'queued' AND q.run_at <= @now
            AND (q.deadline_at IS NULL OR q.deadline_at > @now)
          ORDER BY q.priority + q.age_boost DESC, q.seq LIMIT 1)
      WHERE k.queued > 0 AND (a.concurrency IS NULL OR k.running < a.concurrency)`),
    // A job of the key and model, at this effective priority, whose context size matches what the
    // host has loaded; among the first 64 in claim order only (bounded, whatever the backlog).
    claimSameLoad: p(`SELECT seq FROM (SELECT q.seq, q.request FROM jobs q INDEXED BY jobs_key_model_claim
        WHERE q.key_id = @key AND q.model = @model AND q.state = 'queued' AND q.run_at <= @now
          AND (q.deadline_at IS NULL OR q.deadline_at > @now) AND q.priority + q.age_boost = @eff
        ORDER BY q.priority + q.age_boost DESC, q.seq LIMIT 64)
      WHERE json_extract(request, '$.options.num_ctx') IS @ctx LIMIT 1`).pluck(),
    modelQueued: p(`SELECT queued FROM model_queue WHERE model = ?`).pluck(),
    queuedModels: p(`SELECT model FROM model_queue WHERE queued > 0`).pluck(),
    failQueuedModel: p(`UPDATE jobs SET state = 'failed', error_code = @code, error_message = @message, finished_at = @now, updated_at = @now
      WHERE seq IN (SELECT seq FROM jobs INDEXED BY jobs_state_model_seq WHERE state = 'queued' AND model = @model AND waits = 0 ORDER BY seq LIMIT @limit)
      RETURNING ${TRANSITION_COLS}`),
    modelAvg: p(`SELECT avg_ms FROM model_stats WHERE model = ?`).pluck(),
    claimOne: p(`UPDATE jobs SET state = 'loading', attempt = attempt + 1,
        lease_owner = @owner || ':' || seq || ':' || (attempt + 1),
        lease_expires_at = @lease, started_at = coalesce(started_at, @now), updated_at = @now,
        engine = coalesce(@engine, engine), instance = @instance
      WHERE seq = @seq AND state = 'queued'
      RETURNING ${TRANSITION_COLS}, request, max_attempts, lease_owner, prev_seq`),
    keyServed: p(`UPDATE key_counts SET last_served = (SELECT coalesce(max(last_served), 0) + 1 FROM key_counts) WHERE key_id = ?`),
    heartbeat: p(`UPDATE jobs SET lease_expires_at = @until WHERE seq = @seq AND lease_owner = @lease
        AND state IN ('loading', 'working')`),
    toWorking: p(`UPDATE jobs SET state = 'working', lease_expires_at = @lease_until, updated_at = @now
      WHERE seq = @seq AND state = 'loading' AND lease_owner = @lease RETURNING ${TRANSITION_COLS}`),
    toDone: p(`UPDATE jobs SET state = 'done', result = @result, finished_at = @now, updated_at = @now,
        lease_owner = NULL, lease_expires_at = NULL, load_ms = @load_ms, prompt_tokens = @prompt_tokens,
        completion_tokens = @completion_tokens
      WHERE seq = @seq AND state = 'working' AND lease_owner = @lease RETURNING ${TRANSITION_COLS}`),
    modelStat: p(`INSERT INTO model_stats (model, avg_ms, samples) VALUES (@model, @ms, 1)
      ON CONFLICT (model) DO UPDATE SET avg_ms = avg_ms + 0.2 * (@ms - avg_ms), samples = samples + 1`),
    toFailed: p(`UPDATE jobs SET state = 'failed', error_code = @code, error_message = @message,
        finished_at = @now, updated_at = @now, lease_owner = NULL, lease_expires_at = NULL
      WHERE seq = @seq AND state IN ('loading', 'working') AND lease_owner = @lease RETURNING ${TRANSITION_COLS}`),
    toQueuedRetry: p(`UPDATE jobs SET state = 'queued', run_at = @run_at, updated_at = @now,
        lease_owner = NULL, lease_expires_at = NULL
      WHERE seq = @seq AND state IN ('loading', 'working') AND lease_owner = @lease RETURNING ${TRANSITION_COLS}`),
    // An interrupted attempt (shutdown, crash, storage, unreachable engine) was not the engine's fault: it does not count.
    toQueuedRelease: p(`UPDATE jobs SET state = 'queued', run_at = @now, updated_at = @now,
        attempt = max(attempt - 1, 0), lease_owner = NULL, lease_expires_at = NULL
      WHERE seq = @seq AND state IN ('loading', 'working') AND lease_owner = @lease RETURNING ${TRANSITION_COLS}`),
    seqStateById: p(`SELECT seq, state, key_id AS keyId FROM jobs WHERE id = ?`),
    toCanceled: p(`UPDATE jobs SET state = 'canceled', finished_at = @now, updated_at = @now,
        lease_owner = NULL, lease_expires_at = NULL
      WHERE seq = @seq AND state IN ('scheduled', 'queued', 'loading', 'working') RETURNING ${TRANSITION_COLS}`),
    insertArtifact: p(`INSERT INTO artifacts (job_seq, name, content_type, size, sha256, body, created_at)
      VALUES (?, ?, ?, ?, ?, ?, ?)`),

    // --- maintenance ---
    rescueAll: p(`UPDATE jobs SET state = 'queued', run_at = @now, updated_at = @now,
        attempt = max(attempt - 1, 0), lease_owner = NULL, lease_expires_at = NULL
      WHERE state IN ('loading', 'working') RETURNING ${TRANSITION_COLS}`),
    rescueExpired: p(`UPDATE jobs SET state = 'queued', run_at = @now, updated_at = @now,
        attempt = max(attempt - 1, 0), lease_owner = NULL, lease_expires_at = NULL
      WHERE seq IN (SELECT seq FROM jobs INDEXED BY jobs_running WHERE state IN ('loading', 'working') AND lease_expires_at < @now)
      RETURNING ${TRANSITION_COLS}`),
    staleQueued: p(`UPDATE jobs SET state = 'failed', error_code = @code, error_message = @message,
        finished_at = @now, updated_at = @now
      WHERE seq IN (SELECT seq FROM jobs WHERE state = 'queued' AND created_at < @cutoff ORDER BY seq LIMIT @limit) RETURNING ${TRANSITION_COLS}`),
    pastDeadline: p(`UPDATE jobs SET state = 'failed', error_code = 'deadline_exceeded',
        error_message = 'the job was still queued at its deadline', finished_at = @now, updated_at = @now
      WHERE seq IN (SELECT seq FROM jobs INDEXED BY jobs_deadline WHERE state = 'queued' AND deadline_at IS NOT NULL
        AND deadline_at <= @now ORDER BY deadline_at, seq LIMIT @limit) RETURNING ${TRANSITION_COLS}`),
    // Aging: whole intervals waited (CAST: Date.now() is bound as a REAL).
    // A scheduled job ages from its scheduled time, not from when it was submitted.
    age: p(`UPDATE jobs SET age_boost = max(0, CAST((@now - max(created_at, coalesce(scheduled_for, 0))) / @aging AS INTEGER))
      WHERE state = 'queued' AND age_boost <> max(0, CAST((@now - max(created_at, coalesce(scheduled_for, 0))) / @aging AS INTEGER))`),
    promoteScheduled: p(`UPDATE jobs SET state = 'queued', run_at = @now, updated_at = @now
      WHERE seq IN (SELECT seq FROM jobs INDEXED BY jobs_scheduled WHERE state = 'scheduled' AND scheduled_for <= @now
        ORDER BY scheduled_for, seq LIMIT 500) RETURNING ${TRANSITION_COLS}`),
    nextScheduled: p(`SELECT scheduled_for FROM jobs INDEXED BY jobs_scheduled WHERE state = 'scheduled'
      ORDER BY scheduled_for LIMIT 1`).pluck(),
    // Only a later run_at: a job claimable now but not claimed (past its deadline) is not a reason to wake.
    nextRunAt: p(`SELECT run_at FROM jobs INDEXED BY jobs_run_at WHERE state = 'queued' AND run_at > ? ORDER BY run_at LIMIT 1`).pluck(),
    nextDeadline: p(`SELECT deadline_at FROM jobs INDEXED BY jobs_deadline
      WHERE state = 'queued' AND deadline_at IS NOT NULL ORDER BY deadline_at LIMIT 1`).pluck(),
    // Batch jobs are not the TTL cleaner's: they go with their batch (ADR-0015).
    oldestFinished: p(`SELECT finished_at FROM jobs INDEXED BY jobs_finished_solo
      WHERE state IN ('done', 'failed', 'canceled') AND batch_seq IS NULL ORDER BY finished_at LIMIT 1`).pluck(),
    // Sweep: finished long enough ago, and no delivery still owed.
    // Expired, no delivery owed, and no kept later turn continues it (a conversation never has a hole).
    sweepPick: p(`SELECT seq, id, conversation_id AS conversationId FROM jobs j INDEXED BY jobs_finished_solo
      WHERE state IN ('done', 'failed', 'canceled') AND batch_seq IS NULL
        AND finished_at < max(@cutoff, @failedCutoff)
        AND (CASE WHEN state = 'failed' THEN finished_at < @failedCutoff ELSE finished_at < @cutoff END)
        AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.job_seq = j.seq AND d.status = 'pending')
        AND NOT EXISTS (SELECT 1 FROM jobs k WHERE k.prev_seq = j.seq)
      ORDER BY finished_at LIMIT @limit`),
    deleteJob: p(`DELETE FROM jobs WHERE seq = ?`),

    // --- reads ---
    jobById: p(`SELECT seq, id, state, model, priority, deadline_at, request, metadata, webhook_url, webhook_events,
        webhook_gone, attempt, max_attempts, created_at, started_at, finished_at, updated_at, result, error_code, error_message,
        conversation_id, waits, load_ms, prompt_tokens, completion_tokens, key_id, scheduled_for, engine, instance, kind, batch_seq,
        (SELECT p.id FROM jobs p WHERE p.seq = jobs.prev_seq) AS prev_id
      FROM jobs WHERE id = ?`),
    transitions: p(`SELECT state, at, attempt FROM job_transitions WHERE job_seq = ? ORDER BY n`),
    transitionsSince: p(`SELECT t.n, t.state, t.at, t.attempt, j.error_code, j.error_message, ${TRANSITION_COLS.replace(/(^|,)\s*(\w+)/g, '$1 j.$2 AS j_$2')}
      FROM job_transitions t JOIN jobs j ON j.seq = t.job_seq WHERE j.id = ? AND t.n > ? ORDER BY t.n`),
    artifactMetas: p(`SELECT name, content_type AS contentType, size, sha256 FROM artifacts WHERE job_seq = ? ORDER BY name`),
    artifact: p(`SELECT a.name, a.content_type AS contentType, a.size, a.sha256, a.body
      FROM artifacts a JOIN jobs j ON j.seq = a.job_seq WHERE j.id = ? AND a.name = ?`),
    deliveries: p(`SELECT id, state, sequence, status, attempts, last_status_code AS lastStatusCode, last_error AS lastError,
        next_attempt_at AS nextAttemptAt, delivered_at AS deliveredAt, occurred_at AS occurredAt
      FROM webhook_deliveries WHERE job_seq = ? ORDER BY sequence, id`),
    // Queue position: queued jobs that the claim would pick before this one (ADR-0013): every job
    // of a higher effective priority; at the same one, this key's earlier jobs, and from each other
    // key as many as the round-robin serves first (one more if that key is due before this one).
    queueAheadHigher: p(`SELECT model, count(*) AS n FROM jobs INDEXED BY jobs_claim
      WHERE state = 'queued' AND ${EFFECTIVE} > @eff GROUP BY model`),
    queueAheadMine: p(`SELECT model, count(*) AS n FROM jobs INDEXED BY jobs_key_claim
      WHERE key_id = @key AND state = 'queued' AND ${EFFECTIVE} = @eff AND seq < @seq GROUP BY model`),
    // A key is due before this one if served less recently, or as recently with an older head job.
    queueAheadOthers: p(`SELECT x.model, count(*) AS n FROM (
        SELECT model, key_id, row_number() OVER (PARTITION BY key_id ORDER BY seq) AS rn, min(seq) OVER (PARTITION BY key_id) AS head
        FROM jobs INDEXED BY jobs_claim WHERE state = 'queued' AND ${EFFECTIVE} = @eff AND key_id <> @key) x
      JOIN key_counts k ON k.key_id = x.key_id
      WHERE x.rn <= @mine + (k.last_served < @served OR (k.last_served = @served AND x.head < @head)) GROUP BY x.model`),
    queueHeadOf: p(`SELECT min(seq) FROM jobs INDEXED BY jobs_key_claim WHERE key_id = @key AND state = 'queued' AND ${EFFECTIVE} = @eff`).pluck(),
    queueOf: p(`SELECT j.priority + j.age_boost AS eff, j.key_id AS key, coalesce(k.last_served, 0) AS served
      FROM jobs j LEFT JOIN key_counts k ON k.key_id = j.key_id WHERE j.seq = ?`),
    running: p(`SELECT model, started_at AS startedAt FROM jobs INDEXED BY jobs_running WHERE state IN ('loading', 'working')`),
    modelStats: p(`SELECT model, avg_ms AS avgMs FROM model_stats`),
    // Listing: created_at bounds become seq bounds through the created_at index (one probe each).
    seqCreatedBefore: p(`SELECT seq FROM jobs WHERE created_at < ? ORDER BY created_at DESC, seq DESC LIMIT 1`).pluck(),
    seqCreatedAtOrAfter: p(`SELECT seq FROM jobs WHERE created_at >= ? ORDER BY created_at, seq LIMIT 1`).pluck(),
    ping: p(`SELECT 1`).pluck(),
    activeByStateModel: p(`SELECT state, model, count(*) AS n FROM jobs INDEXED BY jobs_state_model_seq
      WHERE state IN ('scheduled', 'queued', 'loading', 'working') GROUP BY state, model`),
    pendingStats: p(`SELECT count(*) AS count, min(occurred_at) AS oldestOccurredAt FROM webhook_deliveries
      INDEXED BY webhook_deliveries_pending_job WHERE status = 'pending'`),

    // --- webhook outbox (ADR-0010: heads, origins) ---
    // A new row is due at once if no earlier event of its job is still pending.
    insertDelivery: p(`INSERT OR IGNORE INTO webhook_deliveries (job_seq, state, sequence, url, origin, occurred_at, next_attempt_at, due_at)
      VALUES (@seq, @state, @sequence, @url, @origin, @now, @now,
        CASE WHEN EXISTS (SELECT 1 FROM webhook_deliveries WHERE job_seq = @seq AND status = 'pending' AND sequence < @sequence)
          THEN NULL ELSE @now END)
      RETURNING due_at AS dueAt`),
    // An origin's earliest due head only moves earlier here.
    originEarlier: p(`INSERT INTO webhook_origins (origin, due_at) VALUES (@origin, @at)
      ON CONFLICT (origin) DO UPDATE SET due_at = min(coalesce(due_at, excluded.due_at), excluded.due_at)`),
    originRefresh: p(`UPDATE webhook_origins SET due_at = (SELECT min(due_at) FROM webhook_deliveries
        WHERE origin = @origin AND due_at IS NOT NULL) WHERE origin = @origin`),
    // The head of a job's line: due at its next attempt; every other pending row of the job: not due.
    lineRefresh: p(`UPDATE webhook_deliveries SET due_at = CASE WHEN id = (SELECT id FROM webhook_deliveries
          WHERE job_seq = @seq AND status = 'pending' ORDER BY sequence, id LIMIT 1) THEN next_attempt_at END
      WHERE job_seq = @seq AND status = 'pending'`),
    dueOrigins: p(`SELECT origin FROM webhook_origins INDEXED BY webhook_origins_due
      WHERE due_at IS NOT NULL AND due_at <= @now ORDER BY due_at LIMIT @n`).pluck(),
    originsByDue: p(`SELECT origin, due_at AS dueAt FROM webhook_origins INDEXED BY webhook_origins_due
      WHERE due_at IS NOT NULL ORDER BY due_at LIMIT @n`),
    // Ids only, from the covering (origin, due_at, id) index: held rows are skipped before any row is read.
    dueInOrigin: p(`SELECT id FROM webhook_deliveries INDEXED BY webhook_deliveries_origin_due
      WHERE origin = @origin AND due_at IS NOT NULL AND due_at <= @until ORDER BY due_at, id LIMIT @n`).pluck(),
    // A batch event's row has no job (ADR-0015): its batch is read instead.
    deliveryForSend: p(`SELECT d.id, d.job_seq AS jobSeq, d.batch_seq AS batchSeq, d.state, d.sequence, d.url, d.origin, d.occurred_at AS occurredAt,
        d.attempts, coalesce(j.id, b.id) AS jobId, j.metadata, j.error_code AS errorCode, j.error_message AS errorMessage, ${RUN_COLS}
      FROM webhook_deliveries d LEFT JOIN jobs j ON j.seq = d.job_seq LEFT JOIN batches b ON b.seq = d.batch_seq WHERE d.id = ?`),
    // The job's next pending event after a delivered one (sent without waiting for the record).
    nextOfJob: p(`SELECT d.id, d.job_seq AS jobSeq, d.state, d.sequence, d.url, d.origin, d.occurred_at AS occurredAt,
        d.attempts, j.id AS jobId, j.metadata, j.error_code AS errorCode, j.error_message AS errorMessage, ${RUN_COLS}
      FROM (SELECT id, job_seq, sequence FROM webhook_deliveries WHERE id = @id) cur
        -- The lowest pending event other than the acknowledged one, only if it comes after it and
        -- is due: never one past an earlier event not due yet, or pending again (a redelivery).
        JOIN webhook_deliveries d ON d.id = (SELECT w.id FROM webhook_deliveries w
          WHERE w.job_seq = cur.job_seq AND w.status = 'pending' AND w.id <> cur.id ORDER BY w.sequence, w.id LIMIT 1)
        JOIN jobs j ON j.seq = d.job_seq
      WHERE d.sequence > cur.sequence AND d.next_attempt_at <= @now`),
    nextInOrigin: p(`SELECT id, due_at AS dueAt FROM webhook_deliveries INDEXED BY webhook_deliveries_origin_due
      WHERE origin = @origin AND due_at IS NOT NULL ORDER BY due_at, id LIMIT @n`),
    // Bodies only for the artifacts small enough to travel inline in an event.
    artifactsForEvent: p(`SELECT name, content_type AS contentType, size, sha256, CASE WHEN size <= ? THEN body END AS body
      FROM artifacts WHERE job_seq = ? ORDER BY name`),
    deliveryDelivered: p(`UPDATE webhook_deliveries SET status = 'delivered', attempts = attempts + 1, delivered_at = @now,
        next_attempt_at = NULL, due_at = NULL, last_status_code = @code, last_error = NULL
      WHERE id = @id AND status = 'pending' RETURNING job_seq AS jobSeq, origin`),
    deliveryRetry: p(`UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_at = @next,
        due_at = CASE WHEN due_at IS NULL THEN NULL ELSE @next END, last_status_code = @code, last_error = @error
      WHERE id = @id AND status = 'pending' RETURNING job_seq AS jobSeq, origin`),
    deliveryFailed: p(`UPDATE webhook_deliveries SET status = 'failed', attempts = attempts + 1, next_attempt_at = NULL,
        due_at = NULL, last_status_code = @code, last_error = @error
      WHERE id = @id AND status = 'pending' RETURNING job_seq AS jobSeq, origin`),
    goneJob: p(`UPDATE jobs SET webhook_gone = 1 WHERE seq = ?`),
    goneRest: p(`UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, due_at = NULL,
        last_error = 'not sent: the receiver answered 410 Gone for an earlier event'
      WHERE job_seq = ? AND status = 'pending'`),
    redeliver: p(`UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = @now,
        delivered_at = NULL
      WHERE job_seq = @seq AND status <> 'pending' AND (@state IS NULL AND status = 'failed' OR state = @state)
      RETURNING state, origin`),
    ungone: p(`UPDATE jobs SET webhook_gone = 0 WHERE seq = ?`),
  };
}

export type Statements = ReturnType<typeof prepareStatements>;
