import type { TransitionEvent } from './driver.js';

/**
 * What a driver announces after a commit (a typed event map, the single hook for the worker,
 * the dispatcher, SSE and, later, metrics). The SQLite driver announces in process; a shared
 * driver also carries them to other instances (LISTEN/NOTIFY).
 */
export interface QueueEvents {
  /** A job became claimable (submitted, or re-queued). */
  jobReady: [];
  /** An outbox row became due. */
  deliveryReady: [];
  /** A batch was created or cancelled: the batch runner (on the leader) has work. */
  batchReady: [];
  /** Outbox rows written claimed by this instance (ADR-0017): in process only. */
  deliveriesClaimed: [ids: number[]];
  /** A state change committed. */
  stateChanged: [TransitionEvent];
  /** A running job was canceled: whoever runs it should stop. */
  cancelRequested: [jobId: string];
  /**
   * Other instances' announcements may have been missed (the LISTEN connection was lost and is
   * back): whoever waits for a job's state changes reads them again. Never from SQLite.
   */
  resync: [];
}

export type QueueEventName = keyof QueueEvents;

export interface Notifier {
  emit<K extends QueueEventName>(name: K, ...args: QueueEvents[K]): void;
  /** Returns the unsubscribe function. */
  on<K extends QueueEventName>(name: K, fn: (...args: QueueEvents[K]) => void): () => void;
}

/** In-process delivery: listeners run synchronously, in subscription order. */
export class LocalNotifier implements Notifier {
  private readonly listeners: { [K in QueueEventName]?: Set<(...args: QueueEvents[K]) => void> } = {};

  emit<K extends QueueEventName>(name: K, ...args: QueueEvents[K]): void {
    const set = this.listeners[name];
    if (!set) return;
    for (const fn of set) fn(...args);
  }

  on<K extends QueueEventName>(name: K, fn: (...args: QueueEvents[K]) => void): () => void {
    let set = this.listeners[name] as Set<(...args: QueueEvents[K]) => void> | undefined;
    if (!set) (this.listeners as Record<string, unknown>)[name] = set = new Set();
    set.add(fn);
    return () => set.delete(fn);
  }
}
