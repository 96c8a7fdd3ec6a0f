import type { Logger } from 'pino';
import { Wake } from './wake.js';

/**
 * A background loop with start/stop: runs `tick`, then sleeps for the delay it returns (ms)
 * or until `wake.notify()`. A tick that throws is logged and retried after `errorDelayMs`.
 * The worker, the dispatcher and every maintenance service run on one of these.
 */
export class Loop {
  readonly wake = new Wake();
  private stopping = false;
  private running: Promise<void> | null = null;

  constructor(
    readonly name: string,
    private readonly tick: () => Promise<number>,
    private readonly logger: Logger,
    private readonly errorDelayMs = 1000,
  ) {}

  get stopped(): boolean {
    return this.stopping;
  }

  /** Starts the loop; after `stop()` has resolved, starts it again (the leader's loops stop and start with leadership). */
  start(): void {
    if (this.running) return;
    this.stopping = false;
    this.running = this.run();
  }

  private async run(): Promise<void> {
    while (!this.stopping) {
      let delay = this.errorDelayMs;
      try {
        delay = await this.tick();
      } catch (err) {
        this.logger.error({ err, loop: this.name }, `${this.name}: tick failed; will retry`);
      }
      if (this.stopping) break;
      await this.wake.wait(delay);
    }
  }

  /** Stops after the current tick; resolves when the loop has exited. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.wake.notify();
    const running = this.running;
    await running;
    if (this.running === running) this.running = null;
  }
}

/** Exponential backoff with downward jitter: min(max, base·2^(n-1))·[0.8, 1.0], n = attempts so far. */
export function backoffDelay(baseMs: number, maxMs: number, attempts: number, random: () => number): number {
  const d = Math.min(maxMs, baseMs * 2 ** Math.max(0, attempts - 1));
  return Math.round(d * (0.8 + 0.2 * random()));
}
