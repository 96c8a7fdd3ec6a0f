import { randomBytes } from 'node:crypto';
import type { Logger } from 'pino';
import type { Clock } from '../domain.js';
import { Conflict, NotFound, Validation } from '../errors.js';
import { uuidv7 } from '../ids.js';
import { Loop } from '../loop.js';
import type { ApiKeyRecord, BatchEndpoint, BatchRecord, FileLine, NewJob, QueueDriver } from '../queue/driver.js';
import type { Files } from './files.js';
import { DAY_MS } from './keys.js';
import { checkMetadata, mapChat, mapEmbed } from './openai.js';
import { keyIdOf, scopeOf, type Principal } from './principal.js';
import { checkWebhookUrl } from './rules.js';

export interface BatchesSettings {
  /** FOREMAN_MAX_QUEUED: a batch keeps at most half of it queued, so interactive submits keep room. */
  maxQueued: number;
  maxQueuedBytes: number;
  jobMaxAttempts: number;
  /** How long an ended batch (its jobs, output and error files) is kept. */
  batchTtlMs: number;
  /** The runner's longest sleep. */
  idleMs: number;
}

export interface CreateBatchInput {
  inputFileId: string;
  endpoint: string;
  completionWindow: string;
  metadata: unknown;
  /** Foreman's own field; `metadata.webhook_url` works too. */
  webhookUrl: string | undefined;
  priority: number | undefined;
}

/**
 * Lines made into jobs per transaction; jobs ended per transaction on a cancel or an expiry. A
 * transaction holds the event loop while it runs (about 0.25 ms a job with its indexes, counters,
 * transition and metadata rows on the bench machine), so chunks are kept small enough that an
 * interactive submit queued behind one still answers well within 50 ms.
 */
export const BATCH_CHUNK = 32;
/** When the queue has no room for a batch's next jobs, how long before trying again. */
const BLOCKED_RETRY_MS = 250;
/** Active batches the runner looks at in one turn. */
const ACTIVE_PAGE = 32;
const newRound = () => ({ busy: false, blocked: false, queueFull: false, fullKeys: new Set<string>() });
const WINDOW_MS = 24 * 3_600_000;
/** An upload abandoned mid-way (its process died) is removed after this long. */
const ABANDONED_UPLOAD_MS = 3_600_000;

const notFound = (id: string) => new NotFound('batch_not_found', `no batch with id ${JSON.stringify(id.slice(0, 80))}`, 'batch_id');

/**
 * The Batch API's application layer (ADR-0015): create, read, list and cancel batches, and the
 * runner that makes their lines into jobs. Every line becomes a normal job under the batch owner's
 * key, inserted in chunks of `BATCH_CHUNK` per transaction with the event loop free between
 * chunks, never filling more than half the global queue (or of the key's `max_queued`), so other
 * submits are neither blocked long nor refused because of a batch. Progress is counted by the
 * driver in each job's terminal transaction; the batch ends in the transaction that ends its last
 * job. The runner also ends the waiting jobs of a cancelled or expired batch in chunks, and
 * removes expired files and batches.
 */
export class Batches {
  private readonly loop: Loop;
  private lastRetention = 0;
  /** Where the runner's next look starts (it goes round every active batch, a page a turn). */
  private cursor = 0;
  /**
   * This round (one pass over every active batch, a page a turn): whether some batch has more
   * lines (or jobs to end) than it got this time, whether some could not go on, and what was full.
   */
  private round = newRound();

  constructor(
    private readonly driver: QueueDriver,
    private readonly files: Files,
    private readonly clock: Clock,
    private readonly logger: Logger,
    private readonly settings: BatchesSettings,
  ) {
    this.loop = new Loop('batch runner', () => this.tick(), logger);
  }

  start(): void {
    this.loop.start();
  }

  stop(): Promise<void> {
    return this.loop.stop();
  }

  /** Cuts the runner's sleep short (the driver announced `batchReady`; the clock was moved in a test). */
  wake = (): void => this.loop.wake.notify();

