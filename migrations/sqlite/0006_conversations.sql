-- Conversations through the queue (ADR-0016): every job belongs to a conversation; a
-- continuation points at the job it continues. A turn that waits for its predecessor
-- (`wait_for_previous`) is queued with waits = 1 and is not claimable until that job is done.
ALTER TABLE jobs ADD COLUMN conversation_id TEXT;
ALTER TABLE jobs ADD COLUMN prev_seq INTEGER REFERENCES jobs (seq);
ALTER TABLE jobs ADD COLUMN waits INTEGER NOT NULL DEFAULT 0 CHECK (waits IN (0, 1));
-- How the run went, for terminal events.
ALTER TABLE jobs ADD COLUMN load_ms REAL;
ALTER TABLE jobs ADD COLUMN prompt_tokens INTEGER;
ALTER TABLE jobs ADD COLUMN completion_tokens INTEGER;

UPDATE jobs SET conversation_id = id;

CREATE INDEX jobs_conversation ON jobs (conversation_id, seq);
CREATE INDEX jobs_prev ON jobs (prev_seq) WHERE prev_seq IS NOT NULL;

-- Only a queued job can wait.
CREATE TRIGGER jobs_waits_queued
BEFORE UPDATE OF state ON jobs
WHEN NEW.waits = 1 AND NEW.state <> 'queued'
BEGIN
  SELECT RAISE(ABORT, 'a job waiting for its previous turn can only be queued');
END;

CREATE TABLE conversations (
  id          TEXT PRIMARY KEY,
  last_seq    INTEGER NOT NULL,       -- the newest turn: listing is newest activity first
  created_at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX conversations_recent ON conversations (last_seq);

INSERT INTO conversations (id, last_seq, created_at)
SELECT id, seq, created_at FROM jobs;

-- Ids of jobs the TTL removed, so a continuation of one answers 410, not 404.
CREATE TABLE expired_jobs (
  id  TEXT PRIMARY KEY,
  at  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX expired_jobs_at ON expired_jobs (at);
