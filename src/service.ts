import { randomBytes } from 'node:crypto';
import { ArtifactUrls } from './artifact-urls.js';
import { Keys } from './jobs/keys.js';
import { Files } from './jobs/files.js';
import { Batches } from './jobs/batches.js';
import { ScheduledJobs } from './maintenance/scheduled.js';
import type { AddressInfo } from 'node:net';
import { pino, type Logger } from 'pino';
import { engineHostsOf, isLoopbackHost, type Config } from './config.js';
import { blockListOf } from './webhooks/ssrf.js';
import { measureOffset, OffsetClock } from './clock.js';
import { systemClock, type Clock } from './domain.js';
import type { ChatChunk, ChatEngine } from './engine/engine.js';
import { EnginePool } from './engine/pool.js';
import { UnroutableModels } from './maintenance/unroutable.js';
import { EngineHealth } from './engine/health.js';
import { OllamaEngine } from './engine/ollama.js';
import { JobEvents } from './events.js';
import { buildApp, type App } from './http/app.js';
import { Jobs } from './jobs/jobs.js';
import { Aging } from './maintenance/aging.js';
import { Deadlines } from './maintenance/deadlines.js';
import { Maintainer } from './maintenance/maintainer.js';
import { OutagePolicy } from './maintenance/outage.js';
import { ClusterEngines } from './engine/cluster.js';
import { Rescuer } from './maintenance/rescuer.js';
import { TtlCleaner } from './maintenance/ttl-cleaner.js';
import type { QueueDriver } from './queue/driver.js';
import { SqliteDriver } from './queue/sqlite/driver.js';
import { PostgresDriver } from './queue/postgres/driver.js';
import os from 'node:os';
import { Dispatcher } from './webhooks/dispatcher.js';
import { Worker } from './worker/worker.js';
import { VERSION } from './version.js';
import { Metrics } from './metrics.js';

/** How often an instance on a shared database reads the server's clock again, and what counts as a change. */
const CLOCK_CHECK_MS = 60_000;
const CLOCK_STEP_MS = 100;
/** An offset this large is logged as a warning (the machine's clock is off). */
const CLOCK_WARN_MS = 1_000;

export interface ServiceOptions {
  config: Config;
  logger?: Logger;
  clock?: Clock;
  /**
   * Keep time on the database server's clock, when the driver is shared by several instances
   * (ADR-0011, "Time"). Default: only when `clock` is not given (the system clock).
   */
  alignClock?: boolean;
  /** How often the engine view is refreshed in a shared database (default 5 s; tests make it short). */
  engineViewRefreshMs?: number;
  engine?: ChatEngine;
  random?: () => number;
  /** A driver made by the caller (tests); by default the SQLite driver in FOREMAN_DATA_DIR. */
  driver?: QueueDriver;
}

/**
 * One Foreman process: the queue driver, HTTP app, worker, webhook dispatcher and maintenance
 * services, wired with explicit dependencies. `start()` recovers and listens; `stop()` shuts
 * down in order.
 */
export class Service {
  readonly config: Config;
  readonly logger: Logger;
  /** FOREMAN_INSTANCE_ID, default hostname-pid. */
  readonly instanceId: string;
  /** Whether this instance runs the maintenance services now (always, with an exclusive driver). */
  leader = false;
  private stepDown: (() => Promise<void>) | null = null;
  private leaderChange: Promise<void> = Promise.resolve();
  /** Every part's clock; on a shared database start() sets it to the server's time. */
  readonly clock: OffsetClock;
  private readonly alignClock: boolean;
  private clockTimer: NodeJS.Timeout | null = null;
  readonly driver: QueueDriver;
  readonly jobs: Jobs;
  readonly keys: Keys;
  readonly files: Files;
  readonly batches: Batches;
  readonly artifactUrls: ArtifactUrls;
  readonly events: JobEvents;
  /** The engine hosts (ADR-0012). */
  readonly pool: EnginePool;
  /** Every instance's engine view, for the leader's policies (ADR-0011). */
  private readonly clusterEngines: ClusterEngines;
  readonly worker: Worker;
  readonly dispatcher: Dispatcher;
  readonly maintainer: Maintainer;
  readonly ttlCleaner: TtlCleaner;
  readonly app: App;
  private publicUrl: string;
  private stopped: Promise<void> | null = null;
  private readonly unsubscribe: () => void;
  private readonly unsubscribeDeltas: () => void;
  private readonly unsubscribeResync: () => void;
  private readonly unsubscribeMetrics: () => void;
  private readonly unsubscribeBatches: () => void;
  readonly metrics: Metrics;
  /** Group commits so far: how many, how many writes they carried, and their time (logged at stop). */
  readonly commits = { groups: 0, ops: 0, ms: 0 };

