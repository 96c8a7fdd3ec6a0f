import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import type { Clock } from '../domain.js';
import { EngineError, type ChatChunk } from '../engine/engine.js';
import type { EngineHealth } from '../engine/health.js';
import type { EngineHost, EnginePool } from '../engine/pool.js';
import { isStorageUnavailable } from '../errors.js';
import { backoffDelay, Loop } from '../loop.js';
import type { ClaimedJob, QueueDriver } from '../queue/driver.js';
import { retryStorage } from '../retry-storage.js';

export interface WorkerOptions {
  leaseMs: number;
  pollIntervalMs: number;
  retryBaseMs: number;
  retryMaxMs: number;
}

export interface WorkerDeps {
  driver: QueueDriver;
  /** The engine hosts: each has its slots; the claim for a host picks its jobs (ADR-0012). */
  pool: EnginePool;
  health: EngineHealth;
  clock: Clock;
  logger: Logger;
  options: WorkerOptions;
  random?: () => number;
  /** Sees every chunk a running job's generation streams (SSE `delta` events, /api/chat streaming). */
  onChunk?: (jobId: string, chunk: ChatChunk) => void;
  /** Seconds from the start of a generation to its first streamed chunk (metrics). */
  onFirstToken?: (model: string, seconds: number) => void;
  /** This instance's name, the prefix of every lease it takes. */
  instanceId?: string;
}

interface Running {
  job: ClaimedJob;
  host: EngineHost;
  abort: AbortController;
  done: Promise<void>;
  /** Renews the lease at once (a run whose job is no longer its own stops). */
  renew?: () => void;
}

/** The abort reason used when a job is canceled (as opposed to a shutdown). */
const CANCELED = new Error('job canceled');
/** The lease could not be renewed: the rescuer gave the job to another run (a stall longer than the lease). */
const LEASE_LOST = new Error('job lease lost');

/**
 * The worker: claims queued jobs (with a lease per attempt), runs each through the engine (load,
 * then stream), and records the outcome through the driver's transitions. It has no policy
 * beyond running jobs: rescue, deadlines, aging and the outage policy are maintenance services.
 */
export class Worker {
  readonly owner: string;
  private readonly running = new Map<number, Running>();
  private readonly loop: Loop;
  private readonly random: () => number;
  private readonly unsubscribe: (() => void)[] = [];

  constructor(private readonly deps: WorkerDeps) {
    this.random = deps.random ?? Math.random;
    this.owner = `${deps.instanceId ?? 'worker'}-${randomUUID().slice(0, 8)}`;
    this.loop = new Loop('worker', () => this.tick(), deps.logger, deps.options.pollIntervalMs);
    const n = deps.driver.notifier;
    this.unsubscribe.push(n.on('jobReady', this.loop.wake.notify));
    this.unsubscribe.push(n.on('cancelRequested', (id) => this.abortJob(id)));
    // Announcements may have been missed (a cancel among them): every run renews its lease now,
    // and one whose job was canceled or taken meanwhile stops.
    this.unsubscribe.push(n.on('resync', () => this.running.forEach((r) => r.renew?.())));
    deps.health.onUp(this.loop.wake.notify);
  }

  start(): void {
    this.loop.start();
  }

  private async tick(): Promise<number> {
    const { driver, clock, options, health, pool } = this.deps;
    if (health.downSince !== null) return options.pollIntervalMs; // woken when an engine host is back
    const hosts = pool.withFreeSlots();
    if (hosts.length === 0) return options.pollIntervalMs; // woken when a job finishes or a host comes back
    const now = clock.now();
    let filled = true;
    // Each host with free slots claims for itself: only models it has, by the policy of ADR-0012.
    for (const host of hosts) {
      const free = host.free;
      if (free <= 0) continue;
      const claimed = await driver.jobsClaim({ owner: this.owner, limit: free, now, leaseMs: options.leaseMs, engine: pool.claimContext(host) });
      for (const job of claimed) this.launch(job, host);
      if (claimed.length < free) filled = false;
    }
    if (filled) return 0;
    // Delayed retries become claimable at their run_at: sleep until the first of them (after the
    // claim's own `now`, so one that came due since is claimed at once, not a poll later).
    const next = await driver.jobsNextRunAt({ now });
    return next === null ? options.pollIntervalMs : Math.min(options.pollIntervalMs, Math.max(0, next - clock.now()));
  }

  /** Stops a running job's work (its engine request is closed). Returns false if it was not running here. */
  abortJob(jobId: string): boolean {
    for (const r of this.running.values()) {
      if (r.job.id === jobId) {
        r.abort.abort(CANCELED);
        return true;
      }
    }
    return false;
  }

  private launch(job: ClaimedJob, host: EngineHost): void {
    const abort = new AbortController();
    const entry: Running = { job, host, abort, done: Promise.resolve() };
    this.running.set(job.seq, entry);
    host.inUse++;
    let slotHeld = true;
    // The host's slot is free once the engine's answer is in: the next job's claim and load
    // overlap this one's save (ADR-0012). At most once per job.
    const freeSlot = () => {
      if (!slotHeld) return;
      slotHeld = false;
      host.inUse--;
      this.loop.wake.notify();
    };
    entry.done = this.runJob(entry, freeSlot).finally(() => {
      freeSlot(); // wakes the loop, unless the slot was freed (and the loop woken) already
      host.jobsRun++;
      // Only our own entry: a later attempt of the same job may have replaced it.
      if (this.running.get(job.seq) === entry) this.running.delete(job.seq);
    });
  }

