-- Functions no statement calls since 0014: foreman_record (0006; every transition records through
-- foreman_record_claim) and foreman_delivered_next (0011; replaced by foreman_delivered_claim_next).
-- Dropped so the schema keeps one live copy of each. One version runs on a database (ADR-0011).
DROP FUNCTION foreman_record(bigint, text, bigint, integer, text, text, integer, text);
DROP FUNCTION foreman_delivered_next(bigint, bigint, integer, text, text, bigint, bigint);
