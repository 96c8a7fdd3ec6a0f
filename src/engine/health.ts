/**
 * Whether the engine is believed reachable. The worker marks it down when a request cannot reach
 * the engine (and stops claiming); the outage policy probes it and marks it up again.
 */
export class EngineHealth {
  private since: number | null = null;
  private readonly upListeners = new Set<() => void>();
  private readonly downListeners = new Set<() => void>();

  /** When the current outage began, or null while the engine is believed up. */
  get downSince(): number | null {
    return this.since;
  }

  /** Returns true if this call began an outage. */
  markDown(now: number): boolean {
    if (this.since !== null) return false;
    this.since = now;
    for (const fn of this.downListeners) fn();
    return true;
  }

  markUp(): void {
    if (this.since === null) return;
    this.since = null;
    for (const fn of this.upListeners) fn();
  }

  onUp(fn: () => void): void {
    this.upListeners.add(fn);
  }

  onDown(fn: () => void): void {
    this.downListeners.add(fn);
  }
}
