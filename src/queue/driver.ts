import type { ErrorInfo, JobState } from '../domain.js';
import type { Notifier } from './notifier.js';

/**
 * The queue driver boundary (ADR-0010). Everything the service stores goes through one of these
 * methods: async, named entity + verb, one params object each. A driver owns its SQL, its
 * transactions and its connection handling; nothing of its database shows through this file.
 * Errors are domain errors (`StorageUnavailable`, `Conflict`, `NotFound`, see `errors.ts`).
 * Effects (a job became claimable, an outbox row became due, a state changed, a running job was
 * canceled) are announced through the driver's `Notifier`, only after the commit that made them.
 *
 * Writes that return `boolean` are guarded transitions: they return false, and change nothing,
 * when the job is no longer in the state the caller expected or the lease is no longer theirs.
 */
export interface QueueDriver {
  readonly name: string;
  readonly notifier: Notifier;

  /**
   * Start-up recovery, correct for how the driver is shared: an exclusive driver (SQLite)
   * re-queues whatever was running, since its owner is gone; a shared one leaves running jobs
   * to the rescuer, which takes them only once their lease has expired.
   */
  recover(p: { now: number }): Promise<{ requeued: string[] }>;
  ping(): Promise<boolean>;
  close(): Promise<void>;
  /**
   * Shared drivers only: elects one instance to run the maintenance services. `onChange(true)`
   * when this instance becomes the leader, `onChange(false)` when it stops being it. Absent: the
   * process is always the leader (an exclusive driver). Returns a function that steps down.
   */
  leadership?(onChange: (leader: boolean) => void): () => Promise<void>;
  /**
   * Shared drivers only: the database server's clock now (ms since the epoch). The instances
   * keep time on it, so leases and due times mean the same on every one (ADR-0011, "Time").
   */
  serverTime?(): Promise<number>;
  /**
   * Shared drivers only: this instance's engine view (what its hosts can run), kept for the
   * leader's routing and outage policies (ADR-0011, "Engine hosts per instance"). Replaces the
   * instance's last view; `now` is its `seenAt`. Views of any instance seen before `deleteBefore`
   * are deleted. Returns how many other instances put theirs since `freshSince`.
   */
  instanceEnginesPut?(p: { now: number; view: EngineView; deleteBefore: number; freshSince: number }): Promise<{ others: number }>;
  /** Shared drivers only: the other instances' views put within `maxAgeMs` of `now`. */
  instanceEnginesList?(p: { now: number; maxAgeMs: number }): Promise<InstanceEngineView[]>;

  // --- jobs: submit and claim ---
  /** `maxQueuedBytes`: the queued jobs' stored requests may not exceed this many bytes together. */
  jobsInsert(p: { jobs: NewJob[]; now: number; maxQueued: number; maxQueuedBytes?: number }): Promise<InsertOutcome[]>;
  /**
   * Up to `limit` claimable jobs, each moved to `loading` with a lease of its own. The order:
   * effective priority; among equals, the API key served least recently (the fair share), then
   * FIFO within the key. A key at its `concurrency` is skipped (ADR-0013). With `engine`, only
   * jobs of models installed on that host, chosen by the model-aware policy of ADR-0012, and each
   * records the host.
   */
  jobsClaim(p: { owner: string; limit: number; now: number; leaseMs: number; engine?: ClaimHost }): Promise<ClaimedJob[]>;
  jobLeaseRenew(p: { seq: number; lease: string; until: number }): Promise<boolean>;

  // --- jobs: one attempt's transitions (guarded by the lease) ---
  jobSetWorking(p: { seq: number; lease: string; now: number; leaseMs: number }): Promise<boolean>;
  jobComplete(p: {
    seq: number;
    lease: string;
    now: number;
    result: unknown;
    artifacts: ArtifactInput[];
    runMs: number;
    loadMs?: number;
    usage?: { promptTokens: number | null; completionTokens: number | null };
  }): Promise<boolean>;
  jobRetry(p: { seq: number; lease: string; now: number; runAt: number }): Promise<boolean>;
  jobFail(p: { seq: number; lease: string; now: number; error: ErrorInfo }): Promise<boolean>;
  /** Gives the attempt back (shutdown, storage trouble, engine unreachable): it does not count. */
  jobRelease(p: { seq: number; lease: string; now: number }): Promise<boolean>;

