-- Fewer indexes to maintain on every job (measured: the SQLite side of a job's life grew with the
-- indexes and triggers of 0008–0010).
-- jobs_finished is superseded by jobs_finished_solo (0009): nothing reads it.
DROP INDEX jobs_finished;
-- Listing by key is for API keys; keyless jobs (open mode, admin) need no entry.
DROP INDEX jobs_key_seq;
CREATE INDEX jobs_key_seq ON jobs (key_id, seq) WHERE key_id <> '';
