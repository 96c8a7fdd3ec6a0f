-- Fewer round trips per job (ADR-0011, "Speed"). On PostgreSQL a job's cost is mostly its
-- statements: each is a round trip, and each costs the service a socket write and a reply to
-- parse. What every transition and every webhook outcome did in 3 to 6 statements is one call here.

-- The origin (scheme://host[:port]) of a job's webhook URL, kept with the job so the outbox rows of
-- its later states are written in SQL. Set by the driver at submit (the URL's origin as the
-- service computes it). Jobs submitted before this migration get an approximation: it only names
-- the per-receiver cap's bucket.
ALTER TABLE jobs ADD COLUMN webhook_origin text;
UPDATE jobs SET webhook_origin = lower(substring(webhook_url FROM '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*'))
  WHERE webhook_url IS NOT NULL AND state NOT IN ('done', 'failed', 'canceled');

-- A job's transition row, what a `done` releases, and its outbox row, after the job's row has
-- changed (the caller's UPDATE or INSERT, in the same transaction). Returns the transition's
-- number, the outbox row's due time (NULL: no row, or not the head of the job's line) and how many
-- waiting turns a `done` released.
CREATE FUNCTION foreman_record(
  p_seq bigint, p_state text, p_now bigint, p_attempt integer,
  p_url text, p_origin text, p_gone integer, p_events text,
  OUT rec_n integer, OUT rec_due bigint, OUT rec_released integer
) LANGUAGE plpgsql AS $$
DECLARE
  v_sequence integer;
BEGIN
  INSERT INTO job_transitions AS t (job_seq, n, state, at, attempt)
    VALUES (p_seq, (SELECT coalesce(max(x.n), 0) + 1 FROM job_transitions x WHERE x.job_seq = p_seq), p_state, p_now, p_attempt)
    RETURNING t.n INTO rec_n;
  rec_released := 0;
  IF p_state = 'done' THEN
    UPDATE jobs SET waits = 0, run_at = p_now, updated_at = p_now WHERE prev_seq = p_seq AND state = 'queued' AND waits = 1;
    GET DIAGNOSTICS rec_released = ROW_COUNT;
  END IF;
  IF p_url IS NULL OR p_gone = 1 THEN RETURN; END IF;
  IF p_events IS NOT NULL AND NOT (p_events::jsonb ? p_state) THEN RETURN; END IF;
  v_sequence := CASE p_state WHEN 'scheduled' THEN 0 WHEN 'queued' THEN 1 WHEN 'loading' THEN 2 WHEN 'working' THEN 3 ELSE 4 END;
  -- The job's line changes under this lock (see the driver's lineLock).
  PERFORM pg_advisory_xact_lock(-p_seq);
  INSERT INTO webhook_deliveries AS d (job_seq, state, sequence, url, origin, occurred_at, next_attempt_at, due_at)
    VALUES (p_seq, p_state, v_sequence, p_url,
      coalesce(p_origin, lower(substring(p_url FROM '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*'))), p_now, p_now,
      CASE WHEN EXISTS (SELECT 1 FROM webhook_deliveries w WHERE w.job_seq = p_seq AND w.status = 'pending' AND w.sequence < v_sequence)
        THEN NULL ELSE p_now END)
    ON CONFLICT (job_seq, state) DO NOTHING
    RETURNING d.due_at INTO rec_due;
END $$;

-- Makes the head of a job's line (its lowest pending sequence) due, and no other row. Only the
-- rows whose due time changes are written. The caller holds the line's lock.
CREATE FUNCTION foreman_line_refresh(p_seq bigint) RETURNS void LANGUAGE sql AS $$
  UPDATE webhook_deliveries d SET due_at = CASE WHEN d.id = h.id THEN d.next_attempt_at END
    FROM (SELECT (SELECT w.id FROM webhook_deliveries w
            WHERE w.job_seq = p_seq AND w.status = 'pending' ORDER BY w.sequence, w.id LIMIT 1) AS id) h
    WHERE d.job_seq = p_seq AND d.status = 'pending'
      AND d.due_at IS DISTINCT FROM CASE WHEN d.id = h.id THEN d.next_attempt_at END;
$$;

-- A delivery's outcome, with the line's next head made due: one call, its own transaction.
-- Returns the job's seq, or NULL when the row was no longer pending (nothing changed).
-- p_notify (the service's NOTIFY payload, or NULL) tells the other instances a slot is free.
CREATE FUNCTION foreman_delivery_record(
  p_id bigint, p_now bigint, p_kind text, p_code integer, p_next bigint, p_error text, p_notify text
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_seq bigint;
BEGIN
  SELECT job_seq INTO v_seq FROM webhook_deliveries WHERE id = p_id;
  IF v_seq IS NULL THEN RETURN NULL; END IF;
  PERFORM pg_advisory_xact_lock(-v_seq);
  IF p_kind = 'delivered' THEN
    UPDATE webhook_deliveries SET status = 'delivered', attempts = attempts + 1, delivered_at = p_now,
        next_attempt_at = NULL, due_at = NULL, last_status_code = p_code, last_error = NULL, claimed_by = NULL, claimed_until = NULL
      WHERE id = p_id AND status = 'pending';
  ELSIF p_kind = 'retry' THEN
    UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_at = p_next,
        due_at = CASE WHEN due_at IS NULL THEN NULL ELSE p_next END, last_status_code = p_code, last_error = p_error,
        claimed_by = NULL, claimed_until = NULL
      WHERE id = p_id AND status = 'pending';
  ELSE
    UPDATE webhook_deliveries SET status = 'failed', attempts = attempts + 1, next_attempt_at = NULL,
        due_at = NULL, last_status_code = p_code, last_error = p_error, claimed_by = NULL, claimed_until = NULL
      WHERE id = p_id AND status = 'pending';
  END IF;
  IF NOT FOUND THEN RETURN NULL; END IF;
  IF p_kind = 'gone' THEN
    UPDATE jobs SET webhook_gone = 1 WHERE seq = v_seq;
    UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, due_at = NULL, claimed_by = NULL, claimed_until = NULL,
        last_error = 'not sent: the receiver answered 410 Gone for an earlier event'
      WHERE job_seq = v_seq AND status = 'pending';
  END IF;
  IF p_kind <> 'retry' THEN
    PERFORM foreman_line_refresh(v_seq);
  END IF;
  IF p_notify IS NOT NULL THEN PERFORM pg_notify('foreman_events', p_notify); END IF;
  RETURN v_seq;
END $$;