  /**
   * Cancels a scheduled, queued or running job; a running one is announced as `cancelRequested`.
   * Null: no such job, or (with `keyId`) not that key's. `actor` is recorded in the audit log.
   */
  jobCancel(p: { id: string; now: number; keyId?: string; actor?: string }): Promise<CancelOutcome | null>;

  // --- jobs: maintenance ---
  /** Re-queues running jobs whose lease has expired (their attempt does not count). */
  jobsRescue(p: { now: number }): Promise<string[]>;
  /**
   * Fails up to `limit` queued jobs at or past their deadline, earliest deadline first. The
   * sweeps that fail jobs take a chunk per call, each in its own transaction, so a large backlog
   * neither holds one transaction (and its locks) for long nor outlasts a statement timeout.
   */
  jobsFailPastDeadline(p: { now: number; limit: number }): Promise<string[]>;
  /** Fails up to `limit` queued jobs created before `createdBefore`, oldest first (engine outage policy). */
  jobsFailStale(p: { createdBefore: number; now: number; error: ErrorInfo; limit: number }): Promise<string[]>;
  /** Refreshes queued jobs' stored aging boost (whole `agingMs` intervals waited). */
  jobsAge(p: { now: number; agingMs: number }): Promise<number>;
  /**
   * Deletes up to `limit` jobs finished before `finishedBefore` (failed ones: before
   * `failedFinishedBefore`, when given) with no delivery owed.
   */
  jobsDeleteExpired(p: { finishedBefore: number; failedFinishedBefore?: number; limit: number; now: number }): Promise<number>;
  /** When the next delayed (retrying) queued job becomes claimable (after `now`), or null. */
  jobsNextRunAt(p: { now: number }): Promise<number | null>;
  jobsNextDeadlineAt(): Promise<number | null>;
  /** Models with queued jobs (routing: the model_not_found check, ADR-0012). */
  jobsQueuedModels(): Promise<string[]>;
  /** Fails up to `limit` queued jobs of a model no host has, oldest first (a turn waiting for its previous one is left alone). */
  jobsFailQueuedModel(p: { model: string; now: number; error: ErrorInfo; limit: number }): Promise<string[]>;
  /** Moves scheduled jobs whose time has come to `queued`. */
  jobsPromoteScheduled(p: { now: number }): Promise<string[]>;
  /** The earliest `scheduledFor` of a scheduled job, or null. */
  jobsNextScheduledAt(): Promise<number | null>;
  /** The oldest finish time of a terminal job, or null (the TTL cleaner's next wake-up). */
  jobsOldestFinishedAt(): Promise<number | null>;

  // --- jobs: reads ---
  jobGet(p: { id: string }): Promise<JobView | null>;
  jobsList(p: ListFilter): Promise<ListedJob[]>;
  jobTransitionsSince(p: { id: string; after: number }): Promise<TransitionEvent[]>;
  /** Queued and running jobs per state and model (metrics; served by the partial indexes). */
  jobsCountActive(): Promise<{ state: JobState; model: string; n: number }[]>;
  /** Pending webhook deliveries and the oldest one's event time (metrics). */
  deliveriesPendingStats(): Promise<{ count: number; oldestOccurredAt: number | null }>;
  /** What a queued job's position and ETA are computed from (the claim order). */
  jobQueueSnapshot(p: { seq: number }): Promise<QueueSnapshot>;
  artifactGet(p: { jobId: string; name: string }): Promise<Artifact | null>;
  /** Whether a job with this id existed and was removed by the TTL (a continuation of it is 410). */
  jobExpired(p: { id: string }): Promise<boolean>;

  // --- conversations (ADR-0016) ---
  conversationGet(p: { id: string }): Promise<ConversationView | null>;
  /** Newest activity first; `beforeSeq` is the cursor (the last page's last `lastSeq`). `keyId`: only that key's. */
  conversationsList(p: { limit: number; beforeSeq?: number; keyId?: string }): Promise<ConversationListed[]>;

