import { StorageUnavailable } from '../../errors.js';
import type { DB } from './db.js';
import { isSqliteStorageError } from './db.js';

/** What one write did that somebody should hear about once it has committed. */
export interface Effects {
  jobReady: boolean;
  deliveryReady: boolean;
  transitions: import('../driver.js').TransitionEvent[];
  canceled: string[];
}

export const noEffects = (): Effects => ({ jobReady: false, deliveryReady: false, transitions: [], canceled: [] });

/** A driver error as the rest of the service sees it: storage trouble becomes `StorageUnavailable`. */
export function domainError(err: unknown): unknown {
  if (isSqliteStorageError(err)) return new StorageUnavailable(`storage unavailable: ${(err as Error).message}`, err);
  return err;
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

  constructor(
    private readonly db: DB,
    private readonly announce: (fx: Effects[]) => void,
    /** Observes each committed group (metrics). */
    private readonly onGroup: (size: number, ms: number) => void = () => {},
    private readonly maxOps = 1024,
  ) {}

  run<T>(op: (fx: Effects) => T): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      this.ops.push({ op, resolve: resolve as (v: unknown) => void, reject });
      if (this.ops.length >= this.maxOps) this.flush();
      else if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(() => this.flush());
      }
    });
  }

  /** Commits whatever is waiting now. */
  flush(): void {
    this.scheduled = false;
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
    this.announce(results.filter((r) => r.ok).map((r) => r.fx));
    ops.forEach((o, i) => {
      const r = results[i]!;
      if (r.ok) o.resolve(r.value);
      else o.reject(r.value);
    });
  }
}
