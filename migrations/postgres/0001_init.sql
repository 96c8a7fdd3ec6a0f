-- Foreman on PostgreSQL (ADR-0011): the schema of migrations/sqlite up to 0010, in one file.
-- Times are bigint milliseconds since the Unix epoch. Requests and results are JSON text (their
-- byte size is what FOREMAN_MAX_QUEUED_BYTES counts).

CREATE TABLE jobs (
  seq              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- FIFO order; never reused
  id               text NOT NULL UNIQUE,
  state            text NOT NULL,
  model            text NOT NULL,
  request          text NOT NULL,
  metadata         text,
  webhook_url      text,
  webhook_events   text,
  webhook_gone     integer NOT NULL DEFAULT 0,
  attempt          integer NOT NULL DEFAULT 0,
  max_attempts     integer NOT NULL,
  priority         integer NOT NULL DEFAULT 0,
  age_boost        integer NOT NULL DEFAULT 0,
  deadline_at      bigint,
  run_at           bigint NOT NULL,
  lease_owner      text,
  lease_expires_at bigint,
  created_at       bigint NOT NULL,
  started_at       bigint,
  finished_at      bigint,
  updated_at       bigint NOT NULL,
  result           text,
  error_code       text,
  error_message    text,
  conversation_id  text NOT NULL,
  prev_seq         bigint REFERENCES jobs (seq),
  waits            integer NOT NULL DEFAULT 0 CHECK (waits IN (0, 1)),
  load_ms          double precision,
  prompt_tokens    integer,
  completion_tokens integer,
  key_id           text NOT NULL DEFAULT '',
  scheduled_for    bigint,
  engine           text,
  -- The instance (FOREMAN_INSTANCE_ID) that ran, or is running, the job.
  instance         text,
  CHECK (state IN ('scheduled', 'queued', 'loading', 'working', 'done', 'failed', 'canceled')),
  CHECK (attempt >= 0 AND max_attempts >= 1),
  CHECK (priority BETWEEN -1000 AND 1000),
  CHECK (age_boost >= 0),
  CHECK (webhook_gone IN (0, 1)),
  CHECK (state <> 'scheduled' OR scheduled_for IS NOT NULL),
  CHECK ((state IN ('loading', 'working')) = (lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL)),
  CHECK ((state IN ('done', 'failed', 'canceled')) = (finished_at IS NOT NULL)),
  CHECK (state <> 'done' OR (result IS NOT NULL AND error_code IS NULL)),
  CHECK (state <> 'failed' OR (error_code IS NOT NULL AND error_message IS NOT NULL AND result IS NULL)),
  CHECK (state = 'done' OR result IS NULL),
  CHECK (state NOT IN ('loading', 'working') OR started_at IS NOT NULL),
  CHECK (waits = 0 OR state = 'queued')
);

CREATE INDEX jobs_claim ON jobs ((priority + age_boost) DESC, seq) WHERE state = 'queued';
CREATE INDEX jobs_key_claim ON jobs (key_id, (priority + age_boost) DESC, seq) WHERE state = 'queued';
CREATE INDEX jobs_key_model_claim ON jobs (key_id, model, (priority + age_boost) DESC, seq) WHERE state = 'queued';
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
CREATE INDEX jobs_key_seq ON jobs (key_id, seq);
CREATE INDEX jobs_engine_seq ON jobs (engine, seq) WHERE engine IS NOT NULL;

-- Only the lifecycle's edges are legal. Terminal states are final.
CREATE FUNCTION jobs_legal_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NOT (
       (OLD.state = 'scheduled' AND NEW.state IN ('queued', 'failed', 'canceled'))
    OR (OLD.state = 'queued'  AND NEW.state IN ('loading', 'failed', 'canceled'))
    OR (OLD.state = 'loading' AND NEW.state IN ('loading', 'working', 'queued', 'failed', 'canceled'))
    OR (OLD.state = 'working' AND NEW.state IN ('working', 'queued', 'done', 'failed', 'canceled'))
  ) THEN
    RAISE EXCEPTION 'illegal job state transition (% -> %)', OLD.state, NEW.state USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER jobs_legal_transition BEFORE UPDATE OF state ON jobs
  FOR EACH ROW EXECUTE FUNCTION jobs_legal_transition();