  constructor(opts: ServiceOptions) {
    const config = (this.config = opts.config);
    const clock = (this.clock = new OffsetClock(opts.clock ?? systemClock));
    this.alignClock = opts.alignClock ?? opts.clock === undefined;
    this.publicUrl = config.publicUrl;
    const onCommit = (ops: number, ms: number) => {
      this.commits.groups++;
      this.commits.ops += ops;
      this.commits.ms += ms;
      this.metrics?.commit(ops, ms);
    };
    // Several instances share a PostgreSQL database (ADR-0011): each has an id, in its logs and on the jobs it runs.
    this.instanceId = config.instanceId ?? `${os.hostname()}-${process.pid}`;
    const baseLogger = opts.logger ?? pino({ level: config.logLevel });
    const logger = (this.logger = config.databaseUrl !== undefined ? baseLogger.child({ instance: this.instanceId }) : baseLogger);
    const driver = (this.driver =
      opts.driver ??
      (config.databaseUrl !== undefined
        ? new PostgresDriver({
            url: config.databaseUrl,
            poolSize: config.databasePool,
            instanceId: this.instanceId,
            // Longer than any webhook attempt: a live instance's claim never expires under it.
            deliveryLeaseMs: Math.max(5_000, 3 * config.webhookTimeoutMs),
            onCommit,
            onDuplicateId: (id) =>
              logger.error(
                { instance: id },
                'FOREMAN_INSTANCE_ID: another running process uses this instance id; each instance needs its own (one may re-queue or release the other\'s work)',
              ),
          })
        : undefined) ??
      new SqliteDriver({
        dataDir: config.dataDir,
        busyTimeoutMs: config.sqliteBusyTimeoutMs,
        synchronous: config.sqliteSynchronous,
        instanceId: this.instanceId,
        onCommit,
      }));
    this.events = new JobEvents();
    this.unsubscribe = driver.notifier.on('stateChanged', this.events.transition);
    this.unsubscribeDeltas = driver instanceof PostgresDriver ? driver.onRemoteDelta((jobId, chunk) => this.events.delta(jobId, chunk as ChatChunk)) : () => {};
    // State changes announced while this instance could not hear (its LISTEN connection was
    // down): every watched job's are read again, and only the ones its watchers lack go on.
    this.unsubscribeResync = driver.notifier.on('resync', () => {
      for (const { jobId, after } of this.events.watched()) {
        this.jobs.transitionsSince(jobId, after).then(
          (missed) => missed.forEach(this.events.transition),
          (err: unknown) => logger.warn({ err, job_id: jobId }, 'could not re-read a watched job after the LISTEN connection came back'),
        );
      }
    });
    this.keys = new Keys(driver, clock, config.adminToken);
    this.artifactUrls = new ArtifactUrls(() => this.publicUrl, clock);
    this.jobs = new Jobs(driver, clock, {
      maxQueued: config.maxQueued,
      maxQueuedBytes: config.maxQueuedBytes,
      redeliverPerMinute: config.redeliverPerMinute,
      jobMaxAttempts: config.jobMaxAttempts,
      idempotencyTtlMs: config.idempotencyTtlMs,
      // Jobs run at once (the ETA): every host's slots, across the instances (ADR-0011).
      concurrency: () => this.clusterEngines.slots,
    });
    this.files = new Files(driver, clock, { maxLines: config.batchMaxLines, maxLineBytes: config.maxBodyBytes, fileTtlMs: config.fileTtlMs });
    this.batches = new Batches(driver, this.files, clock, logger, {
      maxQueued: config.maxQueued,
      maxQueuedBytes: config.maxQueuedBytes,
      jobMaxAttempts: config.jobMaxAttempts,
      batchTtlMs: config.batchTtlMs,
      idleMs: config.pollIntervalMs,
    });
    // Each host gets a client for the worker (its slots' connections) and one of its own for
    // probes and pass-through reads, so those can never starve the worker's (hardening finding 8).
    const client = (url: string, connections: number) =>
      new OllamaEngine({ url, idleTimeoutMs: config.engineIdleTimeoutMs, connections, maxResponseBytes: config.engineMaxResponseBytes });
    const health = new EngineHealth();
    this.pool = new EnginePool(
      engineHostsOf(config).map((spec) => ({
        spec,
        engine: opts.engine ?? client(spec.url, spec.slots * 2 + 2),
        reader: opts.engine ?? client(spec.url, 4),
      })),
      health,
      clock,
      logger,
      { healthIntervalMs: config.engineHealthIntervalMs, affinityMaxWaitMs: config.affinityMaxWaitMs },
      { onLoad: (engine, model, seconds) => this.metrics?.engineLoad(engine, model, seconds) },
    );
    this.metrics = new Metrics(driver, health, clock, this.pool);
    this.unsubscribeMetrics = driver.notifier.on('stateChanged', this.metrics.transition);
    // A batch created or cancelled on any instance wakes the runner at once (it runs on the leader).
    this.unsubscribeBatches = driver.notifier.on('batchReady', this.batches.wake);
    const random = opts.random ? { random: opts.random } : {};
    this.worker = new Worker({
      driver,
      pool: this.pool,
      health,
      clock,
      logger,
      options: {
        leaseMs: config.jobLeaseMs,
        pollIntervalMs: config.pollIntervalMs,
        retryBaseMs: config.jobRetryBaseMs,
        retryMaxMs: config.jobRetryMaxMs,
      },
      ...random,
      onChunk:
        driver instanceof PostgresDriver
          ? (jobId, chunk) => {
              this.events.delta(jobId, chunk);
              // Watchers on other instances (ADR-0011): only while someone may watch, i.e. always on a shared database.
              driver.relayDelta(jobId, chunk);
            }
          : this.events.delta,
      onFirstToken: this.metrics.firstTokenAfter,
    });
    this.dispatcher = new Dispatcher({
      driver,
      clock,
      logger,
      options: {
        concurrency: config.webhookConcurrency,
        perOriginConcurrency: config.webhookPerUrlConcurrency,
        timeoutMs: config.webhookTimeoutMs,
        backoffBaseMs: config.webhookBackoffBaseMs,
        backoffMaxMs: config.webhookBackoffMaxMs,
        retryAfterMaxMs: config.webhookRetryAfterMaxMs,
        maxAttempts: config.webhookMaxAttempts,
        blockPrivate: config.webhookBlockPrivate ?? !isLoopbackHost(config.host),
        allow: blockListOf(config.webhookAllowNets),
        self: () => this.listenAddress,
        inlineArtifactMaxBytes: config.inlineArtifactMaxBytes,
        secrets: config.webhookSecrets,
        userAgent: `foreman/${VERSION}`,
        pollIntervalMs: config.pollIntervalMs,
        artifactUrl: (jobId, name, at) => this.artifactUrls.url(jobId, name, at),
      },
      ...random,
      onOutcome: this.metrics.delivery,
    });
    this.clusterEngines = new ClusterEngines({
      driver,
      instanceId: this.instanceId,
      pool: this.pool,
      clock,
      logger,
      graceMs: config.engineOutageTimeoutMs,
      ...(opts.engineViewRefreshMs ? { refreshMs: opts.engineViewRefreshMs } : {}),
    });
    const m = { driver, clock, logger };
    this.ttlCleaner = new TtlCleaner(m, config.jobTtlMs, config.sweepIntervalMs, config.failedJobTtlMs ?? config.jobTtlMs);
    this.maintainer = new Maintainer([
      new Rescuer(m, config.jobLeaseMs),
      new Deadlines(m, config.pollIntervalMs),
      new ScheduledJobs(m, config.pollIntervalMs),
      new Aging(m, config.priorityAgingMs),
      this.ttlCleaner,
      new UnroutableModels(m, this.pool, this.clusterEngines, config.engineHealthIntervalMs),
      new OutagePolicy(m, this.pool, health, this.clusterEngines, {
        outageTimeoutMs: config.engineOutageTimeoutMs,
        probeEveryMs: Math.min(1000, config.pollIntervalMs),
        idleMs: config.pollIntervalMs,
      }),
    ]);
    this.app = buildApp({
      jobs: this.jobs,
      keys: this.keys,
      files: this.files,
      batches: this.batches,
      artifactUrls: this.artifactUrls,
      pool: this.pool,
      cluster: this.clusterEngines,
      events: this.events,
      storageReady: () => driver.ping(),
      metrics: this.metrics,
      config,
      clock,
      logger,
      publicUrl: () => this.publicUrl,
    });
  }

