/**
 * The page's one poller of GET /metrics (every 2 s, whichever view is open), shared by the
 * overview, engines and receivers views. It also keeps the last hour of the counters the charts
 * need, one point per 10 s: /metrics has no history, so the charts start when the page opens.
 */
import { useEffect, useState } from 'preact/hooks';
import { getText } from './api';
import { Metrics } from './prom';

export const POLL_MS = 2000;
export const BUCKET_S = 10;
export const HISTORY_S = 3600;

export interface Point {
  /** Seconds since the epoch (the end of the bucket's last scrape). */
  t: number;
  done: number;
  failed: number;
  canceled: number;
  waitSum: number;
  waitCount: number;
  queued: number;
  running: number;
}

interface State {
  metrics: Metrics | null;
  error: Error | null;
  at: number;
  history: Point[];
}

let state: State = { metrics: null, error: null, at: 0, history: [] };
const listeners = new Set<() => void>();
let started = false;

function point(m: Metrics, t: number): Point {
  const fin = m.sumBy('foreman_jobs_finished_total', 'state');
  const active = m.sumBy('foreman_jobs', 'state');
  return {
    t,
    done: fin.get('done') ?? 0,
    failed: fin.get('failed') ?? 0,
    canceled: fin.get('canceled') ?? 0,
    waitSum: m.sum('foreman_job_queue_wait_seconds_sum'),
    waitCount: m.sum('foreman_job_queue_wait_seconds_count'),
    queued: active.get('queued') ?? 0,
    running: (active.get('loading') ?? 0) + (active.get('working') ?? 0),
  };
}

async function tick(): Promise<void> {
  try {
    const m = new Metrics(await getText('/metrics'));
    const now = Date.now() / 1000;
    const p = point(m, now);
    const history = state.history.filter((h) => h.t > now - HISTORY_S);
    const last = history[history.length - 1];
    // One point per bucket: the latest scrape in it.
    if (last && Math.floor(last.t / BUCKET_S) === Math.floor(now / BUCKET_S)) history[history.length - 1] = p;
    else history.push(p);
    state = { metrics: m, error: null, at: Date.now(), history };
  } catch (err) {
    state = { ...state, error: err instanceof Error ? err : new Error(String(err)) };
  }
  for (const l of listeners) l();
}

function start(): void {
  if (started) return;
  started = true;
  const loop = async () => {
    await tick();
    setTimeout(() => void loop(), POLL_MS);
  };
  void loop();
}

export function useMetrics(): State {
  const [, setN] = useState(0);
  useEffect(() => {
    start();
    const l = () => setN((n) => n + 1);
    listeners.add(l);
    return () => void listeners.delete(l);
  }, []);
  return state;
}

/** Rates between consecutive points: jobs finished per minute and the mean queue wait. */
export function series(history: Point[]): { t: number[]; done: (number | null)[]; failed: (number | null)[]; wait: (number | null)[]; queued: number[] } {
  const out = { t: [] as number[], done: [] as (number | null)[], failed: [] as (number | null)[], wait: [] as (number | null)[], queued: [] as number[] };
  for (let i = 1; i < history.length; i++) {
    const a = history[i - 1]!;
    const b = history[i]!;
    const dt = b.t - a.t;
    if (dt <= 0) continue;
    // A counter that went down means the server restarted: no rate for that step.
    const reset = b.done < a.done || b.failed < a.failed || b.waitCount < a.waitCount;
    out.t.push(b.t);
    out.done.push(reset ? null : ((b.done - a.done) / dt) * 60);
    out.failed.push(reset ? null : ((b.failed - a.failed) / dt) * 60);
    const n = b.waitCount - a.waitCount;
    out.wait.push(reset || n <= 0 ? null : (b.waitSum - a.waitSum) / n);
    out.queued.push(b.queued);
  }
  return out;
}