CREATE TABLE job_transitions (
  job_seq  bigint NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
  n        integer NOT NULL,
  state    text NOT NULL CHECK (state IN ('scheduled', 'queued', 'loading', 'working', 'done', 'failed', 'canceled')),
  at       bigint NOT NULL,
  attempt  integer NOT NULL,
  PRIMARY KEY (job_seq, n)
);

CREATE TABLE artifacts (
  job_seq      bigint NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
  name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 64 AND name ~ '^[a-z0-9._-]+$' AND name !~ '^\.'),
  content_type text NOT NULL,
  size         integer NOT NULL,
  sha256       text NOT NULL CHECK (length(sha256) = 64),
  body         bytea NOT NULL,
  created_at   bigint NOT NULL,
  CHECK (size = octet_length(body)),
  PRIMARY KEY (job_seq, name)
);

-- The webhook outbox. A delivery is claimed by one instance at a time with a lease in the row
-- (claimed_by, claimed_until): a dead instance's claims expire and the row is claimed elsewhere.
CREATE TABLE webhook_deliveries (
  id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  job_seq          bigint NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
  state            text NOT NULL CHECK (state IN ('scheduled', 'queued', 'loading', 'working', 'done', 'failed', 'canceled')),
  sequence         integer NOT NULL,
  url              text NOT NULL,
  origin           text NOT NULL,
  occurred_at      bigint NOT NULL,
  status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
  attempts         integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  next_attempt_at  bigint,
  last_status_code integer,
  last_error       text,
  delivered_at     bigint,
  -- next_attempt_at for the head of the job's line (its lowest pending sequence), else NULL.
  due_at           bigint,
  claimed_by       text,
  claimed_until    bigint,
  CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL)),
  CHECK ((status = 'delivered') = (delivered_at IS NOT NULL)),
  CHECK (due_at IS NULL OR status = 'pending'),
  CHECK ((claimed_by IS NULL) = (claimed_until IS NULL)),
  CHECK (claimed_by IS NULL OR status = 'pending'),
  UNIQUE (job_seq, state)
);
CREATE INDEX webhook_deliveries_pending_job ON webhook_deliveries (job_seq, sequence) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_origin_due ON webhook_deliveries (origin, due_at, id) WHERE due_at IS NOT NULL;
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (due_at, id) WHERE due_at IS NOT NULL;
CREATE INDEX webhook_deliveries_claimed ON webhook_deliveries (origin, claimed_until) WHERE claimed_by IS NOT NULL;

CREATE TABLE job_metadata (
  key      text NOT NULL,
  value    text NOT NULL,
  job_seq  bigint NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
  PRIMARY KEY (key, value, job_seq)
);
CREATE INDEX job_metadata_job ON job_metadata (job_seq);

CREATE TABLE idempotency_keys (
  key        text PRIMARY KEY,
  body_hash  text NOT NULL,
  job_seq    bigint NOT NULL REFERENCES jobs (seq) ON DELETE CASCADE,
  expires_at bigint NOT NULL
);
CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
CREATE INDEX idempotency_keys_job ON idempotency_keys (job_seq);

CREATE TABLE model_stats (
  model    text PRIMARY KEY,
  avg_ms   double precision NOT NULL,
  samples  integer NOT NULL
);

CREATE TABLE conversations (
  id          text PRIMARY KEY,
  last_seq    bigint NOT NULL,
  created_at  bigint NOT NULL
);
CREATE INDEX conversations_recent ON conversations (last_seq);

CREATE TABLE expired_jobs (
  id  text PRIMARY KEY,
  at  bigint NOT NULL
);
CREATE INDEX expired_jobs_at ON expired_jobs (at);

CREATE TABLE api_keys (
  id           text PRIMARY KEY,
  name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
  key_hash     text NOT NULL UNIQUE CHECK (length(key_hash) = 64),
  concurrency  integer CHECK (concurrency IS NULL OR concurrency >= 1),
  max_queued   integer CHECK (max_queued IS NULL OR max_queued >= 1),
  daily_limit  integer CHECK (daily_limit IS NULL OR daily_limit >= 1),
  priority_max integer CHECK (priority_max IS NULL OR priority_max BETWEEN -1000 AND 1000),
  created_at   bigint NOT NULL,
  updated_at   bigint NOT NULL,
  revoked_at   bigint
);

