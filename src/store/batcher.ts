import type { NewJob, Store, SubmitOutcome } from './store.js';
import type { Clock } from '../domain.js';
import type { GroupCommitter } from './committer.js';

/**
 * Group commit for submissions: every job submitted in the same turn of the event loop is
 * inserted by one transaction (one fsync), and each caller's promise settles only after that
 * commit. A 202 therefore always follows a durable commit, and concurrent submitters share
 * the cost of the sync.
 */
export class SubmitBatcher {
  private batch: { job: NewJob; resolve: (o: SubmitOutcome) => void; reject: (e: unknown) => void }[] = [];
  private scheduled = false;

  constructor(
    private readonly store: Store,
    private readonly clock: Clock,
    private readonly maxQueued: number,
    private readonly committer: GroupCommitter,
    private readonly maxBatch = 512,
  ) {}

  submit(job: NewJob): Promise<SubmitOutcome> {
    return new Promise((resolve, reject) => {
      this.batch.push({ job, resolve, reject });
      if (this.batch.length >= this.maxBatch) this.flush();
      else if (!this.scheduled) {
        this.scheduled = true;
        setImmediate(() => this.flush());
      }
    });
  }

  private flush(): void {
    this.scheduled = false;
    const batch = this.batch;
    if (batch.length === 0) return;
    this.batch = [];
    // One createJobs for the batch, committed together with whatever else is written this turn.
    this.committer
      .run(() =>
        this.store.createJobs(
          batch.map((b) => b.job),
          this.clock.now(),
          this.maxQueued,
        ),
      )
      .then(
        (out) => batch.forEach((b, i) => b.resolve(out[i]!)),
        (err: unknown) => {
          for (const b of batch) b.reject(err);
        },
      );
  }
}
