-- foreman_line_refresh (0006) as PL/pgSQL: a LANGUAGE sql function that is not inlined is planned
-- again at every call (0.25 ms each, once per webhook outcome: the largest planning cost of a job
-- in the shared bench); PL/pgSQL keeps its statement's plan for the session.
CREATE OR REPLACE FUNCTION foreman_line_refresh(p_seq bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  UPDATE webhook_deliveries d SET due_at = CASE WHEN d.id = h.id THEN d.next_attempt_at END
    FROM (SELECT (SELECT w.id FROM webhook_deliveries w
            WHERE w.job_seq = p_seq AND w.status = 'pending' ORDER BY w.sequence, w.id LIMIT 1) AS id) h
    WHERE d.job_seq = p_seq AND d.status = 'pending'
      AND d.due_at IS DISTINCT FROM CASE WHEN d.id = h.id THEN d.next_attempt_at END;
END $$;
