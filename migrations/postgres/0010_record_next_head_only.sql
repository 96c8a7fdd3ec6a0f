-- foreman_delivery_record_next (0008) claims only the head of the job's line. 0008 took the first
-- pending event after the recorded one that was due by the caller's clock, which could pass over
-- an earlier event not yet due by that clock (events stamped by another instance's clock) or
-- pending again (a redelivery), and send a later event first (found in review, reproduced).

CREATE OR REPLACE FUNCTION foreman_delivery_record_next(
  p_id bigint, p_now bigint, p_kind text, p_code integer, p_next bigint, p_error text, p_notify text,
  p_by text, p_until bigint
) RETURNS TABLE (
  recorded boolean, id bigint, job_seq bigint, state text, sequence integer, url text, origin text, occurred_at bigint,
  attempts integer, job_id text, metadata text, error_code text, error_message text, created_at bigint, started_at bigint,
  finished_at bigint, attempt integer, model text, conversation_id text, load_ms double precision, prompt_tokens integer,
  completion_tokens integer
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
  v_seq bigint;
  v_sequence integer;
  v_next bigint;
BEGIN
  SELECT w.sequence INTO v_sequence FROM webhook_deliveries w WHERE w.id = p_id;
  v_seq := foreman_delivery_record(p_id, p_now, p_kind, p_code, p_next, p_error, p_notify);
  IF v_seq IS NULL OR p_kind <> 'delivered' THEN
    RETURN QUERY SELECT v_seq IS NOT NULL, NULL::bigint, NULL::bigint, NULL::text, NULL::integer, NULL::text, NULL::text,
      NULL::bigint, NULL::integer, NULL::text, NULL::text, NULL::text, NULL::text, NULL::bigint, NULL::bigint, NULL::bigint,
      NULL::integer, NULL::text, NULL::text, NULL::double precision, NULL::integer, NULL::integer;
    RETURN;
  END IF;
  -- The head of the job's line (its lowest pending event, made due by the record above), if it
  -- is due and nobody holds it. Only the head: a later event is never claimed past an earlier one
  -- that is not due yet (another instance's clock) or pending again (a redelivery).
  UPDATE webhook_deliveries w SET claimed_by = p_by, claimed_until = p_until
    WHERE w.id = (SELECT d.id FROM webhook_deliveries d
        WHERE d.job_seq = v_seq AND d.status = 'pending'
        ORDER BY d.sequence, d.id LIMIT 1 FOR UPDATE)
      AND w.sequence > v_sequence AND w.due_at IS NOT NULL AND w.due_at <= p_now
      AND (w.claimed_by IS NULL OR w.claimed_until <= p_now)
    RETURNING w.id INTO v_next;
  RETURN QUERY SELECT true, d.id, d.job_seq, d.state, d.sequence, d.url, d.origin, d.occurred_at, d.attempts,
      j.id, j.metadata, j.error_code, j.error_message, j.created_at, j.started_at, j.finished_at, j.attempt, j.model,
      j.conversation_id, j.load_ms, j.prompt_tokens, j.completion_tokens
    FROM (SELECT 1) one LEFT JOIN webhook_deliveries d ON d.id = v_next LEFT JOIN jobs j ON j.seq = d.job_seq;
END $$;
