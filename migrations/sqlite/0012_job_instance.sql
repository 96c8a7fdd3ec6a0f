-- The instance (FOREMAN_INSTANCE_ID, default <hostname>-<pid>) that ran, or is running, the job:
-- set by each claim, as PostgreSQL's `jobs.instance` (migrations/postgres/0001). On SQLite there
-- is one process per data directory, so it names that process (a restart has another pid).
ALTER TABLE jobs ADD COLUMN instance TEXT;
