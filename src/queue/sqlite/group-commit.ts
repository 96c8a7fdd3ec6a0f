import { StorageUnavailable } from '../../errors.js';
import type { DB } from './db.js';
import { isSqliteStorageError } from './db.js';

/** What one write did that somebody should hear about once it has committed. */
export interface Effects {
  jobReady: boolean;
  deliveryReady: boolean;
  batchReady: boolean;
  transitions: import('../driver.js').TransitionEvent[];
  canceled: string[];
}

export const noEffects = (): Effects => ({ jobReady: false, deliveryReady: false, batchReady: false, transitions: [], canceled: [] });

/** A driver error as the rest of the service sees it: storage trouble becomes `StorageUnavailable`. */
export function domainError(err: unknown): unknown {
  if (isSqliteStorageError(err)) return new StorageUnavailable(`storage unavailable: ${(err as Error).message}`, err);
  return err;
}

/**
 * Makes committed WAL frames durable off the event loop (an `fdatasync` on libuv's thread pool).
 * Null when commits need no extra sync (`FOREMAN_SQLITE_SYNCHRONOUS=NORMAL`).
 */
export interface WalSync {
  sync(cb: (err: Error | null) => void): void;
}

interface Op {
  op: (fx: Effects) => unknown;
  resolve: (v: unknown) => void;
  reject: (e: unknown) => void;
}

/**
 * Group commit: every write asked for in one turn of the event loop runs in one transaction
 * (one fsync with synchronous=FULL); each write is a savepoint, so one failing write rolls back
 * only itself. Each caller's promise settles after the commit, and the writes' effects are
 * announced only then. If a write's failure ended the whole transaction (SQLite rolls back on
 * SQLITE_FULL, for one), the writes after it are not run at all: they would otherwise commit
 * one by one outside any transaction.
 */
export class GroupCommit {
  private ops: Op[] = [];
  private scheduled = false;
  /** Committed groups waiting for their WAL frames to be synced, in commit order. */
  private unsynced: ((err?: unknown) => void)[] = [];
  private syncing = false;
  /** Writes are waiting for the sync in flight to end before they commit. */
  private deferred = false;
  private committed = 0;
  private durable = 0;
  private readonly barriers: { seq: number; resolve: () => void }[] = [];

  constructor(
    private readonly db: DB,
    private readonly announce: (fx: Effects[]) => void,
    /** Observes each committed group (metrics). */
    private readonly onGroup: (size: number, ms: number) => void = () => {},
    /** See `WalSync`: with it, a group's callers hear of their commit only once it is on disk. */
    private readonly walSync: WalSync | null = null,
    private readonly maxOps = 1024,
  ) {}

  /**
   * Resolves once everything committed so far is durable. Whatever is sent out of the process
   * on the strength of a read (a webhook) waits for this, so nothing leaves that a power loss
   * could take back.
   */
  whenDurable(): Promise<void> {
    if (this.durable >= this.committed) return Promise.resolve();
    return new Promise((resolve) => this.barriers.push({ seq: this.committed, resolve }));
  }

  /**
   * One sync at a time; the groups committed meanwhile share the next one. The WAL is written
   * sequentially, so a sync issued after a commit covers it and everything before it.
   */
  private syncNext(): void {
    if (this.syncing || this.unsynced.length === 0) return;
    const settle = this.unsynced;
    this.unsynced = [];
    const upTo = this.committed;
    this.syncing = true;
    this.walSync!.sync((err) => {
      this.syncing = false;
      if (err) {
        // Committed but not known to be on disk: the callers must not take it as durable.
        for (const fn of settle) fn(new StorageUnavailable(`storage unavailable: could not sync the WAL: ${err.message}`, err));
      } else {
        this.durable = upTo;
        for (const fn of settle) fn();
        while (this.barriers.length > 0 && this.barriers[0]!.seq <= upTo) this.barriers.shift()!.resolve();
      }
      if (this.deferred) {
        this.deferred = false;
        this.flush(); // commits the writes that waited, and starts their sync
      }
      this.syncNext();
    });
  }

  run<T>(op: (fx: Effects) => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.ops.push({ op, resolve: resolve as (v: unknown) => void, reject });
      if (this.ops.length >= this.maxOps) this.flush();
      else if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(() => this.flush(false));
      }
    });
  }

  /**
   * Commits whatever is waiting now. While a WAL sync is in flight, the writes that arrive wait
   * for it and then commit together: they could not be reported durable before the next sync
   * anyway, so this costs them no time and saves a commit (and its page writes) per turn.
   * `force` commits at once regardless (shutdown, a full batch).
   */
  flush(force = true): void {
    this.scheduled = false;
    if (!force && this.syncing) {
      this.deferred = true;
      return;
    }
    const ops = this.ops;
    if (ops.length === 0) return;
    this.ops = [];
    const t0 = performance.now();
    const results: { ok: boolean; value: unknown; fx: Effects }[] = [];
    const db = this.db;
    try {
      db.transaction(() => {
        for (const o of ops) {
          if (!db.inTransaction) {
            results.push({ ok: false, value: new StorageUnavailable('storage unavailable: an earlier write in the same commit failed'), fx: noEffects() });
            continue;
          }
          const fx = noEffects();
          try {
            results.push({ ok: true, value: db.transaction(o.op)(fx), fx });
          } catch (err) {
            results.push({ ok: false, value: domainError(err), fx });
          }
        }
      })();
    } catch (err) {
      // The commit itself failed: nothing of the group is durable.
      const e = domainError(err);
      const mapped = e instanceof StorageUnavailable ? e : new StorageUnavailable(`storage unavailable: ${(err as Error).message}`, err);
      for (const o of ops) o.reject(mapped);
      return;
    }
    this.onGroup(ops.length, performance.now() - t0);
    this.committed++;
    const settle = (syncErr?: unknown) => {
      if (syncErr === undefined) this.announce(results.filter((r) => r.ok).map((r) => r.fx));
      ops.forEach((o, i) => {
        const r = results[i]!;
        if (syncErr !== undefined) o.reject(syncErr);
        else if (r.ok) o.resolve(r.value);
        else o.reject(r.value);
      });
    };
    if (!this.walSync) {
      this.durable = this.committed;
      settle();
      return;
    }
    this.unsynced.push(settle);
    this.syncNext();
  }
}
