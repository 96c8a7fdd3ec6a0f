import type { JobEvent, JobEvents } from '../events.js';

/**
 * A job's events (state changes and generation chunks) as a queue the caller awaits one by one.
 * Subscribe before the job exists, so nothing can be missed; `close()` unsubscribes.
 */
export function watchJob(events: JobEvents, id: string): { next(): Promise<JobEvent>; close(): void } {
  const queue: JobEvent[] = [];
  let wake: (() => void) | null = null;
  const close = events.subscribe(id, (e) => {
    queue.push(e);
    wake?.();
  });
  return {
    async next() {
      while (queue.length === 0) await new Promise<void>((r) => (wake = r));
      wake = null;
      return queue.shift()!;
    },
    close,
  };
}
