import { MaintenanceService, type MaintenanceDeps } from './maintainer.js';

/**
 * Moves scheduled jobs (over their API key's daily limit, ADR-0013) to `queued` when their time
 * comes. Sleeps until the earliest one; a newly scheduled job may be earlier, so it wakes the loop.
 */
export class ScheduledJobs extends MaintenanceService {
  readonly name = 'scheduled';

  constructor(
    deps: MaintenanceDeps,
    private readonly idleMs: number,
  ) {
    super(deps);
  }

  protected override subscribe() {
    return [this.deps.driver.notifier.on('stateChanged', (e) => e.state === 'scheduled' && this.wake())];
  }

  protected async tick(): Promise<number> {
    const { driver, clock, logger } = this.deps;
    const next = await driver.jobsNextScheduledAt();
    if (next === null) return this.idleMs;
    if (next > clock.now()) return Math.min(this.idleMs, next - clock.now());
    const ids = await driver.jobsPromoteScheduled({ now: clock.now() });
    for (const id of ids) logger.info({ job_id: id, state: 'queued' }, 'scheduled job queued: its day has come');
    return 0;
  }
}