  // --- webhook outbox ---
  /**
   * Claims up to `limit` due deliveries: the head of each job's line only, none already
   * claimed, at most `perOriginLimit` claimed per receiver origin. A claimed delivery stays
   * claimed until `deliveryRecord` or `deliveryRelease`. Cost does not depend on how many
   * deliveries wait (ADR-0010). `nextDueAt`, when fewer than `limit` were claimed: what
   * `deliveriesNextDueAt` would then say of the heads not yet due (null: none, or `limit` claimed),
   * so a dispatcher learns when to look again in the same step.
   */
  deliveriesClaim(p: { now: number; limit: number; perOriginLimit: number; inlineMax: number }): Promise<{
    deliveries: ClaimedDelivery[];
    nextDueAt: number | null;
    /**
     * False when no origin with an unclaimed due or future head was at its cap: then an attempt
     * that ends frees no room a claim could use now. Absent: unknown (claim again after each).
     */
    capped?: boolean;
  }>;
  /**
   * Optional (ADR-0017): while attached, each transition that writes a job event's row due at once
   * writes it claimed by this instance (the per-origin cap allowing) when `want()` says yes, and
   * the ids of those rows are announced as `deliveriesClaimed` after the commit. Returns the detach.
   */
  deliveriesClaimOnWrite?(p: { perOriginLimit: number; want: () => boolean }): () => void;
  /**
   * Optional, with `deliveriesClaimOnWrite`: the sends of rows claimed on write (in `ids` order),
   * those still claimed by this instance for at least half their lease and pending; the others are
   * left to their lease and the ordinary claim.
   */
  deliveriesClaimed?(p: { ids: number[]; now: number; inlineMax: number }): Promise<ClaimedDelivery[]>;
  /**
   * After delivery `afterId` was acknowledged by its receiver: claims the same job's next pending
   * event, if it is due, so it can be sent at once, without waiting for the first outcome to be
   * recorded (order holds: the receiver already has the earlier event; a crash before the record
   * commits sends both again, in order). Null if there is none.
   */
  deliveryClaimNext(p: { afterId: number; now: number; inlineMax: number }): Promise<ClaimedDelivery | null>;
  /**
   * When the next unclaimed delivery of an origin below its cap becomes due, or null. A claim
   * whose lease ran out by `now` (a shared driver's; a dead instance's) counts as no claim.
   */
  deliveriesNextDueAt(p: { now: number; perOriginLimit: number }): Promise<number | null>;
  deliveryRecord(p: { id: number; now: number; outcome: DeliveryOutcome }): Promise<void>;
  /**
   * Optional, for a driver whose claim is a commit of its own (PostgreSQL): records a delivered
   * event and claims the same job's next event, if due, in one step. The dispatcher then uses it
   * instead of `deliveryClaimNext` beside `deliveryRecord`. `next` is null if there is none.
   */
  deliveryRecordClaimNext?(p: { id: number; now: number; status: number; inlineMax: number }): Promise<{ recorded: boolean; next: ClaimedDelivery | null }>;
  /** Un-claims a delivery without recording an attempt (shutdown): it stays due. */
  deliveryRelease(p: { id: number }): Promise<void>;
  /** Makes a job's failed deliveries (or the one for `state`) pending again; returns their states. */
  deliveriesRedeliver(p: { jobId: string; now: number; state: JobState | null; actor?: string }): Promise<JobState[]>;

