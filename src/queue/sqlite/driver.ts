import fs from 'node:fs';
import path from 'node:path';
import os from 'node:os';
import { createHash } from 'node:crypto';
import type { Statement } from 'better-sqlite3';
import { isTerminal, loadKey, STATE_SEQUENCE, type ErrorInfo, type JobState } from '../../domain.js';
import type {
  Artifact,
  ArtifactMeta,
  CancelOutcome,
  ClaimedDelivery,
  ClaimedJob,
  DeliveryOutcome,
  DeliveryView,
  InsertOutcome,
  JobView,
  ListFilter,
  ListedJob,
  NewJob,
  QueueDriver,
  QueueSnapshot,
  TransitionEvent,
  ConversationView,
  ConversationListed,
  ApiKeyLimits,
  ApiKeyRecord,
  ClaimHost,
  AuditAction,
  AuditEntry,
  KeyUsage,
  JobKind,
  BatchRecord,
  BatchResultRow,
  FileLine,
  FileRecord,
  NewBatch,
  NewFile,
} from '../driver.js';
import { batchEventOf, batchOf, batchResultOf, claimedJobOf, EXPIRED_IDS_KEPT_MS, fairest, jobEventOf, LIST_SCAN_BUDGET, limitsOf, NEVER, originOf, pickByLoadCost, pickWithoutLookups, queuedWork, RESULT_IN_ARTIFACT, runOf, sameLoadProbes, storedResult, type BatchResultDbRow, type BatchRow, type Candidate, type JobEventRow } from '../shared.js';
import { LocalNotifier, type Notifier } from '../notifier.js';
import { Conflict, Validation } from '../../errors.js';
import { lockDataDir, migrate, openDatabase, type DB } from './db.js';
import { domainError, GroupCommit, type Effects } from './group-commit.js';
import { prepareStatements, type Statements } from './statements.js';
import { prepareBatchStatements, type BatchStatements } from './batch-statements.js';

export interface SqliteDriverOptions {
  dataDir: string;
  busyTimeoutMs?: number;
  synchronous?: 'FULL' | 'NORMAL';
  notifier?: Notifier;
  /** Observes each group commit (metrics). */
  onCommit?: (size: number, ms: number) => void;
  /** This process (FOREMAN_INSTANCE_ID): `jobs.instance` of the jobs it claims. */
  instanceId?: string;
}

/** The columns a transition statement returns. */
interface TransitionRow {
  seq: number;
  id: string;
  attempt: number;
  webhook_url: string | null;
  webhook_events: string | null;
  webhook_gone: number;
  error_code: string | null;
  error_message: string | null;
  model: string;
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  conversation_id: string;
  load_ms: number | null;
  prompt_tokens: number | null;
  completion_tokens: number | null;
  key_id: string;
  kind: JobKind;
  batch_seq: number | null;
}

interface JobRow extends TransitionRow {
  scheduled_for: number | null;
  engine: string | null;
  instance: string | null;
  state: JobState;
  waits: number;
  prev_id: string | null;
  priority: number;
  deadline_at: number | null;
  request: string;
  metadata: string | null;
  max_attempts: number;
  created_at: number;
  started_at: number | null;
  finished_at: number | null;
  updated_at: number;
  result: string | null;
}


interface DueRow extends JobEventRow {
  jobSeq: number;
  batchSeq: number | null;
}

const LIST_CACHE_MAX = 64;

function bump(m: Map<string, number>, k: string, d: number): void {
  const n = (m.get(k) ?? 0) + d;
  if (n <= 0) m.delete(k);
  else m.set(k, n);
}

/**
 * The SQLite driver: one process owns the database file (a lock on the data directory enforces
 * it), writes go through the group commit, and claims of webhook deliveries are held in memory
 * (a process that dies releases them with its memory). ADR-0002, ADR-0010.
 */
export class SqliteDriver implements QueueDriver {
  readonly name = 'sqlite';
  readonly notifier: Notifier;
  readonly db: DB;
  private readonly s: Statements;
  private readonly b: BatchStatements;
  private readonly group: GroupCommit;
  private readonly lock: { release(): void };
  private readonly listCache = new Map<string, Statement>();
  /**
   * Deliveries held by this process (id → origin): claimed and in flight, or sent and waiting
   * for their outcome to commit. A held row is never claimed again. `heldPerOrigin` counts them;
   * `inflightPerOrigin` counts only attempts in flight, which is what the per-origin cap limits.
   */
  private readonly claimed = new Map<number, string>();
  private readonly heldPerOrigin = new Map<string, number>();
  private readonly inflightPerOrigin = new Map<string, number>();
  private readonly attempting = new Set<number>();
  private closed = false;
  private claims = 0;
  /** The key the last claim served (its `last_served` mark is the highest): a fair-share hint. */
  private lastServedKey: string | null = null;

  /** `jobs.instance` of the jobs this driver claims. */
  readonly instanceId: string;

  constructor(opts: SqliteDriverOptions) {
    this.instanceId = opts.instanceId ?? `${os.hostname()}-${process.pid}`;
    fs.mkdirSync(opts.dataDir, { recursive: true });
    this.lock = lockDataDir(opts.dataDir);
    try {
      const file = path.join(opts.dataDir, 'foreman.db');
      // FULL durability is kept, but the WAL sync happens off the event loop (ADR-0002): SQLite
      // commits without syncing, and the group's callers hear of it once an fdatasync of the
      // WAL, run on libuv's thread pool, has returned.
      this.db = openDatabase(file, { busyTimeoutMs: opts.busyTimeoutMs ?? 1000, synchronous: 'NORMAL' });
      migrate(this.db);
      this.s = prepareStatements(this.db);
      this.b = prepareBatchStatements(this.db);
      if ((opts.synchronous ?? 'FULL') === 'FULL') {
        this.walFd = fs.openSync(`${file}-wal`, fs.constants.O_RDONLY | fs.constants.O_CREAT);
      }
    } catch (err) {
      this.lock.release();
      throw err;
    }
    this.notifier = opts.notifier ?? new LocalNotifier();
    const walFd = this.walFd;
    this.group = new GroupCommit(
      this.db,
      (all) => all.forEach((fx) => this.announce(fx)),
      opts.onCommit,
      walFd === null ? null : { sync: (cb) => fs.fdatasync(walFd, (err) => cb(err)) },
    );
  }

  private readonly walFd: number | null = null;

  /** URLs repeat across jobs: a bounded memo of their origins. */
  private readonly origins = new Map<string, string>();
  private originOfUrl(url: string): string {
    let o = this.origins.get(url);
    if (o === undefined) {
      o = originOf(url);
      if (this.origins.size >= 4096) this.origins.clear();
      this.origins.set(url, o);
    }
    return o;
  }

  private announce(fx: Effects): void {
    const n = this.notifier;
    if (fx.deliveryReady) n.emit('deliveryReady');
    if (fx.batchReady) n.emit('batchReady');
    if (fx.jobReady) n.emit('jobReady');
    for (const e of fx.transitions) n.emit('stateChanged', e);
    for (const id of fx.canceled) n.emit('cancelRequested', id);
  }

  /** A write, in the current group commit; settles after the commit. */
  private write<T>(op: (fx: Effects) => T): Promise<T> {
    return this.group.run(op);
  }

  /** A read: runs now, outside any transaction it does not need. */
  private async read<T>(fn: () => T): Promise<T> {
    try {
      return fn();
    } catch (err) {
      throw domainError(err);
    }
  }

  // --- transitions ---

