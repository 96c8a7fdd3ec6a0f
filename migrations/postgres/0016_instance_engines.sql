-- What each instance's engine hosts can run (ADR-0011, "Engine hosts per instance"). Every
-- instance keeps its own row fresh (seen_at: at start, whenever its view changes and every few
-- seconds); the leader's routing and outage policies read the rows, so instances may list
-- different hosts. A row that is no longer refreshed (its instance stopped or died) stands for
-- hosts that are down but may come back with what they had, until the outage timeout has passed.
-- Rows older than that (and than a day) are deleted by the next write of any instance: ids like
-- hostname-pid are new at each start.
CREATE TABLE instance_engines (
  instance_id text PRIMARY KEY,
  seen_at bigint NOT NULL,
  -- Every host answered its last probe.
  all_up boolean NOT NULL,
  -- Since when no host of the instance has answered (all down), or NULL.
  down_since bigint,
  -- Some host lists no models (not probed yet, or an Ollama-compatible server that does not): it may run any.
  any_model boolean NOT NULL,
  -- The models installed on the hosts as last probed (every alias, as the pool matches them).
  models text[] NOT NULL,
  CHECK (down_since IS NULL OR NOT all_up)
);
