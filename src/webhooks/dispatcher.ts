import { Agent } from 'undici';
import type { Logger } from 'pino';
import type { Clock } from '../domain.js';
import type { DueDelivery, Store } from '../store/store.js';
import type { Wake } from '../wake.js';
import { discardBody } from '../body.js';
import { buildEvent } from './payload.js';
import { Signer } from './signing.js';
import { guardedConnector } from './ssrf.js';

export interface DispatcherOptions {
  concurrency: number;
  /** At most this many attempts in flight to one URL, so a dead receiver cannot take every slot. */
  perUrlConcurrency: number;
  timeoutMs: number;
  backoffBaseMs: number;
  backoffMaxMs: number;
  maxAttempts: number;
  blockPrivate: boolean;
  inlineArtifactMaxBytes: number;
  secrets: string[];
  userAgent: string;
  pollIntervalMs: number;
  /** Read at send time: the public URL may only be known once the server listens. */
  publicUrl: () => string;
}

export interface DispatcherDeps {
  store: Store;
  clock: Clock;
  logger: Logger;
  wake: Wake;
  options: DispatcherOptions;
  random?: () => number;
  /** Runs a store write in the current group commit; resolves after it is durable. */
  commit: <T>(op: () => T) => Promise<T>;
}

/** What one attempt came to. */
type Outcome =
  | { kind: 'delivered'; status: number }
  | { kind: 'gone'; status: number }
  | { kind: 'retry'; status: number | null; error: string; retryAfterMs?: number };

/** Exponential backoff with downward jitter: min(max, base·2^(n-1))·[0.8, 1.0], n = attempts so far. */
export function webhookRetryDelay(o: { backoffBaseMs: number; backoffMaxMs: number }, attempts: number, random: () => number): number {
  const d = Math.min(o.backoffMaxMs, o.backoffBaseMs * 2 ** Math.max(0, attempts - 1));
  return Math.round(d * (0.8 + 0.2 * random()));
}

/** `Retry-After` as delta-seconds or an HTTP date; undefined if absent or unreadable. */
export function parseRetryAfter(value: string | string[] | undefined, now: number): number | undefined {
  const v = Array.isArray(value) ? value[0] : value;
  if (v === undefined) return undefined;
  if (/^\s*\d+\s*$/.test(v)) return Number(v) * 1000;
  const t = Date.parse(v);
  return Number.isNaN(t) ? undefined : Math.max(0, t - now);
}

const RESPONSE_BODY_LIMIT = 4096;

/**
 * The outbox dispatcher: a loop separate from the worker that sends due deliveries
 * concurrently, head-of-line per job (a later state waits for the earlier one), with a
 * per-attempt timeout, and records each attempt. Nothing here touches a job's state.
 */
export class Dispatcher {
  private readonly agent: Agent;
  private readonly signer: Signer;
  private readonly inflight = new Set<Promise<void>>();
  private readonly perUrl = new Map<string, number>();
  /** Deliveries with an attempt in flight (single process: memory is the lock). */
  private readonly busyIds = new Set<number>();
  private readonly stopCtl = new AbortController();
  private stopping = false;
  private loop: Promise<void> | null = null;
  private readonly random: () => number;

  constructor(private readonly deps: DispatcherDeps) {
    const o = deps.options;
    this.random = deps.random ?? Math.random;
    this.signer = new Signer(o.secrets);
    this.agent = new Agent({
      connect: guardedConnector({ blockPrivate: o.blockPrivate, timeoutMs: o.timeoutMs }),
      headersTimeout: o.timeoutMs,
      bodyTimeout: o.timeoutMs,
      keepAliveTimeout: 4_000,
    });
  }

  start(): void {
    this.loop ??= this.run();
  }

  private async run(): Promise<void> {
    const { store, clock, logger, wake, options } = this.deps;
    while (!this.stopping) {
      let delay = options.pollIntervalMs;
      try {
        const free = options.concurrency - this.inflight.size;
        if (free > 0) {
          const now = clock.now();
          const saturated = [...this.perUrl].filter(([, n]) => n >= options.perUrlConcurrency).map(([u]) => u);
          const busy = [...this.busyIds];
          const due = store.dueDeliveries(now, free, busy, saturated);
          let launched = 0;
          for (const d of due) {
            // Several rows of one URL may come back in one read: respect its cap here too.
            if ((this.perUrl.get(d.url) ?? 0) >= options.perUrlConcurrency) continue;
            this.launch(d);
            launched++;
          }
          if (launched === free) continue;
          if (launched < due.length) {
            await wake.wait(delay); // woken when an attempt finishes
            continue;
          }
          const next = store.nextDeliveryAt([...this.busyIds]);
          const wait = next === null ? delay : next - clock.now();
          // Something already due that the claim skipped belongs to a busy URL: wait for an attempt to finish.
          if (wait > 0 || saturated.length === 0) delay = Math.min(delay, Math.max(0, wait));
        }
      } catch (err) {
        logger.error({ err }, 'webhook dispatcher: store error; will retry');
      }
      await wake.wait(delay);
    }
  }

  private launch(d: DueDelivery): void {
    this.perUrl.set(d.url, (this.perUrl.get(d.url) ?? 0) + 1);
    this.busyIds.add(d.id);
    const p: Promise<void> = this.deliver(d)
      .catch((err: unknown) => this.deps.logger.error({ err, job_id: d.jobId }, 'webhook delivery crashed'))
      .finally(() => {
        const n = (this.perUrl.get(d.url) ?? 1) - 1;
        if (n === 0) this.perUrl.delete(d.url);
        else this.perUrl.set(d.url, n);
        this.busyIds.delete(d.id);
        this.inflight.delete(p);
        this.deps.wake.notify();
      });
    this.inflight.add(p);
  }

