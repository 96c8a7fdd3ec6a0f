-- foreman_delivery_record (0006, 0007) took the line's lock and then, on a 410 Gone, the job's row
-- lock (to mark it gone), while a transition holds the job's row and then takes the line's lock
-- (foreman_record): a 410 recorded while the job changed state deadlocked both until PostgreSQL's
-- deadlock_timeout (1 s) ended one, which the driver then ran again. foreman_delivery_outcome is
-- foreman_delivery_record with the job's row locked first on a 410; nothing else changes. A new
-- name, not a replacement: 0007 may be applied after this migration (see 0007's header), and
-- would put the old body back.

CREATE FUNCTION foreman_delivery_outcome(
  p_id bigint, p_now bigint, p_kind text, p_code integer, p_next bigint, p_error text, p_notify text
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_seq bigint;
  v_batch bigint;
BEGIN
  SELECT job_seq, batch_seq INTO v_seq, v_batch FROM webhook_deliveries WHERE id = p_id;
  IF v_seq IS NULL AND v_batch IS NULL THEN RETURN NULL; END IF;
  -- A 410 marks the job gone: its row lock comes first, as in a transition (the job's row, then
  -- the line's lock); the other way round each could wait for the other until deadlock_timeout.
  IF v_seq IS NOT NULL AND p_kind = 'gone' THEN PERFORM 1 FROM jobs WHERE seq = v_seq FOR UPDATE; END IF;
  IF v_seq IS NOT NULL THEN PERFORM pg_advisory_xact_lock(-v_seq); END IF;
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
  IF v_seq IS NOT NULL THEN
    IF p_kind = 'gone' THEN
      UPDATE jobs SET webhook_gone = 1 WHERE seq = v_seq;
      UPDATE webhook_deliveries SET status = 'failed', next_attempt_at = NULL, due_at = NULL, claimed_by = NULL, claimed_until = NULL,
          last_error = 'not sent: the receiver answered 410 Gone for an earlier event'
        WHERE job_seq = v_seq AND status = 'pending';
    END IF;
    IF p_kind <> 'retry' THEN
      PERFORM foreman_line_refresh(v_seq);
    END IF;
  END IF;
  IF p_notify IS NOT NULL THEN PERFORM pg_notify('foreman_events', p_notify); END IF;
  RETURN coalesce(v_seq, 0);
END $$;
