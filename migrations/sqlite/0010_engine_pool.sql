-- The engine pool and model-aware scheduling (ADR-0012).

-- The host that ran (or is running) a job: set by each claim.
ALTER TABLE jobs ADD COLUMN engine TEXT;
CREATE INDEX jobs_engine_seq ON jobs (engine, seq) WHERE engine IS NOT NULL;

-- The claim for one host: each key's next job of each model the host has installed.
CREATE INDEX jobs_key_model_claim ON jobs (key_id, model, priority + age_boost DESC, seq) WHERE state = 'queued';

-- Queued jobs per model, kept by triggers: which models have work waiting (routing, the
-- model_not_found check) and how much (the load-cost tiebreak), without counting the queue.
CREATE TABLE model_queue (
  model   TEXT PRIMARY KEY,
  queued  INTEGER NOT NULL DEFAULT 0 CHECK (queued >= 0)
) WITHOUT ROWID;

INSERT INTO model_queue (model, queued) SELECT model, count(*) FROM jobs WHERE state = 'queued' GROUP BY model;

CREATE TRIGGER jobs_model_queue_insert AFTER INSERT ON jobs WHEN NEW.state = 'queued'
BEGIN
  INSERT INTO model_queue (model, queued) VALUES (NEW.model, 1) ON CONFLICT (model) DO UPDATE SET queued = queued + 1;
END;

CREATE TRIGGER jobs_model_queue_update AFTER UPDATE OF state ON jobs WHEN (OLD.state = 'queued') <> (NEW.state = 'queued')
BEGIN
  INSERT INTO model_queue (model, queued) VALUES (NEW.model, 0) ON CONFLICT (model) DO NOTHING;
  UPDATE model_queue SET queued = queued + (NEW.state = 'queued') - (OLD.state = 'queued') WHERE model = NEW.model;
END;

CREATE TRIGGER jobs_model_queue_delete AFTER DELETE ON jobs WHEN OLD.state = 'queued'
BEGIN
  UPDATE model_queue SET queued = queued - 1 WHERE model = OLD.model;
END;