  /** Appends the transition and, if the job's webhook wants this state, the outbox row. */
  private record(fx: Effects, row: TransitionRow, state: JobState, now: number): void {
    const s = this.s;
    const n = s.insertTransition.get({ seq: row.seq, state, at: now, attempt: row.attempt }) as number;
    const ev: TransitionEvent = { jobId: row.id, state, model: row.model, n, at: now, attempt: row.attempt };
    if (state === 'failed') ev.error = { code: row.error_code ?? 'unknown', message: row.error_message ?? '' };
    if (isTerminal(state)) ev.run = runOf(row);
    fx.transitions.push(ev);
    if (state === 'queued') fx.jobReady = true;
    // Turns waiting for this one: released when it is done, failed when it is not (ADR-0016).
    if (state === 'done') {
      if (s.releaseWaiting.run({ seq: row.seq, now }).changes > 0) fx.jobReady = true;
    } else if (state === 'failed' || state === 'canceled') {
      const message = `the job this one continues (${row.id}) ended ${state}`;
      for (const w of s.failWaiting.all({ seq: row.seq, now, message }) as TransitionRow[]) this.record(fx, w, 'failed', now);
    }
    // A batch's last job to end ends the batch, in the same transaction (ADR-0015).
    if (row.batch_seq !== null && isTerminal(state)) this.batchSettle(fx, row.batch_seq, now);
    if (row.webhook_url === null || row.webhook_gone === 1) return;
    if (row.webhook_events !== null && !(JSON.parse(row.webhook_events) as string[]).includes(state)) return;
    const origin = this.originOfUrl(row.webhook_url);
    const r = s.insertDelivery.get({ seq: row.seq, state, sequence: STATE_SEQUENCE[state], url: row.webhook_url, origin, now }) as
      | { dueAt: number | null }
      | undefined;
    // Due now unless an earlier event of the job is still pending (then it becomes due in turn).
    if (r?.dueAt == null) return;
    s.originEarlier.run({ origin, at: r.dueAt });
    fx.deliveryReady = true;
  }

  private move(fx: Effects, stmt: Statement, params: object, state: JobState, now: number): TransitionRow | undefined {
    const row = stmt.get(params) as TransitionRow | undefined;
    if (row) this.record(fx, row, state, now);
    return row;
  }

  private moveAll(fx: Effects, stmt: Statement, params: object, state: JobState, now: number): string[] {
    const rows = stmt.all(params) as TransitionRow[];
    for (const r of rows) this.record(fx, r, state, now);
    return rows.map((r) => r.id);
  }

  async recover(p: { now: number }): Promise<{ requeued: string[] }> {
    // This process owns the database exclusively: whatever was running belonged to a process that is gone.
    const requeued = await this.write((fx) => this.moveAll(fx, this.s.rescueAll, { now: p.now }, 'queued', p.now));
    return { requeued };
  }

  async ping(): Promise<boolean> {
    return this.read(() => this.s.ping.get() === 1);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.group.flush();
    await this.group.whenDurable();
    this.db.close();
    if (this.walFd !== null) fs.closeSync(this.walFd);
    this.lock.release();
  }

  jobsInsert(p: { jobs: NewJob[]; now: number; maxQueued: number; maxQueuedBytes?: number }): Promise<InsertOutcome[]> {
    return this.write((fx) => this.insertJobs(fx, p));
  }

  /** Inserts jobs in one transaction (the caller's); `stopAtRefusal`: stop at the first refused one. */
  private insertJobs(fx: Effects, p: { jobs: NewJob[]; now: number; maxQueued: number; maxQueuedBytes?: number }, stopAtRefusal = false): InsertOutcome[] {
    const s = this.s;
    {
      const { now } = p;
      const counts = s.countQueued.get() as { n: number; bytes: number };
      let queued = counts.n;
      let bytes = counts.bytes;
      const out: InsertOutcome[] = [];
      for (const j of p.jobs) {
        if (stopAtRefusal && out.length > 0 && !out[out.length - 1]!.ok) break;
        if (j.idempotency) {
          const prior = s.idemGet.get(j.idempotency.key) as { bodyHash: string; jobSeq: number; expiresAt: number } | undefined;
          if (prior && prior.expiresAt > now) {
            const job = s.idStateBySeq.get(prior.jobSeq) as { id: string; state: JobState; scheduledFor: number | null };
            out.push(
              prior.bodyHash === j.idempotency.bodyHash
                ? { ok: true, jobId: job.id, replayed: true, state: job.state, scheduledFor: job.scheduledFor }
                : { ok: false, code: 'idempotency_key_reused' },
            );
            continue;
          }
          if (prior) s.idemDelete.run(j.idempotency.key);
        }
        if (queued >= p.maxQueued) {
          out.push({ ok: false, code: 'queue_full' });
          continue;
        }
        const keyId = j.keyId ?? '';
        let scheduledFor: number | null = null;
        if (j.quota) {
          if (j.quota.maxQueued !== null && ((s.keyQueued.get(keyId) as number | undefined) ?? 0) >= j.quota.maxQueued) {
            out.push({ ok: false, code: 'key_queue_full' });
            continue;
          }
          // Days are counted by submission: today's count includes the jobs it scheduled.
          if (j.quota.dailyLimit !== null && ((s.keyDayJobs.get(keyId, j.quota.day) as number | undefined) ?? 0) >= j.quota.dailyLimit) {
            if (j.quota.refuseOverDaily) {
              out.push({ ok: false, code: 'key_daily_limit', nextDayAt: j.quota.nextDayAt });
              continue;
            }
            scheduledFor = j.quota.nextDayAt;
          }
        }
        const request = JSON.stringify(j.request);
        const size = Buffer.byteLength(request, 'utf8');
        if (p.maxQueuedBytes !== undefined && bytes + size > p.maxQueuedBytes) {
          out.push({ ok: false, code: 'queue_bytes_full' });
          continue;
        }
        // A continuation: decided here, in the transaction, against the earlier job's state now.
        let waits = 0;
        if (j.previous) {
          const prevState = (s.idStateBySeq.get(j.previous.seq) as { state: JobState } | undefined)?.state;
          const running = prevState === 'queued' || prevState === 'loading' || prevState === 'working';
          if (prevState !== 'done' && !(running && j.previous.wait)) {
            out.push({ ok: false, code: 'previous_not_ready', state: prevState ?? 'canceled' });
            continue;
          }
          if (running) waits = 1;
        }
        const row = s.insertJob.get({
          id: j.id,
          model: j.model,
          request,
          metadata: j.metadata === null ? null : JSON.stringify(j.metadata),
          webhook_url: j.webhookUrl,
          webhook_events: j.webhookEvents === null ? null : JSON.stringify(j.webhookEvents),
          max_attempts: j.maxAttempts,
          priority: j.priority,
          deadline_at: j.deadlineAt,
          now,
          state: scheduledFor === null ? 'queued' : 'scheduled',
          run_at: waits ? NEVER : (scheduledFor ?? now),
          conversation_id: j.conversationId ?? j.id,
          prev_seq: j.previous?.seq ?? null,
          waits,
          key_id: keyId,
          scheduled_for: scheduledFor,
          kind: j.kind ?? 'chat',
          batch_seq: j.batchSeq ?? null,
        }) as TransitionRow;
        if (keyId !== '' && j.quota) s.keyDayAddJob.run(keyId, j.quota.day);
        if (j.clampedFrom) {
          this.audit(now, j.clampedFrom.actor, 'job.priority_clamped', j.id, { asked: j.clampedFrom.priority, given: j.priority });
        }
        s.conversationUpsert.run({ id: row.conversation_id, seq: row.seq, now });
        if (j.metadata) for (const [k, v] of Object.entries(j.metadata)) s.insertMetadata.run(k, v, row.seq);
        if (j.idempotency) s.idemInsert.run(j.idempotency.key, j.idempotency.bodyHash, row.seq, j.idempotency.expiresAt);
        const state = scheduledFor === null ? 'queued' : 'scheduled';
        this.record(fx, row, state, now);
        queued++;
        bytes += size;
        out.push({ ok: true, jobId: j.id, replayed: false, state, scheduledFor });
      }
      return out;
    }
  }

