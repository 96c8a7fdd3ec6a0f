-- What an instance's answering engine hosts list as installed (their /api/tags entries, merged by
-- name), so that GET /api/tags, /v1/models and /v1/models/<model> give the same answer from every
-- instance whichever hosts it lists itself (ADR-0011, "Engine hosts per instance"). A JSON array
-- of Ollama's model entries; a view written before this lists none.
ALTER TABLE instance_engines ADD COLUMN tags jsonb NOT NULL DEFAULT '[]'::jsonb
  CHECK (jsonb_typeof(tags) = 'array');
