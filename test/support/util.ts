import type { Harness } from './harness.js';

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export const terminal = ['done', 'failed'];

/** Polls `fn` until it returns a truthy value; throws with `what` after `timeoutMs`. */
export async function until<T>(what: string, fn: () => Promise<T | undefined | null | false>, timeoutMs = 5_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    const v = await fn();
    if (v) return v;
    await sleep(5);
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** Rows in the jobs table, read straight from the service's database. */
export function jobCount(h: Harness): number {
  return (h.service.db.prepare('select count(*) n from jobs').get() as { n: number }).n;
}

/** Polls GET /jobs/:id until pred holds. */
export async function pollJob(h: Harness, id: string, pred: (j: any) => boolean, what: string, timeoutMs = 10_000): Promise<any> {
  const end = Date.now() + timeoutMs;
  let last: any;
  while (Date.now() < end) {
    const r = await h.api(`/jobs/${id}`);
    last = r.body;
    if (r.status === 200 && pred(last)) return last;
    await sleep(10);
  }
  throw new Error(`job ${id}: ${what} not reached in ${timeoutMs}ms; last: ${JSON.stringify(last)}`);
}

/** Waits until the job is terminal and none of its deliveries is pending. */
export const settled = (h: Harness, id: string, timeoutMs?: number) =>
  pollJob(
    h,
    id,
    (j) =>
      (j.state === 'done' || j.state === 'failed') &&
      j.webhook !== null &&
      j.webhook.deliveries.length > 0 &&
      j.webhook.deliveries.every((d: any) => d.status !== 'pending'),
    'terminal with no pending delivery',
    timeoutMs,
  );
