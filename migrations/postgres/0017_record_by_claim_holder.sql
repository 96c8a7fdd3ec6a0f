-- A webhook attempt's outcome is recorded only by the instance that holds the delivery's claim
-- (or when nobody does). An instance whose record was held up past its lease (it could not reach
-- the database, or stalled) found the delivery claimed by another instance that was sending it
-- again; its late record still cleared that claim and set the row due, so a third instance could
-- send it a third time while the second was in flight, and the job's next event could overtake it
-- at the receiver (a review found this). Now such a record changes nothing: the new holder records
-- its own attempt. A delivery nobody holds (the leader released the expired claim) still takes
-- the late record, which saves sending it again. foreman_delivery_outcome (0012) gains p_by, the
-- recording instance (the old signature is dropped: one live copy of each function, ADR-0011);
-- foreman_delivered_claim_next (0014) already had it.

CREATE FUNCTION foreman_delivery_outcome(
  p_id bigint, p_now bigint, p_kind text, p_code integer, p_next bigint, p_error text, p_notify text, p_by text
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
      WHERE id = p_id AND status = 'pending' AND (claimed_by IS NULL OR claimed_by = p_by);
  ELSIF p_kind = 'retry' THEN
    UPDATE webhook_deliveries SET attempts = attempts + 1, next_attempt_at = p_next,
        due_at = CASE WHEN due_at IS NULL THEN NULL ELSE p_next END, last_status_code = p_code, last_error = p_error,
        claimed_by = NULL, claimed_until = NULL
      WHERE id = p_id AND status = 'pending' AND (claimed_by IS NULL OR claimed_by = p_by);
  ELSE
    UPDATE webhook_deliveries SET status = 'failed', attempts = attempts + 1, next_attempt_at = NULL,
        due_at = NULL, last_status_code = p_code, last_error = p_error, claimed_by = NULL, claimed_until = NULL
      WHERE id = p_id AND status = 'pending' AND (claimed_by IS NULL OR claimed_by = p_by);
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

DROP FUNCTION foreman_delivery_outcome(bigint, bigint, text, integer, bigint, text, text);

CREATE OR REPLACE FUNCTION foreman_delivered_claim_next(
  p_id bigint, p_now bigint, p_code integer, p_notify text, p_by text, p_until bigint, p_inline bigint
) RETURNS TABLE (
  recorded boolean, id bigint, job_seq bigint, state text, sequence integer, url text, origin text, occurred_at bigint,
  attempts integer, job_id text, metadata text, error_code text, error_message text, created_at bigint, started_at bigint,
  finished_at bigint, attempt integer, model text, conversation_id text, load_ms double precision, prompt_tokens integer,
  completion_tokens integer, arts json, head_left boolean
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  v_seq bigint;
  v_sequence integer;
  v_next bigint;
  v_head bigint;
BEGIN
  SELECT w.job_seq, w.sequence INTO v_seq, v_sequence FROM webhook_deliveries w WHERE w.id = p_id;
  IF v_seq IS NOT NULL THEN PERFORM pg_advisory_xact_lock(-v_seq); END IF;
  UPDATE webhook_deliveries w SET status = 'delivered', attempts = w.attempts + 1, delivered_at = p_now,
      next_attempt_at = NULL, due_at = NULL, last_status_code = p_code, last_error = NULL, claimed_by = NULL, claimed_until = NULL
    WHERE w.id = p_id AND w.status = 'pending' AND (w.claimed_by IS NULL OR w.claimed_by = p_by);
  IF NOT FOUND THEN
    RETURN QUERY SELECT false, NULL::bigint, NULL::bigint, NULL::text, NULL::integer, NULL::text, NULL::text,
      NULL::bigint, NULL::integer, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bigint, NULL::bigint, NULL::bigint,
      NULL::integer, NULL::text, NULL::text, NULL::double precision, NULL::integer, NULL::integer, NULL::json, false;
    RETURN;
  END IF;
  IF p_notify IS NOT NULL THEN PERFORM pg_notify('foreman_events', p_notify); END IF;
  IF v_seq IS NOT NULL THEN
    WITH h AS (
      SELECT (SELECT x.id FROM webhook_deliveries x WHERE x.job_seq = v_seq AND x.status = 'pending'
        ORDER BY x.sequence, x.id LIMIT 1) AS id
    ), u AS (
      UPDATE webhook_deliveries d SET
          due_at = CASE WHEN d.id = h.id THEN d.next_attempt_at END,
          claimed_by = CASE WHEN d.id = h.id AND d.sequence > v_sequence AND d.next_attempt_at <= p_now
            AND (d.claimed_by IS NULL OR d.claimed_until <= p_now) THEN p_by ELSE d.claimed_by END,
          claimed_until = CASE WHEN d.id = h.id AND d.sequence > v_sequence AND d.next_attempt_at <= p_now
            AND (d.claimed_by IS NULL OR d.claimed_until <= p_now) THEN p_until ELSE d.claimed_until END
        FROM h
        WHERE d.job_seq = v_seq AND d.status = 'pending'
          AND (d.due_at IS DISTINCT FROM CASE WHEN d.id = h.id THEN d.next_attempt_at END
            OR (d.id = h.id AND d.sequence > v_sequence AND d.next_attempt_at <= p_now
              AND (d.claimed_by IS NULL OR d.claimed_until <= p_now)))
        RETURNING d.id, d.claimed_by IS NOT DISTINCT FROM p_by AND d.claimed_until IS NOT DISTINCT FROM p_until AS mine
    )
    SELECT (SELECT u.id FROM u WHERE u.mine), (SELECT h.id FROM h) INTO v_next, v_head;
  END IF;
  RETURN QUERY SELECT true, d.id, d.job_seq, d.state, d.sequence, d.url, d.origin, d.occurred_at, d.attempts,
      j.id, j.metadata, j.error_code, j.error_message, j.created_at, j.started_at, j.finished_at, j.attempt, j.model,
      j.conversation_id, j.load_ms, j.prompt_tokens, j.completion_tokens, foreman_event_artifacts(d.job_seq, d.state, p_inline),
      v_head IS NOT NULL AND v_next IS NULL
    FROM (SELECT 1) one LEFT JOIN webhook_deliveries d ON d.id = v_next LEFT JOIN jobs j ON j.seq = d.job_seq;
END $$;