  jobsClaim(p: { owner: string; limit: number; now: number; leaseMs: number; engine?: ClaimHost }): Promise<ClaimedJob[]> {
    // Each claim call gets its own token prefix: an attempt given back (its number reused) and
    // claimed again by the same owner still gets a lease of its own.
    const owner = `${p.owner}.${++this.claims}`;
    const s = this.s;
    return this.write((fx) => {
      type Row = TransitionRow & { request: string; max_attempts: number; lease_owner: string; prev_seq: number | null };
      const rows: Row[] = [];
      const host = p.engine;
      const models = host ? JSON.stringify(host.models) : null;
      const resident = host ? new Set(host.resident) : null;
      // One at a time: each claim moves its key to the back of the round (ADR-0013).
      while (rows.length < p.limit) {
        const pick = host
          ? this.pickForHost(host, models!, resident!, p.now)
          : (s.claimPick.get({ now: p.now }) as { seq: number; keyId: string; numCtx?: unknown } | undefined);
        if (!pick) break;
        const r = s.claimOne.get({ seq: pick.seq, owner, now: p.now, lease: p.now + p.leaseMs, engine: host?.name ?? null, instance: this.instanceId }) as Row;
        // The key served last already has the highest mark: serving it again changes nothing.
        if (pick.keyId !== this.lastServedKey) {
          s.keyServed.run(pick.keyId);
          this.lastServedKey = pick.keyId;
        }
        if (host) resident!.add(loadKey(r.model, pick.numCtx)); // the host is about to load it
        this.record(fx, r, 'loading', p.now);
        rows.push(r);
      }
      return rows.map((r) => claimedJobOf(r, r.prev_seq === null ? [] : this.historyBefore(r.prev_seq)));
    });
  }

  /**
   * The model-aware pick for one host (ADR-0012), among each key's next job of each model the
   * host has installed: the best effective priority first; among equals, a job that has waited
   * longer than `affinityMaxWaitMs` (no starvation), else a job whose model is resident (no
   * swap), else the model with the most queued work per second of its load time; the fair share
   * (key served least recently, then FIFO) decides what is left.
   */
  private pickForHost(host: ClaimHost, models: string, resident: Set<string>, now: number): Candidate | undefined {
    const s = this.s;
    const all = s.claimCandidates.all({ models, now, any: host.anyModel ? 1 : 0 }) as Candidate[];
    if (all.length === 0) return undefined;
    const first = pickWithoutLookups(all, host, resident, now);
    if ('pick' in first) return first.pick;
    const sameLoad: Candidate[] = [];
    for (const { cand, model, ctx } of sameLoadProbes(first.atTop, resident)) {
      const seq = s.claimSameLoad.get({ key: cand.keyId, model, now, eff: cand.eff, ctx }) as number | undefined;
      if (seq !== undefined) sameLoad.push({ ...cand, seq, numCtx: ctx });
    }
    if (sameLoad.length > 0) return fairest(sameLoad);
    const work = new Map<string, number>();
    for (const m of new Set(first.atTop.map((c) => c.model))) {
      work.set(m, queuedWork(s.modelQueued.get(m) as number | undefined, s.modelAvg.get(m) as number | undefined));
    }
    return pickByLoadCost(first.atTop, host, work);
  }

  jobsQueuedModels(): Promise<string[]> {
    return this.read(() => this.s.queuedModels.all() as string[]);
  }

  jobsFailQueuedModel(p: { model: string; now: number; error: ErrorInfo; limit: number }): Promise<string[]> {
    return this.write((fx) =>
      this.moveAll(fx, this.s.failQueuedModel, { model: p.model, now: p.now, code: p.error.code, message: p.error.message, limit: p.limit }, 'failed', p.now),
    );
  }

  /**
   * A continuation's conversation so far, oldest first: each earlier turn's own messages, then
   * its assistant reply (tool calls included). Built when the turn runs; never stored again.
   */
  private historyBefore(prevSeq: number): Record<string, unknown>[] {
    const turns: Record<string, unknown>[][] = [];
    for (let seq: number | null = prevSeq; seq !== null; ) {
      const t = this.s.turnBySeq.get(seq) as { prevSeq: number | null; request: string; result: string | null } | undefined;
      if (!t) break;
      const req = JSON.parse(t.request) as { messages?: Record<string, unknown>[] };
      const result = this.resultOf(seq, t.result) as { message?: Record<string, unknown> } | null;
      turns.push([...(req.messages ?? []), ...(result?.message ? [result.message] : [])]);
      seq = t.prevSeq;
    }
    return turns.reverse().flat();
  }

  jobLeaseRenew(p: { seq: number; lease: string; until: number }): Promise<boolean> {
    return this.write(() => this.s.heartbeat.run(p).changes > 0);
  }

  jobSetWorking(p: { seq: number; lease: string; now: number; leaseMs: number }): Promise<boolean> {
    return this.write(
      (fx) => this.move(fx, this.s.toWorking, { seq: p.seq, lease: p.lease, now: p.now, lease_until: p.now + p.leaseMs }, 'working', p.now) !== undefined,
    );
  }

  jobComplete(p: {
    seq: number;
    lease: string;
    now: number;
    result: unknown;
    artifacts: { name: string; contentType: string; body: Buffer }[];
    runMs: number;
    loadMs?: number;
    usage?: { promptTokens: number | null; completionTokens: number | null };
  }): Promise<boolean> {
    const s = this.s;
    return this.write((fx) => {
      const row = this.move(
        fx,
        s.toDone,
        {
          seq: p.seq,
          lease: p.lease,
          now: p.now,
          result: storedResult(p.result, p.artifacts),
          load_ms: p.loadMs ?? null,
          prompt_tokens: p.usage?.promptTokens ?? null,
          completion_tokens: p.usage?.completionTokens ?? null,
        },
        'done',
        p.now,
      );
      if (!row) return false;
      for (const a of p.artifacts) {
        const sha = createHash('sha256').update(a.body).digest('hex');
        s.insertArtifact.run(p.seq, a.name, a.contentType, a.body.length, sha, a.body, p.now);
      }
      s.modelStat.run({ model: row.model, ms: p.runMs });
      const tokens = (p.usage?.promptTokens ?? 0) + (p.usage?.completionTokens ?? 0);
      if (row.key_id !== '' && tokens > 0) s.keyDayAddTokens.run({ key: row.key_id, day: Math.floor(p.now / 86_400_000), tokens });
      return true;
    });
  }

  jobRetry(p: { seq: number; lease: string; now: number; runAt: number }): Promise<boolean> {
    return this.write((fx) => this.move(fx, this.s.toQueuedRetry, { seq: p.seq, lease: p.lease, now: p.now, run_at: p.runAt }, 'queued', p.now) !== undefined);
  }

  jobFail(p: { seq: number; lease: string; now: number; error: ErrorInfo }): Promise<boolean> {
    return this.write(
      (fx) =>
        this.move(fx, this.s.toFailed, { seq: p.seq, lease: p.lease, now: p.now, code: p.error.code, message: p.error.message }, 'failed', p.now) !==
        undefined,
    );
  }

