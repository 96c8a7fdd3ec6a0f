import { MaintenanceService, type MaintenanceDeps } from './maintainer.js';

/**
 * Priority aging (ADR-0009): refreshes queued jobs' stored boost, whole `agingMs` intervals
 * waited, four times per interval, so the claim reads an index instead of sorting the queue.
 */
export class Aging extends MaintenanceService {
  readonly name = 'aging';

  constructor(
    deps: MaintenanceDeps,
    private readonly agingMs: number,
  ) {
    super(deps);
  }

  protected async tick(): Promise<number> {
    const { driver, clock } = this.deps;
    const changed = await driver.jobsAge({ now: clock.now(), agingMs: this.agingMs });
    if (changed > 0) driver.notifier.emit('jobReady'); // the claim order moved
    return Math.max(1, Math.floor(this.agingMs / 4));
  }
}
