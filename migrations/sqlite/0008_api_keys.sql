-- foreman:foreign-keys-off
-- API keys, per-key isolation, fair sharing, quotas and usage (ADR-0013), and the `scheduled`
-- state: a job over its key's daily limit is accepted and waits for the next UTC day.
--
-- SQLite cannot change a CHECK constraint in place, and the state CHECKs name every state: the
-- tables that carry one are rebuilt by SQLite's documented procedure (create the new table, copy,
-- drop the old one, rename, recreate indexes and triggers). The migration runner turns foreign
-- keys off around this file (the first line asks for it) and runs foreign_key_check before it commits.

CREATE TABLE api_keys (
  id           TEXT PRIMARY KEY,
  name         TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
  key_hash     TEXT NOT NULL UNIQUE CHECK (length(key_hash) = 64),  -- sha256 of the raw key; the key itself is never stored
  concurrency  INTEGER CHECK (concurrency IS NULL OR concurrency >= 1),
  max_queued   INTEGER CHECK (max_queued IS NULL OR max_queued >= 1),
  daily_limit  INTEGER CHECK (daily_limit IS NULL OR daily_limit >= 1),
  priority_max INTEGER CHECK (priority_max IS NULL OR priority_max BETWEEN -1000 AND 1000),
  created_at   INTEGER NOT NULL,
  updated_at   INTEGER NOT NULL,
  revoked_at   INTEGER
) WITHOUT ROWID;