  async create(input: CreateBatchInput, who: Principal): Promise<BatchRecord> {
    if (input.completionWindow !== '24h') throw new Validation('completion_window must be "24h"', 'completion_window', 'invalid_value');
    const endpoint = input.endpoint as BatchEndpoint;
    if (endpoint !== '/v1/chat/completions' && endpoint !== '/v1/embeddings') {
      throw new Validation('endpoint must be /v1/chat/completions or /v1/embeddings', 'endpoint', 'unsupported_value');
    }
    const metadata = checkMetadata(input.metadata, 'metadata');
    const hook = input.webhookUrl ?? metadata?.webhook_url;
    let webhookUrl: string | null = null;
    if (hook !== undefined) {
      try {
        webhookUrl = checkWebhookUrl(hook);
      } catch (err) {
        throw new Validation((err as Error).message.replace('state_webhook_url', 'webhook_url'), input.webhookUrl !== undefined ? 'webhook_url' : 'metadata.webhook_url');
      }
    }
    let file;
    try {
      file = await this.files.get(input.inputFileId, who);
    } catch (err) {
      if (err instanceof NotFound) throw new NotFound('file_not_found', `no file with id ${JSON.stringify(input.inputFileId.slice(0, 80))}`, 'input_file_id');
      throw err;
    }
    if (file.purpose !== 'batch') throw new Validation(`file ${file.id} is not a batch input file (purpose ${file.purpose})`, 'input_file_id');
    if (file.endpoint !== endpoint) {
      throw new Validation(`the requests of file ${file.id} are for ${file.endpoint}, not ${endpoint}`, 'endpoint', 'invalid_value');
    }
    let priority = input.priority ?? 0;
    if (who.kind === 'key' && who.key.priorityMax !== null && priority > who.key.priorityMax) priority = who.key.priorityMax;
    const now = this.clock.now();
    const id = `batch_${randomBytes(12).toString('hex')}`;
    const hex = () => `file-${randomBytes(12).toString('hex')}`;
    const batch = await this.driver.batchInsert({
      now,
      batch: {
        id,
        keyId: keyIdOf(who),
        inputFileSeq: file.seq,
        inputFileId: file.id,
        endpoint,
        completionWindow: '24h',
        metadata,
        webhookUrl,
        priority,
        total: file.lines,
        outputFileId: hex(),
        errorFileId: hex(),
        expiresAt: now + WINDOW_MS,
        fileExpiresAt: null,
      },
    });
    if (!batch) throw new NotFound('file_not_found', `file ${file.id} was deleted`, 'input_file_id');
    // The runner (on whichever instance leads) hears of it through the driver's `batchReady`.
    this.logger.info({ batch_id: id, lines: file.lines, endpoint, key_id: who.kind === 'key' ? who.key.id : undefined }, 'batch created');
    return batch;
  }

  async get(id: string, who: Principal): Promise<BatchRecord> {
    const b = await this.driver.batchGet({ id });
    const scope = scopeOf(who);
    if (!b || (scope !== undefined && (b.keyId ?? '') !== scope)) throw notFound(id);
    return b;
  }

  /** Newest first; `after` is the last id of the previous page (OpenAI's cursor). */
  async list(q: { limit: number; after?: string }, who: Principal): Promise<{ batches: BatchRecord[]; hasMore: boolean }> {
    if (!(q.limit >= 1 && q.limit <= 100)) throw new Validation('limit must be 1 to 100', 'limit', 'invalid_value');
    const scope = scopeOf(who);
    const before = q.after === undefined ? undefined : (await this.get(q.after, who)).seq;
    const rows = await this.driver.batchesList({
      limit: q.limit + 1,
      ...(before !== undefined ? { beforeSeq: before } : {}),
      ...(scope !== undefined ? { keyId: scope } : {}),
    });
    const hasMore = rows.length > q.limit;
    if (hasMore) rows.pop();
    return { batches: rows, hasMore };
  }

