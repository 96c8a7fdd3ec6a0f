-- foreman_event_artifacts (0011) as PL/pgSQL, for the reason 0009 gave for foreman_line_refresh:
-- a LANGUAGE sql function that is not inlined (this one has a sub-select) is parsed and planned
-- again in every statement that calls it, about 0.2 ms each time here, and every claim of a job
-- event calls it. PL/pgSQL keeps its plan for the session. Same signature, same answers.
CREATE OR REPLACE FUNCTION foreman_event_artifacts(p_seq bigint, p_state text, p_inline bigint) RETURNS json
LANGUAGE plpgsql STABLE AS $$
BEGIN
  IF p_state IS DISTINCT FROM 'done' THEN RETURN NULL; END IF;
  RETURN (SELECT coalesce(json_agg(json_build_object('name', a.name, 'contentType', a.content_type, 'size', a.size,
      'sha256', a.sha256, 'body', CASE WHEN a.size <= p_inline THEN encode(a.body, 'base64') END) ORDER BY a.name), '[]'::json)
    FROM artifacts a WHERE a.job_seq = p_seq);
END $$;
