import fs from 'node:fs';
import path from 'node:path';
import type { AddressInfo } from 'node:net';
import { pino, type Logger } from 'pino';
import type { Config } from './config.js';
import { systemClock, type Clock } from './domain.js';
import type { ChatEngine } from './engine/engine.js';
import { OllamaEngine } from './engine/ollama.js';
import { buildApp, type App } from './http/app.js';
import { SubmitBatcher } from './store/batcher.js';
import { GroupCommitter } from './store/committer.js';
import { migrate, openDatabase, type DB } from './store/db.js';
import { Store } from './store/store.js';
import { Dispatcher } from './webhooks/dispatcher.js';
import { Wake } from './wake.js';
import { JobEvents } from './events.js';
import { Worker } from './worker/worker.js';
import { VERSION } from './version.js';

export interface ServiceOptions {
  config: Config;
  logger?: Logger;
  clock?: Clock;
  engine?: ChatEngine;
  random?: () => number;
}

/**
 * One Foreman process: database, HTTP app, worker loop, webhook dispatcher and TTL sweep,
 * wired with explicit dependencies. `start()` recovers and listens; `stop()` shuts down in order.
 */
export class Service {
  readonly config: Config;
  readonly logger: Logger;
  readonly clock: Clock;
  readonly db: DB;
  readonly store: Store;
  readonly events: JobEvents;
  readonly engine: ChatEngine;
  readonly worker: Worker;
  readonly dispatcher: Dispatcher;
  readonly app: App;
  private publicUrl: string;
  private sweepTimer: NodeJS.Timeout | null = null;
  private stopped: Promise<void> | null = null;

  constructor(opts: ServiceOptions) {
    const config = (this.config = opts.config);
    this.logger = opts.logger ?? pino({ level: config.logLevel });
    this.clock = opts.clock ?? systemClock;
    this.publicUrl = config.publicUrl;
    fs.mkdirSync(config.dataDir, { recursive: true });
    this.db = openDatabase(path.join(config.dataDir, 'foreman.db'), {
      busyTimeoutMs: config.sqliteBusyTimeoutMs,
      synchronous: config.sqliteSynchronous,
    });
    migrate(this.db);
    const jobWake = new Wake();
    const deliveryWake = new Wake();
    this.events = new JobEvents();
    this.store = new Store(
      this.db,
      { jobReady: jobWake.notify, deliveryReady: deliveryWake.notify, transition: this.events.transition },
      config.priorityAgingMs,
    );
    this.engine =
      opts.engine ??
      new OllamaEngine({
        url: config.ollamaUrl,
        idleTimeoutMs: config.engineIdleTimeoutMs,
        connections: config.concurrency * 2 + 2,
        maxResponseBytes: config.engineMaxResponseBytes,
      });
    const committer = new GroupCommitter(this.store);
    const commit = <T>(op: () => T) => committer.run(op);
    this.worker = new Worker({
      commit,
      store: this.store,
      engine: this.engine,
      clock: this.clock,
      logger: this.logger,
      wake: jobWake,
      options: {
        concurrency: config.concurrency,
        leaseMs: config.jobLeaseMs,
        pollIntervalMs: config.pollIntervalMs,
        retryBaseMs: config.jobRetryBaseMs,
        outageTimeoutMs: config.engineOutageTimeoutMs,
      },
      ...(opts.random ? { random: opts.random } : {}),
      onChunk: this.events.delta,
    });
    this.dispatcher = new Dispatcher({
      commit,
      store: this.store,
      clock: this.clock,
      logger: this.logger,
      wake: deliveryWake,
      options: {
        concurrency: config.webhookConcurrency,
        perUrlConcurrency: config.webhookPerUrlConcurrency,
        timeoutMs: config.webhookTimeoutMs,
        backoffBaseMs: config.webhookBackoffBaseMs,
        backoffMaxMs: config.webhookBackoffMaxMs,
        maxAttempts: config.webhookMaxAttempts,
        blockPrivate: config.webhookBlockPrivate,
        inlineArtifactMaxBytes: config.inlineArtifactMaxBytes,
        secrets: config.webhookSecrets,
        userAgent: `foreman/${VERSION}`,
        pollIntervalMs: config.pollIntervalMs,
        publicUrl: () => this.publicUrl,
      },
      ...(opts.random ? { random: opts.random } : {}),
    });
    this.app = buildApp({
      store: this.store,
      submitter: new SubmitBatcher(this.store, this.clock, config.maxQueued, committer),
      engine: this.engine,
      worker: this.worker,
      events: this.events,
      config,
      clock: this.clock,
      logger: this.logger,
      publicUrl: () => this.publicUrl,
    });
  }

  /** The URL the server listens on (after start). */
  url = '';

  async start(): Promise<string> {
    const t0 = performance.now();
    // This process is the only one using the database: whatever was running belonged to a
    // process that is gone.
    const requeued = this.store.requeueOrphans(this.clock.now(), false);
    for (const id of requeued) this.logger.warn({ job_id: id, state: 'queued' }, 'job was running when the last process stopped; re-queued');
    await this.app.listen({ host: this.config.host, port: this.config.port });
    const addr = this.app.server.address() as AddressInfo;
    const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
    this.url = `http://${host === '0.0.0.0' || host === '[::]' ? '127.0.0.1' : host}:${addr.port}`;
    if (this.publicUrl === '') this.publicUrl = this.url;
    this.worker.start();
    this.dispatcher.start();
    this.sweep();
    this.logger.info(
      { url: this.url, public_url: this.publicUrl, requeued: requeued.length, startup_ms: Math.round(performance.now() - t0) },
      `foreman listening on ${this.url}`,
    );
    return this.url;
  }

  /**
   * Deletes finished jobs older than the TTL (never one with a delivery still pending), one batch
   * per turn of the event loop so a large backlog never blocks requests, then re-arms.
   */
  private sweep(deletedSoFar = 0): void {
    const BATCH = 500;
    let deleted = 0;
    try {
      deleted = this.store.sweepExpired(this.clock.now() - this.config.jobTtlMs, BATCH, this.clock.now());
    } catch (err) {
      this.logger.error({ err }, 'TTL sweep failed; will try again');
    }
    const total = deletedSoFar + deleted;
    if (deleted === BATCH) {
      this.sweepTimer = setTimeout(() => this.sweep(total), 0);
    } else {
      if (total > 0) this.logger.info({ deleted: total }, 'TTL sweep deleted expired jobs');
      this.sweepTimer = setTimeout(() => this.sweep(), this.config.sweepIntervalMs);
    }
    this.sweepTimer.unref();
  }

  /** Runs a TTL sweep now, to completion (tests, tools). */
  sweepNow(): number {
    if (this.sweepTimer) clearTimeout(this.sweepTimer);
    let total = 0;
    for (let n = -1; n !== 0; total += n) n = this.store.sweepExpired(this.clock.now() - this.config.jobTtlMs, 500, this.clock.now());
    this.sweep();
    return total;
  }

  /**
   * Shutdown: stop taking requests, stop claiming, give running jobs the grace period, re-queue
   * what is unfinished, let in-flight webhook attempts finish briefly, then close the database.
   */
  stop(): Promise<void> {
    this.stopped ??= (async () => {
      if (this.sweepTimer) clearTimeout(this.sweepTimer);
      await this.app.close();
      await this.worker.stop(this.config.shutdownGraceMs);
      await this.dispatcher.stop(Math.min(2000, this.config.shutdownGraceMs));
      await this.engine.close();
      this.db.close();
      this.logger.info('foreman stopped');
    })();
    return this.stopped;
  }
}
