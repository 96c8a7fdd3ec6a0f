import type { ErrorInfo, JobState } from '../../domain.js';
import { Conflict, Validation } from '../../errors.js';
import type {
  BatchRecord,
  BatchResultRow,
  ClaimedDelivery,
  FileLine,
  FileRecord,
  InsertOutcome,
  NewBatch,
  NewFile,
  NewJob,
} from '../driver.js';
import { batchEventOf, batchOf, batchResultOf, originOf, RESULT_IN_ARTIFACT, type BatchResultDbRow, type BatchRow } from '../shared.js';
import type { Conn } from './db.js';
import type { Effects } from './driver.js';
import { ACTIVE, BATCH_COLS, FILE_COLS } from '../batch-columns.js';

/**
 * Files and batches (the Batch API, ADR-0015) on PostgreSQL: the SQL and the method bodies of
 * `PostgresDriver`'s file* and batch* methods, the same rules as the SQLite driver's
 * (`queue/sqlite/batch-statements.ts`), with the schema of migration 0004. The driver lends its
 * transaction helpers (`PgFilesHost`); every write here is one of its transactions.
 *
 * Locks, in the driver's order (ADR-0011): a job's row before its batch's row. A batch job's
 * terminal transition locks its job, then the batch (the progress trigger); `batchJobsEnd` locks
 * the waiting jobs first, in one statement, before any batch update; `batchJobsInsert` locks the
 * batch first and then only inserts new rows. A file is locked before the batch that reads it is
 * inserted, and before it is deleted, so a delete never removes the input of a batch being created.
 */

/** What the driver lends: its transactions and its transition recording. */
export interface PgFilesHost {
  tx<T>(op: (c: Conn, fx: Effects) => Promise<T>): Promise<T>;
  read<T>(fn: (c: Conn) => Promise<T>): Promise<T>;
  /** Runs a statement that moves jobs (RETURNING `transitionCols`) and records each one's transition; their ids. */
  moveAll(c: Conn, fx: Effects, sql: string, params: Record<string, unknown>, state: JobState, now: number): Promise<string[]>;
  /** The driver's job insert in the caller's transaction; `stopAtRefusal`: stop at the first refused job. */
  insertJobs(c: Conn, fx: Effects, p: { jobs: NewJob[]; now: number; maxQueued: number; maxQueuedBytes?: number }, stopAtRefusal: boolean): Promise<InsertOutcome[]>;
  /** The columns a transition statement returns. */
  transitionCols: string;
}

const ENDED_AT = 'coalesce(completed_at, failed_at, expired_at, cancelled_at)';

const RESULT_COLS = `j.seq, j.id AS jobId, j.metadata, j.state, j.model, j.result, a.body AS artifact, j.error_code AS errorCode,
  j.error_message AS errorMessage, j.created_at AS createdAt, j.finished_at AS finishedAt,
  j.prompt_tokens AS promptTokens, j.completion_tokens AS completionTokens`;

