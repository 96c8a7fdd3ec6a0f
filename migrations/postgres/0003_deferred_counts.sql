-- The counters (job_counts, key_counts, model_queue) are one row per state, key and model: every
-- state change of the cluster updates the same few rows, and a row lock is held until COMMIT. Kept
-- by an immediate trigger, that lock was held for the whole rest of the transaction (its other
-- statements, round trips and the WAL flush), which serialized every instance's writes behind it
-- (25 jobs/s in the shared bench). As a deferred constraint trigger the counters are updated at
-- COMMIT, so the lock is held for the commit only. Code that needs an exact answer inside a
-- transaction (a key's running jobs at its concurrency, the queue near its cap) takes a
-- transaction advisory lock and counts (see the driver).
DROP TRIGGER jobs_counts ON jobs;
CREATE CONSTRAINT TRIGGER jobs_counts AFTER INSERT OR DELETE OR UPDATE OF state ON jobs
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION jobs_counts();
-- A key's running jobs, counted exactly under the key's lock (the concurrency check of a claim).
CREATE INDEX jobs_key_running ON jobs (key_id) WHERE state IN ('loading', 'working');

-- The fair share's round (ADR-0013) in a table of its own: a claim updates it at once, and nothing
-- updated at COMMIT touches it, so a claim holding it never waits for a committing transaction that
-- waits for the claim (lock order: key_served, then a job's delivery line, then the counters).
CREATE TABLE key_served (
  key_id      text PRIMARY KEY,
  last_served bigint NOT NULL DEFAULT 0
);
INSERT INTO key_served (key_id, last_served) SELECT key_id, last_served FROM key_counts;
