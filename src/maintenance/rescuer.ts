import { MaintenanceService, type MaintenanceDeps } from './maintainer.js';

/** Re-queues running jobs whose lease expired (their instance died or hung); the attempt does not count. */
export class Rescuer extends MaintenanceService {
  readonly name = 'rescuer';

  constructor(
    deps: MaintenanceDeps,
    private readonly leaseMs: number,
  ) {
    super(deps);
  }

  protected async tick(): Promise<number> {
    const { driver, clock, logger } = this.deps;
    for (const id of await driver.jobsRescue({ now: clock.now() })) {
      logger.warn({ job_id: id, state: 'queued' }, 'job lease expired; job re-queued');
    }
    return Math.max(50, Math.floor(this.leaseMs / 2));
  }
}