  // --- API keys, usage and audit (ADR-0013) ---
  /** Stores a new key; only the hash of its secret is given, and kept. */
  keyInsert(p: { key: ApiKeyRecord; hash: string; actor: string }): Promise<void>;
  keyByHash(p: { hash: string }): Promise<ApiKeyRecord | null>;
  keyGet(p: { id: string }): Promise<ApiKeyRecord | null>;
  keysList(): Promise<ApiKeyRecord[]>;
  /** Changes limits (a null removes one) or the name; null when there is no such key. */
  keyUpdate(p: { id: string; changes: Partial<ApiKeyLimits> & { name?: string }; now: number; actor: string }): Promise<ApiKeyRecord | null>;
  /** Revokes a key (its queued jobs stay); null when there is no such key. */
  keyRevoke(p: { id: string; now: number; actor: string }): Promise<ApiKeyRecord | null>;
  /** A key's usage on UTC day `day` (days since the epoch); `keyId` '' is the keyless bucket. */
  keyUsage(p: { keyId: string; day: number }): Promise<KeyUsage>;
  /** Newest first; `beforeId` is the cursor. */
  auditList(p: { limit: number; beforeId?: number }): Promise<AuditEntry[]>;
  /** The stored secret of this name; stores `value` first if there is none (every instance gets the same). */
  secretEnsure(p: { name: string; value: string }): Promise<string>;

  // --- files and batches (ADR-0015) ---
  /** Stores an upload's first lines under a new `uploading` file (a staging row set). */
  fileInsert(p: { file: NewFile; lines: FileLine[] }): Promise<number>;
  /** Appends validated lines to an `uploading` file. */
  fileLinesAppend(p: { fileSeq: number; lines: FileLine[] }): Promise<void>;
  /** The upload is complete: the file becomes `processed` (visible). False if it is gone. */
  fileFinish(p: { fileSeq: number; bytes: number; lines: number }): Promise<boolean>;
  /**
   * Deletes up to `limit` of a file's lines (a large file is removed in steps); returns how many.
   * This and `fileDelete` refuse (`Conflict file_in_use`) while a batch still submits from the file.
   */
  fileLinesDelete(p: { fileSeq: number; limit: number }): Promise<number>;
  /** Deletes the file row (its remaining lines with it). */
  fileDelete(p: { fileSeq: number }): Promise<boolean>;
  fileGet(p: { id: string }): Promise<FileRecord | null>;
  /** Newest first; `beforeSeq` is the cursor. `keyId`: only that key's. */
  filesList(p: { limit: number; beforeSeq?: number; keyId?: string; purpose?: string }): Promise<FileRecord[]>;
  /** Lines in order, after line number `afterN`. */
  fileLinesPage(p: { fileSeq: number; afterN: number; limit: number }): Promise<FileLine[]>;
  /** An output file's size, once its batch has ended (it no longer changes). */
  fileBytesSet(p: { fileSeq: number; bytes: number }): Promise<void>;
  /** Files whose `expires_at` passed, uploads abandoned before `uploadingBefore`: up to `limit` of them. */
  filesExpired(p: { now: number; uploadingBefore: number; limit: number }): Promise<FileRecord[]>;

  /** Creates a batch (with its output and error file rows). Null if the input file is gone. */
  batchInsert(p: { batch: NewBatch; now: number }): Promise<BatchRecord | null>;
  batchGet(p: { id: string } | { seq: number }): Promise<BatchRecord | null>;
  /** Newest first; `beforeSeq` is the cursor. `keyId`: only that key's. */
  batchesList(p: { limit: number; beforeSeq?: number; keyId?: string }): Promise<BatchRecord[]>;
  /**
   * Inserts the next lines of a batch as jobs, in line order, in one transaction, and advances
   * the batch (`submitted`, `lastLine`; `validating` → `in_progress`). Stops at the first job the
   * queue refuses (full): `stopped` says why, and the rest is tried again later.
   */
  batchJobsInsert(p: { batchSeq: number; jobs: (NewJob & { line: number })[]; now: number; maxQueued: number; maxQueuedBytes?: number }): Promise<{
    inserted: number;
    stopped: InsertOutcome | null;
  }>;
  /** Batches the runner has work for (lines still to submit, or ending: cancel, expiry), oldest first, after `afterSeq`. */
  batchesActive(p: { limit: number; afterSeq?: number }): Promise<BatchRecord[]>;
  /** The running batch that expires first, or null. */
  batchesNextExpiry(): Promise<{ seq: number; expiresAt: number } | null>;
  /**
   * Starts a batch's cancel (`cancelling`): no more lines are submitted; the rest of the queue is
   * ended by `batchJobsEnd`. Null: no such batch (or another key's). `ended`: it had already ended.
   */
  batchCancel(p: { id: string; now: number; keyId?: string }): Promise<{ batch: BatchRecord; changed: boolean } | null>;
  /** Starts a batch's expiry (its completion window passed). */
  batchExpire(p: { seq: number; now: number }): Promise<boolean>;
  /**
   * Fails a batch that cannot go on (its input file is gone, or a line cannot be submitted); its
   * queued jobs are ended like a cancel. Only while lines are left to submit: false otherwise.
   */
  batchFail(p: { seq: number; now: number; error: ErrorInfo }): Promise<boolean>;
  /**
   * Ends up to `limit` of an ending batch's waiting jobs (scheduled or queued): canceled for a
   * cancel, failed `batch_expired` for an expiry. Running jobs finish. Returns how many.
   */
  batchJobsEnd(p: { batchSeq: number; now: number; limit: number }): Promise<number>;
  /** Finished jobs of a batch in line order after job `afterSeq`: done ones (`output`) or the others (`error`). */
  batchResultsPage(p: { batchSeq: number; role: 'output' | 'error'; afterSeq: number; limit: number }): Promise<BatchResultRow[]>;
  /** Deletes up to `limit` jobs of batches that ended before `endedBefore`, then those batches; returns rows deleted. */
  batchesDeleteExpired(p: { endedBefore: number; limit: number; now: number }): Promise<number>;
}

