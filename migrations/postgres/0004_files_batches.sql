-- Files and batches (the Batch API, ADR-0015) on PostgreSQL: the tables, CHECKs and triggers of
-- migrations/sqlite/0009, ported. Uploaded lines are text (each a validated JSON line); an output
-- or error file stores nothing but its row (its lines are made from the batch's finished jobs).
--
-- What every plain job pays for it: nothing but two WHEN tests. jobs.batch_seq (0002) has no
-- foreign key (an RI trigger would fire on every job insert; a batch's jobs are deleted with it,
-- by the driver, before the batch), the indexes on batch_seq are partial on batch_seq IS NOT NULL,
-- and the progress counter is a trigger whose WHEN clause skips non-batch jobs before any call.

-- --- uploaded files, and the output and error files of batches ---
CREATE TABLE files (
  seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id          text NOT NULL UNIQUE,                 -- file-…, the public id
  key_id      text NOT NULL DEFAULT '',             -- the API key that owns it; '' = none
  purpose     text NOT NULL CHECK (purpose IN ('batch', 'batch_output')),
  filename    text NOT NULL CHECK (length(filename) BETWEEN 1 AND 255),
  bytes       bigint CHECK (bytes IS NULL OR bytes >= 0),  -- an output file's size is known once its batch has ended
  lines       integer NOT NULL DEFAULT 0 CHECK (lines >= 0),
  endpoint    text CHECK (endpoint IN ('/v1/chat/completions', '/v1/embeddings')),  -- every line's url (an upload)
  status      text NOT NULL CHECK (status IN ('uploading', 'processed')),
  batch_seq   bigint,                                -- an output or error file's batch (foreign key below)
  role        text CHECK (role IN ('output', 'error')),
  created_at  bigint NOT NULL,
  expires_at  bigint,
  CHECK ((purpose = 'batch') = (endpoint IS NOT NULL)),
  CHECK ((purpose = 'batch_output') = (batch_seq IS NOT NULL AND role IS NOT NULL)),
  CHECK (purpose = 'batch_output' OR bytes IS NOT NULL),
  CHECK (status = 'processed' OR purpose = 'batch')
);
CREATE INDEX files_key_seq ON files (key_id, seq);
CREATE INDEX files_expiry ON files (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX files_uploading ON files (created_at) WHERE status = 'uploading';
CREATE INDEX files_batch ON files (batch_seq) WHERE batch_seq IS NOT NULL;

-- An upload's lines, as sent (one JSON object each), stored while it is validated: a file is
-- `uploading` until its last line is in, and is deleted whole if any line is refused.
CREATE TABLE file_lines (
  file_seq   bigint NOT NULL REFERENCES files (seq) ON DELETE CASCADE,
  n          integer NOT NULL CHECK (n >= 1),      -- the line number in the upload
  custom_id  text NOT NULL CHECK (length(custom_id) BETWEEN 1 AND 512),
  body       text NOT NULL,
  PRIMARY KEY (file_seq, n)
);
-- A custom_id appears once per file.
CREATE UNIQUE INDEX file_lines_custom_id ON file_lines (file_seq, custom_id);

-- --- batches ---
CREATE TABLE batches (
  seq               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  id                text NOT NULL UNIQUE,           -- batch_…, the public id
  key_id            text NOT NULL DEFAULT '',       -- its jobs are submitted under this key
  input_file_id     text NOT NULL,
  input_file_seq    bigint REFERENCES files (seq) ON DELETE SET NULL,
  endpoint          text NOT NULL CHECK (endpoint IN ('/v1/chat/completions', '/v1/embeddings')),
  completion_window text NOT NULL CHECK (completion_window = '24h'),
  status            text NOT NULL DEFAULT 'validating'
                    CHECK (status IN ('validating', 'in_progress', 'finalizing', 'completed', 'failed', 'expired', 'cancelling', 'cancelled')),
  ending            text CHECK (ending IN ('cancel', 'expire', 'fail')),  -- why it is winding down
  metadata          text,                           -- JSON object of strings
  webhook_url       text,
  webhook_origin    text,                           -- its scheme://host[:port] (the per-receiver cap's key), set by the driver
  priority          integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000 AND 1000),
  total             integer NOT NULL CHECK (total >= 0),
  submitted         integer NOT NULL DEFAULT 0,     -- lines made into jobs so far
  last_line         integer NOT NULL DEFAULT 0,     -- the line number (file_lines.n) of the last one
  completed         integer NOT NULL DEFAULT 0,     -- jobs done
  failed            integer NOT NULL DEFAULT 0,     -- jobs failed (an expiry fails what had not run)
  canceled          integer NOT NULL DEFAULT 0,     -- jobs canceled, and lines never submitted (cancel, expiry)
  errors            text,                           -- JSON [{code, message, line?}] for a failed batch
  output_file_id    text NOT NULL,
  error_file_id     text NOT NULL,
  created_at        bigint NOT NULL,
  expires_at        bigint NOT NULL,
  in_progress_at    bigint,
  finalizing_at     bigint,
  completed_at      bigint,
  failed_at         bigint,
  expired_at        bigint,
  cancelling_at     bigint,
  cancelled_at      bigint,
  CHECK (submitted BETWEEN 0 AND total),
  CHECK (completed >= 0 AND failed >= 0 AND canceled >= 0 AND completed + failed + canceled <= total),
  CHECK ((status = 'cancelling') = (ending = 'cancel' AND cancelled_at IS NULL)),
  CHECK (status NOT IN ('completed', 'expired', 'cancelled') OR completed + failed + canceled = total),
  CHECK ((status = 'completed') = (completed_at IS NOT NULL)),
  CHECK ((status = 'failed') = (failed_at IS NOT NULL)),
  CHECK ((status = 'expired') = (expired_at IS NOT NULL)),
  CHECK ((status = 'cancelled') = (cancelled_at IS NOT NULL)),
  CHECK ((webhook_url IS NULL) = (webhook_origin IS NULL))
);
ALTER TABLE files ADD FOREIGN KEY (batch_seq) REFERENCES batches (seq) ON DELETE CASCADE;
CREATE INDEX batches_key_seq ON batches (key_id, seq);
-- Batches still running: the runner's work list and the next expiry.
CREATE INDEX batches_active ON batches (expires_at) WHERE status IN ('validating', 'in_progress', 'cancelling', 'finalizing');
-- Ended batches by end time (retention).
CREATE INDEX batches_ended ON batches ((coalesce(completed_at, failed_at, expired_at, cancelled_at)))
  WHERE status IN ('completed', 'failed', 'expired', 'cancelled');

-- Only OpenAI's edges are legal.
CREATE FUNCTION batches_legal_status() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NOT (
       (OLD.status = 'validating'  AND NEW.status IN ('in_progress', 'cancelling', 'failed', 'expired', 'finalizing'))
    OR (OLD.status = 'in_progress' AND NEW.status IN ('finalizing', 'cancelling', 'failed', 'expired'))
    OR (OLD.status = 'finalizing'  AND NEW.status IN ('completed'))
    OR (OLD.status = 'cancelling'  AND NEW.status IN ('cancelled'))
  ) THEN
    RAISE EXCEPTION 'illegal batch status transition (% -> %)', OLD.status, NEW.status USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER batches_legal_status BEFORE UPDATE OF status ON batches
  FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION batches_legal_status();

-- --- jobs of a batch ---
CREATE INDEX jobs_batch ON jobs (batch_seq, seq) WHERE batch_seq IS NOT NULL;
-- Queued jobs of a batch, for a cancel or an expiry that ends them in chunks.
CREATE INDEX jobs_batch_queued ON jobs (batch_seq, seq) WHERE batch_seq IS NOT NULL AND state IN ('scheduled', 'queued');
-- The TTL cleaner's order without batch jobs (those go with their batch, by its own retention):
-- jobs_finished becomes jobs_finished_solo, one index for one, so a plain job maintains no more.
DROP INDEX jobs_finished;
CREATE INDEX jobs_finished_solo ON jobs (finished_at) WHERE state IN ('done', 'failed', 'canceled') AND batch_seq IS NULL;

-- --- the outbox: a row is a job's state event (job_seq) or a batch's terminal event (batch_seq) ---
-- No foreign key on batch_seq (it would fire on every job's delivery insert): a batch's rows are
-- deleted with the batch, by the driver.
ALTER TABLE webhook_deliveries ALTER COLUMN job_seq DROP NOT NULL;
ALTER TABLE webhook_deliveries ADD COLUMN batch_seq bigint;
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_state_check;
ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_subject CHECK (
     (job_seq IS NOT NULL AND batch_seq IS NULL
       AND state IN ('scheduled', 'queued', 'loading', 'working', 'done', 'failed', 'canceled'))
  OR (job_seq IS NULL AND batch_seq IS NOT NULL
       AND state IN ('batch.completed', 'batch.failed', 'batch.expired', 'batch.cancelled'))
);
-- One event of each type per batch (partial: job events do not maintain it).
CREATE UNIQUE INDEX webhook_deliveries_batch ON webhook_deliveries (batch_seq, state) WHERE batch_seq IS NOT NULL;

-- Settling: every line accounted for and every job ended → the batch's final status (a batch that
-- ran to the end passes through finalizing to completed), and its webhook row, due at once.
-- Called by the trigger below in the transaction that ended the batch's last job, and by the
-- driver in the one that began an ending (cancel, expiry, failure). `settled`: the status it
-- ended in (NULL: not yet, or already); `due`: its webhook row's due time (NULL: none).
CREATE FUNCTION foreman_batch_settle(p_seq bigint, p_now bigint, OUT settled text, OUT due bigint) LANGUAGE plpgsql AS $$
DECLARE
  v_url text;
  v_origin text;
BEGIN
  UPDATE batches SET
      status = CASE ending WHEN 'cancel' THEN 'cancelled' WHEN 'expire' THEN 'expired' WHEN 'fail' THEN 'failed' ELSE 'finalizing' END,
      cancelled_at = CASE WHEN ending = 'cancel' THEN p_now END,
      expired_at = CASE WHEN ending = 'expire' THEN p_now END,
      failed_at = CASE WHEN ending = 'fail' THEN p_now END,
      finalizing_at = CASE WHEN ending IS NULL THEN p_now END
    WHERE seq = p_seq AND status IN ('validating', 'in_progress', 'cancelling') AND completed + failed + canceled = total
      AND (ending IS NOT NULL OR submitted = total)
    RETURNING status, webhook_url, webhook_origin INTO settled, v_url, v_origin;
  IF settled IS NULL THEN RETURN; END IF;
  IF settled = 'finalizing' THEN
    UPDATE batches SET status = 'completed', completed_at = p_now WHERE seq = p_seq AND status = 'finalizing';
    settled := 'completed';
  END IF;
  IF v_url IS NULL THEN RETURN; END IF;
  INSERT INTO webhook_deliveries AS d (batch_seq, state, sequence, url, origin, occurred_at, next_attempt_at, due_at)
    VALUES (p_seq, 'batch.' || settled, 0, v_url, v_origin, p_now, p_now, p_now)
    ON CONFLICT (batch_seq, state) WHERE batch_seq IS NOT NULL DO NOTHING
    RETURNING d.due_at INTO due;
END $$;

-- A batch's progress, counted in the statement that ends each of its jobs, and the batch ended
-- with its last job: in that job's transaction whatever wrote it (a worker's completion, a cancel,
-- a deadline, a batch's own ending), so a poll reads one row and a batch never stays unsettled.
-- The WHEN clause is tested before the trigger is queued: a job of no batch costs nothing more.
CREATE FUNCTION jobs_batch_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE batches SET completed = completed + (NEW.state = 'done')::int, failed = failed + (NEW.state = 'failed')::int,
      canceled = canceled + (NEW.state = 'canceled')::int
    WHERE seq = NEW.batch_seq;
  PERFORM foreman_batch_settle(NEW.batch_seq, NEW.finished_at);
  RETURN NULL;
END $$;
CREATE TRIGGER jobs_batch_counts AFTER UPDATE OF state ON jobs
  FOR EACH ROW WHEN (NEW.batch_seq IS NOT NULL AND OLD.state IS DISTINCT FROM NEW.state AND NEW.state IN ('done', 'failed', 'canceled'))
  EXECUTE FUNCTION jobs_batch_counts();