  private async deliver(d: DueDelivery): Promise<void> {
    const { store, clock, logger, options, commit } = this.deps;
    const event = buildEvent(d, d.state === 'done' ? store.artifactsForEvent(d.jobSeq, options.inlineArtifactMaxBytes) : [], options.publicUrl(), options.inlineArtifactMaxBytes);
    const body = Buffer.from(JSON.stringify(event), 'utf8');
    const outcome = await this.attempt(event.event_id, body, d.url);
    if (this.stopping && outcome.kind === 'retry' && this.stopCtl.signal.aborted) return; // stays pending; sent after restart
    const now = clock.now();
    const attempts = d.attempts + 1;
    const log = logger.child({ job_id: d.jobId, event_id: event.event_id, attempts });
    switch (outcome.kind) {
      case 'delivered':
        await commit(() => store.markDelivered(d.id, now, outcome.status));
        log.debug({ status: outcome.status }, 'webhook delivered');
        return;
      case 'gone':
        await commit(() => store.markGone(d.id, d.jobSeq, outcome.status, 'receiver answered 410 Gone; no further events for this job'));
        log.warn({ status: 410 }, 'webhook receiver answered 410 Gone; giving up on this job\'s webhook');
        return;
      case 'retry':
        if (attempts >= options.maxAttempts) {
          await commit(() => store.markDeliveryFailed(d.id, outcome.status, outcome.error));
          log.warn({ status: outcome.status, last_error: outcome.error }, 'webhook delivery failed after the last attempt');
          return;
        }
        {
          const delay =
            outcome.retryAfterMs !== undefined
              ? Math.min(outcome.retryAfterMs, options.backoffMaxMs)
              : webhookRetryDelay(options, attempts, this.random);
          await commit(() => store.markAttemptFailed(d.id, now + delay, outcome.status, outcome.error));
          log.info({ status: outcome.status, last_error: outcome.error, retry_in_ms: delay }, 'webhook attempt failed; will retry');
        }
    }
  }

  private async attempt(eventId: string, body: Buffer, url: string): Promise<Outcome> {
    const { options, clock } = this.deps;
    const timestamp = Math.floor(clock.now() / 1000);
    const headers: Record<string, string> = {
      'content-type': 'application/json',
      'user-agent': options.userAgent,
      'webhook-id': eventId,
      'webhook-timestamp': String(timestamp),
      ...this.signer.headers(eventId, timestamp, body),
    };
    // A per-attempt controller with its own timer. (AbortSignal.any over AbortSignal.timeout can
    // lose the timeout to garbage collection on Node 20: nodejs/node#57736.)
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(new Error('webhook attempt timed out')), options.timeoutMs);
    const onStop = () => ctl.abort(new Error('shutting down'));
    this.stopCtl.signal.addEventListener('abort', onStop, { once: true });
    const signal = ctl.signal;
    try {
      const res = await this.agent.request({
        origin: new URL(url).origin,
        path: pathOf(url),
        method: 'POST',
        headers,
        body,
        signal,
      });
      const status = res.statusCode;
      const len = Number(res.headers['content-length']);
      if (Number.isFinite(len) && len <= RESPONSE_BODY_LIMIT) {
        await res.body.dump({ limit: RESPONSE_BODY_LIMIT, signal }).catch(() => undefined);
      } else {
        discardBody(res.body);
      }
      if (status >= 200 && status < 300) return { kind: 'delivered', status };
      if (status === 410) return { kind: 'gone', status };
      if (status >= 300 && status < 400) {
        return { kind: 'retry', status, error: `HTTP ${status}: redirects are not followed` };
      }
      const retryAfterMs = [429, 502, 503, 504].includes(status)
        ? parseRetryAfter(res.headers['retry-after'], clock.now())
        : undefined;
      return { kind: 'retry', status, error: `HTTP ${status}`, ...(retryAfterMs !== undefined ? { retryAfterMs } : {}) };
    } catch (err) {
      const e = err as Error & { code?: string; cause?: Error };
      const timedOut = (signal.aborted && !this.stopCtl.signal.aborted) || e.code === 'UND_ERR_HEADERS_TIMEOUT' || e.code === 'UND_ERR_BODY_TIMEOUT';
      if (timedOut) return { kind: 'retry', status: null, error: `timed out after ${options.timeoutMs}ms` };
      const msg = [e.code, e.message, e.cause?.message].filter(Boolean).join(': ');
      return { kind: 'retry', status: null, error: msg.slice(0, 500) };
    } finally {
      clearTimeout(timer);
      this.stopCtl.signal.removeEventListener('abort', onStop);
    }
  }

  /** Stops claiming; waits up to graceMs for attempts in flight, then aborts them (they stay pending). */
  async stop(graceMs: number): Promise<void> {
    this.stopping = true;
    this.deps.wake.notify();
    await this.loop;
    const all = Promise.allSettled([...this.inflight]);
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([all, new Promise<void>((r) => (timer = setTimeout(r, graceMs)))]);
    clearTimeout(timer);
    this.stopCtl.abort();
    await all;
    await this.agent.destroy();
  }
}

function pathOf(url: string): string {
  const u = new URL(url);
  return `${u.pathname}${u.search}`;
}