const Q = {
  // --- files ---
  fileInsert: `INSERT INTO files (id, key_id, purpose, filename, bytes, lines, endpoint, status, created_at, expires_at)
    VALUES (@id, @keyId, 'batch', @filename, 0, 0, @endpoint, 'uploading', @createdAt, @expiresAt::bigint) RETURNING seq`,
  // A chunk of lines in one statement (one round trip, whatever its size).
  linesInsert: `INSERT INTO file_lines (file_seq, n, custom_id, body)
    SELECT @seq::bigint, l.n, l.custom_id, l.body FROM unnest(@ns::integer[], @ids::text[], @bodies::text[]) AS l (n, custom_id, body)`,
  // The upload is still there, and stays while its lines go in.
  fileUploading: `SELECT 1 AS x FROM files WHERE seq = @seq AND status = 'uploading' FOR KEY SHARE`,
  fileFinish: `UPDATE files SET status = 'processed', bytes = @bytes, lines = @lines WHERE seq = @seq AND status = 'uploading'`,
  fileLock: `SELECT seq FROM files WHERE seq = @seq FOR UPDATE`,
  fileLinesDelete: `DELETE FROM file_lines WHERE file_seq = @seq AND n IN (SELECT n FROM file_lines WHERE file_seq = @seq ORDER BY n LIMIT @limit)`,
  fileDelete: `DELETE FROM files WHERE seq = @seq`,
  fileById: `SELECT ${FILE_COLS} FROM files WHERE id = @id`,
  // The input file of a batch being created: locked, so it is not deleted before the batch is in.
  fileBySeqShared: `SELECT ${FILE_COLS} FROM files WHERE seq = @seq FOR SHARE`,
  // Whether all of a file's lines are still there (its removal deletes them in steps first).
  fileWhole: `SELECT count(*) = @lines AS whole FROM file_lines WHERE file_seq = @seq`,
  filesPage: `SELECT ${FILE_COLS} FROM files WHERE seq < @before AND status = 'processed'
      AND (@key::text IS NULL OR key_id = @key::text) AND (@purpose::text IS NULL OR purpose = @purpose::text) ORDER BY seq DESC LIMIT @limit`,
  fileLinesPage: `SELECT n, custom_id AS customId, body FROM file_lines WHERE file_seq = @seq AND n > @after ORDER BY n LIMIT @limit`,
  fileBytesSet: `UPDATE files SET bytes = @bytes WHERE seq = @seq`,
  filesExpired: `SELECT ${FILE_COLS} FROM files WHERE expires_at IS NOT NULL AND expires_at <= @now ORDER BY expires_at LIMIT @limit`,
  filesAbandoned: `SELECT ${FILE_COLS} FROM files WHERE status = 'uploading' AND created_at < @before ORDER BY created_at LIMIT @limit`,
  // An input file still feeding a batch that has lines to submit is not deleted under it.
  fileFeeding: `SELECT 1 AS x FROM batches WHERE ${ACTIVE} AND input_file_seq = @seq AND ending IS NULL
      AND submitted < total AND status IN ('validating', 'in_progress') LIMIT 1`,

  // --- batches ---
  batchInsert: `INSERT INTO batches (id, key_id, input_file_id, input_file_seq, endpoint, completion_window, metadata, webhook_url,
      webhook_origin, priority, total, output_file_id, error_file_id, created_at, expires_at)
    VALUES (@id, @keyId, @inputFileId, @inputFileSeq, @endpoint, @completionWindow, @metadata::text, @webhookUrl::text,
      @webhookOrigin::text, @priority, @total, @outputFileId, @errorFileId, @now, @expiresAt) RETURNING seq`,
  outputFileInsert: `INSERT INTO files (id, key_id, purpose, filename, bytes, lines, status, batch_seq, role, created_at, expires_at)
    VALUES (@id, @keyId, 'batch_output', @filename, NULL, 0, 'processed', @batchSeq, @role, @now, @expiresAt::bigint)`,
  batchById: `SELECT ${BATCH_COLS} FROM batches WHERE id = @id`,
  batchBySeq: `SELECT ${BATCH_COLS} FROM batches WHERE seq = @seq`,
  batchesPage: `SELECT ${BATCH_COLS} FROM batches WHERE seq < @before AND (@key::text IS NULL OR key_id = @key::text) ORDER BY seq DESC LIMIT @limit`,
  batchesActive: `SELECT ${BATCH_COLS} FROM batches
    WHERE ${ACTIVE} AND status IN ('validating', 'in_progress', 'cancelling') AND (ending IS NOT NULL OR submitted < total)
      AND seq > @after ORDER BY seq LIMIT @limit`,
  batchesNextExpiry: `SELECT seq, expires_at AS expiresAt FROM batches
    WHERE ${ACTIVE} AND status IN ('validating', 'in_progress') AND ending IS NULL ORDER BY expires_at LIMIT 1`,
  // A chunk of jobs goes in under the batch's row lock: a cancel or an expiry that commits first
  // wins (nothing more is submitted), and one that comes later counts these jobs as submitted.
  batchLockOpen: `SELECT last_line AS lastLine FROM batches WHERE seq = @seq AND ending IS NULL AND status IN ('validating', 'in_progress')
    FOR NO KEY UPDATE`,
  batchAdvance: `UPDATE batches SET submitted = submitted + @n, last_line = @lastLine,
      status = CASE WHEN status = 'validating' THEN 'in_progress' ELSE status END,
      in_progress_at = coalesce(in_progress_at, @now::bigint)
    WHERE seq = @seq AND ending IS NULL AND status IN ('validating', 'in_progress')`,
  // Ending: the lines never submitted are counted at once (canceled for a cancel, failed for an
  // expiry or a failure); the waiting jobs are ended in chunks by batchJobsEnd.
  batchCancel: `UPDATE batches SET status = 'cancelling', ending = 'cancel', cancelling_at = @now, canceled = canceled + total - submitted
    WHERE seq = @seq AND status IN ('validating', 'in_progress') AND ending IS NULL RETURNING seq`,
  batchExpire: `UPDATE batches SET ending = 'expire', failed = failed + total - submitted
    WHERE seq = @seq AND status IN ('validating', 'in_progress') AND ending IS NULL RETURNING seq`,
  // Only while lines are left to submit (what fails a batch is a line that cannot be): a runner
  // acting on an old read (it lost the lead meanwhile) cannot fail a batch another one finished submitting.
  batchFail: `UPDATE batches SET ending = 'fail', failed = failed + total - submitted, errors = @errors
    WHERE seq = @seq AND status IN ('validating', 'in_progress') AND ending IS NULL AND submitted < total RETURNING seq`,
  // Settling (migration 0004): the batch's final status and its webhook row, if every line is
  // accounted for and every job ended.
  batchSettle: `SELECT settled, due FROM foreman_batch_settle(@seq, @now)`,
  // A batch job ended: did its batch end with it (in the same statement), with an event due?
  batchEventDue: `SELECT 1 AS x FROM webhook_deliveries WHERE batch_seq = @seq AND due_at IS NOT NULL LIMIT 1`,
  // The waiting jobs of an ending batch (locked first: a job's row before its batch's).
  waitingLocked: `SELECT seq FROM jobs WHERE batch_seq = @seq AND state IN ('scheduled', 'queued') ORDER BY seq LIMIT @limit FOR UPDATE`,
  batchResultsOutput: `SELECT ${RESULT_COLS} FROM jobs j
      LEFT JOIN artifacts a ON a.job_seq = j.seq AND a.name = 'completion' AND j.result = @marker
    WHERE j.batch_seq = @seq AND j.seq > @after AND j.state = 'done' ORDER BY j.seq LIMIT @limit`,
  batchResultsError: `SELECT ${RESULT_COLS} FROM jobs j
      LEFT JOIN artifacts a ON a.job_seq = j.seq AND a.name = 'completion' AND j.result = @marker
    WHERE j.batch_seq = @seq AND j.seq > @after AND j.state IN ('failed', 'canceled') ORDER BY j.seq LIMIT @limit`,
  // Retention: jobs of batches that ended long enough ago go first, then the batches (their
  // output and error file rows with them, and their webhook rows).
  batchesEnded: `SELECT seq FROM batches
    WHERE status IN ('completed', 'failed', 'expired', 'cancelled') AND ${ENDED_AT} < @before
      AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.batch_seq = batches.seq AND d.status = 'pending')
    ORDER BY ${ENDED_AT} LIMIT @limit FOR UPDATE SKIP LOCKED`,
  batchJobsDelete: `WITH gone AS (
      DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE batch_seq = @seq ORDER BY seq LIMIT @limit) RETURNING id, conversation_id),
    remembered AS (INSERT INTO expired_jobs (id, at) SELECT id, @now::bigint FROM gone ON CONFLICT (id) DO NOTHING)
    SELECT id, conversation_id AS conversationId FROM gone`,
  conversationsDropIfEmpty: `DELETE FROM conversations c WHERE c.id = ANY(@ids::text[])
    AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.conversation_id = c.id)`,
  batchDeliveriesDelete: `DELETE FROM webhook_deliveries WHERE batch_seq = @seq`,
  batchDelete: `DELETE FROM batches WHERE seq = @seq`,
};

