-- FOREMAN_MAX_QUEUED_BYTES counts bytes: length() of TEXT counts characters, so count the UTF-8
-- bytes (CAST AS BLOB) in the triggers and the stored totals (0005 counted characters).
UPDATE job_counts SET bytes = (SELECT coalesce(sum(length(CAST(request AS BLOB))), 0) FROM jobs j WHERE j.state = job_counts.state);

DROP TRIGGER jobs_count_insert;
DROP TRIGGER jobs_count_update;
DROP TRIGGER jobs_count_delete;

CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
BEGIN
  UPDATE job_counts SET n = n + 1, bytes = bytes + length(CAST(NEW.request AS BLOB)) WHERE state = NEW.state;
END;

CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
WHEN OLD.state <> NEW.state
BEGIN
  UPDATE job_counts SET n = n - 1, bytes = bytes - length(CAST(OLD.request AS BLOB)) WHERE state = OLD.state;
  UPDATE job_counts SET n = n + 1, bytes = bytes + length(CAST(NEW.request AS BLOB)) WHERE state = NEW.state;
END;

CREATE TRIGGER jobs_count_delete AFTER DELETE ON jobs
BEGIN
  UPDATE job_counts SET n = n - 1, bytes = bytes - length(CAST(OLD.request AS BLOB)) WHERE state = OLD.state;
END;
