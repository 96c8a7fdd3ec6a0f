-- Bytes of stored requests per state, kept by the same triggers as the counts, so
-- FOREMAN_MAX_QUEUED_BYTES is one row read per submit (hardening finding 12).
ALTER TABLE job_counts ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;

UPDATE job_counts SET bytes = (SELECT coalesce(sum(length(request)), 0) FROM jobs j WHERE j.state = job_counts.state);

DROP TRIGGER jobs_count_insert;
DROP TRIGGER jobs_count_update;
DROP TRIGGER jobs_count_delete;

CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
BEGIN
  UPDATE job_counts SET n = n + 1, bytes = bytes + length(NEW.request) WHERE state = NEW.state;
END;

CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
WHEN OLD.state <> NEW.state
BEGIN
  UPDATE job_counts SET n = n - 1, bytes = bytes - length(OLD.request) WHERE state = OLD.state;
  UPDATE job_counts SET n = n + 1, bytes = bytes + length(NEW.request) WHERE state = NEW.state;
END;

CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs
BEGIN
  UPDATE job_counts SET n = n - 1, bytes = bytes - length(OLD.request) WHERE state = OLD.state;
END;
