import type { Store } from './store.js';

/**
 * Groups the store writes made in one turn of the event loop into one transaction, so they share
 * one commit (one fsync with synchronous=FULL). Each caller's promise settles after that commit
 * with its own write's result or error (each write is a savepoint, so one failure does not undo
 * the others). Used by the submit batcher, the worker and the dispatcher.
 */
export class GroupCommitter {
  private ops: { op: () => unknown; resolve: (v: unknown) => void; reject: (e: unknown) => void }[] = [];
  private scheduled = false;

  constructor(
    private readonly store: Store,
    private readonly maxOps = 1024,
  ) {}

  run<T>(op: () => T): Promise<T> {
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
    const results: { ok: boolean; value: unknown }[] = [];
    try {
      this.store.group(() => {
        for (const o of ops) {
          try {
            results.push({ ok: true, value: o.op() });
          } catch (err) {
            results.push({ ok: false, value: err });
          }
        }
      });
    } catch (err) {
      // The commit itself failed: nothing of the group is durable.
      for (const o of ops) o.reject(err);
      return;
    }
    ops.forEach((o, i) => {
      const r = results[i]!;
      if (r.ok) o.resolve(r.value);
      else o.reject(r.value);
    });
  }
}