  private async runJob(entry: Running, freeSlot: () => void): Promise<void> {
    const { job, host, abort } = entry;
    const signal = abort.signal;
    const { driver, clock, options, pool } = this.deps;
    const engine = host.engine;
    const { seq, lease } = job;
    const log = this.deps.logger.child({ job_id: job.id, attempt: job.attempt, engine: host.name });
    log.debug({ state: 'loading', model: job.model }, 'job loading');
    // The fence: a run whose lease could not be renewed (storage unreachable) stops shortly before
    // the lease it last had runs out, since from then on the rescuer may give the job to another
    // run (on another instance). A renewal that succeeds moves the fence.
    const fenceMargin = Math.min(1_000, Math.floor(options.leaseMs / 10));
    let fence: NodeJS.Timeout | null = null;
    const armFence = (leaseUntil: number) => {
      if (fence) clearTimeout(fence);
      fence = setTimeout(() => {
        if (signal.aborted) return;
        log.warn('could not renew the job lease before it ran out; its run stopped');
        abort.abort(LEASE_LOST);
      }, Math.max(0, leaseUntil - fenceMargin - clock.now()));
      fence.unref();
    };
    armFence(clock.now() + options.leaseMs);
    const renew = () => {
      const until = clock.now() + options.leaseMs;
      driver.jobLeaseRenew({ seq, lease, until }).then(
        (held) => {
          if (signal.aborted) return;
          if (held) armFence(until);
          // The job is no longer this run's (canceled, or rescued after a stall past its lease): stop, touch nothing.
          else abort.abort(LEASE_LOST);
        },
        (err: unknown) => log.error({ err }, 'lease heartbeat failed'),
      );
    };
    entry.renew = renew;
    const heartbeat = setInterval(renew, Math.max(50, Math.floor(options.leaseMs / 3)));
    try {
      const t0 = performance.now();
      await engine.load(job.model, { keepAlive: job.request.keep_alive, signal, kind: job.kind });
      const loadMs = Math.round((performance.now() - t0) * 1000) / 1000;
      pool.loaded(host, job.model, loadMs, (job.request.options as { num_ctx?: unknown } | undefined)?.num_ctx);
      // The generation starts while `working` commits (a round trip less per job); its chunks
      // reach watchers only once it has, and a lost lease stops it.
      // (A storage error on `working` is thrown once the generation ends, and the job released.)
      const working = driver.jobSetWorking({ seq, lease, now: clock.now(), leaseMs: options.leaseMs }).then((ok) => {
        if (!ok && !signal.aborted) abort.abort(LEASE_LOST);
        return ok;
      });
      working.catch(() => {}); // awaited below, whatever happens
      const tRun = performance.now();
      const { onChunk: watch, onFirstToken } = this.deps;
      let first = true;
      let held: ChatChunk[] | null = watch ? [] : null;
      if (held) {
        void working.then(
          (ok) => {
            const chunks = held!;
            held = null;
            if (ok) for (const c of chunks) watch!(job.id, c);
          },
          () => {},
        );
      }
      const onChunk =
        watch || onFirstToken
          ? (jobId: string, c: ChatChunk) => {
              if (first) {
                first = false;
                onFirstToken?.(job.model, (performance.now() - tRun) / 1000);
              }
              if (held) held.push(c);
              else watch?.(jobId, c);
            }
          : undefined;
      let response: Record<string, unknown> & { prompt_eval_count?: number; eval_count?: number };
      try {
        if (job.kind === 'embed') {
          // An embedding job (ADR-0015): one /api/embed call; the vectors are the result.
          response = { ...(await engine.embed(job.request, { signal })) };
        } else {
          // A continuation sends the conversation so far, then its own messages (ADR-0016).
          const request =
            job.history.length === 0 ? job.request : { ...job.request, messages: [...job.history, ...((job.request.messages as unknown[] | undefined) ?? [])] };
          response = { ...(await engine.chat(request, { signal, ...(onChunk ? { onChunk: (c: ChatChunk) => onChunk(job.id, c) } : {}) })) };
        }
      } catch (err) {
        // `working` first: its storage error is the one to handle (the job goes back).
        await working;
        throw err;
      }
      if (!(await working)) {
        log.warn('lost the job lease before working; leaving it to its new owner');
        return;
      }
      log.debug({ state: 'working', load_ms: loadMs }, 'job working');
      freeSlot();
      const result = { ...response, foreman: { load_ms: loadMs } };
      const body = Buffer.from(JSON.stringify(result), 'utf8');
      const runMs = loadMs + (performance.now() - tRun);
      const moved = await retryStorage(
        () =>
          driver.jobComplete({
            seq,
            lease,
            now: clock.now(),
            result,
            artifacts: [{ name: 'completion', contentType: 'application/json', body }],
            runMs,
            loadMs,
            usage: { promptTokens: response.prompt_eval_count ?? null, completionTokens: response.eval_count ?? null },
          }),
        { signal, maxTries: 9, onRetry: (err, wait) => log.error({ err, retry_in_ms: wait }, 'could not save the result; retrying') },
      );
      if (moved) log.info({ state: 'done', model: job.model, load_ms: loadMs, run_ms: Math.round(runMs), bytes: body.length }, 'job done');
      else log.warn('lost the job lease before done; result discarded');
    } catch (err) {
      await this.handleFailure(job, host, err, signal, log);
    } finally {
      clearInterval(heartbeat);
      if (fence) clearTimeout(fence);
    }
  }