  jobRelease(p: { seq: number; lease: string; now: number }): Promise<boolean> {
    return this.write((fx) => this.move(fx, this.s.toQueuedRelease, p, 'queued', p.now) !== undefined);
  }

  jobCancel(p: { id: string; now: number; keyId?: string; actor?: string }): Promise<CancelOutcome | null> {
    const s = this.s;
    return this.write((fx) => {
      const before = s.seqStateById.get(p.id) as { seq: number; state: JobState; keyId: string } | undefined;
      if (!before || (p.keyId !== undefined && before.keyId !== p.keyId)) return null;
      const canceled = this.move(fx, s.toCanceled, { seq: before.seq, now: p.now }, 'canceled', p.now) !== undefined;
      const wasRunning = canceled && (before.state === 'loading' || before.state === 'working');
      if (wasRunning) fx.canceled.push(p.id);
      if (canceled && p.actor !== undefined) this.audit(p.now, p.actor, 'job.canceled', p.id, { was: before.state });
      return { canceled, wasRunning, state: canceled ? 'canceled' : before.state };
    });
  }

  // --- maintenance ---

  jobsRescue(p: { now: number }): Promise<string[]> {
    return this.write((fx) => this.moveAll(fx, this.s.rescueExpired, p, 'queued', p.now));
  }

  jobsFailPastDeadline(p: { now: number; limit: number }): Promise<string[]> {
    return this.write((fx) => this.moveAll(fx, this.s.pastDeadline, p, 'failed', p.now));
  }

  jobsFailStale(p: { createdBefore: number; now: number; error: ErrorInfo; limit: number }): Promise<string[]> {
    return this.write((fx) =>
      this.moveAll(fx, this.s.staleQueued, { cutoff: p.createdBefore, now: p.now, code: p.error.code, message: p.error.message, limit: p.limit }, 'failed', p.now),
    );
  }

  jobsAge(p: { now: number; agingMs: number }): Promise<number> {
    return this.write(() => this.s.age.run({ now: p.now, aging: p.agingMs }).changes);
  }

  jobsDeleteExpired(p: { finishedBefore: number; failedFinishedBefore?: number; limit: number; now: number }): Promise<number> {
    const s = this.s;
    return this.write(() => {
      const picked = s.sweepPick.all({ cutoff: p.finishedBefore, failedCutoff: p.failedFinishedBefore ?? p.finishedBefore, limit: p.limit }) as {
        seq: number;
        id: string;
        conversationId: string;
      }[];
      for (const j of picked) {
        s.deleteJob.run(j.seq);
        s.expiredInsert.run(j.id, p.now);
        s.conversationDropIfEmpty.run({ id: j.conversationId });
      }
      s.idemSweep.run(p.now, p.limit);
      s.expiredSweep.run(p.now - EXPIRED_IDS_KEPT_MS, p.limit);
      return picked.length;
    });
  }

  jobsNextRunAt(p: { now: number }): Promise<number | null> {
    return this.read(() => (this.s.nextRunAt.get(p.now) as number | undefined) ?? null);
  }

  jobsNextDeadlineAt(): Promise<number | null> {
    return this.read(() => (this.s.nextDeadline.get() as number | undefined) ?? null);
  }

  jobsPromoteScheduled(p: { now: number }): Promise<string[]> {
    return this.write((fx) => this.moveAll(fx, this.s.promoteScheduled, p, 'queued', p.now));
  }

  jobsNextScheduledAt(): Promise<number | null> {
    return this.read(() => (this.s.nextScheduled.get() as number | undefined) ?? null);
  }

  jobsOldestFinishedAt(): Promise<number | null> {
    return this.read(() => (this.s.oldestFinished.get() as number | undefined) ?? null);
  }

  // --- reads ---

  jobGet(p: { id: string }): Promise<JobView | null> {
    const s = this.s;
    return this.read(() => {
      const r = s.jobById.get(p.id) as JobRow | undefined;
      if (!r) return null;
      return {
        seq: r.seq,
        id: r.id,
        kind: r.kind,
        state: r.state,
        model: r.model,
        attempt: r.attempt,
        maxAttempts: r.max_attempts,
        priority: r.priority,
        deadlineAt: r.deadline_at,
        metadata: r.metadata === null ? null : (JSON.parse(r.metadata) as Record<string, string>),
        createdAt: r.created_at,
        startedAt: r.started_at,
        finishedAt: r.finished_at,
        updatedAt: r.updated_at,
        result: this.resultOf(r.seq, r.result),
        error: r.error_code === null ? null : { code: r.error_code, message: r.error_message ?? '' },
        webhookUrl: r.webhook_url,
        webhookEvents: r.webhook_events === null ? null : (JSON.parse(r.webhook_events) as JobState[]),
        transitions: s.transitions.all(r.seq) as JobView['transitions'],
        artifacts: s.artifactMetas.all(r.seq) as ArtifactMeta[],
        deliveries: s.deliveries.all(r.seq) as DeliveryView[],
        conversationId: r.conversation_id,
        continueFrom: r.prev_id,
        waiting: r.waits === 1,
        loadMs: r.load_ms,
        usage: { promptTokens: r.prompt_tokens, completionTokens: r.completion_tokens },
        keyId: r.key_id === '' ? null : r.key_id,
        scheduledFor: r.scheduled_for,
        engine: r.engine,
        instance: r.instance,
      };
    });
  }

  private resultOf(seq: number, stored: string | null): unknown {
    if (stored === null) return null;
    if (stored !== RESULT_IN_ARTIFACT) return JSON.parse(stored) as unknown;
    const body = this.s.artifactBody.get(seq, 'completion') as Buffer | undefined;
    return body === undefined ? null : (JSON.parse(body.toString('utf8')) as unknown);
  }

  jobTransitionsSince(p: { id: string; after: number }): Promise<TransitionEvent[]> {
    return this.read(() =>
      (this.s.transitionsSince.all(p.id, p.after) as Record<string, unknown>[]).map((t) => {
        const state = t.state as JobState;
        const e: TransitionEvent = { jobId: p.id, state, model: t.j_model as string, n: t.n as number, at: t.at as number, attempt: t.attempt as number };
        if (state === 'failed') e.error = { code: (t.error_code as string | null) ?? 'unknown', message: (t.error_message as string | null) ?? '' };
        if (isTerminal(state)) {
          // The job row, as a transition statement returns it (columns prefixed j_).
          const row = Object.fromEntries(Object.entries(t).filter(([k]) => k.startsWith('j_')).map(([k, v]) => [k.slice(2), v])) as unknown as TransitionRow;
          e.run = runOf(row);
        }
        return e;
      }),
    );
  }

  jobsCountActive(): Promise<{ state: JobState; model: string; n: number }[]> {
    return this.read(() => this.s.activeByStateModel.all() as { state: JobState; model: string; n: number }[]);
  }

  deliveriesPendingStats(): Promise<{ count: number; oldestOccurredAt: number | null }> {
    return this.read(() => this.s.pendingStats.get() as { count: number; oldestOccurredAt: number | null });
  }

