import type { Database } from 'better-sqlite3';
import type { Harness } from './harness.js';
import type { SqliteDriver } from '../../src/queue/sqlite/driver.js';
import { PostgresDriver } from '../../src/queue/postgres/driver.js';

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

/** The service's SQLite database, for tests that look at or interfere with storage directly. */
export function sqlite(h: Harness): Database {
  return (h.service.driver as SqliteDriver).db;
}

/** Rows in the jobs table, read straight from the service's database (either driver). */
export async function jobCount(h: Harness): Promise<number> {
  const d = h.service.driver;
  if (d instanceof PostgresDriver) return Number((await d.pool.query<{ n: string }>('select count(*) AS n from jobs')).rows[0]!.n);
  return (sqlite(h).prepare('select count(*) n from jobs').get() as { n: number }).n;
}

/** Rows in a table (a fixed name, never user input), read straight from the service's database (either driver). */
export async function rowCount(h: Harness, table: 'files' | 'file_lines' | 'batches' | 'jobs'): Promise<number> {
  const d = h.service.driver;
  if (d instanceof PostgresDriver) return Number((await d.pool.query<{ n: string }>(`SELECT count(*) AS n FROM ${table}`)).rows[0]!.n);
  return sqlite(h).prepare(`SELECT count(*) FROM ${table}`).pluck().get() as number;
}

/** The stored moving average of a model's run time (either driver). */
export async function modelAvgMs(h: Harness, model: string): Promise<number | undefined> {
  const d = h.service.driver;
  if (d instanceof PostgresDriver) return (await d.pool.query<{ avg_ms: number }>('SELECT avg_ms FROM model_stats WHERE model = $1', [model])).rows[0]?.avg_ms;
  return sqlite(h).prepare('SELECT avg_ms FROM model_stats WHERE model = ?').pluck().get(model) as number | undefined;
}

/** A job's state and its deliveries' statuses, read synchronously (for polling predicates). */
export function storedJob(h: Harness, id: string): { state: string; deliveries: { status: string }[] } | null {
  const db = sqlite(h);
  const j = db.prepare('SELECT seq, state FROM jobs WHERE id = ?').get(id) as { seq: number; state: string } | undefined;
  if (!j) return null;
  const deliveries = db.prepare('SELECT status FROM webhook_deliveries WHERE job_seq = ? ORDER BY sequence, id').all(j.seq) as { status: string }[];
  return { state: j.state, deliveries };
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
