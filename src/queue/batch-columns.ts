/**
 * The files' and batches' columns as both drivers read them (ADR-0015): the same schema and the
 * same SQL in SQLite and PostgreSQL, written once.
 */

export const FILE_COLS = `seq, id, nullif(key_id, '') AS keyId, purpose, filename, bytes, lines, endpoint, status, batch_seq AS batchSeq, role,
  created_at AS createdAt, expires_at AS expiresAt`;

export const BATCH_COLS = `seq, id, nullif(key_id, '') AS keyId, input_file_id AS inputFileId, input_file_seq AS inputFileSeq, endpoint,
  completion_window AS completionWindow, status, ending, metadata, webhook_url AS webhookUrl, priority, total, submitted,
  last_line AS lastLine, completed, failed, canceled, errors, output_file_id AS outputFileId, error_file_id AS errorFileId,
  created_at AS createdAt, expires_at AS expiresAt, in_progress_at AS inProgressAt, finalizing_at AS finalizingAt,
  completed_at AS completedAt, failed_at AS failedAt, expired_at AS expiredAt, cancelling_at AS cancellingAt,
  cancelled_at AS cancelledAt`;

/** The partial index batches_active's condition, stated exactly so each store can use the index. */
export const ACTIVE = "status IN ('validating', 'in_progress', 'cancelling', 'finalizing')";