const linesParams = (fileSeq: number, lines: FileLine[]) => ({
  seq: fileSeq,
  ns: lines.map((l) => l.n),
  ids: lines.map((l) => l.customId),
  bodies: lines.map((l) => l.body),
});

export class PgFilesBatches {
  private readonly cancelWaiting: string;
  private readonly failWaiting: string;

  constructor(private readonly h: PgFilesHost) {
    const waiting = `seq IN (${Q.waitingLocked}) AND state IN ('scheduled', 'queued')`;
    this.cancelWaiting = `UPDATE jobs SET state = 'canceled', waits = 0, finished_at = @now, updated_at = @now
      WHERE ${waiting} RETURNING ${h.transitionCols}`;
    this.failWaiting = `UPDATE jobs SET state = 'failed', waits = 0, error_code = @code, error_message = @message, finished_at = @now, updated_at = @now
      WHERE ${waiting} RETURNING ${h.transitionCols}`;
  }

  // --- files ---

  fileInsert(p: { file: NewFile; lines: FileLine[] }): Promise<number> {
    return this.h.tx(async (c) => {
      const f = p.file;
      const seq = (await c.one<number>(Q.fileInsert, { id: f.id, keyId: f.keyId, filename: f.filename, endpoint: f.endpoint, createdAt: f.createdAt, expiresAt: f.expiresAt }))!;
      if (p.lines.length > 0) await c.run(Q.linesInsert, linesParams(seq, p.lines));
      return seq;
    });
  }

