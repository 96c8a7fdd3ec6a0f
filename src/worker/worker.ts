import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import type { Clock } from '../domain.js';
import { EngineError, type ChatChunk, type ChatEngine } from '../engine/engine.js';
import type { Store, ClaimedJob } from '../store/store.js';
import { isStorageError } from '../store/db.js';
import type { Wake } from '../wake.js';

export interface WorkerOptions {
  concurrency: number;
  leaseMs: number;
  pollIntervalMs: number;
  retryBaseMs: number;
  /** While the engine is unreachable, a queued job fails after waiting this long (ADR-0007). */
  outageTimeoutMs: number;
}

export interface WorkerDeps {
  store: Store;
  engine: ChatEngine;
  clock: Clock;
  logger: Logger;
  /** Notified by the store when a job becomes claimable. */
  wake: Wake;
  options: WorkerOptions;
  random?: () => number;
  /** Runs a store write in the current group commit; resolves after it is durable. */
  commit: <T>(op: () => T) => Promise<T>;
  /** Sees every chunk a running job's generation streams (SSE `delta` events, /api/chat streaming). */
  onChunk?: (jobId: string, chunk: ChatChunk) => void;
}

interface Running {
  job: ClaimedJob;
  abort: AbortController;
  done: Promise<void>;
}

/** The abort reason used when a job is canceled (as opposed to a shutdown). */
const CANCELED = new Error('job canceled');

/**
 * Runs a store write, retrying storage errors (locked, read-only, full disk) with backoff for
 * up to ~15 s, so a finished generation is not thrown away by a passing storage fault. No
 * transaction is held across the waits.
 */
async function retryStorage<T>(fn: () => Promise<T>, signal: AbortSignal, onRetry: (err: unknown, waitMs: number) => void): Promise<T> {
  for (let i = 0; ; i++) {
    try {
      return await fn();
    } catch (err) {
      if (!isStorageError(err) || i >= 8 || signal.aborted) throw err;
      const wait = Math.min(4000, 50 * 2 ** i);
      onRetry(err, wait);
      await new Promise((r) => setTimeout(r, wait));
    }
  }
}

/** Exponential backoff with a little downward jitter: base·2^(attempt-1)·[0.8, 1.0]. */
export function jobRetryDelay(baseMs: number, attempt: number, random: () => number): number {
  return Math.round(baseMs * 2 ** Math.max(0, attempt - 1) * (0.8 + 0.2 * random()));
}

/**
 * The worker loop: claims queued jobs (one SQL statement, with a lease), runs each through
 * the engine (load, then stream), and records the outcome through the store's transitions.
 */
export class Worker {
  readonly owner = `worker-${randomUUID()}`;
  private readonly running = new Map<number, Running>();
  private stopping = false;
  private loop: Promise<void> | null = null;
  private lastLeaseSweep = 0;
  /** Set when the engine could not be reached; claiming pauses until a probe succeeds. */
  private engineDownSince: number | null = null;
  private lastProbe = 0;
  private readonly random: () => number;

  constructor(private readonly deps: WorkerDeps) {
    this.random = deps.random ?? Math.random;
  }

  /** When the current engine outage began, or null if the engine is believed up. */
  get engineDown(): number | null {
    return this.engineDownSince;
  }

  get activeJobs(): number {
    return this.running.size;
  }

  start(): void {
    this.loop ??= this.run();
  }

