-- foreman:foreign-keys-off
-- The OpenAI-compatible surface and the Batch API (ADR-0015): job kinds (chat, embed), uploaded
-- files (their validated lines), batches (every line a job), and batch webhook events in the same
-- outbox as job events.
--
-- webhook_deliveries is rebuilt (SQLite cannot change a CHECK in place): a row is now either a
-- job's state event (job_seq set) or a batch's terminal event (batch_seq set). The migration runner
-- turns foreign keys off around this file and runs foreign_key_check before it commits.

-- --- job kinds, and the batch a job belongs to ---
ALTER TABLE jobs ADD COLUMN kind TEXT NOT NULL DEFAULT 'chat' CHECK (kind IN ('chat', 'embed'));
ALTER TABLE jobs ADD COLUMN batch_seq INTEGER REFERENCES batches (seq);
CREATE INDEX jobs_batch ON jobs (batch_seq, seq) WHERE batch_seq IS NOT NULL;
-- Queued jobs of a batch, for a cancel or an expiry that ends them in chunks.
CREATE INDEX jobs_batch_queued ON jobs (batch_seq, seq) WHERE batch_seq IS NOT NULL AND state IN ('scheduled', 'queued');
-- The TTL cleaner's order without batch jobs: those live and go with their batch (its own retention).
CREATE INDEX jobs_finished_solo ON jobs (finished_at) WHERE state IN ('done', 'failed', 'canceled') AND batch_seq IS NULL;

-- --- uploaded files, and the output and error files of batches ---
CREATE TABLE files (
  seq         INTEGER PRIMARY KEY AUTOINCREMENT,
  id          TEXT NOT NULL UNIQUE,                 -- file-…, the public id
  key_id      TEXT NOT NULL DEFAULT '',             -- the API key that owns it; '' = none
  purpose     TEXT NOT NULL CHECK (purpose IN ('batch', 'batch_output')),
  filename    TEXT NOT NULL CHECK (length(filename) BETWEEN 1 AND 255),
  bytes       INTEGER CHECK (bytes IS NULL OR bytes >= 0),  -- an output file's size is known once its batch has ended
  lines       INTEGER NOT NULL DEFAULT 0 CHECK (lines >= 0),
  endpoint    TEXT CHECK (endpoint IN ('/v1/chat/completions', '/v1/embeddings')),  -- every line's url (an upload)
  status      TEXT NOT NULL CHECK (status IN ('uploading', 'processed')),
  batch_seq   INTEGER REFERENCES batches (seq) ON DELETE CASCADE,  -- an output or error file's batch
  role        TEXT CHECK (role IN ('output', 'error')),
  created_at  INTEGER NOT NULL,
  expires_at  INTEGER,
  CHECK ((purpose = 'batch') = (endpoint IS NOT NULL)),
  CHECK ((purpose = 'batch_output') = (batch_seq IS NOT NULL AND role IS NOT NULL)),
  CHECK (purpose = 'batch_output' OR bytes IS NOT NULL),
  CHECK (status = 'processed' OR purpose = 'batch')
);
CREATE INDEX files_key_seq ON files (key_id, seq);
CREATE INDEX files_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX files_uploading ON files (created_at) WHERE status = 'uploading';

-- An upload's lines, as sent (one JSON object each), stored while it is validated: a file is
-- `uploading` until its last line is in, and is deleted whole if any line is refused.
CREATE TABLE file_lines (
  file_seq   INTEGER NOT NULL REFERENCES files (seq) ON DELETE CASCADE,
  n          INTEGER NOT NULL CHECK (n >= 1),      -- the line number in the upload
  custom_id  TEXT NOT NULL CHECK (length(custom_id) BETWEEN 1 AND 512),
  body       TEXT NOT NULL,
  PRIMARY KEY (file_seq, n)
) WITHOUT ROWID;
-- A custom_id appears once per file.
CREATE UNIQUE INDEX file_lines_custom_id ON file_lines (file_seq, custom_id);

-- --- batches ---
CREATE TABLE batches (
  seq               INTEGER PRIMARY KEY AUTOINCREMENT,
  id                TEXT NOT NULL UNIQUE,           -- batch_…, the public id
  key_id            TEXT NOT NULL DEFAULT '',       -- its jobs are submitted under this key
  input_file_id     TEXT NOT NULL,
  input_file_seq    INTEGER REFERENCES files (seq) ON DELETE SET NULL,
  endpoint          TEXT NOT NULL CHECK (endpoint IN ('/v1/chat/completions', '/v1/embeddings')),
  completion_window TEXT NOT NULL CHECK (completion_window = '24h'),
  status            TEXT NOT NULL DEFAULT 'validating'
                    CHECK (status IN ('validating', 'in_progress', 'finalizing', 'completed', 'failed', 'expired', 'cancelling', 'cancelled')),
  ending            TEXT CHECK (ending IN ('cancel', 'expire', 'fail')),  -- why it is winding down
  metadata          TEXT,                           -- JSON object of strings
  webhook_url       TEXT,
  priority          INTEGER NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000 AND 1000),
  total             INTEGER NOT NULL CHECK (total >= 0),
  submitted         INTEGER NOT NULL DEFAULT 0,     -- lines made into jobs so far
  last_line         INTEGER NOT NULL DEFAULT 0,     -- the line number (file_lines.n) of the last one
  completed         INTEGER NOT NULL DEFAULT 0,     -- jobs done
  failed            INTEGER NOT NULL DEFAULT 0,     -- jobs failed (an expiry fails what had not run)
  canceled          INTEGER NOT NULL DEFAULT 0,     -- jobs canceled, and lines never submitted (cancel, expiry)
  errors            TEXT,                           -- JSON [{code, message, line?}] for a failed batch
  output_file_id    TEXT NOT NULL,
  error_file_id     TEXT NOT NULL,
  created_at        INTEGER NOT NULL,
  expires_at        INTEGER NOT NULL,
  in_progress_at    INTEGER,
  finalizing_at     INTEGER,
  completed_at      INTEGER,
  failed_at         INTEGER,
  expired_at        INTEGER,
  cancelling_at     INTEGER,
  cancelled_at      INTEGER,
  CHECK (submitted BETWEEN 0 AND total),
  CHECK (completed >= 0 AND failed >= 0 AND canceled >= 0 AND completed + failed + canceled <= total),
  CHECK ((status = 'cancelling') = (ending = 'cancel' AND cancelled_at IS NULL)),
  CHECK (status NOT IN ('completed', 'expired', 'cancelled') OR completed + failed + canceled = total),
  CHECK ((status = 'completed') = (completed_at IS NOT NULL)),
  CHECK ((status = 'failed') = (failed_at IS NOT NULL)),
  CHECK ((status = 'expired') = (expired_at IS NOT NULL)),
  CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL))
);
CREATE INDEX batches_key_seq ON batches (key_id, seq);
-- Batches still running: the runner's work list and the next expiry.
CREATE INDEX batches_active ON batches (expires_at) WHERE status IN ('validating', 'in_progress', 'cancelling', 'finalizing');
-- Ended batches by end time (retention).
CREATE INDEX batches_ended ON batches (coalesce(completed_at, failed_at, expired_at, cancelled_at))
  WHERE status IN ('completed', 'failed', 'expired', 'cancelled');