  jobQueueSnapshot(p: { seq: number }): Promise<QueueSnapshot> {
    const s = this.s;
    return this.read(() => {
      const me = s.queueOf.get(p.seq) as { eff: number; key: string; served: number };
      const byModel = new Map<string, number>();
      const add = (rows: { model: string; n: number }[]) => rows.forEach((r) => byModel.set(r.model, (byModel.get(r.model) ?? 0) + r.n));
      add(s.queueAheadHigher.all({ eff: me.eff }) as { model: string; n: number }[]);
      const mine = s.queueAheadMine.all({ key: me.key, eff: me.eff, seq: p.seq }) as { model: string; n: number }[];
      add(mine);
      const head = s.queueHeadOf.get({ key: me.key, eff: me.eff }) as number;
      add(s.queueAheadOthers.all({ eff: me.eff, key: me.key, served: me.served, head, mine: mine.reduce((a, r) => a + r.n, 0) }) as { model: string; n: number }[]);
      const ahead = [...byModel].map(([model, n]) => ({ model, n }));
      const running = s.running.all() as { model: string; startedAt: number }[];
      const stats = new Map((s.modelStats.all() as { model: string; avgMs: number }[]).map((r) => [r.model, r.avgMs]));
      return { ahead, running, stats };
    });
  }

  jobExpired(p: { id: string }): Promise<boolean> {
    return this.read(() => this.s.expiredById.get(p.id) === 1);
  }

  conversationGet(p: { id: string }): Promise<ConversationView | null> {
    const s = this.s;
    return this.read(() => {
      const c = s.conversationById.get(p.id) as { id: string; createdAt: number; keyId: string | null } | undefined;
      if (!c) return null;
      const turns = (
        s.conversationTurns.all(p.id) as {
          seq: number;
          id: string;
          state: JobState;
          request: string;
          result: string | null;
          errorCode: string | null;
          errorMessage: string | null;
          createdAt: number;
          finishedAt: number | null;
        }[]
      ).map((t) => ({
        jobId: t.id,
        state: t.state,
        messages: (JSON.parse(t.request) as { messages?: unknown[] }).messages ?? [],
        reply: (this.resultOf(t.seq, t.result) as { message?: unknown } | null)?.message ?? null,
        error: t.errorCode === null ? null : { code: t.errorCode, message: t.errorMessage ?? '' },
        createdAt: t.createdAt,
        finishedAt: t.finishedAt,
      }));
      return { id: c.id, createdAt: c.createdAt, keyId: c.keyId === '' ? null : c.keyId, turns };
    });
  }

  conversationsList(p: { limit: number; beforeSeq?: number; keyId?: string }): Promise<ConversationListed[]> {
    return this.read(
      () => this.s.conversationsPage.all({ before: p.beforeSeq ?? Number.MAX_SAFE_INTEGER, limit: p.limit, key: p.keyId ?? null }) as ConversationListed[],
    );
  }

  artifactGet(p: { jobId: string; name: string }): Promise<Artifact | null> {
    return this.read(() => (this.s.artifact.get(p.jobId, p.name) as Artifact | undefined) ?? null);
  }

  /** Newest first, keyset-paginated on seq (never OFFSET). */
  jobsList(f: ListFilter): Promise<ListedJob[]> {
    return this.read(() => this.list(f));
  }

  private list(f: ListFilter): ListedJob[] {
    const s = this.s;
    let upper = f.beforeSeq ?? null; // exclusive
    let lower: number | null = null; // inclusive
    if (f.createdBefore !== undefined) {
      const b = (s.seqCreatedBefore.get(f.createdBefore) as number | undefined) ?? null;
      if (b === null) return [];
      upper = upper === null ? b + 1 : Math.min(upper, b + 1);
    }
    if (f.createdAfter !== undefined) {
      lower = (s.seqCreatedAtOrAfter.get(f.createdAfter) as number | undefined) ?? null;
      if (lower === null) return [];
    }
    const where: string[] = [];
    const params: Record<string, unknown> = { limit: f.limit };
    let from = 'jobs j';
    const meta = f.metadata ?? [];
    // The first metadata filter drives the scan through its (key, value, job_seq) index, at most
    // LIST_SCAN_BUDGET entries of it: a listing never holds the process for long (finding 10).
    const inner: string[] = ['key = @mk0', 'value = @mv0'];
    if (upper !== null) {
      inner.push('job_seq < @upper');
      params.upper = upper;
    }
    if (lower !== null) {
      inner.push('job_seq >= @lower');
      params.lower = lower;
    }
    meta.forEach(([k, v], i) => {
      params[`mk${i}`] = k;
      params[`mv${i}`] = v;
      if (i > 0) where.push(`EXISTS (SELECT 1 FROM job_metadata m${i} WHERE m${i}.key = @mk${i} AND m${i}.value = @mv${i} AND m${i}.job_seq = j.seq)`);
    });
    const innerSql = `SELECT job_seq FROM job_metadata WHERE ${inner.join(' AND ')} ORDER BY job_seq DESC LIMIT ${LIST_SCAN_BUDGET}`;
    if (meta.length > 0) from = `(${innerSql}) m JOIN jobs j ON j.seq = m.job_seq`;
    const seqCol = meta.length > 0 ? 'm.job_seq' : 'j.seq';
    if (meta.length === 0 && upper !== null) where.push('j.seq < @upper');
    if (meta.length === 0 && lower !== null) where.push('j.seq >= @lower');
    // seq bounds narrow the scan; the created_at checks keep the result exact even if the clock
    // ever stepped back between two submissions.
    if (f.createdBefore !== undefined) {
      where.push('j.created_at < @cbefore');
      params.cbefore = f.createdBefore;
    }
    if (f.createdAfter !== undefined) {
      where.push('j.created_at >= @cafter');
      params.cafter = f.createdAfter;
    }
    if (f.state) {
      where.push('j.state = @state');
      params.state = f.state;
    }
    if (f.model) {
      where.push('j.model = @model');
      params.model = f.model;
    }
    if (f.conversationId) {
      where.push('j.conversation_id = @conversation');
      params.conversation = f.conversationId;
    }
    if (f.keyId !== undefined) {
      where.push('j.key_id = @key');
      params.key = f.keyId;
    }
    if (f.engine !== undefined) {
      where.push('j.engine = @engine');
      params.engine = f.engine;
    }
    const sql = `SELECT j.seq, j.id, j.state, j.model, j.priority, j.attempt, j.metadata, j.created_at AS createdAt,
        j.finished_at AS finishedAt, nullif(j.key_id, '') AS keyId, j.engine, j.instance
      FROM ${from} ${where.length ? `WHERE ${where.join(' AND ')}` : ''}
      ORDER BY ${seqCol} DESC LIMIT @limit`;
    // A handful of shapes, each prepared once; the cache is bounded (least recently used out).
    const stmt = this.cached(sql);
    const rows = (stmt.all(params) as (Omit<ListedJob, 'metadata'> & { metadata: string | null })[]).map((r) => ({
      ...r,
      metadata: r.metadata === null ? null : (JSON.parse(r.metadata) as Record<string, string>),
    }));
    if (meta.length > 0 && rows.length < f.limit) {
      // A short page: exact only if the driving scan ended before its budget did.
      const scanned = this.cached(`SELECT count(*) FROM (${innerSql})`).pluck().get(params) as number;
      if (scanned >= LIST_SCAN_BUDGET && (f.metadata!.length > 1 || f.state || f.model || f.createdAfter !== undefined || f.createdBefore !== undefined)) {
        throw new Validation(
          `this filter combination would scan more than ${LIST_SCAN_BUDGET} jobs of metadata.${meta[0]![0]}=${JSON.stringify(meta[0]![1].slice(0, 40))}: narrow it (created_after/created_before, or a rarer metadata filter first)`,
          `metadata.${meta[0]![0]}`,
          'filter_too_broad',
        );
      }
    }
    return rows;
  }

  private cached(sql: string): Statement {
    let stmt = this.listCache.get(sql);
    if (stmt) this.listCache.delete(sql);
    else {
      stmt = this.db.prepare(sql);
      if (this.listCache.size >= LIST_CACHE_MAX) this.listCache.delete(this.listCache.keys().next().value as string);
    }
    this.listCache.set(sql, stmt);
    return stmt;
  }