  fileLinesAppend(p: { fileSeq: number; lines: FileLine[] }): Promise<void> {
    return this.h.tx(async (c) => {
      if ((await c.one<number>(Q.fileUploading, { seq: p.fileSeq })) !== 1) throw new Validation('the upload was removed', 'file');
      if (p.lines.length > 0) await c.run(Q.linesInsert, linesParams(p.fileSeq, p.lines));
    });
  }

  fileFinish(p: { fileSeq: number; bytes: number; lines: number }): Promise<boolean> {
    return this.h.tx(async (c) => (await c.run(Q.fileFinish, { seq: p.fileSeq, bytes: p.bytes, lines: p.lines })) > 0);
  }

  fileLinesDelete(p: { fileSeq: number; limit: number }): Promise<number> {
    return this.h.tx(async (c) => {
      await this.refuseIfFeeding(c, p.fileSeq);
      return c.run(Q.fileLinesDelete, { seq: p.fileSeq, limit: p.limit });
    });
  }

  fileDelete(p: { fileSeq: number }): Promise<boolean> {
    return this.h.tx(async (c) => {
      await this.refuseIfFeeding(c, p.fileSeq);
      return (await c.run(Q.fileDelete, { seq: p.fileSeq })) > 0;
    });
  }

  /** An input file a batch is still submitting lines from is not deleted under it (checked under the file's lock). */
  private async refuseIfFeeding(c: Conn, fileSeq: number): Promise<void> {
    await c.run(Q.fileLock, { seq: fileSeq });
    if ((await c.one<number>(Q.fileFeeding, { seq: fileSeq })) === 1) {
      throw new Conflict('file_in_use', 'a batch is still submitting the requests of this file; delete it once every request is submitted, or cancel the batch');
    }
  }