  private async run(): Promise<void> {
    const { store, clock, logger, wake, options } = this.deps;
    while (!this.stopping) {
      let delay = options.pollIntervalMs;
      try {
        const now = clock.now();
        if (now - this.lastLeaseSweep >= options.leaseMs / 2) {
          this.lastLeaseSweep = now;
          for (const id of store.requeueOrphans(now, true)) {
            logger.warn({ job_id: id }, 'job lease expired; job re-queued');
          }
        }
        if (this.engineDownSince !== null) {
          delay = await this.whileEngineDown(now);
          if (this.engineDownSince !== null) {
            await wake.wait(delay);
            continue;
          }
        }
        store.ageQueue(now);
        const deadline = store.nextDeadlineAt();
        if (deadline !== null && deadline <= now) {
          for (const id of await this.deps.commit(() => store.failPastDeadline(now))) {
            logger.info({ job_id: id, state: 'failed', code: 'deadline_exceeded' }, 'job still queued at its deadline');
          }
        }
        const free = options.concurrency - this.running.size;
        if (free > 0) {
          // Through the group commit: a claim shares its commit with whatever else is written now.
          const claimed = await this.deps.commit(() => store.claimJobs(this.owner, free, now, options.leaseMs));
          for (const job of claimed) this.launch(job);
          if (claimed.length === free) continue; // full: loop again only when woken by a finishing job
          const next = store.nextRunAt();
          if (next !== null) delay = Math.min(delay, Math.max(0, next - clock.now()));
        }
        // Deadlines are enforced even while every slot is busy.
        const nextDeadline = store.nextDeadlineAt();
        if (nextDeadline !== null) delay = Math.min(delay, Math.max(0, nextDeadline - clock.now()));
      } catch (err) {
        logger.error({ err }, 'worker loop: store error; will retry');
      }
      await wake.wait(delay);
    }
  }

  /**
   * Engine outage: jobs stay queued (no attempts are burned) and the engine is probed; once the
   * outage has lasted `outageTimeoutMs`, queued jobs that have waited that long fail. Returns the
   * time to wait before the next probe.
   */
  private async whileEngineDown(now: number): Promise<number> {
    const { engine, store, logger, options, clock } = this.deps;
    const probeEvery = Math.min(1000, options.pollIntervalMs);
    if (now - this.lastProbe < probeEvery) return probeEvery - (now - this.lastProbe);
    this.lastProbe = now;
    const status = await engine.status();
    logger.debug({ status }, 'engine probe');
    if (status.up) {
      logger.info({ down_ms: clock.now() - (this.engineDownSince ?? now) }, 'engine is reachable again; resuming');
      this.engineDownSince = null;
      return 0;
    }
    const since = this.engineDownSince ?? now;
    if (now - since >= options.outageTimeoutMs) {
      const ids = store.failStaleQueued(now - options.outageTimeoutMs, clock.now(), {
        code: 'engine_unavailable',
        message: `the engine has been unreachable for longer than FOREMAN_ENGINE_OUTAGE_TIMEOUT (${options.outageTimeoutMs}ms): ${status.error ?? 'down'}`,
      });
      for (const id of ids) logger.warn({ job_id: id, state: 'failed', code: 'engine_unavailable' }, 'job failed: engine outage outlasted its wait');
    }
    return probeEvery;
  }

  /**
   * Stops a running job's work (its engine request is closed, which stops Ollama). The store has
   * already made it `canceled`; this only ends the work. Returns false if it was not running here.
   */
  abortJob(jobId: string): boolean {
    for (const r of this.running.values()) {
      if (r.job.id === jobId) {
        r.abort.abort(CANCELED);
        return true;
      }
    }
    return false;
  }

  private launch(job: ClaimedJob): void {
    const abort = new AbortController();
    const entry: Running = { job, abort, done: Promise.resolve() };
    this.running.set(job.seq, entry);
    entry.done = this.runJob(job, abort.signal).finally(() => {
      this.running.delete(job.seq);
      this.deps.wake.notify();
    });
  }

  private async runJob(job: ClaimedJob, signal: AbortSignal): Promise<void> {
    const { store, engine, clock, options } = this.deps;
    const log = this.deps.logger.child({ job_id: job.id, attempt: job.attempt });
    log.info({ state: 'loading', model: job.model }, 'job loading');
    const heartbeat = setInterval(() => {
      try {
        store.heartbeat(job.seq, this.owner, clock.now() + options.leaseMs);
      } catch (err) {
        log.error({ err }, 'lease heartbeat failed');
      }
    }, Math.max(50, Math.floor(options.leaseMs / 3)));
    try {
      const t0 = performance.now();
      await engine.load(job.model, { keepAlive: job.request.keep_alive, signal });
      const loadMs = Math.round((performance.now() - t0) * 1000) / 1000;
      const { commit } = this.deps;
      if (!(await commit(() => store.markWorking(job.seq, this.owner, clock.now(), options.leaseMs)))) {
        log.warn('lost the job lease before working; leaving it to its new owner');
        return;
      }
      log.info({ state: 'working', load_ms: loadMs }, 'job working');
      const tRun = performance.now();
      const onChunk = this.deps.onChunk;
      const response = await engine.chat(job.request, { signal, ...(onChunk ? { onChunk: (c: ChatChunk) => onChunk(job.id, c) } : {}) });
      const result = { ...response, foreman: { load_ms: loadMs } };
      const body = Buffer.from(JSON.stringify(result), 'utf8');
      const moved = await retryStorage(
        () =>
          commit(() =>
            store.completeJob(
            job.seq,
            this.owner,
            clock.now(),
            result,
              [{ name: 'completion', contentType: 'application/json', body }],
              loadMs + (performance.now() - tRun),
            ),
          ),
        signal,
        (err, wait) => log.error({ err, retry_in_ms: wait }, 'could not save the result; retrying'),
      );
      if (moved) log.info({ state: 'done', bytes: body.length }, 'job done');
      else log.warn('lost the job lease before done; result discarded');
    } catch (err) {
      await this.handleFailure(job, err, signal, log);
    } finally {
      clearInterval(heartbeat);
    }
  }