  /** The URL the server listens on (after start). */
  url = '';
  /** Where this process listens (after start): webhooks may never point here. */
  private listenAddress: { address: string; port: number } | null = null;

  async start(): Promise<string> {
    const t0 = performance.now();
    const serverTime = this.driver.serverTime?.bind(this.driver);
    if (this.alignClock && serverTime) {
      await this.keepServerTime(serverTime, true);
      this.clockTimer = setInterval(() => void this.keepServerTime(serverTime, false), CLOCK_CHECK_MS);
      this.clockTimer.unref();
    }
    const { requeued } = await this.driver.recover({ now: this.clock.now() });
    if (this.keys.enabled) {
      // Signed artifact URLs (ADR-0013): the configured secret, or one generated once and kept
      // in the database, so it survives restarts and every instance signs alike.
      const secret =
        this.config.urlSigningSecret ?? (await this.driver.secretEnsure({ name: 'artifact_url_signing', value: randomBytes(32).toString('base64url') }));
      this.artifactUrls.useSecret(secret, this.config.artifactUrlTtlMs);
    }
    for (const id of requeued) this.logger.warn({ job_id: id, state: 'queued' }, 'job was running when the last process stopped; re-queued');
    await this.app.listen({ host: this.config.host, port: this.config.port });
    const addr = this.app.server.address() as AddressInfo;
    this.listenAddress = { address: addr.address, port: addr.port };
    const host = addr.family === 'IPv6' ? `[${addr.address}]` : addr.address;
    this.url = `http://${host === '0.0.0.0' || host === '[::]' ? '127.0.0.1' : host}:${addr.port}`;
    if (this.publicUrl === '') this.publicUrl = this.url;
    await this.pool.start();
    // Once its hosts have been probed, the other instances' leader knows what they can run. (Not
    // before: a start that failed, or a process crash-looping, would leave a view of hosts never
    // probed, which may have any model, and hold every model's jobs for the grace.)
    await this.clusterEngines.start();
    this.worker.start();
    this.dispatcher.start();
    if (this.driver.leadership) {
      // A shared driver: maintenance (and the batch runner) run on the elected leader only.
      this.stepDown = this.driver.leadership((leader) => {
        this.leader = leader;
        this.leaderChange = this.leaderChange.then(async () => {
          if (leader) {
            this.logger.info({ leader: true }, 'this instance now leads maintenance');
            this.maintainer.start();
            this.batches.start();
          } else {
            this.logger.info({ leader: false }, 'this instance no longer leads maintenance');
            // Both at once: the batch runner must not go on for as long as a maintenance tick lasts.
            await Promise.all([this.maintainer.stop(), this.batches.stop()]);
          }
        });
      });
    } else {
      this.leader = true;
      this.maintainer.start();
      this.batches.start();
    }
    this.logger.info(
      { url: this.url, public_url: this.publicUrl, driver: this.driver.name, requeued: requeued.length, clock_offset_ms: this.clock.offsetMs, startup_ms: Math.round(performance.now() - t0) },
      `foreman listening on ${this.url}`,
    );
    return this.url;
  }

