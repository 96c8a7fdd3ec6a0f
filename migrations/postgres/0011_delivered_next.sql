-- A delivered event's record and the claim of its job's next one in four statements instead of
-- nine (ADR-0011, "Speed"): foreman_delivery_record_next (0008, 0010) read the row twice, made the
-- line's new head due in one UPDATE and claimed it in a second, and the send of a `done` event read
-- its artifacts in a round trip of its own. Here the head is made due and claimed in one UPDATE,
-- and the claimed event comes back with its artifacts (`arts`, JSON; inline bodies in base64).
-- The line lock is taken before the row changes, as in foreman_delivery_record.

-- A `done` event's artifacts as its send needs them: metadata, and the body when it is at most
-- p_inline bytes (base64). NULL for any other state.
CREATE FUNCTION foreman_event_artifacts(p_seq bigint, p_state text, p_inline bigint) RETURNS json
LANGUAGE sql STABLE AS $$
  SELECT CASE WHEN p_state = 'done' THEN (
    SELECT coalesce(json_agg(json_build_object('name', a.name, 'contentType', a.content_type, 'size', a.size,
        'sha256', a.sha256, 'body', CASE WHEN a.size <= p_inline THEN encode(a.body, 'base64') END) ORDER BY a.name), '[]'::json)
      FROM artifacts a WHERE a.job_seq = p_seq) END
$$;

CREATE FUNCTION foreman_delivered_next(
  p_id bigint, p_now bigint, p_code integer, p_notify text, p_by text, p_until bigint, p_inline bigint
) RETURNS TABLE (
  recorded boolean, id bigint, job_seq bigint, state text, sequence integer, url text, origin text, occurred_at bigint,
  attempts integer, job_id text, metadata text, error_code text, error_message text, created_at bigint, started_at bigint,
  finished_at bigint, attempt integer, model text, conversation_id text, load_ms double precision, prompt_tokens integer,
  completion_tokens integer, arts json
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  v_seq bigint;
  v_sequence integer;
  v_next bigint;
BEGIN
  SELECT w.job_seq, w.sequence INTO v_seq, v_sequence FROM webhook_deliveries w WHERE w.id = p_id;
  -- The job's line changes under this lock (see the driver's lineLock); a batch event has no line.
  IF v_seq IS NOT NULL THEN PERFORM pg_advisory_xact_lock(-v_seq); END IF;
  UPDATE webhook_deliveries w SET status = 'delivered', attempts = w.attempts + 1, delivered_at = p_now,
      next_attempt_at = NULL, due_at = NULL, last_status_code = p_code, last_error = NULL, claimed_by = NULL, claimed_until = NULL
    WHERE w.id = p_id AND w.status = 'pending';
  IF NOT FOUND THEN
    RETURN QUERY SELECT false, NULL::bigint, NULL::bigint, NULL::text, NULL::integer, NULL::text, NULL::text,
      NULL::bigint, NULL::integer, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bigint, NULL::bigint, NULL::bigint,
      NULL::integer, NULL::text, NULL::text, NULL::double precision, NULL::integer, NULL::integer, NULL::json;
    RETURN;
  END IF;
  IF p_notify IS NOT NULL THEN PERFORM pg_notify('foreman_events', p_notify); END IF;
  IF v_seq IS NOT NULL THEN
    -- foreman_line_refresh (the head of the line, its lowest pending event, is due and no other
    -- row is), and in the same UPDATE the head claimed here if it is due by p_now, nobody holds
    -- it, and it comes after the recorded event: never a later event past an earlier one that is
    -- not due yet (another instance's clock) or pending again (a redelivery).
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
    SELECT u.id INTO v_next FROM u WHERE u.mine;
  END IF;
  RETURN QUERY SELECT true, d.id, d.job_seq, d.state, d.sequence, d.url, d.origin, d.occurred_at, d.attempts,
      j.id, j.metadata, j.error_code, j.error_message, j.created_at, j.started_at, j.finished_at, j.attempt, j.model,
      j.conversation_id, j.load_ms, j.prompt_tokens, j.completion_tokens, foreman_event_artifacts(d.job_seq, d.state, p_inline)
    FROM (SELECT 1) one LEFT JOIN webhook_deliveries d ON d.id = v_next LEFT JOIN jobs j ON j.seq = d.job_seq;
END $$;
