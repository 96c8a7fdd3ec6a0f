/**
 * Webhook receivers, from the delivery records of recent jobs: GET /jobs (the most recent
 * SCAN_JOBS) and GET /jobs/<id> for each (its `webhook.deliveries`). A job whose deliveries are all
 * settled (delivered or failed) and that is finished cannot change until someone redelivers, so
 * its record is kept and not fetched again.
 */
import { getJson } from './api';
import { isTerminal, type Job, type ListReply } from './types';

export const SCAN_JOBS = 100;
const PARALLEL = 4;

export interface ReceiverRow {
  /** scheme://host[:port]/path of the webhook URL (query values are already redacted by the API). */
  receiver: string;
  jobs: number;
  delivered: number;
  failed: number;
  /** Pending deliveries that have failed at least once (retrying). */
  retrying: number;
  lastError: string | null;
  lastStatus: number | null;
  /** Jobs with failed or retrying deliveries, newest first. */
  failingJobs: string[];
}

const cache = new Map<string, Job>();

function settledJob(j: Job): boolean {
  return isTerminal(j.state) && (j.webhook?.deliveries ?? []).every((d) => d.status !== 'pending');
}

export function receiverOf(url: string): string {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    return url;
  }
}

export async function scanReceivers(signal: AbortSignal): Promise<{ rows: ReceiverRow[]; scanned: number }> {
  const list = await getJson<ListReply>(`/jobs?limit=${SCAN_JOBS}`, signal);
  const ids = list.jobs.map((j) => j.job_id);
  const jobs: (Job | null)[] = new Array(ids.length).fill(null);
  let next = 0;
  const worker = async () => {
    while (next < ids.length) {
      const i = next++;
      const id = ids[i]!;
      const hit = cache.get(id);
      if (hit && settledJob(hit)) {
        jobs[i] = hit;
        continue;
      }
      try {
        const j = await getJson<Job>(`/jobs/${encodeURIComponent(id)}`, signal);
        cache.set(id, j);
        jobs[i] = j;
      } catch (err) {
        if (signal.aborted) throw err;
        /* removed meanwhile (TTL): skip it */
      }
    }
  };
  await Promise.all(Array.from({ length: PARALLEL }, worker));
  const keep = new Set(ids);
  for (const id of cache.keys()) if (!keep.has(id)) cache.delete(id);

  const rows = new Map<string, ReceiverRow>();
  for (const j of jobs) {
    if (!j?.webhook) continue;
    const key = receiverOf(j.webhook.url);
    let r = rows.get(key);
    if (!r) rows.set(key, (r = { receiver: key, jobs: 0, delivered: 0, failed: 0, retrying: 0, lastError: null, lastStatus: null, failingJobs: [] }));
    r.jobs++;
    let failing = false;
    for (const d of j.webhook.deliveries) {
      if (d.status === 'delivered') r.delivered++;
      else if (d.status === 'failed') r.failed++;
      else if (d.attempts > 0) r.retrying++;
      if ((d.status === 'failed' || (d.status === 'pending' && d.attempts > 0)) && d.last_error !== null) {
        failing = true;
        // Jobs come newest first: the first error seen is the most recent job's.
        if (r.lastError === null) {
          r.lastError = d.last_error;
          r.lastStatus = d.last_status_code;
        }
      }
    }
    if (failing) r.failingJobs.push(j.job_id);
  }
  const out = [...rows.values()].sort((a, b) => b.failed + b.retrying - (a.failed + a.retrying) || a.receiver.localeCompare(b.receiver));
  return { rows: out, scanned: ids.length };
}
