-- GET /jobs?state=…&model=…: served from one index range, newest first (hardening finding 10).
CREATE INDEX jobs_state_model_seq ON jobs (state, model, seq);
