-- Jobs per state, kept by triggers, so the queue cap (FOREMAN_MAX_QUEUED) is one row read per
-- submit instead of a count over the whole queue (ADR-0010).
CREATE TABLE job_counts (
  state  TEXT PRIMARY KEY CHECK (state IN ('queued', 'loading', 'working', 'done', 'failed', 'canceled')),
  n      INTEGER NOT NULL CHECK (n >= 0)
) WITHOUT ROWID;

INSERT INTO job_counts (state, n)
SELECT s.state, (SELECT count(*) FROM jobs j WHERE j.state = s.state)
FROM (SELECT 'queued' AS state UNION ALL SELECT 'loading' UNION ALL SELECT 'working'
      UNION ALL SELECT 'done' UNION ALL SELECT 'failed' UNION ALL SELECT 'canceled') s;

CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
BEGIN
  UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
END;

CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
WHEN OLD.state <> NEW.state
BEGIN
  UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
  UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
END;

CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs
BEGIN
  UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
END;