  /**
   * Cancels a batch: nothing more is submitted, its queued jobs are canceled (in chunks, by the
   * runner), running ones finish; it ends `cancelled` with what finished in its output file.
   */
  async cancel(id: string, who: Principal): Promise<BatchRecord> {
    const scope = scopeOf(who);
    const r = await this.driver.batchCancel({ id, now: this.clock.now(), ...(scope !== undefined ? { keyId: scope } : {}) });
    if (!r) throw notFound(id);
    if (!r.changed && r.batch.status !== 'cancelling' && r.batch.status !== 'cancelled') {
      throw new Conflict('batch_not_cancellable', `the batch is ${r.batch.status}: it cannot be cancelled`, 'batch_id');
    }
    this.logger.info({ batch_id: id, status: r.batch.status }, 'batch cancel requested');
    return r.batch;
  }

  // --- the runner ---

  private async tick(): Promise<number> {
    const { driver, clock, settings } = this;
    let now = clock.now();
    // Completion windows that passed: the batch expires (its waiting jobs are failed below).
    for (let next = await driver.batchesNextExpiry(); next !== null && next.expiresAt <= now; next = await driver.batchesNextExpiry()) {
      await driver.batchExpire({ seq: next.seq, now });
      this.logger.info({ batch_seq: next.seq }, 'batch expired: its completion window passed');
    }
    // A page of the active batches a turn, going round all of them: batches that cannot go on
    // (their key's queue is full) never keep the runner from the ones after them, and the next
    // page comes at once. Once a key's queue (or the whole queue) was found full this round, its
    // other batches wait for the next round without a refused write each.
    if (this.cursor === 0) this.round = newRound();
    const round = this.round;
    const page = await driver.batchesActive({ limit: ACTIVE_PAGE, afterSeq: this.cursor });
    const more = page.length === ACTIVE_PAGE;
    this.cursor = more ? page[page.length - 1]!.seq : 0;
    for (const b of page) {
      if (this.loop.stopped) return 0; // no longer the leader (or shutting down): another runner takes over
      now = clock.now();
      const t0 = performance.now();
      if (b.ending !== null) {
        if ((await driver.batchJobsEnd({ batchSeq: b.seq, now, limit: BATCH_CHUNK })) === BATCH_CHUNK) round.busy = true;
      } else if (round.queueFull || round.fullKeys.has(b.keyId ?? '')) {
        round.blocked = true;
        continue;
      } else {
        const r = await this.submitChunk(b, now);
        if (r === 'more') round.busy = true;
        else if (r !== 'done') {
          round.blocked = true;
          if (r === 'key_full') round.fullKeys.add(b.keyId ?? '');
          else round.queueFull = true;
        }
      }
      // Between chunks the runner rests as long as the chunk took (at most half the process's time
      // goes to batch inserts), so other requests find the event loop and the commit free. The
      // worker drains far slower than this inserts, so the batch's end-to-end time is not affected.
      await new Promise<void>((r) => setTimeout(r, Math.min(50, performance.now() - t0)));
    }
    if (now - this.lastRetention >= 60_000) {
      this.lastRetention = now;
      await this.retention(now);
    }
    if (more || round.busy) return 0; // the round goes on, or another starts at once
    if (round.blocked) return BLOCKED_RETRY_MS;
    const next = await driver.batchesNextExpiry();
    return next === null ? settings.idleMs : Math.max(0, Math.min(settings.idleMs, next.expiresAt - clock.now()));
  }

