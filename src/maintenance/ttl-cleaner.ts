import { MaintenanceService, type MaintenanceDeps } from './maintainer.js';
import { isTerminal } from '../domain.js';

/**
 * Deletes finished jobs once `ttlMs` has passed (never one with a delivery still owed), one batch
 * per tick so a large backlog never blocks requests. It sleeps until the oldest finished job
 * expires (at most `intervalMs`), and a job that finishes wakes it if that job would expire
 * sooner, so a short TTL is honoured within a second or so, not at the next interval.
 */
export class TtlCleaner extends MaintenanceService {
  readonly name = 'ttl cleaner';
  private wakeAt = Infinity;
  private timer: NodeJS.Timeout | null = null;
  static readonly BATCH = 500;

  constructor(
    deps: MaintenanceDeps,
    private readonly ttlMs: number,
    private readonly intervalMs: number,
    /** Failed jobs may be kept longer (or shorter) than the rest: FOREMAN_FAILED_JOB_TTL. */
    private readonly failedTtlMs: number = ttlMs,
  ) {
    super(deps);
  }

  protected override subscribe() {
    return [
      this.deps.driver.notifier.on('stateChanged', (e) => {
        if (!isTerminal(e.state)) return;
        const at = e.at + (e.state === 'failed' ? this.failedTtlMs : this.ttlMs);
        if (at >= this.wakeAt) return;
        this.wakeAt = at;
        if (this.timer) clearTimeout(this.timer);
        this.timer = setTimeout(this.wake, Math.max(0, at - this.deps.clock.now()));
        this.timer.unref();
      }),
      () => this.timer && clearTimeout(this.timer),
    ];
  }

  /** Deletes every expired job now (tests, tools); returns how many. */
  async sweepNow(): Promise<number> {
    let total = 0;
    for (let n = -1; n !== 0; total += n) n = await this.sweep();
    return total;
  }

  private sweep(): Promise<number> {
    const { driver, clock } = this.deps;
    const now = clock.now();
    return driver.jobsDeleteExpired({ finishedBefore: now - this.ttlMs, failedFinishedBefore: now - this.failedTtlMs, limit: TtlCleaner.BATCH, now });
  }

  protected async tick(): Promise<number> {
    const { driver, clock, logger } = this.deps;
    const deleted = await this.sweep();
    if (deleted > 0) logger.info({ deleted }, 'TTL cleaner deleted expired jobs');
    if (deleted === TtlCleaner.BATCH) return 0;
    // Jobs kept for a pending delivery stay the oldest; do not spin on them.
    const ttl = Math.min(this.ttlMs, this.failedTtlMs);
    const floor = Math.min(this.intervalMs, Math.max(1000, ttl));
    const oldest = await driver.jobsOldestFinishedAt();
    const until = oldest === null ? this.intervalMs : oldest + ttl - clock.now() + 1;
    const delay = Math.min(this.intervalMs, Math.max(floor, until));
    this.wakeAt = clock.now() + delay;
    return delay;
  }
}
