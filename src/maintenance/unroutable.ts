import type { ClusterEngines } from '../engine/cluster.js';
import type { EnginePool } from '../engine/pool.js';
import { MaintenanceService, SWEEP_CHUNK, type MaintenanceDeps } from './maintainer.js';

/**
 * Routing's dead end (ADR-0012): while every engine host answers, a queued job whose model none
 * of them has installed can never run, so it fails at once with `model_not_found` and Ollama's
 * message. While some host is down the job waits instead (that host may have it). Woken by every
 * submit; otherwise it looks again each health interval (a host may have lost a model).
 * With several instances (ADR-0011) "every engine host" means every live instance's: the job
 * also waits while another instance's hosts have the model or are not all answering.
 */
export class UnroutableModels extends MaintenanceService {
  readonly name = 'unroutable models';

  constructor(
    deps: MaintenanceDeps,
    private readonly pool: EnginePool,
    private readonly cluster: ClusterEngines,
    private readonly idleMs: number,
  ) {
    super(deps);
  }

  protected override subscribe() {
    return [this.deps.driver.notifier.on('jobReady', this.wake)];
  }

  protected async tick(): Promise<number> {
    const { driver, clock, logger } = this.deps;
    if (!this.pool.allUp) return this.idleMs;
    const models = await driver.jobsQueuedModels();
    for (const model of models) {
      const error = { code: 'model_not_found', message: `model '${model}' not found` };
      // In chunks, each its own transaction. Before each, and after every await, the model is
      // judged again: a host that went down meanwhile, or one that has it now, ends the sweep.
      for (let n = SWEEP_CHUNK; n === SWEEP_CHUNK && !this.stopping; ) {
        if (!this.pool.allUp || this.pool.installedAnywhere(model)) break;
        if (await this.cluster.elsewhereMayRun(model)) break;
        if (this.stopping || !this.pool.allUp || this.pool.installedAnywhere(model)) break;
        const ids = await driver.jobsFailQueuedModel({ model, now: clock.now(), error, limit: SWEEP_CHUNK });
        for (const id of ids) logger.info({ job_id: id, state: 'failed', code: 'model_not_found', model }, 'no engine host has this model');
        n = ids.length;
      }
    }
    return this.idleMs;
  }
}
