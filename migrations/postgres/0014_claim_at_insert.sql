-- A job event's outbox row claimed in the transition that writes it (ADR-0017). Before this, a
-- row written due was claimed by a second statement (the dispatcher's claimDue, its own commit),
-- about 1.8 such statements per job in the shared bench. foreman_record_claim is foreman_record
-- (0006) with three more parameters: when p_by is set and the row is the head of its job's line
-- (due at once), the row is written claimed by p_by until p_until, unless its receiver origin
-- already has p_cap deliveries claimed (the per-origin cap counts the same rows as claimDue).
-- rec_claimed is the row's id when it was claimed here, NULL otherwise.
CREATE FUNCTION foreman_record_claim(
  p_seq bigint, p_state text, p_now bigint, p_attempt integer,
  p_url text, p_origin text, p_gone integer, p_events text,
  p_by text, p_until bigint, p_cap integer,
  OUT rec_n integer, OUT rec_due bigint, OUT rec_released integer, OUT rec_claimed bigint
) LANGUAGE plpgsql AS $$
DECLARE
  v_sequence integer;
  v_origin text;
  v_due bigint;
  v_by text;
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
  v_origin := coalesce(p_origin, lower(substring(p_url FROM '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*')));
  -- The job's line changes under this lock (see the driver's lineLock).
  PERFORM pg_advisory_xact_lock(-p_seq);
  v_due := CASE WHEN EXISTS (SELECT 1 FROM webhook_deliveries w WHERE w.job_seq = p_seq AND w.status = 'pending' AND w.sequence < v_sequence)
    THEN NULL ELSE p_now END;
  IF v_due IS NOT NULL AND p_by IS NOT NULL
    AND (SELECT count(*) FROM webhook_deliveries c
      WHERE c.origin = v_origin AND c.claimed_by IS NOT NULL AND c.claimed_until > p_now) < p_cap THEN
    v_by := p_by;
  END IF;
  INSERT INTO webhook_deliveries AS d (job_seq, state, sequence, url, origin, occurred_at, next_attempt_at, due_at, claimed_by, claimed_until)
    VALUES (p_seq, p_state, v_sequence, p_url, v_origin, p_now, p_now, v_due, v_by, CASE WHEN v_by IS NOT NULL THEN p_until END)
    ON CONFLICT (job_seq, state) DO NOTHING
    RETURNING d.due_at, CASE WHEN d.claimed_by IS NOT NULL THEN d.id END INTO rec_due, rec_claimed;
END $$;

-- foreman_delivered_next (0011) with one more column, head_left: after the record, the job's line
-- has a pending head that this call did not claim (an earlier event pending again after a
-- redelivery, one not due yet, or one another instance holds). The dispatcher no longer claims
-- after every attempt that ends (ADR-0017), so such a head is announced as due by the driver.
CREATE FUNCTION foreman_delivered_claim_next(
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
    WHERE w.id = p_id AND w.status = 'pending';
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