CREATE TRIGGER batches_legal_status
BEFORE UPDATE OF status ON batches
WHEN OLD.status <> NEW.status AND NOT (
     (OLD.status = 'validating'  AND NEW.status IN ('in_progress', 'cancelling', 'failed', 'expired', 'finalizing'))
  OR (OLD.status = 'in_progress' AND NEW.status IN ('finalizing', 'cancelling', 'failed', 'expired'))
  OR (OLD.status = 'finalizing'  AND NEW.status IN ('completed'))
  OR (OLD.status = 'cancelling'  AND NEW.status IN ('cancelled'))
)
BEGIN
  SELECT RAISE(ABORT, 'illegal batch status transition');
END;

-- A batch's progress, counted in the transaction that ends each of its jobs: a poll reads one row.
CREATE TRIGGER jobs_batch_counts AFTER UPDATE OF state ON jobs
WHEN NEW.batch_seq IS NOT NULL AND OLD.state <> NEW.state AND NEW.state IN ('done', 'failed', 'canceled')
BEGIN
  UPDATE batches SET completed = completed + (NEW.state = 'done'), failed = failed + (NEW.state = 'failed'),
      canceled = canceled + (NEW.state = 'canceled')
    WHERE seq = NEW.batch_seq;
END;

-- --- webhook_deliveries, rebuilt: a job's state event, or a batch's terminal event ---
CREATE TEMP TABLE _sequences AS SELECT name, seq FROM sqlite_sequence WHERE name = 'webhook_deliveries';

CREATE TABLE webhook_deliveries_new (
  id               INTEGER PRIMARY KEY AUTOINCREMENT,
  job_seq          INTEGER REFERENCES jobs (seq) ON DELETE CASCADE,
  batch_seq        INTEGER REFERENCES batches (seq) ON DELETE CASCADE,
  state            TEXT NOT NULL,     -- the job state, or the batch event type
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
  CHECK (
       (job_seq IS NOT NULL AND batch_seq IS NULL
         AND state IN ('scheduled', 'queued', 'loading', 'working', 'done', 'failed', 'canceled'))
    OR (job_seq IS NULL AND batch_seq IS NOT NULL
         AND state IN ('batch.completed', 'batch.failed', 'batch.expired', 'batch.cancelled'))
  ),
  CHECK ((status = 'pending') = (next_attempt_at IS NOT NULL)),
  CHECK ((status = 'delivered') = (delivered_at IS NOT NULL)),
  UNIQUE (job_seq, state),
  UNIQUE (batch_seq, state)
);
INSERT INTO webhook_deliveries_new (id, job_seq, state, sequence, url, occurred_at, status, attempts, next_attempt_at,
    last_status_code, last_error, delivered_at, origin, due_at)
  SELECT id, job_seq, state, sequence, url, occurred_at, status, attempts, next_attempt_at,
    last_status_code, last_error, delivered_at, origin, due_at FROM webhook_deliveries;
DROP TABLE webhook_deliveries;
ALTER TABLE webhook_deliveries_new RENAME TO webhook_deliveries;
CREATE INDEX webhook_deliveries_pending_job ON webhook_deliveries (job_seq, sequence) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_origin_due ON webhook_deliveries (origin, due_at, id) WHERE due_at IS NOT NULL;
CREATE INDEX webhook_deliveries_batch ON webhook_deliveries (batch_seq) WHERE batch_seq IS NOT NULL;
CREATE TRIGGER webhook_deliveries_due_pending
BEFORE UPDATE OF due_at, status ON webhook_deliveries
WHEN NEW.due_at IS NOT NULL AND NEW.status <> 'pending'
BEGIN
  SELECT RAISE(ABORT, 'only a pending delivery can be due');
END;

UPDATE sqlite_sequence SET seq = max(seq, (SELECT s.seq FROM _sequences s WHERE s.name = sqlite_sequence.name))
  WHERE name IN (SELECT name FROM _sequences);
INSERT INTO sqlite_sequence (name, seq)
  SELECT name, seq FROM _sequences s WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence q WHERE q.name = s.name);
DROP TABLE _sequences;
