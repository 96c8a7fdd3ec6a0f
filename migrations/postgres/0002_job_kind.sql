-- Job kinds (ADR-0015): a chat (/api/chat) or an embedding (/api/embed). The batch a job belongs
-- to is recorded for when the Batch API comes to this driver (not yet: ADR-0011).
ALTER TABLE jobs ADD COLUMN kind text NOT NULL DEFAULT 'chat' CHECK (kind IN ('chat', 'embed'));
ALTER TABLE jobs ADD COLUMN batch_seq bigint;