  fileGet(p: { id: string }): Promise<FileRecord | null> {
    return this.h.read(async (c) => (await c.get<FileRecord>(Q.fileById, { id: p.id })) ?? null);
  }

  filesList(p: { limit: number; beforeSeq?: number; keyId?: string; purpose?: string }): Promise<FileRecord[]> {
    return this.h.read((c) =>
      c.all<FileRecord>(Q.filesPage, { before: p.beforeSeq ?? Number.MAX_SAFE_INTEGER, key: p.keyId ?? null, purpose: p.purpose ?? null, limit: p.limit }),
    );
  }

  fileLinesPage(p: { fileSeq: number; afterN: number; limit: number }): Promise<FileLine[]> {
    return this.h.read((c) => c.all<FileLine>(Q.fileLinesPage, { seq: p.fileSeq, after: p.afterN, limit: p.limit }));
  }

  fileBytesSet(p: { fileSeq: number; bytes: number }): Promise<void> {
    return this.h.tx(async (c) => void (await c.run(Q.fileBytesSet, { seq: p.fileSeq, bytes: p.bytes })));
  }

  filesExpired(p: { now: number; uploadingBefore: number; limit: number }): Promise<FileRecord[]> {
    return this.h.read(async (c) => [
      ...(await c.all<FileRecord>(Q.filesExpired, { now: p.now, limit: p.limit })),
      ...(await c.all<FileRecord>(Q.filesAbandoned, { before: p.uploadingBefore, limit: p.limit })),
    ]);
  }

  // --- batches ---

  batchInsert(p: { batch: NewBatch; now: number }): Promise<BatchRecord | null> {
    const n = p.batch;
    return this.h.tx(async (c, fx) => {
      const input = await c.get<FileRecord>(Q.fileBySeqShared, { seq: n.inputFileSeq });
      if (!input || input.status !== 'processed') return null;
      // A file being removed (some of its lines deleted already) is as good as gone.
      if ((await c.one<boolean>(Q.fileWhole, { seq: input.seq, lines: input.lines })) !== true) return null;
      fx.batchReady = true;
      const seq = (await c.one<number>(Q.batchInsert, {
        id: n.id,
        keyId: n.keyId,
        inputFileId: n.inputFileId,
        inputFileSeq: n.inputFileSeq,
        endpoint: n.endpoint,
        completionWindow: n.completionWindow,
        metadata: n.metadata === null ? null : JSON.stringify(n.metadata),
        webhookUrl: n.webhookUrl,
        webhookOrigin: n.webhookUrl === null ? null : originOf(n.webhookUrl),
        priority: n.priority,
        total: n.total,
        outputFileId: n.outputFileId,
        errorFileId: n.errorFileId,
        now: p.now,
        expiresAt: n.expiresAt,
      }))!;
      for (const [role, id] of [['output', n.outputFileId], ['error', n.errorFileId]] as const) {
        await c.run(Q.outputFileInsert, { id, keyId: n.keyId, filename: `${n.id}_${role}.jsonl`, batchSeq: seq, role, now: p.now, expiresAt: n.fileExpiresAt });
      }
      return batchOf(await c.get<BatchRow>(Q.batchBySeq, { seq }));
    });
  }

  batchGet(p: { id: string } | { seq: number }): Promise<BatchRecord | null> {
    return this.h.read(async (c) => batchOf('id' in p ? await c.get<BatchRow>(Q.batchById, { id: p.id }) : await c.get<BatchRow>(Q.batchBySeq, { seq: p.seq })));
  }

  batchesList(p: { limit: number; beforeSeq?: number; keyId?: string }): Promise<BatchRecord[]> {
    return this.h.read(async (c) =>
      (await c.all<BatchRow>(Q.batchesPage, { before: p.beforeSeq ?? Number.MAX_SAFE_INTEGER, key: p.keyId ?? null, limit: p.limit })).map((r) => batchOf(r)!),
    );
  }