  /**
   * Makes the batch's next lines into jobs (one transaction). 'key_full': the owner key's queue
   * (or its daily limit) refused the chunk; 'queue_full': the whole queue's.
   */
  private async submitChunk(b: BatchRecord, now: number): Promise<'more' | 'done' | 'key_full' | 'queue_full'> {
    const { driver, settings } = this;
    if (b.inputFileSeq === null) {
      await driver.batchFail({ seq: b.seq, now, error: { code: 'input_file_deleted', message: 'the input file was deleted before every request was submitted' } });
      return 'done';
    }
    const lines = await driver.fileLinesPage({ fileSeq: b.inputFileSeq, afterN: b.lastLine, limit: BATCH_CHUNK });
    if (lines.length === 0) {
      await driver.batchFail({ seq: b.seq, now, error: { code: 'input_file_incomplete', message: 'the input file holds fewer requests than the batch counted' } });
      return 'done';
    }
    const key = b.keyId === null ? null : await driver.keyGet({ id: b.keyId });
    let jobs: (NewJob & { line: number })[];
    try {
      jobs = lines.map((l) => this.jobOf(b, l, key, now));
    } catch (err) {
      // Validated at upload; a line the mapping refuses now fails the batch, naming it.
      const line = lines.find((l) => {
        try {
          this.jobOf(b, l, key, now);
          return false;
        } catch {
          return true;
        }
      });
      await driver.batchFail({ seq: b.seq, now, error: { code: 'invalid_request', message: `line ${line?.n}: ${(err as Error).message}` } });
      return 'done';
    }
    const r = await driver.batchJobsInsert({
      batchSeq: b.seq,
      jobs,
      now,
      // Half the global queue at most: interactive submits keep room while a batch waits.
      maxQueued: Math.max(1, Math.floor(settings.maxQueued / 2)),
      maxQueuedBytes: Math.max(1, Math.floor(settings.maxQueuedBytes / 2)),
    });
    if (r.stopped !== null) return !r.stopped.ok && (r.stopped.code === 'key_queue_full' || r.stopped.code === 'key_daily_limit') ? 'key_full' : 'queue_full';
    return b.submitted + r.inserted < b.total ? 'more' : 'done';
  }

  private jobOf(b: BatchRecord, l: FileLine, key: ApiKeyRecord | null, now: number): NewJob & { line: number } {
    const body = (JSON.parse(l.body) as { body: unknown }).body;
    const embed = b.endpoint === '/v1/embeddings';
    const plan = embed ? mapEmbed(body, 'body.') : mapChat(body, 'body.');
    const metadata: Record<string, string> = { batch_id: b.id, custom_id: l.customId };
    if (embed && 'encoding' in plan && plan.encoding === 'base64') metadata.encoding_format = 'base64';
    const day = Math.floor(now / DAY_MS);
    return {
      line: l.n,
      id: uuidv7(),
      kind: embed ? 'embed' : 'chat',
      model: plan.model,
      request: plan.request,
      metadata,
      webhookUrl: null,
      webhookEvents: null,
      maxAttempts: this.settings.jobMaxAttempts,
      priority: b.priority,
      deadlineAt: null,
      idempotency: null,
      keyId: b.keyId ?? '',
      // The owner's limits apply as to any submit; a batch keeps at most half its max_queued.
      ...(key
        ? {
            quota: {
              maxQueued: key.maxQueued === null ? null : Math.max(1, Math.floor(key.maxQueued / 2)),
              dailyLimit: key.dailyLimit,
              day,
              nextDayAt: (day + 1) * DAY_MS,
            },
          }
        : {}),
    };
  }

  /** Expired uploads and abandoned ones, and batches (with their jobs) ended longer ago than FOREMAN_BATCH_TTL. */
  private async retention(now: number): Promise<void> {
    const { driver } = this;
    for (const f of await driver.filesExpired({ now, uploadingBefore: now - ABANDONED_UPLOAD_MS, limit: 100 })) {
      if (f.purpose !== 'batch') continue; // output files go with their batch
      await this.files.remove(f.seq).catch((err: unknown) => this.logger.info({ err, file_id: f.id }, 'expired file not removed yet'));
    }
    while ((await driver.batchesDeleteExpired({ endedBefore: now - this.settings.batchTtlMs, limit: BATCH_CHUNK, now })) > 0) {
      await new Promise<void>((r) => setImmediate(r));
    }
  }
}