  // --- webhook outbox ---

  async deliveriesClaim(p: { now: number; limit: number; perOriginLimit: number; inlineMax: number }): Promise<{ deliveries: ClaimedDelivery[]; nextDueAt: number | null }> {
    const claimed = await this.claimDue(p);
    const nextDueAt = claimed.length < p.limit ? await this.deliveriesNextDueAt({ now: p.now, perOriginLimit: p.perOriginLimit }) : null;
    // An event is sent only once the state change it reports is on disk.
    if (claimed.length > 0) await this.group.whenDurable();
    return { deliveries: claimed, nextDueAt };
  }

  private claimDue(p: { now: number; limit: number; perOriginLimit: number; inlineMax: number }): Promise<ClaimedDelivery[]> {
    const s = this.s;
    return this.read(() => {
      const out: ClaimedDelivery[] = [];
      if (p.limit <= 0) return out;
      // Origins with claims may lead the list without yielding anything: fetch that many more.
      const origins = s.dueOrigins.all({ now: p.now, n: p.limit + this.heldPerOrigin.size }) as string[];
      for (const origin of origins) {
        if (out.length >= p.limit) break;
        const room = Math.min(p.perOriginLimit - (this.inflightPerOrigin.get(origin) ?? 0), p.limit - out.length);
        if (room <= 0) continue;
        const heldHere = this.heldPerOrigin.get(origin) ?? 0;
        const ids = s.dueInOrigin.all({ origin, until: p.now, n: room + heldHere }) as number[];
        let took = 0;
        for (const id of ids) {
          if (took >= room) break;
          if (this.claimed.has(id)) continue;
          took++;
          out.push(this.hold(s.deliveryForSend.get(id) as DueRow, p.inlineMax));
        }
      }
      return out;
    });
  }

  private hold(r: DueRow, inlineMax: number): ClaimedDelivery {
    this.claimed.set(r.id, r.origin);
    this.attempting.add(r.id);
    bump(this.heldPerOrigin, r.origin, 1);
    bump(this.inflightPerOrigin, r.origin, 1);
    if (r.batchSeq != null) {
      // A batch's terminal event (ADR-0015): the batch as it ended is the event's body.
      return batchEventOf(r, this.batchOf(this.b.batchBySeq.get(r.batchSeq)));
    }
    return jobEventOf(r, r.state === 'done' ? (this.s.artifactsForEvent.all(inlineMax, r.jobSeq) as (ArtifactMeta & { body: Buffer | null })[]) : []);
  }

  async deliveryClaimNext(p: { afterId: number; now: number; inlineMax: number }): Promise<ClaimedDelivery | null> {
    const next = await this.read(() => {
      const r = this.s.nextOfJob.get({ id: p.afterId, now: p.now }) as DueRow | undefined;
      return r && !this.claimed.has(r.id) ? this.hold(r, p.inlineMax) : null;
    });
    if (next) await this.group.whenDurable();
    return next;
  }

  // \`now\` is not needed: this process holds its claims (in memory) until it records them.
  deliveriesNextDueAt(p: { now: number; perOriginLimit: number }): Promise<number | null> {
    const s = this.s;
    return this.read(() => {
      let best: number | null = null;
      // At most heldPerOrigin.size origins hold rows; the one after them holds none.
      const origins = s.originsByDue.all({ n: this.heldPerOrigin.size + 1 }) as { origin: string; dueAt: number }[];
      for (const o of origins) {
        if (best !== null && o.dueAt >= best) break;
        if ((this.inflightPerOrigin.get(o.origin) ?? 0) >= p.perOriginLimit) continue; // woken when one of its attempts ends
        const heldHere = this.heldPerOrigin.get(o.origin) ?? 0;
        if (heldHere === 0) {
          best = o.dueAt;
          break;
        }
        const rows = s.nextInOrigin.all({ origin: o.origin, n: heldHere + 1 }) as { id: number; dueAt: number }[];
        const first = rows.find((r) => !this.claimed.has(r.id));
        if (first && (best === null || first.dueAt < best)) best = first.dueAt;
      }
      return best;
    });
  }

  /** The attempt is over: its origin has a free slot (the row stays held until its outcome commits). */
  private endAttempt(id: number, inflight: Set<number>): void {
    const origin = this.claimed.get(id);
    if (origin === undefined || !inflight.has(id)) return;
    inflight.delete(id);
    bump(this.inflightPerOrigin, origin, -1);
  }

  private unclaim(id: number): void {
    this.endAttempt(id, this.attempting);
    const origin = this.claimed.get(id);
    if (origin === undefined) return;
    this.claimed.delete(id);
    bump(this.heldPerOrigin, origin, -1);
  }

  async deliveryRecord(p: { id: number; now: number; outcome: DeliveryOutcome }): Promise<void> {
    const s = this.s;
    const o = p.outcome;
    this.endAttempt(p.id, this.attempting);
    await this.write((fx) => {
      type Done = { jobSeq: number; origin: string } | undefined;
      let row: Done;
      switch (o.kind) {
        case 'delivered':
          row = s.deliveryDelivered.get({ id: p.id, now: p.now, code: o.status }) as Done;
          break;
        case 'retry':
          row = s.deliveryRetry.get({ id: p.id, next: o.at, code: o.status, error: o.error }) as Done;
          break;
        case 'failed':
        case 'gone':
          row = s.deliveryFailed.get({ id: p.id, code: o.status, error: o.error }) as Done;
          if (row && o.kind === 'gone') {
            s.goneJob.run(row.jobSeq);
            s.goneRest.run(row.jobSeq);
          }
          break;
      }
      if (!row) return;
      if (o.kind !== 'retry') {
        // The job's next event, if any, is now the head of its line.
        s.lineRefresh.run({ seq: row.jobSeq });
        fx.deliveryReady = true;
      }
      s.originRefresh.run({ origin: row.origin });
    });
    // Only once the outcome is durable may the row be claimed again.
    this.unclaim(p.id);
  }

  async deliveryRelease(p: { id: number }): Promise<void> {
    this.unclaim(p.id);
  }

  deliveriesRedeliver(p: { jobId: string; now: number; state: JobState | null; actor?: string }): Promise<JobState[]> {
    const s = this.s;
    return this.write((fx) => {
      const job = s.seqStateById.get(p.jobId) as { seq: number } | undefined;
      if (!job) return [];
      const rows = s.redeliver.all({ seq: job.seq, now: p.now, state: p.state }) as { state: JobState; origin: string }[];
      if (rows.length === 0) return [];
      s.ungone.run(job.seq);
      s.lineRefresh.run({ seq: job.seq });
      for (const origin of new Set(rows.map((r) => r.origin))) s.originRefresh.run({ origin });
      fx.deliveryReady = true;
      if (p.actor !== undefined) this.audit(p.now, p.actor, 'job.redelivered', p.jobId, { states: rows.map((r) => r.state) });
      return rows.map((r) => r.state);
    });
  }

  // --- API keys, usage and audit (ADR-0013) ---

  /** Appends an audit record; called inside the transaction of what it records. */
  private audit(at: number, actor: string, action: AuditAction, target: string, detail: Record<string, unknown> | null): void {
    this.s.auditInsert.run(at, actor, action, target, detail === null ? null : JSON.stringify(detail));
  }

  keyInsert(p: { key: ApiKeyRecord; hash: string; actor: string }): Promise<void> {
    const k = p.key;
    return this.write(() => {
      this.s.keyInsert.run({ ...k, hash: p.hash });
      this.audit(k.createdAt, p.actor, 'key.created', k.id, { name: k.name, ...limitsOf(k) });
    });
  }