  batchJobsInsert(p: { batchSeq: number; jobs: (NewJob & { line: number })[]; now: number; maxQueued: number; maxQueuedBytes?: number }): Promise<{
    inserted: number;
    stopped: InsertOutcome | null;
  }> {
    return this.h.tx(async (c, fx) => {
      // A cancel or an expiry that committed first wins: nothing more is submitted.
      const open = await c.get<{ lastLine: number }>(Q.batchLockOpen, { seq: p.batchSeq });
      if (!open) return { inserted: 0, stopped: null };
      // These lines were submitted already (a runner of another instance, just before it stopped leading).
      if (p.jobs.length > 0 && p.jobs[0]!.line <= open.lastLine) return { inserted: 0, stopped: null };
      const jobs = p.jobs.map((j) => ({ ...j, batchSeq: p.batchSeq }));
      const out = await this.h.insertJobs(c, fx, { jobs, now: p.now, maxQueued: p.maxQueued, ...(p.maxQueuedBytes !== undefined ? { maxQueuedBytes: p.maxQueuedBytes } : {}) }, true);
      const ok = out.filter((o) => o.ok).length;
      const stopped = out.find((o) => !o.ok) ?? null;
      if (ok > 0) await c.run(Q.batchAdvance, { seq: p.batchSeq, n: ok, lastLine: p.jobs[ok - 1]!.line, now: p.now });
      return { inserted: ok, stopped };
    });
  }

  batchesActive(p: { limit: number; afterSeq?: number }): Promise<BatchRecord[]> {
    return this.h.read(async (c) => (await c.all<BatchRow>(Q.batchesActive, { limit: p.limit, after: p.afterSeq ?? 0 })).map((r) => batchOf(r)!));
  }

  batchesNextExpiry(): Promise<{ seq: number; expiresAt: number } | null> {
    return this.h.read(async (c) => (await c.get<{ seq: number; expiresAt: number }>(Q.batchesNextExpiry)) ?? null);
  }

  batchCancel(p: { id: string; now: number; keyId?: string }): Promise<{ batch: BatchRecord; changed: boolean } | null> {
    return this.h.tx(async (c, fx) => {
      const before = batchOf(await c.get<BatchRow>(Q.batchById, { id: p.id }));
      if (!before || (p.keyId !== undefined && (before.keyId ?? '') !== p.keyId)) return null;
      const changed = (await c.one<number>(Q.batchCancel, { seq: before.seq, now: p.now })) !== undefined;
      if (changed) {
        fx.batchReady = true;
        await this.settle(c, fx, before.seq, p.now);
      }
      return { batch: batchOf(await c.get<BatchRow>(Q.batchBySeq, { seq: before.seq }))!, changed };
    });
  }

  batchExpire(p: { seq: number; now: number }): Promise<boolean> {
    return this.h.tx(async (c, fx) => {
      const changed = (await c.one<number>(Q.batchExpire, { seq: p.seq })) !== undefined;
      if (changed) await this.settle(c, fx, p.seq, p.now);
      return changed;
    });
  }

  batchFail(p: { seq: number; now: number; error: ErrorInfo }): Promise<boolean> {
    return this.h.tx(async (c, fx) => {
      const changed = (await c.one<number>(Q.batchFail, { seq: p.seq, errors: JSON.stringify([{ ...p.error, line: null, param: null }]) })) !== undefined;
      if (changed) await this.settle(c, fx, p.seq, p.now);
      return changed;
    });
  }