CREATE TABLE key_counts (
  key_id      text PRIMARY KEY,
  scheduled   integer NOT NULL DEFAULT 0 CHECK (scheduled >= 0),
  queued      integer NOT NULL DEFAULT 0 CHECK (queued >= 0),
  running     integer NOT NULL DEFAULT 0 CHECK (running >= 0),
  last_served bigint NOT NULL DEFAULT 0
);
CREATE INDEX key_counts_served ON key_counts (last_served);

CREATE TABLE key_days (
  key_id  text NOT NULL,
  day     integer NOT NULL,
  jobs    integer NOT NULL DEFAULT 0 CHECK (jobs >= 0),
  tokens  bigint NOT NULL DEFAULT 0 CHECK (tokens >= 0),
  PRIMARY KEY (key_id, day)
);

CREATE TABLE audit_log (
  id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  at      bigint NOT NULL,
  actor   text NOT NULL,
  action  text NOT NULL CHECK (action IN ('key.created', 'key.updated', 'key.revoked', 'job.canceled', 'job.redelivered', 'job.priority_clamped')),
  target  text NOT NULL,
  detail  text
);

CREATE TABLE server_secrets (
  name   text PRIMARY KEY,
  value  text NOT NULL
);

-- Jobs per state and bytes of stored requests per state (FOREMAN_MAX_QUEUED, _BYTES: one row read
-- per submit), per key, and queued per model; kept by the trigger below. Each change updates its
-- rows in one statement, in key order, so concurrent transactions lock them in the same order.
CREATE TABLE job_counts (
  state  text PRIMARY KEY CHECK (state IN ('scheduled', 'queued', 'loading', 'working', 'done', 'failed', 'canceled')),
  n      bigint NOT NULL CHECK (n >= 0),
  bytes  bigint NOT NULL DEFAULT 0
);
INSERT INTO job_counts (state, n) VALUES ('scheduled', 0), ('queued', 0), ('loading', 0), ('working', 0), ('done', 0), ('failed', 0), ('canceled', 0);

CREATE TABLE model_queue (
  model   text PRIMARY KEY,
  queued  integer NOT NULL DEFAULT 0 CHECK (queued >= 0)
);

CREATE FUNCTION jobs_counts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  o_state text; n_state text; o_bytes bigint := 0; n_bytes bigint := 0; k text; m text;
BEGIN
  IF TG_OP <> 'INSERT' THEN o_state := OLD.state; o_bytes := octet_length(OLD.request); k := OLD.key_id; m := OLD.model; END IF;
  IF TG_OP <> 'DELETE' THEN n_state := NEW.state; n_bytes := octet_length(NEW.request); k := NEW.key_id; m := NEW.model; END IF;
  IF o_state IS NOT DISTINCT FROM n_state THEN RETURN NULL; END IF;
  UPDATE job_counts SET
      n = n - CASE WHEN state = o_state THEN 1 ELSE 0 END + CASE WHEN state = n_state THEN 1 ELSE 0 END,
      bytes = bytes - CASE WHEN state = o_state THEN o_bytes ELSE 0 END + CASE WHEN state = n_state THEN n_bytes ELSE 0 END
    WHERE state IN (o_state, n_state);
  IF TG_OP = 'INSERT' THEN
    INSERT INTO key_counts (key_id) VALUES (k) ON CONFLICT (key_id) DO NOTHING;
  END IF;
  UPDATE key_counts SET
      scheduled = scheduled - coalesce((o_state = 'scheduled')::int, 0) + coalesce((n_state = 'scheduled')::int, 0),
      queued = queued - coalesce((o_state = 'queued')::int, 0) + coalesce((n_state = 'queued')::int, 0),
      running = running - coalesce((o_state IN ('loading', 'working'))::int, 0) + coalesce((n_state IN ('loading', 'working'))::int, 0)
    WHERE key_id = k;
  IF (o_state = 'queued') IS DISTINCT FROM (n_state = 'queued') AND (o_state = 'queued' OR n_state = 'queued') THEN
    INSERT INTO model_queue AS q (model, queued) VALUES (m, CASE WHEN n_state = 'queued' THEN 1 ELSE 0 END)
      ON CONFLICT (model) DO UPDATE SET queued = q.queued + CASE WHEN n_state = 'queued' THEN 1 ELSE -1 END;
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER jobs_counts AFTER INSERT OR DELETE OR UPDATE OF state ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_counts();