  /** Runs a TTL sweep now, to completion (tests, tools). */
  sweepNow(): Promise<number> {
    return this.ttlCleaner.sweepNow();
  }

  /**
   * The database server's time, read through this instance's clock (ADR-0011, "Time"): at start
   * the offset is set, and then each check moves it when it changed by 100 ms or more (the
   * machine's clock was stepped), not for the jitter of a round trip.
   */
  private async keepServerTime(serverTime: () => Promise<number>, first: boolean): Promise<void> {
    let m: { offsetMs: number; rttMs: number };
    try {
      m = await measureOffset(this.clock.base, serverTime);
    } catch (err) {
      if (first) throw err;
      // A read that a shutdown overtook is not worth a warning.
      if (this.stopped === null) this.logger.warn({ err }, "could not read the database server's clock; keeping the last offset");
      return;
    }
    const was = this.clock.offsetMs;
    if (!first && Math.abs(m.offsetMs - was) < CLOCK_STEP_MS) return;
    this.clock.offsetMs = m.offsetMs;
    const fields = { clock_offset_ms: m.offsetMs, round_trip_ms: m.rttMs, ...(first ? {} : { previous_offset_ms: was }) };
    if (Math.abs(m.offsetMs) >= CLOCK_WARN_MS) {
      this.logger.warn(fields, "this machine's clock differs from the database server's; this instance keeps the server's time");
    } else if (!first) {
      this.logger.info(fields, "this machine's clock moved against the database server's; the offset follows");
    }
  }

