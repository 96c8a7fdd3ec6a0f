-- foreman_delivery_record (0006) for a batch's terminal event too (ADR-0015; its outbox row, from
-- 0004, has batch_seq and no job_seq): its outcome is recorded like a job event's, without the
-- job's line (a batch event is alone in its line: no lock, no next head) and without a job to
-- mark gone on a 410. It returns 0 for a batch event (NULL still means: nothing changed).
-- In its own migration because 0004 may be applied before or after 0006 (0004 was numbered
-- before 0005 and 0006 were written, and a database may already be at 0006).
CREATE OR REPLACE FUNCTION foreman_delivery_record(
  p_id bigint, p_now bigint, p_kind text, p_code integer, p_next bigint, p_error text, p_notify text
) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_seq bigint;
  v_batch bigint;
BEGIN
  SELECT job_seq, batch_seq INTO v_seq, v_batch FROM webhook_deliveries WHERE id = p_id;
  IF v_seq IS NULL AND v_batch IS NULL THEN RETURN NULL; END IF;
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
