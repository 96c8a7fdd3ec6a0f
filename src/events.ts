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

  subscribe(jobId: string, fn: JobListener): () => void {
    let set = this.listeners.get(jobId);
    if (!set) this.listeners.set(jobId, (set = new Set()));
    set.add(fn);
    return () => {
      set.delete(fn);
      if (set.size === 0 && this.listeners.get(jobId) === set) this.listeners.delete(jobId);
    };
  }

  watchers(jobId: string): number {
    return this.listeners.get(jobId)?.size ?? 0;
  }

  transition = (event: TransitionEvent): void => {
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