  keyByHash(p: { hash: string }): Promise<ApiKeyRecord | null> {
    return this.read(() => (this.s.keyByHash.get(p.hash) as ApiKeyRecord | undefined) ?? null);
  }

  keyGet(p: { id: string }): Promise<ApiKeyRecord | null> {
    return this.read(() => (this.s.keyById.get(p.id) as ApiKeyRecord | undefined) ?? null);
  }

  keysList(): Promise<ApiKeyRecord[]> {
    return this.read(() => this.s.keysAll.all() as ApiKeyRecord[]);
  }

  keyUpdate(p: { id: string; changes: Partial<ApiKeyLimits> & { name?: string }; now: number; actor: string }): Promise<ApiKeyRecord | null> {
    const c = p.changes;
    const has = (k: keyof ApiKeyLimits) => (k in c ? 1 : 0);
    return this.write(() => {
      const r = this.s.keyUpdate.get({
        id: p.id,
        now: p.now,
        name: c.name ?? null,
        set_concurrency: has('concurrency'),
        concurrency: c.concurrency ?? null,
        set_max_queued: has('maxQueued'),
        max_queued: c.maxQueued ?? null,
        set_daily_limit: has('dailyLimit'),
        daily_limit: c.dailyLimit ?? null,
        set_priority_max: has('priorityMax'),
        priority_max: c.priorityMax ?? null,
      }) as ApiKeyRecord | undefined;
      if (!r) return null;
      this.audit(p.now, p.actor, 'key.updated', p.id, { ...c });
      // A raised concurrency may make queued jobs claimable.
      return r;
    }).then((r) => {
      if (r) this.notifier.emit('jobReady');
      return r;
    });
  }

  keyRevoke(p: { id: string; now: number; actor: string }): Promise<ApiKeyRecord | null> {
    return this.write(() => {
      const before = this.s.keyById.get(p.id) as ApiKeyRecord | undefined;
      if (!before) return null;
      if (before.revokedAt !== null) return before; // revoking again changes nothing
      const r = this.s.keyRevoke.get({ id: p.id, now: p.now }) as ApiKeyRecord;
      this.audit(p.now, p.actor, 'key.revoked', p.id, null);
      return r;
    });
  }

  keyUsage(p: { keyId: string; day: number }): Promise<KeyUsage> {
    return this.read(() => this.s.keyUsage.get({ key: p.keyId, day: p.day }) as KeyUsage);
  }

  auditList(p: { limit: number; beforeId?: number }): Promise<AuditEntry[]> {
    return this.read(() =>
      (this.s.auditPage.all({ before: p.beforeId ?? Number.MAX_SAFE_INTEGER, limit: p.limit }) as (Omit<AuditEntry, 'detail'> & { detail: string | null })[]).map(
        (r) => ({ ...r, detail: r.detail === null ? null : (JSON.parse(r.detail) as Record<string, unknown>) }),
      ),
    );
  }

  secretEnsure(p: { name: string; value: string }): Promise<string> {
    return this.write(() => {
      this.s.secretInsert.run(p.name, p.value);
      return this.s.secretGet.get(p.name) as string;
    });
  }

  // --- files and batches (ADR-0015) ---

  fileInsert(p: { file: NewFile; lines: FileLine[] }): Promise<number> {
    const b = this.b;
    return this.write(() => {
      const seq = b.fileInsert.get({ ...p.file }) as number;
      for (const l of p.lines) b.fileLineInsert.run(seq, l.n, l.customId, l.body);
      return seq;
    });
  }

  fileLinesAppend(p: { fileSeq: number; lines: FileLine[] }): Promise<void> {
    const b = this.b;
    return this.write(() => {
      if (b.fileUploading.get(p.fileSeq) !== 1) throw new Validation('the upload was removed', 'file');
      for (const l of p.lines) b.fileLineInsert.run(p.fileSeq, l.n, l.customId, l.body);
    });
  }

  fileFinish(p: { fileSeq: number; bytes: number; lines: number }): Promise<boolean> {
    return this.write(() => this.b.fileFinish.run({ seq: p.fileSeq, bytes: p.bytes, lines: p.lines }).changes > 0);
  }

  fileLinesDelete(p: { fileSeq: number; limit: number }): Promise<number> {
    return this.write(() => {
      this.refuseIfFeeding(p.fileSeq);
      return this.b.fileLinesDelete.run({ seq: p.fileSeq, limit: p.limit }).changes;
    });
  }

  fileDelete(p: { fileSeq: number }): Promise<boolean> {
    return this.write(() => {
      this.refuseIfFeeding(p.fileSeq);
      return this.b.fileDelete.run(p.fileSeq).changes > 0;
    });
  }

  /** An input file a batch is still submitting lines from is not deleted under it. */
  private refuseIfFeeding(fileSeq: number): void {
    if (this.b.fileFeeding.get(fileSeq) === 1) {
      throw new Conflict('file_in_use', 'a batch is still submitting the requests of this file; delete it once every request is submitted, or cancel the batch');
    }
  }

  fileGet(p: { id: string }): Promise<FileRecord | null> {
    return this.read(() => (this.b.fileById.get(p.id) as FileRecord | undefined) ?? null);
  }

  filesList(p: { limit: number; beforeSeq?: number; keyId?: string; purpose?: string }): Promise<FileRecord[]> {
    return this.read(
      () =>
        this.b.filesPage.all({ before: p.beforeSeq ?? Number.MAX_SAFE_INTEGER, key: p.keyId ?? null, purpose: p.purpose ?? null, limit: p.limit }) as FileRecord[],
    );
  }

  fileLinesPage(p: { fileSeq: number; afterN: number; limit: number }): Promise<FileLine[]> {
    return this.read(() => this.b.fileLinesPage.all({ seq: p.fileSeq, after: p.afterN, limit: p.limit }) as FileLine[]);
  }

  fileBytesSet(p: { fileSeq: number; bytes: number }): Promise<void> {
    return this.write(() => void this.b.fileBytesSet.run({ seq: p.fileSeq, bytes: p.bytes }));
  }

  filesExpired(p: { now: number; uploadingBefore: number; limit: number }): Promise<FileRecord[]> {
    return this.read(() => [
      ...(this.b.filesExpired.all({ now: p.now, limit: p.limit }) as FileRecord[]),
      ...(this.b.filesAbandoned.all({ before: p.uploadingBefore, limit: p.limit }) as FileRecord[]),
    ]);
  }

  /** A batch from its row as better-sqlite3 returns it (`unknown`). */
  private batchOf(r: unknown): BatchRecord | null {
    return batchOf(r as BatchRow | undefined);
  }

  batchInsert(p: { batch: NewBatch; now: number }): Promise<BatchRecord | null> {
    const b = this.b;
    const n = p.batch;
    return this.write((fx) => {
      const input = b.fileBySeq.get(n.inputFileSeq) as FileRecord | undefined;
      if (!input || input.status !== 'processed') return null;
      // A file being removed (some of its lines deleted already) is as good as gone.
      if (b.fileWhole.get({ seq: input.seq, lines: input.lines }) !== 1) return null;
      fx.batchReady = true;
      const seq = b.batchInsert.get({
        id: n.id,
        keyId: n.keyId,
        inputFileId: n.inputFileId,
        inputFileSeq: n.inputFileSeq,
        endpoint: n.endpoint,
        completionWindow: n.completionWindow,
        metadata: n.metadata === null ? null : JSON.stringify(n.metadata),
        webhookUrl: n.webhookUrl,
        priority: n.priority,
        total: n.total,
        outputFileId: n.outputFileId,
        errorFileId: n.errorFileId,
        now: p.now,
        expiresAt: n.expiresAt,
      }) as number;
      for (const [role, id] of [['output', n.outputFileId], ['error', n.errorFileId]] as const) {
        b.outputFileInsert.run({ id, keyId: n.keyId, filename: `${n.id}_${role}.jsonl`, batchSeq: seq, role, now: p.now, expiresAt: n.fileExpiresAt });
      }
      return this.batchOf(b.batchBySeq.get(seq));
    });
  }

