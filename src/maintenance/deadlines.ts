import { MaintenanceService, SWEEP_CHUNK, type MaintenanceDeps } from './maintainer.js';

/**
 * Fails queued jobs at their deadline. Sleeps until the earliest deadline; a new job may bring
 * an earlier one, so every submit wakes it.
 */
export class Deadlines extends MaintenanceService {
  readonly name = 'deadlines';

  constructor(
    deps: MaintenanceDeps,
    private readonly idleMs: number,
  ) {
    super(deps);
  }

  protected override subscribe() {
    return [this.deps.driver.notifier.on('jobReady', this.wake)];
  }

  protected async tick(): Promise<number> {
    const { driver, clock, logger } = this.deps;
    const next = await driver.jobsNextDeadlineAt();
    if (next === null) return this.idleMs;
    if (next > clock.now()) return Math.min(this.idleMs, next - clock.now());
    // A chunk a tick; the next tick comes at once while deadlines are past.
    for (const id of await driver.jobsFailPastDeadline({ now: clock.now(), limit: SWEEP_CHUNK })) {
      logger.info({ job_id: id, state: 'failed', code: 'deadline_exceeded' }, 'job still queued at its deadline');
    }
    return 0;
  }
}