/** What one instance's engine hosts can run, as far as its pool knows (ADR-0011). */
export interface EngineView {
  /** Every host answered its last probe. */
  allUp: boolean;
  /** Since when no host has answered (all down), or null. */
  downSince: number | null;
  /** Some host lists no models (not probed yet, or a server that does not list them): it may run any. */
  anyModel: boolean;
  /** The models installed on the hosts as last probed, every name a job may use for them. */
  models: string[];
  /** The hosts, by name (a host several instances list has one name), with their slots. */
  hosts: { name: string; slots: number }[];
  /** What the answering hosts list as installed: Ollama's `/api/tags` entries, merged by name. */
  tags: ModelEntry[];
}

/** One model as Ollama's `/api/tags` lists it (`name`, `model`, `modified_at`, `size`, `digest`, `details`). */
export interface ModelEntry {
  name?: string;
  model?: string;
  [k: string]: unknown;
}

export interface InstanceEngineView extends EngineView {
  instance: string;
  seenAt: number;
}

/** What a job runs: a chat (`/api/chat`) or an embedding (`/api/embed`). */
export type JobKind = 'chat' | 'embed';
export const JOB_KINDS = ['chat', 'embed'] as const;

export type BatchEndpoint = '/v1/chat/completions' | '/v1/embeddings';
export type BatchStatus = 'validating' | 'in_progress' | 'finalizing' | 'completed' | 'failed' | 'expired' | 'cancelling' | 'cancelled';
export type BatchEventType = 'batch.completed' | 'batch.failed' | 'batch.expired' | 'batch.cancelled';

export interface NewFile {
  id: string;
  keyId: string;
  filename: string;
  endpoint: BatchEndpoint;
  createdAt: number;
  expiresAt: number | null;
}

/** One validated line of an upload. */
export interface FileLine {
  n: number;
  customId: string;
  body: string;
}

export interface FileRecord {
  seq: number;
  id: string;
  keyId: string | null;
  purpose: 'batch' | 'batch_output';
  filename: string;
  /** Null for an output file of a batch still running. */
  bytes: number | null;
  lines: number;
  endpoint: BatchEndpoint | null;
  status: 'uploading' | 'processed';
  batchSeq: number | null;
  role: 'output' | 'error' | null;
  createdAt: number;
  expiresAt: number | null;
}

export interface NewBatch {
  id: string;
  keyId: string;
  inputFileSeq: number;
  inputFileId: string;
  endpoint: BatchEndpoint;
  completionWindow: '24h';
  metadata: Record<string, string> | null;
  webhookUrl: string | null;
  priority: number;
  total: number;
  outputFileId: string;
  errorFileId: string;
  expiresAt: number;
  /** Output files are kept this long after creation (or null: as long as the batch). */
  fileExpiresAt: number | null;
}