  batchGet(p: { id: string } | { seq: number }): Promise<BatchRecord | null> {
    return this.read(() => this.batchOf('id' in p ? this.b.batchById.get(p.id) : this.b.batchBySeq.get(p.seq)));
  }

  batchesList(p: { limit: number; beforeSeq?: number; keyId?: string }): Promise<BatchRecord[]> {
    return this.read(() =>
      this.b.batchesPage.all({ before: p.beforeSeq ?? Number.MAX_SAFE_INTEGER, key: p.keyId ?? null, limit: p.limit }).map((r) => this.batchOf(r)!),
    );
  }

  batchJobsInsert(p: { batchSeq: number; jobs: (NewJob & { line: number })[]; now: number; maxQueued: number; maxQueuedBytes?: number }): Promise<{
    inserted: number;
    stopped: InsertOutcome | null;
  }> {
    const b = this.b;
    return this.write((fx) => {
      // A cancel or an expiry that committed first wins: nothing more is submitted.
      if (b.batchAcceptsJobs.get(p.batchSeq) !== 1) return { inserted: 0, stopped: null };
      const jobs = p.jobs.map((j) => ({ ...j, batchSeq: p.batchSeq }));
      const out = this.insertJobs(fx, { jobs, now: p.now, maxQueued: p.maxQueued, ...(p.maxQueuedBytes !== undefined ? { maxQueuedBytes: p.maxQueuedBytes } : {}) }, true);
      const ok = out.filter((o) => o.ok).length;
      const stopped = out.find((o) => !o.ok) ?? null;
      if (ok > 0) b.batchAdvance.run({ seq: p.batchSeq, n: ok, lastLine: p.jobs[ok - 1]!.line, now: p.now });
      return { inserted: ok, stopped };
    });
  }

  batchesActive(p: { limit: number; afterSeq?: number }): Promise<BatchRecord[]> {
    return this.read(() => this.b.batchesActive.all({ limit: p.limit, after: p.afterSeq ?? 0 }).map((r) => this.batchOf(r)!));
  }

  batchesNextExpiry(): Promise<{ seq: number; expiresAt: number } | null> {
    return this.read(() => (this.b.batchesNextExpiry.get() as { seq: number; expiresAt: number } | undefined) ?? null);
  }

  batchCancel(p: { id: string; now: number; keyId?: string }): Promise<{ batch: BatchRecord; changed: boolean } | null> {
    const b = this.b;
    return this.write((fx) => {
      const before = this.batchOf(b.batchById.get(p.id));
      if (!before || (p.keyId !== undefined && (before.keyId ?? '') !== p.keyId)) return null;
      const changed = b.batchCancel.get({ seq: before.seq, now: p.now }) !== undefined;
      if (changed) {
        fx.batchReady = true;
        this.batchSettle(fx, before.seq, p.now);
      }
      return { batch: this.batchOf(b.batchBySeq.get(before.seq))!, changed };
    });
  }

  batchExpire(p: { seq: number; now: number }): Promise<boolean> {
    return this.write((fx) => {
      const changed = this.b.batchExpire.get({ seq: p.seq, now: p.now }) !== undefined;
      if (changed) this.batchSettle(fx, p.seq, p.now);
      return changed;
    });
  }

  batchFail(p: { seq: number; now: number; error: ErrorInfo }): Promise<boolean> {
    return this.write((fx) => {
      const changed = this.b.batchFail.get({ seq: p.seq, now: p.now, errors: JSON.stringify([{ ...p.error, line: null, param: null }]) }) !== undefined;
      if (changed) this.batchSettle(fx, p.seq, p.now);
      return changed;
    });
  }

  batchJobsEnd(p: { batchSeq: number; now: number; limit: number }): Promise<number> {
    const b = this.b;
    return this.write((fx) => {
      const batch = this.batchOf(b.batchBySeq.get(p.batchSeq));
      if (!batch || batch.ending === null) return 0;
      const seqs = b.batchWaitingJobs.all({ seq: p.batchSeq, limit: p.limit }) as number[];
      for (const seq of seqs) {
        if (batch.ending === 'cancel') this.move(fx, b.jobCancelWaiting, { seq, now: p.now }, 'canceled', p.now);
        else {
          const message =
            batch.ending === 'expire' ? 'this request could not be executed before the completion window expired' : 'the batch failed before this request ran';
          this.move(fx, b.jobFailWaiting, { seq, now: p.now, code: batch.ending === 'expire' ? 'batch_expired' : 'batch_failed', message }, 'failed', p.now);
        }
      }
      // Nothing waiting (or running) any more: settles now if that was the last.
      this.batchSettle(fx, p.batchSeq, p.now);
      return seqs.length;
    });
  }

  batchResultsPage(p: { batchSeq: number; role: 'output' | 'error'; afterSeq: number; limit: number }): Promise<BatchResultRow[]> {
    return this.read(() =>
      (
        this.b.batchResults.all({ seq: p.batchSeq, after: p.afterSeq, role: p.role, limit: p.limit }) as (BatchResultDbRow & { result: string | null })[]
      ).map((r) => batchResultOf(r, this.resultOf(r.seq, r.result))),
    );
  }

  batchesDeleteExpired(p: { endedBefore: number; limit: number; now: number }): Promise<number> {
    const b = this.b;
    const s = this.s;
    return this.write(() => {
      let deleted = 0;
      for (const seq of b.batchesEnded.all({ before: p.endedBefore, limit: 8 }) as number[]) {
        const jobs = b.batchJobsOf.all({ seq, limit: p.limit - deleted }) as { seq: number; id: string; conversationId: string }[];
        for (const j of jobs) {
          s.deleteJob.run(j.seq);
          s.expiredInsert.run(j.id, p.now);
          s.conversationDropIfEmpty.run({ id: j.conversationId });
        }
        deleted += jobs.length;
        if (deleted >= p.limit) break;
        b.batchDelete.run(seq);
        deleted++;
      }
      return deleted;
    });
  }

  /**
   * Ends a batch whose every line is accounted for and every job ended, and queues its webhook
   * event (ADR-0015). Runs in the transaction that ended the last job, or that began the ending.
   */
  private batchSettle(fx: Effects, batchSeq: number, now: number): void {
    const b = this.b;
    let status = b.batchSettle.get({ seq: batchSeq, now }) as string | undefined;
    if (status === undefined) return;
    if (status === 'finalizing') {
      b.batchComplete.run({ seq: batchSeq, now });
      status = 'completed';
    }
    const hook = b.batchWebhook.get(batchSeq) as { url: string | null } | undefined;
    if (!hook?.url) return;
    const origin = this.originOfUrl(hook.url);
    const r = b.insertBatchDelivery.get({ seq: batchSeq, state: `batch.${status}`, url: hook.url, origin, now }) as { dueAt: number | null } | undefined;
    if (r?.dueAt == null) return;
    this.s.originEarlier.run({ origin, at: r.dueAt });
    fx.deliveryReady = true;
  }
}

