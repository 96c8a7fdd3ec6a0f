-- The counters (queued jobs and bytes for the caps, a key's queued/scheduled/running jobs, queued
-- jobs per model) in shards. As one row per state, key and model, every submit and every claim of
-- the cluster updated the same rows at COMMIT, and each held its row lock through its WAL flush:
-- the commits went one fsync at a time, never grouped. Now each connection adds to its own shard
-- (its backend pid modulo 16), so two connections rarely touch the same row, and readers sum the
-- shards through views of the old names (a claim reads one key's or model's 16 rows at most).
-- A shard may go below zero (a job counted in on one connection and out on another); only sums
-- mean anything. Only what is read is counted: job_counts has the queued and scheduled states.

CREATE TABLE job_count_shards (
  state  text NOT NULL CHECK (state IN ('scheduled', 'queued')),
  shard  integer NOT NULL,
  n      bigint NOT NULL DEFAULT 0,
  bytes  bigint NOT NULL DEFAULT 0,
  PRIMARY KEY (state, shard)
);
INSERT INTO job_count_shards (state, shard, n, bytes)
  SELECT state, 0, n, bytes FROM job_counts WHERE state IN ('scheduled', 'queued');

CREATE TABLE key_count_shards (
  key_id     text NOT NULL,
  shard      integer NOT NULL,
  scheduled  integer NOT NULL DEFAULT 0,
  queued     integer NOT NULL DEFAULT 0,
  running    integer NOT NULL DEFAULT 0,
  PRIMARY KEY (key_id, shard)
);
INSERT INTO key_count_shards (key_id, shard, scheduled, queued, running)
  SELECT key_id, 0, scheduled, queued, running FROM key_counts;

CREATE TABLE model_queue_shards (
  model   text NOT NULL,
  shard   integer NOT NULL,
  queued  integer NOT NULL DEFAULT 0,
  PRIMARY KEY (model, shard)
);
INSERT INTO model_queue_shards (model, shard, queued) SELECT model, 0, queued FROM model_queue;

DROP TABLE job_counts;
DROP TABLE key_counts;
DROP TABLE model_queue;

-- The old names, read as before (both states always have a row: shard 0 is seeded above).
CREATE VIEW job_counts AS
  SELECT state, sum(n)::bigint AS n, sum(bytes)::bigint AS bytes FROM job_count_shards GROUP BY state;
CREATE VIEW key_counts AS
  SELECT key_id, sum(scheduled)::integer AS scheduled, sum(queued)::integer AS queued, sum(running)::integer AS running
  FROM key_count_shards GROUP BY key_id;
CREATE VIEW model_queue AS
  SELECT model, sum(queued)::integer AS queued FROM model_queue_shards GROUP BY model;

CREATE OR REPLACE FUNCTION jobs_counts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  o_state text; n_state text; o_bytes bigint := 0; n_bytes bigint := 0; k text; m text;
  sh integer := pg_backend_pid() % 16;
  dq integer; ds integer; dr integer;
BEGIN
  IF TG_OP <> 'INSERT' THEN o_state := OLD.state; o_bytes := octet_length(OLD.request); k := OLD.key_id; m := OLD.model; END IF;
  IF TG_OP <> 'DELETE' THEN n_state := NEW.state; n_bytes := octet_length(NEW.request); k := NEW.key_id; m := NEW.model; END IF;
  IF o_state IS NOT DISTINCT FROM n_state THEN RETURN NULL; END IF;
  dq := coalesce((n_state = 'queued')::int, 0) - coalesce((o_state = 'queued')::int, 0);
  ds := coalesce((n_state = 'scheduled')::int, 0) - coalesce((o_state = 'scheduled')::int, 0);
  dr := coalesce((n_state IN ('loading', 'working'))::int, 0) - coalesce((o_state IN ('loading', 'working'))::int, 0);
  -- loading -> working, and a finished job's deletion, change nothing that is read.
  IF dq = 0 AND ds = 0 AND dr = 0 THEN RETURN NULL; END IF;
  -- One lock order everywhere: job_count_shards, key_count_shards, model_queue_shards.
  IF dq <> 0 OR ds <> 0 THEN
    INSERT INTO job_count_shards AS c (state, shard, n, bytes)
      SELECT s.state, sh, s.dn, s.db FROM (VALUES
        ('queued', dq, CASE WHEN n_state = 'queued' THEN n_bytes ELSE 0 END - CASE WHEN o_state = 'queued' THEN o_bytes ELSE 0 END),
        ('scheduled', ds, CASE WHEN n_state = 'scheduled' THEN n_bytes ELSE 0 END - CASE WHEN o_state = 'scheduled' THEN o_bytes ELSE 0 END)
      ) AS s(state, dn, db) WHERE s.dn <> 0 ORDER BY s.state
      ON CONFLICT (state, shard) DO UPDATE SET n = c.n + excluded.n, bytes = c.bytes + excluded.bytes;
  END IF;
  INSERT INTO key_count_shards AS c (key_id, shard, scheduled, queued, running) VALUES (k, sh, ds, dq, dr)
    ON CONFLICT (key_id, shard) DO UPDATE
      SET scheduled = c.scheduled + excluded.scheduled, queued = c.queued + excluded.queued, running = c.running + excluded.running;
  IF dq <> 0 THEN
    INSERT INTO model_queue_shards AS q (model, shard, queued) VALUES (m, sh, dq)
      ON CONFLICT (model, shard) DO UPDATE SET queued = q.queued + excluded.queued;
  END IF;
  RETURN NULL;
END $$;