-- Per key ('' = no key: open mode, or the admin token): jobs per state class, kept by triggers,
-- and when the key was last served by a claim (the fair-share round-robin).
CREATE TABLE key_counts (
  key_id      TEXT PRIMARY KEY,
  scheduled   INTEGER NOT NULL DEFAULT 0 CHECK (scheduled >= 0),
  queued      INTEGER NOT NULL DEFAULT 0 CHECK (queued >= 0),
  running     INTEGER NOT NULL DEFAULT 0 CHECK (running >= 0),
  last_served INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX key_counts_served ON key_counts (last_served);

-- Per key and UTC day (days since the epoch): jobs submitted, and tokens of jobs finished.
CREATE TABLE key_days (
  key_id  TEXT NOT NULL,
  day     INTEGER NOT NULL,
  jobs    INTEGER NOT NULL DEFAULT 0 CHECK (jobs >= 0),
  tokens  INTEGER NOT NULL DEFAULT 0 CHECK (tokens >= 0),
  PRIMARY KEY (key_id, day)
) WITHOUT ROWID;

CREATE TABLE audit_log (
  id      INTEGER PRIMARY KEY AUTOINCREMENT,
  at      INTEGER NOT NULL,
  actor   TEXT NOT NULL,       -- 'admin', 'open', or the key id
  action  TEXT NOT NULL CHECK (action IN ('key.created', 'key.updated', 'key.revoked', 'job.canceled', 'job.redelivered', 'job.priority_clamped')),
  target  TEXT NOT NULL,       -- a key id or a job id
  detail  TEXT                 -- JSON
);

-- Secrets the server generates once and every instance shares (the artifact URL signing key).
CREATE TABLE server_secrets (
  name   TEXT PRIMARY KEY,
  value  TEXT NOT NULL
) WITHOUT ROWID;

-- --- jobs, rebuilt: key_id, scheduled_for, and the `scheduled` state ---
CREATE TEMP TABLE _sequences AS SELECT name, seq FROM sqlite_sequence WHERE name IN ('jobs', 'webhook_deliveries');

CREATE TABLE jobs_new (
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
  conversation_id TEXT,
  prev_seq        INTEGER REFERENCES jobs (seq),
  waits           INTEGER NOT NULL DEFAULT 0 CHECK (waits IN (0, 1)),
  load_ms         REAL,
  prompt_tokens   INTEGER,
  completion_tokens INTEGER,
  key_id          TEXT NOT NULL DEFAULT '',           -- the API key that submitted it; '' = none (open mode, admin)
  scheduled_for   INTEGER,                            -- a scheduled job becomes queued at this time
  CHECK (state IN ('scheduled', 'queued', 'loading', 'working', 'done', 'failed', 'canceled')),
  CHECK (attempt >= 0 AND max_attempts >= 1),
  CHECK (priority BETWEEN -1000 AND 1000),
  CHECK (age_boost >= 0),
  CHECK (webhook_gone IN (0, 1)),
  CHECK (state <> 'scheduled' OR scheduled_for IS NOT NULL),
  -- a running job always has a lease holder; nobody else holds one
  CHECK ((state IN ('loading', 'working')) = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
  -- finished exactly when terminal
  CHECK ((state IN ('done', 'failed', 'canceled')) = (finished_at IS NOT NULL)),
  CHECK (state <> 'done' OR (result IS NOT NULL AND error_code IS NULL)),
  CHECK (state <> 'failed' OR (error_code IS NOT NULL AND error_message IS NOT NULL AND result IS NULL)),
  CHECK (state = 'done' OR result IS NULL),
  CHECK (state NOT IN ('loading', 'working') OR started_at IS NOT NULL)
);

INSERT INTO jobs_new (seq, id, state, model, request, metadata, webhook_url, webhook_events, webhook_gone, attempt,
    max_attempts, priority, age_boost, deadline_at, run_at, lease_owner, lease_expires_at, created_at, started_at,
    finished_at, updated_at, result, error_code, error_message, conversation_id, prev_seq, waits, load_ms,
    prompt_tokens, completion_tokens)
  SELECT seq, id, state, model, request, metadata, webhook_url, webhook_events, webhook_gone, attempt,
    max_attempts, priority, age_boost, deadline_at, run_at, lease_owner, lease_expires_at, created_at, started_at,
    finished_at, updated_at, result, error_code, error_message, conversation_id, prev_seq, waits, load_ms,
    prompt_tokens, completion_tokens
  FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;

CREATE INDEX jobs_claim ON jobs (priority + age_boost DESC, seq) WHERE state = 'queued';
-- The fair-share claim: each key's next job, in the claim order.
CREATE INDEX jobs_key_claim ON jobs (key_id, priority + age_boost DESC, seq) WHERE state = 'queued';
CREATE INDEX jobs_run_at ON jobs (run_at) WHERE state = 'queued';
CREATE INDEX jobs_scheduled ON jobs (scheduled_for) WHERE state = 'scheduled';
CREATE INDEX jobs_deadline ON jobs (deadline_at) WHERE state = 'queued' AND deadline_at IS NOT NULL;
CREATE INDEX jobs_running ON jobs (lease_expires_at) WHERE state IN ('loading', 'working');
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE state IN ('done', 'failed', 'canceled');
CREATE INDEX jobs_state_seq ON jobs (state, seq);
CREATE INDEX jobs_model_seq ON jobs (model, seq);
CREATE INDEX jobs_created ON jobs (created_at);
CREATE INDEX jobs_state_model_seq ON jobs (state, model, seq);
CREATE INDEX jobs_conversation ON jobs (conversation_id, seq);
CREATE INDEX jobs_prev ON jobs (prev_seq) WHERE prev_seq IS NOT NULL;
-- GET /jobs for one key (every listing by a key, and ?key_id= for the admin).
CREATE INDEX jobs_key_seq ON jobs (key_id, seq);

-- Only the lifecycle's edges are legal. Terminal states are final.
CREATE TRIGGER jobs_legal_transition
BEFORE UPDATE OF state ON jobs
WHEN NOT (
     (OLD.state = 'scheduled' AND NEW.state IN ('queued', 'failed', 'canceled'))
  OR (OLD.state = 'queued'  AND NEW.state IN ('loading', 'failed', 'canceled'))
  OR (OLD.state = 'loading' AND NEW.state IN ('loading', 'working', 'queued', 'failed', 'canceled'))
  OR (OLD.state = 'working' AND NEW.state IN ('working', 'queued', 'done', 'failed', 'canceled'))
)
BEGIN
  SELECT RAISE(ABORT, 'illegal job state transition');
END;

CREATE TRIGGER jobs_waits_queued
BEFORE UPDATE OF state ON jobs
WHEN NEW.waits = 1 AND NEW.state <> 'queued'
BEGIN
  SELECT RAISE(ABORT, 'a job waiting for its previous turn can only be queued');
END;

-- --- job_counts, rebuilt with a `scheduled` row ---
CREATE TABLE job_counts_new (
  state  TEXT PRIMARY KEY CHECK (state IN ('scheduled', 'queued', 'loading', 'working', 'done', 'failed', 'canceled')),
  n      INTEGER NOT NULL CHECK (n >= 0),
  bytes  INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
INSERT INTO job_counts_new (state, n, bytes) SELECT state, n, bytes FROM job_counts;
INSERT INTO job_counts_new (state, n, bytes) VALUES ('scheduled', 0, 0);
DROP TABLE job_counts;
ALTER TABLE job_counts_new RENAME TO job_counts;

CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
BEGIN
  UPDATE job_counts SET n = n + 1, bytes = bytes + length(CAST(NEW.request AS BLOB)) WHERE state = NEW.state;
  INSERT INTO key_counts (key_id) VALUES (NEW.key_id) ON CONFLICT (key_id) DO NOTHING;
  UPDATE key_counts SET scheduled = scheduled + (NEW.state = 'scheduled'), queued = queued + (NEW.state = 'queued')
    WHERE key_id = NEW.key_id;
END;

CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
WHEN OLD.state <> NEW.state
BEGIN
  UPDATE job_counts SET n = n - 1, bytes = bytes - length(CAST(OLD.request AS BLOB)) WHERE state = OLD.state;
  UPDATE job_counts SET n = n + 1, bytes = bytes + length(CAST(NEW.request AS BLOB)) WHERE state = NEW.state;
  UPDATE key_counts SET
      scheduled = scheduled - (OLD.state = 'scheduled') + (NEW.state = 'scheduled'),
      queued = queued - (OLD.state = 'queued') + (NEW.state = 'queued'),
      running = running - (OLD.state IN ('loading', 'working')) + (NEW.state IN ('loading', 'working'))
    WHERE key_id = NEW.key_id;
END;

CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs
BEGIN
  UPDATE job_counts SET n = n - 1, bytes = bytes - length(CAST(OLD.request AS BLOB)) WHERE state = OLD.state;
  UPDATE key_counts SET
      scheduled = scheduled - (OLD.state = 'scheduled'),
      queued = queued - (OLD.state = 'queued'),
      running = running - (OLD.state IN ('loading', 'working'))
    WHERE key_id = OLD.key_id;
END;

INSERT INTO key_counts (key_id, queued, running)
  SELECT '', count(*) FILTER (WHERE state = 'queued'), count(*) FILTER (WHERE state IN ('loading', 'working')) FROM jobs;

-- --- job_transitions, rebuilt ---
CREATE TABLE job_transitions_new (
  job_seq  INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
  n        INTEGER NOT NULL,          -- 1, 2, 3 ... in order
  state    TEXT NOT NULL CHECK (state IN ('scheduled', 'queued', 'loading', 'working', 'done', 'failed', 'canceled')),
  at       INTEGER NOT NULL,
  attempt  INTEGER NOT NULL,
  PRIMARY KEY (job_seq, n)
) WITHOUT ROWID;
INSERT INTO job_transitions_new SELECT job_seq, n, state, at, attempt FROM job_transitions;
DROP TABLE job_transitions;
ALTER TABLE job_transitions_new RENAME TO job_transitions;

-- --- webhook_deliveries, rebuilt ---
CREATE TABLE webhook_deliveries_new (
  id               INTEGER PRIMARY KEY AUTOINCREMENT,
  job_seq          INTEGER NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
  state            TEXT NOT NULL CHECK (state IN ('scheduled', 'queued', 'loading', 'working', 'done', 'failed', 'canceled')),
  sequence         INTEGER NOT NULL,  -- the state's place in the lifecycle order
  url              TEXT NOT NULL,
  occurred_at      INTEGER NOT NULL,
  status           TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
  attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  next_attempt_at  INTEGER,
  last_status_code INTEGER,
  last_error       TEXT,
  delivered_at     INTEGER,
  origin           TEXT NOT NULL DEFAULT '',
  due_at           INTEGER,
  CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL)),
  CHECK ((status = 'delivered') = (delivered_at IS NOT NULL)),
  UNIQUE (job_seq, state)
);
INSERT INTO webhook_deliveries_new (id, job_seq, state, sequence, url, occurred_at, status, attempts, next_attempt_at,
    last_status_code, last_error, delivered_at, origin, due_at)
  SELECT id, job_seq, state, sequence, url, occurred_at, status, attempts, next_attempt_at,
    last_status_code, last_error, delivered_at, origin, due_at FROM webhook_deliveries;
DROP TABLE webhook_deliveries;
ALTER TABLE webhook_deliveries_new RENAME TO webhook_deliveries;
CREATE INDEX webhook_deliveries_pending_job ON webhook_deliveries (job_seq, sequence) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_origin_due ON webhook_deliveries (origin, due_at, id) WHERE due_at IS NOT NULL;
CREATE TRIGGER webhook_deliveries_due_pending
BEFORE UPDATE OF due_at, status ON webhook_deliveries
WHEN NEW.due_at IS NOT NULL AND NEW.status <> 'pending'
BEGIN
  SELECT RAISE(ABORT, 'only a pending delivery can be due');
END;

-- AUTOINCREMENT counters carry over: an id or seq is never reused.
UPDATE sqlite_sequence SET seq = max(seq, (SELECT s.seq FROM _sequences s WHERE s.name = sqlite_sequence.name))
  WHERE name IN (SELECT name FROM _sequences);
INSERT INTO sqlite_sequence (name, seq)
  SELECT name, seq FROM _sequences s WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence q WHERE q.name = s.name);
DROP TABLE _sequences;
