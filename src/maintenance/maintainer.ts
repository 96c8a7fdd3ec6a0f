import type { Logger } from 'pino';
import type { Clock } from '../domain.js';
import { Loop } from '../loop.js';
import type { QueueDriver } from '../queue/driver.js';

/**
 * How many jobs a sweep that fails queued jobs (deadlines, engine outage, unroutable models) ends
 * per transaction: a backlog of any size goes in chunks, each short, with the event loop free
 * between them.
 */
export const SWEEP_CHUNK = 500;

/** What every maintenance service gets. */
export interface MaintenanceDeps {
  driver: QueueDriver;
  clock: Clock;
  logger: Logger;
}

/**
 * A maintenance service: one job of upkeep on the queue, with the same start/stop as every other.
 * `tick` does one round and returns how long to sleep (ms); `wake()` cuts the sleep short.
 */
export abstract class MaintenanceService {
  abstract readonly name: string;
  private loop: Loop | null = null;
  private readonly subscriptions: (() => void)[] = [];

  constructor(protected readonly deps: MaintenanceDeps) {}

  protected abstract tick(): Promise<number>;

  /** Subscriptions made on start (to the driver's notifier), undone on stop. */
  protected subscribe(): (() => void)[] {
    return [];
  }

  start(): void {
    if (this.loop) return;
    this.loop = new Loop(this.name, () => this.tick(), this.deps.logger);
    this.subscriptions.push(...this.subscribe());
    this.loop.start();
  }

  wake = (): void => {
    this.loop?.wake.notify();
  };

  /** Whether `stop()` was called: a tick that works in chunks ends after its current one. */
  protected get stopping(): boolean {
    return this.loop?.stopped ?? true;
  }

  async stop(): Promise<void> {
    for (const u of this.subscriptions.splice(0)) u();
    await this.loop?.stop();
    this.loop = null;
  }
}

/**
 * Runs the maintenance services. A driver shared by several instances will run them on the
 * elected leader only (ADR-0010); the SQLite driver's single process is always the leader.
 */
export class Maintainer {
  constructor(readonly services: MaintenanceService[]) {}

  start(): void {
    for (const s of this.services) s.start();
  }

  async stop(): Promise<void> {
    await Promise.all(this.services.map((s) => s.stop()));
  }
}