  batchJobsEnd(p: { batchSeq: number; now: number; limit: number }): Promise<number> {
    return this.h.tx(async (c, fx) => {
      const batch = batchOf(await c.get<BatchRow>(Q.batchBySeq, { seq: p.batchSeq }));
      if (!batch || batch.ending === null) return 0;
      const params = { seq: p.batchSeq, now: p.now, limit: p.limit };
      let ended: string[];
      if (batch.ending === 'cancel') ended = await this.h.moveAll(c, fx, this.cancelWaiting, params, 'canceled', p.now);
      else {
        const message =
          batch.ending === 'expire' ? 'this request could not be executed before the completion window expired' : 'the batch failed before this request ran';
        const code = batch.ending === 'expire' ? 'batch_expired' : 'batch_failed';
        ended = await this.h.moveAll(c, fx, this.failWaiting, { ...params, code, message }, 'failed', p.now);
      }
      // Nothing waiting (or running) any more: settles now if that was the last.
      await this.settle(c, fx, p.batchSeq, p.now);
      return ended.length;
    });
  }

  batchResultsPage(p: { batchSeq: number; role: 'output' | 'error'; afterSeq: number; limit: number }): Promise<BatchResultRow[]> {
    type Row = BatchResultDbRow & { result: string | null; artifact: Buffer | null };
    const sql = p.role === 'output' ? Q.batchResultsOutput : Q.batchResultsError;
    return this.h.read(async (c) =>
      (await c.all<Row>(sql, { seq: p.batchSeq, after: p.afterSeq, limit: p.limit, marker: RESULT_IN_ARTIFACT })).map((r) =>
        batchResultOf(
          r,
          // A result stored once, as the completion artifact (RESULT_IN_ARTIFACT), is read from there.
          r.result === null ? null : r.result !== RESULT_IN_ARTIFACT ? (JSON.parse(r.result) as unknown) : r.artifact === null ? null : (JSON.parse(r.artifact.toString('utf8')) as unknown),
        ),
      ),
    );
  }

  batchesDeleteExpired(p: { endedBefore: number; limit: number; now: number }): Promise<number> {
    return this.h.tx(async (c) => {
      let deleted = 0;
      for (const { seq } of await c.all<{ seq: number }>(Q.batchesEnded, { before: p.endedBefore, limit: 8 })) {
        const jobs = await c.all<{ id: string; conversationId: string }>(Q.batchJobsDelete, { seq, limit: p.limit - deleted, now: p.now });
        if (jobs.length > 0) await c.run(Q.conversationsDropIfEmpty, { ids: [...new Set(jobs.map((j) => j.conversationId))] });
        deleted += jobs.length;
        if (deleted >= p.limit) break;
        await c.run(Q.batchDeliveriesDelete, { seq });
        await c.run(Q.batchDelete, { seq });
        deleted++;
      }
      return deleted;
    });
  }

  /**
   * Ends a batch whose every line is accounted for and every job ended, with its webhook row
   * (ADR-0015), in the transaction that began its ending. The end of its last job settles it in
   * the database (the progress trigger of migration 0004), whichever statement ended the job.
   */
  async settle(c: Conn, fx: Effects, batchSeq: number, now: number): Promise<void> {
    const r = await c.get<{ settled: string | null; due: number | null }>(Q.batchSettle, { seq: batchSeq, now });
    if (r?.due != null) fx.deliveryReady = true;
  }

  /**
   * After a batch job's terminal transition (the driver's transition code): if that ended the
   * batch and its event is due, the dispatcher is told. The batch itself was settled by the
   * statement that ended the job; this is only the wake-up.
   */
  async jobEnded(c: Conn, fx: Effects, batchSeq: number): Promise<void> {
    if ((await c.one<number>(Q.batchEventDue, { seq: batchSeq })) === 1) fx.deliveryReady = true;
  }

  /** A claimed batch event (its row has no job): the batch, as it ended, is the event's body. */
  async batchEvent(
    c: Conn,
    r: { id: number; jobId: string; state: string; sequence: number; url: string; origin: string; occurredAt: number; attempts: number; batchSeq: number },
  ): Promise<ClaimedDelivery> {
    return batchEventOf(r, batchOf(await c.get<BatchRow>(Q.batchBySeq, { seq: r.batchSeq })));
  }
}