  private async handleFailure(job: ClaimedJob, err: unknown, signal: AbortSignal, log: Logger): Promise<void> {
    const { store, clock, options, commit } = this.deps;
    try {
      if (signal.aborted && signal.reason === CANCELED) {
        log.info({ state: 'canceled' }, 'job canceled; engine request closed');
        return;
      }
      if (signal.aborted) {
        await commit(() => store.releaseJob(job.seq, this.owner, clock.now()));
        log.info({ state: 'queued' }, 'job interrupted by shutdown; re-queued');
        return;
      }
      if (isStorageError(err)) {
        // Not the engine's fault: give the attempt back; the job runs again when storage recovers.
        await commit(() => store.releaseJob(job.seq, this.owner, clock.now()));
        log.error({ err, state: 'queued' }, 'storage error while running job; re-queued');
        return;
      }
      if (err instanceof EngineError && err.unreachable) {
        // The engine is down: the job keeps its place and its attempt; claiming pauses until the
        // engine answers (or FOREMAN_ENGINE_OUTAGE_TIMEOUT fails the waiting jobs).
        await commit(() => store.releaseJob(job.seq, this.owner, clock.now()));
        if (this.engineDownSince === null) {
          this.engineDownSince = clock.now();
          this.lastProbe = clock.now();
          log.warn({ err, state: 'queued' }, 'engine unreachable; job re-queued and claims paused until it answers');
        }
        return;
      }
      const e =
        err instanceof EngineError
          ? err
          : new EngineError('transient', 'internal_error', `unexpected error: ${(err as Error)?.message ?? String(err)}`);
      if (!(err instanceof EngineError)) log.error({ err }, 'unexpected error while running job');
      if (e.kind === 'transient' && job.attempt < job.maxAttempts) {
        const delay = jobRetryDelay(options.retryBaseMs, job.attempt, this.random);
        await commit(() => store.retryJob(job.seq, this.owner, clock.now(), clock.now() + delay));
        log.warn({ state: 'queued', code: e.code, err: e, retry_in_ms: delay }, 'transient engine failure; job will retry');
        return;
      }
      const message =
        e.kind === 'transient' ? `${e.message} (gave up after ${job.attempt} attempts)` : e.message;
      await commit(() => store.failJob(job.seq, this.owner, clock.now(), { code: e.code, message }));
      log.warn({ state: 'failed', code: e.code, err: e }, 'job failed');
    } catch (storeErr) {
      // The lease will expire and the job will be re-queued; nothing is lost.
      log.error({ err: storeErr }, 'could not record the job outcome; the lease will expire and the job will run again');
    }
  }

  /**
   * Two-stage stop: stop claiming, give running jobs `graceMs` to finish, then abort the rest
   * (their engine requests are closed, which stops Ollama's work) and put them back on the queue.
   */
  async stop(graceMs: number): Promise<void> {
    this.stopping = true;
    this.deps.wake.notify();
    await this.loop;
    const all = Promise.allSettled([...this.running.values()].map((r) => r.done));
    let timer: NodeJS.Timeout | undefined;
    const graceOver = new Promise<void>((r) => (timer = setTimeout(r, graceMs)));
    await Promise.race([all, graceOver]);
    clearTimeout(timer);
    for (const r of this.running.values()) r.abort.abort(new Error('shutting down'));
    await all;
  }
}
