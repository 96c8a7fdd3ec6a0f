-- Outbox dispatch whose cost does not grow with the backlog (ADR-0010).
-- A pending delivery is "due-able" only at the head of its job's line (the pending row with the
-- lowest sequence). `due_at` holds next_attempt_at for exactly those rows and is NULL for every
-- other row, so due heads are an index range. `origin` (scheme://host[:port]) keys the
-- per-receiver concurrency cap, and `webhook_origins` keeps each origin's earliest due head, so a
-- claim skips a saturated receiver's whole backlog with one index step.

ALTER TABLE webhook_deliveries ADD COLUMN origin TEXT NOT NULL DEFAULT '';
ALTER TABLE webhook_deliveries ADD COLUMN due_at INTEGER;

UPDATE webhook_deliveries
   SET origin = substr(url, 1, 8 + instr(substr(url, 9), '/') - 1);

UPDATE webhook_deliveries AS d
   SET due_at = d.next_attempt_at
 WHERE d.status = 'pending'
   AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e
                    WHERE e.job_seq = d.job_seq AND e.status = 'pending' AND e.sequence < d.sequence);

DROP INDEX webhook_deliveries_due;
CREATE INDEX webhook_deliveries_origin_due ON webhook_deliveries (origin, due_at, id) WHERE due_at IS NOT NULL;

CREATE TABLE webhook_origins (
  origin  TEXT PRIMARY KEY,
  due_at  INTEGER              -- min(due_at) of the origin's head rows; NULL when it has none
) WITHOUT ROWID;
CREATE INDEX webhook_origins_due ON webhook_origins (due_at) WHERE due_at IS NOT NULL;

INSERT INTO webhook_origins (origin, due_at)
SELECT origin, min(due_at) FROM webhook_deliveries WHERE due_at IS NOT NULL GROUP BY origin;

-- Only a pending row can be due.
CREATE TRIGGER webhook_deliveries_due_pending
BEFORE UPDATE OF due_at, status ON webhook_deliveries
WHEN NEW.due_at IS NOT NULL AND NEW.status <> 'pending'
BEGIN
  SELECT RAISE(ABORT, 'only a pending delivery can be due');
END;