  private async handleFailure(job: ClaimedJob, host: EngineHost, err: unknown, signal: AbortSignal, log: Logger): Promise<void> {
    const { driver, clock, options, health, pool } = this.deps;
    const { seq, lease } = job;
    try {
      if (signal.aborted && signal.reason === CANCELED) {
        log.info({ state: 'canceled' }, 'job canceled; engine request closed');
        return;
      }
      if (signal.aborted && signal.reason === LEASE_LOST) {
        log.warn('lost the job lease (the job was canceled elsewhere, or rescued after a stall longer than FOREMAN_JOB_LEASE); its run stopped, the job is left as it is');
        return;
      }
      if (signal.aborted) {
        await driver.jobRelease({ seq, lease, now: clock.now() });
        log.info({ state: 'queued' }, 'job interrupted by shutdown; re-queued');
        return;
      }
      if (isStorageUnavailable(err)) {
        // Not the engine's fault: give the attempt back; the job runs again when storage recovers.
        await driver.jobRelease({ seq, lease, now: clock.now() });
        log.error({ err, state: 'queued' }, 'storage error while running job; re-queued');
        return;
      }
      if (err instanceof EngineError && (err.unreachable || (err.code === 'engine_unavailable' && pool.hosts.length > 1))) {
        // The host is down (or died mid-job): the job keeps its attempt and goes back to the queue,
        // for another host that has its model; this host takes no job until a probe succeeds.
        // With every host down, claiming pauses until the outage policy finds one answering.
        await driver.jobRelease({ seq, lease, now: clock.now() });
        pool.unreachable(host, err.message);
        if (health.downSince !== null) log.warn({ err, state: 'queued' }, 'engine unreachable; job re-queued and claims paused until a host answers');
        else log.warn({ err, state: 'queued' }, 'engine host unreachable; job re-queued for another host');
        return;
      }
      if (err instanceof EngineError && err.code === 'model_not_found' && !(await this.stillInstalled(host, job.model))) {
        // The host's list of models was stale: give the job back for a host that has it (or for
        // the model_not_found check, if none does).
        await driver.jobRelease({ seq, lease, now: clock.now() });
        log.warn({ state: 'queued', model: job.model }, 'model no longer on this engine host; job re-queued');
        return;
      }
      const e =
        err instanceof EngineError ? err : new EngineError('transient', 'internal_error', `unexpected error: ${(err as Error)?.message ?? String(err)}`);
      if (!(err instanceof EngineError)) log.error({ err }, 'unexpected error while running job');
      if (e.kind === 'transient' && job.attempt < job.maxAttempts) {
        const delay = backoffDelay(options.retryBaseMs, options.retryMaxMs, job.attempt, this.random);
        await driver.jobRetry({ seq, lease, now: clock.now(), runAt: clock.now() + delay });
        log.warn({ state: 'queued', code: e.code, err: e, retry_in_ms: delay }, 'transient engine failure; job will retry');
        return;
      }
      const message = e.kind === 'transient' ? `${e.message} (gave up after ${job.attempt} attempts)` : e.message;
      await driver.jobFail({ seq, lease, now: clock.now(), error: { code: e.code, message } });
      log.warn({ state: 'failed', code: e.code, err: e }, 'job failed');
    } catch (storeErr) {
      // The lease will expire and the rescuer will re-queue the job; nothing is lost.
      log.error({ err: storeErr }, 'could not record the job outcome; the lease will expire and the job will run again');
    }
  }

  /** Refreshes the host's installed models (after a model_not_found): does it still list `model`? */
  private async stillInstalled(host: EngineHost, model: string): Promise<boolean> {
    await this.deps.pool.probe(host);
    return host.mayRun(model);
  }

  /**
   * Two-stage stop: stop claiming, give running jobs `graceMs` to finish, then abort the rest
   * (their engine requests are closed, which stops Ollama's work) and put them back on the queue.
   */
  async stop(graceMs: number): Promise<void> {
    await this.loop.stop();
    for (const u of this.unsubscribe) u();
    const all = Promise.allSettled([...this.running.values()].map((r) => r.done));
    let timer: NodeJS.Timeout | undefined;
    const graceOver = new Promise<void>((r) => (timer = setTimeout(r, graceMs)));
    await Promise.race([all, graceOver]);
    clearTimeout(timer);
    for (const r of this.running.values()) r.abort.abort(new Error('shutting down'));
    await all;
  }
}
