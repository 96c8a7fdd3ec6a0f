-- Foreman schema v1: jobs, their transition log, artifacts and the webhook outbox.
-- Times are integer milliseconds since the Unix epoch.

CREATE TABLE jobs (
  seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- FIFO order; never reused
  id              TEXT NOT NULL UNIQUE,               -- UUIDv7, the public id
  state           TEXT NOT NULL,
  model           TEXT NOT NULL,
  request         TEXT NOT NULL,                      -- the engine request (JSON), without Foreman's own fields
  metadata        TEXT,                               -- JSON object of strings, or NULL
  webhook_url     TEXT,
  webhook_events  TEXT,                               -- JSON array of states, NULL = all
  webhook_gone    INTEGER NOT NULL DEFAULT 0,         -- 1 after a receiver answered 410: no further events
  attempt         INTEGER NOT NULL DEFAULT 0,
  max_attempts    INTEGER NOT NULL,
  priority        INTEGER NOT NULL DEFAULT 0,         -- higher runs first (with aging, see ADR-0009)
  age_boost       INTEGER NOT NULL DEFAULT 0,         -- whole aging intervals waited while queued
  deadline_at     INTEGER,                            -- still queued after this: failed deadline_exceeded
  run_at          INTEGER NOT NULL,                   -- a queued job is not claimed before this
  lease_owner     TEXT,
  lease_expires_at INTEGER,
  created_at      INTEGER NOT NULL,
  started_at      INTEGER,
  finished_at     INTEGER,
  updated_at      INTEGER NOT NULL,
  result          TEXT,                               -- merged chat response (JSON), when done
  error_code      TEXT,
  error_message   TEXT,
  CHECK (state IN ('queued', 'loading', 'working', 'done', 'failed', 'canceled')),
  CHECK (attempt >= 0 AND max_attempts >= 1),
  CHECK (priority BETWEEN -1000 AND 1000),
  CHECK (age_boost >= 0),
  CHECK (webhook_gone IN (0, 1)),
  -- a running job always has a lease holder; nobody else holds one
  CHECK ((state IN ('loading', 'working')) = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
  -- finished exactly when terminal
  CHECK ((state IN ('done', 'failed', 'canceled')) = (finished_at IS NOT NULL)),
  CHECK (state <> 'done' OR (result IS NOT NULL AND error_code IS NULL)),
  CHECK (state <> 'failed' OR (error_code IS NOT NULL AND error_message IS NOT NULL AND result IS NULL)),
  CHECK (state = 'done' OR result IS NULL),
  CHECK (state NOT IN ('loading', 'working') OR started_at IS NOT NULL)
);

-- The claim order: effective priority, then FIFO. Served by this index, no sort.
CREATE INDEX jobs_claim ON jobs (priority + age_boost DESC, seq) WHERE state = 'queued';
CREATE INDEX jobs_run_at ON jobs (run_at) WHERE state = 'queued';
CREATE INDEX jobs_deadline ON jobs (deadline_at) WHERE state = 'queued' AND deadline_at IS NOT NULL;
CREATE INDEX jobs_running ON jobs (lease_expires_at) WHERE state IN ('loading', 'working');
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE state IN ('done', 'failed', 'canceled');
-- Listing (GET /jobs): newest first by seq, per filter.
CREATE INDEX jobs_state_seq ON jobs (state, seq);
CREATE INDEX jobs_model_seq ON jobs (model, seq);
CREATE INDEX jobs_created ON jobs (created_at);

-- Only the lifecycle's edges are legal. Terminal states are final.
CREATE TRIGGER jobs_legal_transition
BEFORE UPDATE OF state ON jobs
WHEN NOT (
     (OLD.state = 'queued'  AND NEW.state IN ('loading', 'failed', 'canceled'))
  OR (OLD.state = 'loading' AND NEW.state IN ('loading', 'working', 'queued', 'failed', 'canceled'))
  OR (OLD.state = 'working' AND NEW.state IN ('working', 'queued', 'done', 'failed', 'canceled'))
)
BEGIN
  SELECT RAISE(ABORT, 'illegal job state transition');
END;

CREATE TABLE job_transitions (
  job_seq  INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
  n        INTEGER NOT NULL,          -- 1, 2, 3 ... in order
  state    TEXT NOT NULL CHECK (state IN ('queued', 'loading', 'working', 'done', 'failed', 'canceled')),
  at       INTEGER NOT NULL,
  attempt  INTEGER NOT NULL,
  PRIMARY KEY (job_seq, n)
) WITHOUT ROWID;

CREATE TABLE artifacts (
  job_seq      INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
  name         TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 64 AND name NOT GLOB '*[^a-z0-9._-]*' AND name NOT GLOB '.*'),
  content_type TEXT NOT NULL,
  size         INTEGER NOT NULL CHECK (size = length(body)),
  sha256       TEXT NOT NULL CHECK (length(sha256) = 64),
  body         BLOB NOT NULL,
  created_at   INTEGER NOT NULL,
  PRIMARY KEY (job_seq, name)
) WITHOUT ROWID;

-- The webhook outbox: one row per (job, state) the job's webhook wants, written in the
-- same transaction as the state change.
CREATE TABLE webhook_deliveries (
  id               INTEGER PRIMARY KEY AUTOINCREMENT,
  job_seq          INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
  state            TEXT NOT NULL CHECK (state IN ('queued', 'loading', 'working', 'done', 'failed', 'canceled')),
  sequence         INTEGER NOT NULL,  -- the state's place in the lifecycle order
  url              TEXT NOT NULL,
  occurred_at      INTEGER NOT NULL,
  status           TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
  attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  next_attempt_at  INTEGER,
  last_status_code INTEGER,
  last_error       TEXT,
  delivered_at     INTEGER,
  CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL)),
  CHECK ((status = 'delivered') = (delivered_at IS NOT NULL)),
  UNIQUE (job_seq, state)
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_pending_job ON webhook_deliveries (job_seq, sequence) WHERE status = 'pending';

-- Metadata as rows, so GET /jobs?metadata.<key>=<value> is an index lookup.
CREATE TABLE job_metadata (
  key      TEXT NOT NULL,
  value    TEXT NOT NULL,
  job_seq  INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
  PRIMARY KEY (key, value, job_seq)
) WITHOUT ROWID;
CREATE INDEX job_metadata_job ON job_metadata (job_seq);

-- Idempotency-Key on POST /jobs: the key, a hash of the request body, and the job it created.
CREATE TABLE idempotency_keys (
  key        TEXT PRIMARY KEY,
  body_hash  TEXT NOT NULL,
  job_seq    INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
  expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
CREATE INDEX idempotency_keys_job ON idempotency_keys (job_seq);

-- Moving average of run time per model, for estimated_start_at.
CREATE TABLE model_stats (
  model    TEXT PRIMARY KEY,
  avg_ms   REAL NOT NULL,
  samples  INTEGER NOT NULL
) WITHOUT ROWID;