export interface BatchRecord {
  seq: number;
  id: string;
  keyId: string | null;
  inputFileId: string;
  inputFileSeq: number | null;
  endpoint: BatchEndpoint;
  completionWindow: string;
  status: BatchStatus;
  ending: 'cancel' | 'expire' | 'fail' | null;
  metadata: Record<string, string> | null;
  webhookUrl: string | null;
  priority: number;
  total: number;
  submitted: number;
  /** The line number of the last line submitted. */
  lastLine: number;
  completed: number;
  failed: number;
  canceled: number;
  errors: { code: string; message: string; line?: number | null; param?: string | null }[] | null;
  outputFileId: string;
  errorFileId: string;
  createdAt: number;
  expiresAt: number;
  inProgressAt: number | null;
  finalizingAt: number | null;
  completedAt: number | null;
  failedAt: number | null;
  expiredAt: number | null;
  cancellingAt: number | null;
  cancelledAt: number | null;
}

/** A finished job of a batch, as its output or error file line is made from it. */
export interface BatchResultRow {
  seq: number;
  jobId: string;
  /** The job's metadata (a batch job's carries `batch_id` and `custom_id`). */
  metadata: Record<string, string> | null;
  state: JobState;
  model: string;
  result: unknown;
  error: ErrorInfo | null;
  createdAt: number;
  finishedAt: number | null;
  promptTokens: number | null;
  completionTokens: number | null;
}

export interface ApiKeyLimits {
  /** Jobs of the key running at once. */
  concurrency: number | null;
  /** Jobs of the key queued (or scheduled) at once; beyond it a submit gets 429. */
  maxQueued: number | null;
  /** Jobs submitted per UTC day; beyond it a submit is scheduled for the next day. */
  dailyLimit: number | null;
  /** Submitted priorities above it are clamped to it. */
  priorityMax: number | null;
}

export interface ApiKeyRecord extends ApiKeyLimits {
  id: string;
  name: string;
  createdAt: number;
  updatedAt: number;
  revokedAt: number | null;
}

export interface KeyUsage {
  jobsToday: number;
  tokensToday: number;
  running: number;
  queued: number;
  scheduled: number;
}

export type AuditAction = 'key.created' | 'key.updated' | 'key.revoked' | 'job.canceled' | 'job.redelivered' | 'job.priority_clamped';

export interface AuditEntry {
  id: number;
  at: number;
  /** 'admin', 'open', or the key id. */
  actor: string;
  action: AuditAction;
  /** A key id or a job id. */
  target: string;
  detail: Record<string, unknown> | null;
}

/** The host a claim is for, and what the scheduler knows of it (ADR-0012). */
export interface ClaimHost {
  name: string;
  /** Models installed on the host, under every name a job may use for them. */
  models: string[];
  /** The host does not list its models (an empty `/api/tags`): it is offered every model. */
  anyModel?: boolean;
  /** Models resident (loaded) on the host now. */
  resident: string[];
  /** Measured load time per model on this host (ms); absent: unknown. */
  loadMs: Record<string, number>;
  /** How long a job may be passed over to save a model swap; 0 turns affinity off (FIFO). */
  affinityMaxWaitMs: number;
  /**
   * The host's slots across every instance. A driver shared by several instances (PostgreSQL)
   * claims for the host at most this many less the jobs running on it anywhere (their `engine`),
   * counted under the host's lock, and wakes the worker (`jobReady`) when a job ends elsewhere
   * after a claim was cut short so. One process (SQLite) counts its own: the worker's `limit`.
   */
  slots?: number;
}

