import type { ClusterEngines } from '../engine/cluster.js';
import type { ChatEngine } from '../engine/engine.js';
import type { EngineHealth } from '../engine/health.js';
import { MaintenanceService, SWEEP_CHUNK, type MaintenanceDeps } from './maintainer.js';

/**
 * The engine-outage policy (ADR-0007). While the worker has found the engine unreachable, jobs
 * stay queued with their attempts, and this probes the engine; once it answers, claims resume.
 * Once the outage has lasted `outageTimeoutMs`, queued jobs that have waited that long fail
 * with `engine_unavailable`. With several instances (ADR-0011) the outage is the cluster's: it
 * lasts while no live instance has a host answering, from the last of them to go down.
 */
export class OutagePolicy extends MaintenanceService {
  readonly name = 'outage policy';

  constructor(
    deps: MaintenanceDeps,
    private readonly engine: Pick<ChatEngine, 'status'>,
    private readonly health: EngineHealth,
    private readonly cluster: ClusterEngines,
    private readonly opts: { outageTimeoutMs: number; probeEveryMs: number; idleMs: number },
  ) {
    super(deps);
    health.onDown(this.wake);
  }

  protected async tick(): Promise<number> {
    const { driver, clock, logger } = this.deps;
    const since = this.health.downSince;
    if (since === null) return this.opts.idleMs; // woken when the worker marks the engine down
    const waited = clock.now() - since;
    if (waited < this.opts.probeEveryMs) return this.opts.probeEveryMs - waited;
    const status = await this.engine.status();
    logger.debug({ status }, 'engine probe');
    if (status.up) {
      logger.info({ down_ms: clock.now() - since }, 'engine is reachable again; resuming');
      this.health.markUp();
      return this.opts.idleMs;
    }
    if (clock.now() - since < this.opts.outageTimeoutMs) return this.opts.probeEveryMs;
    const error = {
      code: 'engine_unavailable',
      message: `the engine has been unreachable for longer than FOREMAN_ENGINE_OUTAGE_TIMEOUT (${this.opts.outageTimeoutMs}ms): ${status.error ?? 'down'}`,
    };
    // In chunks, each its own transaction. Before each the outage is judged again: a host of
    // this instance or of another one that answers meanwhile ends the sweep (and so does a new
    // outage that began since: its jobs get their full wait).
    while (!this.stopping && this.health.downSince === since) {
      const outageSince = await this.cluster.outageSince(since);
      const now = clock.now();
      if (outageSince === null) {
        logger.debug({ down_ms: now - since }, "this instance's engine hosts are out, another instance's answer: no job fails");
        break;
      }
      if (now - outageSince < this.opts.outageTimeoutMs || this.stopping || this.health.downSince !== since) break;
      const ids = await driver.jobsFailStale({ createdBefore: now - this.opts.outageTimeoutMs, now, error, limit: SWEEP_CHUNK });
      for (const id of ids) logger.warn({ job_id: id, state: 'failed', code: 'engine_unavailable' }, 'job failed: engine outage outlasted its wait');
      if (ids.length < SWEEP_CHUNK) break;
    }
    return this.opts.probeEveryMs;
  }
}
