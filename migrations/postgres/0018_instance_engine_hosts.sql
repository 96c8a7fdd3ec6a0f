-- The hosts behind an instance's engine view (ADR-0011, "Engine hosts per instance"): their names
-- and slots, so that every instance counts the same jobs-at-once for the queue's ETA whichever
-- hosts it lists itself. A JSON array of {"name", "slots"}; a view written before this has none.
ALTER TABLE instance_engines ADD COLUMN hosts jsonb NOT NULL DEFAULT '[]'::jsonb
  CHECK (jsonb_typeof(hosts) = 'array');