export interface NewJob {
  id: string;
  model: string;
  request: Record<string, unknown>;
  metadata: Record<string, string> | null;
  webhookUrl: string | null;
  webhookEvents: JobState[] | null;
  maxAttempts: number;
  priority: number;
  deadlineAt: number | null;
  /** Idempotency-Key handling: the key, the hash of the request body, and when the key expires. */
  idempotency: { key: string; bodyHash: string; expiresAt: number } | null;
  /** The conversation: a fresh id for a first turn, the earlier job's for a continuation. */
  conversationId?: string;
  /** A continuation: the job it continues, and whether to wait for it to be done. */
  previous?: { seq: number; wait: boolean } | null;
  /** The API key submitting it ('' or absent: none). */
  keyId?: string;
  /**
   * The key's limits, applied in the insert's transaction: beyond `maxQueued` queued or scheduled
   * jobs the insert is refused; beyond `dailyLimit` submissions on UTC day `day` the job is
   * inserted `scheduled` for `nextDayAt`.
   */
  quota?: { maxQueued: number | null; dailyLimit: number | null; day: number; nextDayAt: number; refuseOverDaily?: boolean };
  /** The priority asked for, when it was clamped to the key's `priority_max` (audited). */
  clampedFrom?: { priority: number; actor: string };
  /** What it runs; default chat. */
  kind?: JobKind;
  /** The batch it belongs to (ADR-0015). */
  batchSeq?: number;
}

export type InsertOutcome =
  | { ok: true; jobId: string; replayed: boolean; state: JobState; scheduledFor: number | null }
  | { ok: false; code: 'queue_full' }
  /** The key's `maxQueued`. */
  | { ok: false; code: 'key_queue_full' }
  /** Over the key's `dailyLimit`, with `refuseOverDaily`: nothing written. */
  | { ok: false; code: 'key_daily_limit'; nextDayAt: number }
  | { ok: false; code: 'queue_bytes_full' }
  | { ok: false; code: 'idempotency_key_reused' }
  /** The continued job is not done (and the caller would not wait), or it failed or was canceled. */
  | { ok: false; code: 'previous_not_ready'; state: JobState };

export interface ClaimedJob {
  seq: number;
  id: string;
  kind: JobKind;
  model: string;
  request: Record<string, unknown>;
  attempt: number;
  maxAttempts: number;
  /** This attempt's lease token: every later transition of the attempt must present it. */
  lease: string;
  /**
   * For a continuation: the conversation so far, oldest first (each earlier turn's messages and
   * its assistant reply), to send before `request.messages`. Built at claim time, never stored.
   */
  history: Record<string, unknown>[];
}

/** How a finished run went: carried by terminal events (ADR-0005). */
export interface RunSummary {
  createdAt: number;
  startedAt: number | null;
  finishedAt: number | null;
  attempt: number;
  model: string;
  loadMs: number | null;
  promptTokens: number | null;
  completionTokens: number | null;
  conversationId: string;
}

export interface ConversationTurn {
  jobId: string;
  state: JobState;
  /** The turn's own new messages, as submitted. */
  messages: unknown[];
  /** The assistant's reply, once done. */
  reply: unknown;
  error: ErrorInfo | null;
  createdAt: number;
  finishedAt: number | null;
}

export interface ConversationView {
  id: string;
  /** The key of its first turn, or null. */
  keyId: string | null;
  createdAt: number;
  turns: ConversationTurn[];
}

export interface ConversationListed {
  id: string;
  createdAt: number;
  lastSeq: number;
  lastJobId: string;
  lastState: JobState;
  turns: number;
}

export interface CancelOutcome {
  canceled: boolean;
  wasRunning: boolean;
  /** The state after the call. */
  state: JobState;
}

export interface ArtifactInput {
  name: string;
  contentType: string;
  body: Buffer;
}

export interface ArtifactMeta {
  name: string;
  contentType: string;
  size: number;
  sha256: string;
}

export interface Artifact extends ArtifactMeta {
  body: Buffer;
}

export interface DeliveryView {
  id: number;
  state: JobState;
  sequence: number;
  status: 'pending' | 'delivered' | 'failed';
  attempts: number;
  lastStatusCode: number | null;
  lastError: string | null;
  nextAttemptAt: number | null;
  deliveredAt: number | null;
  occurredAt: number;
}

