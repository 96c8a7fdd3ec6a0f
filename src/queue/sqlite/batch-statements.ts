import type { DB } from './db.js';
import { TRANSITION_COLS } from './statements.js';
import { ACTIVE, BATCH_COLS, FILE_COLS } from '../batch-columns.js';

/** The SQLite driver's statements for files and batches (ADR-0015), prepared once. */
export function prepareBatchStatements(db: DB) {
  const p = (sql: string) => db.prepare(sql);
  return {
    // --- files ---
    fileInsert: p(`INSERT INTO files (id, key_id, purpose, filename, bytes, lines, endpoint, status, created_at, expires_at)
      VALUES (@id, @keyId, 'batch', @filename, 0, 0, @endpoint, 'uploading', @createdAt, @expiresAt) RETURNING seq`).pluck(),
    fileLineInsert: p(`INSERT INTO file_lines (file_seq, n, custom_id, body) VALUES (?, ?, ?, ?)`),
    fileUploading: p(`SELECT 1 FROM files WHERE seq = ? AND status = 'uploading'`).pluck(),
    fileFinish: p(`UPDATE files SET status = 'processed', bytes = @bytes, lines = @lines WHERE seq = @seq AND status = 'uploading'`),
    fileLinesDelete: p(`DELETE FROM file_lines WHERE file_seq = @seq AND n IN (SELECT n FROM file_lines WHERE file_seq = @seq ORDER BY n LIMIT @limit)`),
    fileDelete: p(`DELETE FROM files WHERE seq = ?`),
    fileById: p(`SELECT ${FILE_COLS} FROM files WHERE id = ?`),
    fileBySeq: p(`SELECT ${FILE_COLS} FROM files WHERE seq = ?`),
    // Whether all of a file's lines are still there (its removal deletes them in steps first).
    fileWhole: p(`SELECT count(*) = @lines FROM file_lines WHERE file_seq = @seq`).pluck(),
    filesPage: p(`SELECT ${FILE_COLS} FROM files WHERE seq < @before AND status = 'processed'
        AND (@key IS NULL OR key_id = @key) AND (@purpose IS NULL OR purpose = @purpose) ORDER BY seq DESC LIMIT @limit`),
    fileLinesPage: p(`SELECT n, custom_id AS customId, body FROM file_lines WHERE file_seq = @seq AND n > @after ORDER BY n LIMIT @limit`),
    fileBytesSet: p(`UPDATE files SET bytes = @bytes WHERE seq = @seq`),
    filesExpired: p(`SELECT ${FILE_COLS} FROM files INDEXED BY files_expiry WHERE expires_at IS NOT NULL AND expires_at <= @now
        ORDER BY expires_at LIMIT @limit`),
    filesAbandoned: p(`SELECT ${FILE_COLS} FROM files INDEXED BY files_uploading WHERE status = 'uploading' AND created_at < @before
        ORDER BY created_at LIMIT @limit`),
    // An input file still feeding a batch that has lines to submit is not deleted under it.
    fileFeeding: p(`SELECT 1 FROM batches INDEXED BY batches_active WHERE ${ACTIVE} AND input_file_seq = ? AND ending IS NULL
        AND submitted < total AND status IN ('validating', 'in_progress') LIMIT 1`).pluck(),

    // --- batches ---
    batchInsert: p(`INSERT INTO batches (id, key_id, input_file_id, input_file_seq, endpoint, completion_window, metadata, webhook_url,
        priority, total, output_file_id, error_file_id, created_at, expires_at)
      VALUES (@id, @keyId, @inputFileId, @inputFileSeq, @endpoint, @completionWindow, @metadata, @webhookUrl,
        @priority, @total, @outputFileId, @errorFileId, @now, @expiresAt) RETURNING seq`).pluck(),
    outputFileInsert: p(`INSERT INTO files (id, key_id, purpose, filename, bytes, lines, status, batch_seq, role, created_at, expires_at)
      VALUES (@id, @keyId, 'batch_output', @filename, NULL, 0, 'processed', @batchSeq, @role, @now, @expiresAt)`),
    batchById: p(`SELECT ${BATCH_COLS} FROM batches WHERE id = ?`),
    batchBySeq: p(`SELECT ${BATCH_COLS} FROM batches WHERE seq = ?`),
    batchesPage: p(`SELECT ${BATCH_COLS} FROM batches WHERE seq < @before AND (@key IS NULL OR key_id = @key) ORDER BY seq DESC LIMIT @limit`),
    batchesActive: p(`SELECT ${BATCH_COLS} FROM batches INDEXED BY batches_active
      WHERE ${ACTIVE} AND status IN ('validating', 'in_progress', 'cancelling') AND (ending IS NOT NULL OR submitted < total)
        AND seq > @after ORDER BY seq LIMIT @limit`),
    batchesNextExpiry: p(`SELECT seq, expires_at AS expiresAt FROM batches INDEXED BY batches_active
      WHERE ${ACTIVE} AND status IN ('validating', 'in_progress') AND ending IS NULL ORDER BY expires_at LIMIT 1`),
    batchAdvance: p(`UPDATE batches SET submitted = submitted + @n, last_line = @lastLine,
        status = CASE WHEN status = 'validating' THEN 'in_progress' ELSE status END,
        in_progress_at = coalesce(in_progress_at, @now)
      WHERE seq = @seq AND ending IS NULL AND status IN ('validating', 'in_progress')`),
    batchAcceptsJobs: p(`SELECT 1 FROM batches WHERE seq = ? AND ending IS NULL AND status IN ('validating', 'in_progress')`).pluck(),
    // Ending: the lines never submitted are counted at once (canceled for a cancel, failed for an
    // expiry or a failure); the waiting jobs are ended in chunks by batchJobsEnd.
    batchCancel: p(`UPDATE batches SET status = 'cancelling', ending = 'cancel', cancelling_at = @now, canceled = canceled + total - submitted
      WHERE seq = @seq AND status IN ('validating', 'in_progress') AND ending IS NULL RETURNING seq`).pluck(),
    batchExpire: p(`UPDATE batches SET ending = 'expire', failed = failed + total - submitted
      WHERE seq = @seq AND status IN ('validating', 'in_progress') AND ending IS NULL RETURNING seq`).pluck(),
    // Only while lines are left to submit (see the PostgreSQL driver's).
    batchFail: p(`UPDATE batches SET ending = 'fail', failed = failed + total - submitted, errors = @errors
      WHERE seq = @seq AND status IN ('validating', 'in_progress') AND ending IS NULL AND submitted < total RETURNING seq`).pluck(),
    // Settling: every line accounted for and every job ended → the batch's final status, in the
    // transaction that ended its last job. A batch that ran to the end passes through finalizing.
    batchSettle: p(`UPDATE batches SET
        status = CASE ending WHEN 'cancel' THEN 'cancelled' WHEN 'expire' THEN 'expired' WHEN 'fail' THEN 'failed' ELSE 'finalizing' END,
        cancelled_at = CASE WHEN ending = 'cancel' THEN @now END,
        expired_at = CASE WHEN ending = 'expire' THEN @now END,
        failed_at = CASE WHEN ending = 'fail' THEN @now END,
        finalizing_at = CASE WHEN ending IS NULL THEN @now END
      WHERE seq = @seq AND status IN ('validating', 'in_progress', 'cancelling') AND completed + failed + canceled = total
        AND (ending IS NOT NULL OR submitted = total)
      RETURNING status`).pluck(),
    batchComplete: p(`UPDATE batches SET status = 'completed', completed_at = @now WHERE seq = @seq AND status = 'finalizing'`),
    batchWebhook: p(`SELECT webhook_url AS url, status FROM batches WHERE seq = ?`),
    insertBatchDelivery: p(`INSERT OR IGNORE INTO webhook_deliveries (batch_seq, state, sequence, url, origin, occurred_at, next_attempt_at, due_at)
      VALUES (@seq, @state, 0, @url, @origin, @now, @now, @now) RETURNING due_at AS dueAt`),
    // A waiting job of an ending batch: canceled (cancel) or failed batch_expired (expiry, failure).
    batchWaitingJobs: p(`SELECT seq FROM jobs INDEXED BY jobs_batch_queued
      WHERE batch_seq = @seq AND state IN ('scheduled', 'queued') ORDER BY seq LIMIT @limit`).pluck(),
    jobCancelWaiting: p(`UPDATE jobs SET state = 'canceled', waits = 0, finished_at = @now, updated_at = @now
      WHERE seq = @seq AND state IN ('scheduled', 'queued') RETURNING ${TRANSITION_COLS}`),
    jobFailWaiting: p(`UPDATE jobs SET state = 'failed', waits = 0, error_code = @code, error_message = @message, finished_at = @now, updated_at = @now
      WHERE seq = @seq AND state IN ('scheduled', 'queued') RETURNING ${TRANSITION_COLS}`),
    batchResults: p(`SELECT j.seq, j.id AS jobId, j.metadata, j.state, j.model, j.result, j.error_code AS errorCode,
        j.error_message AS errorMessage, j.created_at AS createdAt, j.finished_at AS finishedAt,
        j.prompt_tokens AS promptTokens, j.completion_tokens AS completionTokens
      FROM jobs j INDEXED BY jobs_batch WHERE j.batch_seq = @seq AND j.seq > @after
        AND (CASE WHEN @role = 'output' THEN j.state = 'done' ELSE j.state IN ('failed', 'canceled') END)
      ORDER BY j.seq LIMIT @limit`),
    // Retention: jobs of batches that ended long enough ago go first, then the batches (their
    // output and error file rows with them).
    batchesEnded: p(`SELECT seq FROM batches INDEXED BY batches_ended
      WHERE status IN ('completed', 'failed', 'expired', 'cancelled') AND coalesce(completed_at, failed_at, expired_at, cancelled_at) < @before
        AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.batch_seq = batches.seq AND d.status = 'pending')
      ORDER BY coalesce(completed_at, failed_at, expired_at, cancelled_at) LIMIT @limit`).pluck(),
    batchJobsOf: p(`SELECT seq, id, conversation_id AS conversationId FROM jobs INDEXED BY jobs_batch WHERE batch_seq = @seq LIMIT @limit`),
    batchDelete: p(`DELETE FROM batches WHERE seq = ?`),
  };
}

export type BatchStatements = ReturnType<typeof prepareBatchStatements>;
