import type { ChatChunk } from './engine/engine.js';
import type { TransitionEvent } from './queue/driver.js';

export type JobEvent = { type: 'state'; event: TransitionEvent } | { type: 'delta'; chunk: ChatChunk };
export type JobListener = (e: JobEvent) => void;

/**
 * In-process fan-out of a job's committed state changes and generation chunks to its watchers
 * (SSE streams, /api/chat callers). The engine stream is the worker's one request; any number
 * of watchers read from here, so many watchers cost one engine stream.
 */
export class JobEvents {
  private readonly listeners = new Map<string, Set<JobListener>>();
  /** Of each watched job, the last state change passed on (its place in the job's log). */
  private readonly lastN = new Map<string, number>();

  subscribe(jobId: string, fn: JobListener): () => void {
    let set = this.listeners.get(jobId);
    if (!set) this.listeners.set(jobId, (set = new Set()));
    set.add(fn);
    return () => {
      set.delete(fn);
      if (set.size === 0 && this.listeners.get(jobId) === set) {
        this.listeners.delete(jobId);
        this.lastN.delete(jobId);
      }
    };
  }

  watchers(jobId: string): number {
    return this.listeners.get(jobId)?.size ?? 0;
  }

  /** The watched jobs, each with the last state change passed on to its watchers (0: none yet). */
  watched(): { jobId: string; after: number }[] {
    return [...this.listeners.keys()].map((jobId) => ({ jobId, after: this.lastN.get(jobId) ?? 0 }));
  }

  /** A committed state change; one a watched job's watchers were already given (a re-read after `resync`) is not passed on twice. */
  transition = (event: TransitionEvent): void => {
    if (!this.listeners.has(event.jobId)) return;
    if (event.n <= (this.lastN.get(event.jobId) ?? 0)) return;
    this.lastN.set(event.jobId, event.n);
    this.emit(event.jobId, { type: 'state', event });
  };

  delta = (jobId: string, chunk: ChatChunk): void => {
    this.emit(jobId, { type: 'delta', chunk });
  };

  private emit(jobId: string, e: JobEvent): void {
    const set = this.listeners.get(jobId);
    if (!set) return;
    for (const fn of [...set]) fn(e);
  }
}