  /**
   * Shutdown: stop taking requests, stop claiming, give running jobs the grace period, re-queue
   * what is unfinished, let in-flight webhook attempts finish briefly, then close the driver.
   */
  stop(): Promise<void> {
    this.stopped ??= (async () => {
      // In-flight requests may finish; connections still open after the grace period (keep-alive
      // sockets a request finished on meanwhile, watchers) are closed rather than waited for.
      const closing = this.app.close();
      const force = setTimeout(() => this.app.server.closeAllConnections(), this.config.shutdownGraceMs);
      await closing;
      clearTimeout(force);
      if (this.clockTimer) clearInterval(this.clockTimer);
      if (this.stepDown) await this.stepDown();
      await this.leaderChange;
      await this.maintainer.stop();
      await this.batches.stop();
      await this.clusterEngines.stop();
      await this.worker.stop(this.config.shutdownGraceMs);
      await this.dispatcher.stop(Math.min(2000, this.config.shutdownGraceMs));
      await this.pool.stop();
      this.unsubscribe();
      this.unsubscribeDeltas();
      this.unsubscribeResync();
      this.unsubscribeMetrics();
      this.unsubscribeBatches();
      await this.driver.close();
      const c = this.commits;
      this.logger.info(
        { commits: c.groups, writes_per_commit: c.groups ? +(c.ops / c.groups).toFixed(2) : 0, commit_ms_avg: c.groups ? +(c.ms / c.groups).toFixed(3) : 0 },
        'foreman stopped',
      );
    })();
    return this.stopped;
  }
}