export interface JobView {
  seq: number;
  id: string;
  kind: JobKind;
  state: JobState;
  model: string;
  attempt: number;
  maxAttempts: number;
  priority: number;
  deadlineAt: number | null;
  metadata: Record<string, string> | null;
  createdAt: number;
  startedAt: number | null;
  finishedAt: number | null;
  updatedAt: number;
  result: unknown;
  error: ErrorInfo | null;
  webhookUrl: string | null;
  webhookEvents: JobState[] | null;
  transitions: { state: JobState; at: number; attempt: number }[];
  artifacts: ArtifactMeta[];
  deliveries: DeliveryView[];
  conversationId: string;
  /** The job this one continues, or null. */
  continueFrom: string | null;
  /** Queued, waiting for the job it continues to be done. */
  waiting: boolean;
  loadMs: number | null;
  usage: { promptTokens: number | null; completionTokens: number | null };
  /** The API key that submitted it, or null. */
  keyId: string | null;
  /** A scheduled job becomes queued at this time. */
  scheduledFor: number | null;
  /** The engine host that ran (or is running) it. */
  engine: string | null;
  /** The Foreman instance (FOREMAN_INSTANCE_ID) that ran (or is running) it: set by each claim; null before the first. */
  instance: string | null;
}

/** A claimed webhook delivery, with what the dispatcher needs to build the event body. */
export interface ClaimedDelivery {
  id: number;
  /** The job's id; for a batch event, the batch's. */
  jobId: string;
  /** The job state; for a batch event, its type (`batch.completed`, …). */
  state: JobState | BatchEventType;
  sequence: number;
  url: string;
  /** scheme://host[:port]: the key of the per-receiver concurrency cap. */
  origin: string;
  occurredAt: number;
  attempts: number;
  metadata: Record<string, string> | null;
  error: ErrorInfo | null;
  /** For `done`: the job's artifacts; `body` only where small enough to travel inline. */
  artifacts: (ArtifactMeta & { body: Buffer | null })[];
  /** For terminal states: how the run went. */
  run: RunSummary | null;
  /** For a batch event: the batch, as it ended. */
  batch?: BatchRecord | null;
}

export type DeliveryOutcome =
  | { kind: 'delivered'; status: number }
  | { kind: 'retry'; at: number; status: number | null; error: string }
  | { kind: 'failed'; status: number | null; error: string }
  /** 410: this and every later event of the job are given up. */
  | { kind: 'gone'; status: number; error: string };

/** A committed state change, as watchers see it. `n` is its place in the job's transition log. */
export interface TransitionEvent {
  jobId: string;
  state: JobState;
  /** The job's model (metrics label). */
  model?: string;
  n: number;
  at: number;
  attempt: number;
  /** For `failed`. */
  error?: ErrorInfo;
  /** For terminal states: how the run went. */
  run?: RunSummary;
  /**
   * When the job ends or goes back to the queue after running: the engine host whose slot it
   * frees (PostgreSQL; an instance waiting for that host's slot is woken by it).
   */
  engine?: string;
  /** Committed by another instance (heard by NOTIFY): watchers want it, this instance's metrics do not. */
  remote?: true;
}

export interface ListFilter {
  state?: JobState;
  /** Only this key's jobs ('' = the keyless ones). */
  keyId?: string;
  /** Only jobs run on this engine host. */
  engine?: string;
  conversationId?: string;
  model?: string;
  createdAfter?: number;
  createdBefore?: number;
  /** metadata.<key>=<value> filters; all must match. */
  metadata?: [string, string][];
  /** Only jobs with seq below this (the cursor). */
  beforeSeq?: number;
  limit: number;
}

export interface ListedJob {
  seq: number;
  keyId: string | null;
  engine: string | null;
  /** The instance that ran, or is running, the job (FOREMAN_INSTANCE_ID); null before its first claim. */
  instance: string | null;
  id: string;
  state: JobState;
  model: string;
  priority: number;
  attempt: number;
  metadata: Record<string, string> | null;
  createdAt: number;
  finishedAt: number | null;
}

export interface QueueSnapshot {
  /** Queued jobs the claim takes before this one, per model. */
  ahead: { model: string; n: number }[];
  running: { model: string; startedAt: number }[];
  /** Moving average of run time per model. */
  stats: Map<string, number>;
}
