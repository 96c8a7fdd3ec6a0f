import { setMaxListeners } from 'node:events';
import type { BlockList } from 'node:net';
import { Agent } from 'undici';
import type { Logger } from 'pino';
import type { Clock } from '../domain.js';
import type { ClaimedDelivery, DeliveryOutcome, QueueDriver } from '../queue/driver.js';
import { backoffDelay, Loop } from '../loop.js';
import { retryStorage } from '../retry-storage.js';
import { discardBody } from '../body.js';
import { buildEvent, type ArtifactUrlOf } from './payload.js';
import { Signer } from './signing.js';
import { guardedConnector } from './ssrf.js';

export interface DispatcherOptions {
  concurrency: number;
  /** At most this many attempts in flight to one receiver origin, so a dead receiver cannot take every slot. */
  perOriginConcurrency: number;
  timeoutMs: number;
  backoffBaseMs: number;
  backoffMaxMs: number;
  /** A receiver's `Retry-After` is honoured up to this, whatever the backoff maximum. */
  retryAfterMaxMs: number;
  maxAttempts: number;
  blockPrivate: boolean;
  /** Ranges allowed despite `blockPrivate` (FOREMAN_WEBHOOK_ALLOW_NETS). */
  allow: BlockList;
  /** Foreman's own listening address: never a webhook target. */
  self: () => { address: string; port: number } | null;
  inlineArtifactMaxBytes: number;
  secrets: string[];
  userAgent: string;
  pollIntervalMs: number;
  /** Artifact URLs for `done` events (read at send time: the public URL is known once the server listens). */
  artifactUrl: ArtifactUrlOf;
}

export interface DispatcherDeps {
  /** Each attempt's outcome, and for a delivered one the time since its state change (metrics). */
  onOutcome?: (outcome: 'delivered' | 'retried' | 'failed' | 'gone', latencySeconds: number | null) => void;
  driver: QueueDriver;
  clock: Clock;
  logger: Logger;
  options: DispatcherOptions;
  random?: () => number;
}

/** What one attempt came to, before it is turned into a `DeliveryOutcome`. */
type Attempt =
  | { kind: 'delivered'; status: number }
  | { kind: 'gone'; status: number }
  | { kind: 'retry'; status: number | null; error: string; retryAfterMs?: number };

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
 * The outbox dispatcher: a loop separate from the worker that claims due deliveries from the
 * driver (head of each job's line, per-origin cap), sends them concurrently with a per-attempt
 * timeout, and records each attempt. Nothing here touches a job's state.
 */
export class Dispatcher {
  private readonly agent: Agent;
  private readonly signer: Signer;
  private readonly inflight = new Set<Promise<void>>();
  private readonly stopCtl = new AbortController();
  private readonly loop: Loop;
  private readonly random: () => number;
  private readonly unsubscribe: (() => void)[];
  /** Rows the driver claimed for this dispatcher as transitions wrote them (ADR-0017), not yet sent. */
  private readonly held: number[] = [];
  /**
   * Deliveries whose outcome is being recorded again after storage failed. A shared driver's claim
   * may hand one back once its lease has run out (its claimer, this instance, is recorded in the
   * row): it is not sent again before its outcome is stored (ADR-0007), and its claim is left to
   * run out.
   */
  private readonly recording = new Set<number>();
  private detach: (() => void) | null = null;
  /**
   * Whether the next tick runs the claim: a row became due unclaimed, the last claim was cut short
   * by room, or an origin was at its cap when an attempt ended. Otherwise a wake-up (an attempt
   * that ended, rows claimed on write) costs no statement.
   */
  private claimWanted = true;
  /** The last claim found an origin at its cap (or could not tell): each attempt's end claims again. */
  private capped = true;
  /** When to claim again (a head falls due, or the poll interval), whatever else happens. */
  private claimAt = 0;

  constructor(private readonly deps: DispatcherDeps) {
    const o = deps.options;
    // Every attempt in flight (and every outcome being recorded) listens to the stop signal until
    // it ends: up to a few per concurrent attempt, each removed afterwards; not a leak.
    setMaxListeners(Math.max(64, o.concurrency * 4), this.stopCtl.signal);
    this.random = deps.random ?? Math.random;
    this.signer = new Signer(o.secrets);
    this.agent = new Agent({
      connect: guardedConnector({ blockPrivate: o.blockPrivate, allow: o.allow, self: o.self, timeoutMs: o.timeoutMs }),
      headersTimeout: o.timeoutMs,
      bodyTimeout: o.timeoutMs,
      keepAliveTimeout: 4_000,
    });
    this.loop = new Loop('webhook dispatcher', () => this.tick(), deps.logger, o.pollIntervalMs);
    const { notifier } = deps.driver;
    this.unsubscribe = [
      notifier.on('deliveryReady', () => {
        this.claimWanted = true;
        this.loop.wake.notify();
      }),
      notifier.on('deliveriesClaimed', (ids) => {
        this.held.push(...ids);
        this.loop.wake.notify();
      }),
    ];
  }

  start(): void {
    const { driver, options } = this.deps;
    // Rows written claimed for this dispatcher only while it has room for them (ADR-0017).
    this.detach =
      driver.deliveriesClaimOnWrite?.({
        perOriginLimit: options.perOriginConcurrency,
        want: () => !this.loop.stopped && this.inflight.size + this.held.length < options.concurrency,
      }) ?? null;
    this.loop.start();
  }

  private async tick(): Promise<number> {
    const { driver, clock, options } = this.deps;
    let free = options.concurrency - this.inflight.size;
    if (free <= 0) return options.pollIntervalMs; // woken when an attempt ends
    if (this.held.length > 0 && driver.deliveriesClaimed) {
      // Rows claimed on write: their sends, read in one statement (no commit).
      const ids = this.held.splice(0, free);
      let sends: ClaimedDelivery[];
      try {
        sends = await driver.deliveriesClaimed({ ids, now: clock.now(), inlineMax: options.inlineArtifactMaxBytes });
      } catch (err) {
        this.held.unshift(...ids);
        throw err;
      }
      for (const d of sends) this.launch(d);
      // One not sendable any more (its lease nearly over, or recorded elsewhere) is the ordinary claim's.
      if (sends.length < ids.length) this.claimWanted = true;
      free -= sends.length;
      if (free <= 0) return options.pollIntervalMs; // woken when an attempt ends
    }
    const now = clock.now();
    if (!this.claimWanted && now < this.claimAt) return this.claimAt - now;
    this.claimWanted = false;
    // One step: the claim, and when the first head not claimed now falls due.
    const { deliveries, nextDueAt: next, capped } = await driver.deliveriesClaim({
      now,
      limit: free,
      perOriginLimit: options.perOriginConcurrency,
      inlineMax: options.inlineArtifactMaxBytes,
    }).catch((err: unknown) => {
      this.claimWanted = true;
      throw err;
    });
    this.capped = capped ?? true;
    for (const d of deliveries) this.launch(d);
    if (deliveries.length === free) {
      this.claimWanted = true;
      return 0;
    }
    const delay = next === null ? options.pollIntervalMs : Math.min(options.pollIntervalMs, Math.max(0, next - clock.now()));
    this.claimAt = clock.now() + delay;
    return delay;
  }

  private launch(d: ClaimedDelivery): void {
    if (this.recording.has(d.id)) return;
    const p: Promise<void> = this.deliver(d)
      .catch((err: unknown) => this.deps.logger.error({ err, job_id: d.jobId }, 'webhook delivery crashed'))
      .finally(() => {
        this.inflight.delete(p);
        // Its origin's room (and a slot) is free: worth a claim only if something waited for it.
        if (this.capped) this.claimWanted = true;
        this.loop.wake.notify();
      });
    this.inflight.add(p);
  }

  /** Sends `first`, then, while each is acknowledged, the same job's next due event (ADR-0010). */
  private async deliver(first: ClaimedDelivery): Promise<void> {
    const records: Promise<void>[] = [];
    let d: ClaimedDelivery | null = first;
    try {
      while (d && !this.recording.has(d.id)) {
        const step: { next: ClaimedDelivery | null; recorded: Promise<void> } = await this.deliverOne(d);
        records.push(step.recorded);
        d = step.next;
      }
    } catch (err) {
      // A bug, not the receiver: let the row go, so it is claimed again later.
      if (d) await this.deps.driver.deliveryRelease({ id: d.id });
      throw err;
    } finally {
      await Promise.all(records);
    }
  }

  /** One attempt; its outcome's record runs on in `recorded`. */
  private async deliverOne(d: ClaimedDelivery): Promise<{ next: ClaimedDelivery | null; recorded: Promise<void> }> {
    const { driver, clock, logger, options } = this.deps;
    const event = buildEvent(d, options.artifactUrl, options.inlineArtifactMaxBytes);
    const body = Buffer.from(JSON.stringify(event), 'utf8');
    const attempt = await this.attempt(event.event_id, body, d.url);
    if (this.stopCtl.signal.aborted && attempt.kind === 'retry') {
      // Cut short by shutdown: not the receiver's fault; it stays due and is sent after restart.
      return { next: null, recorded: driver.deliveryRelease({ id: d.id }) };
    }
    const now = clock.now();
    const attempts = d.attempts + 1;
    const log = logger.child({ job_id: d.jobId, event_id: event.event_id, attempts });
    const outcome = this.outcomeOf(attempt, attempts, now);
    if (outcome.kind === 'delivered' && driver.deliveryRecordClaimNext && !this.stopCtl.signal.aborted) {
      // One step: the record and the claim of the job's next event (its send follows at once).
      try {
        const { next } = await driver.deliveryRecordClaimNext({ id: d.id, now, status: outcome.status, inlineMax: options.inlineArtifactMaxBytes });
        this.deps.onOutcome?.('delivered', (now - d.occurredAt) / 1000);
        this.logOutcome(log, outcome, now);
        return { next, recorded: Promise.resolve() };
      } catch (err) {
        log.error({ err }, 'could not record the webhook attempt; retrying');
        // Below: the record with retries, and the next event's claim on its own.
      }
    }
    // Recording can fail (disk full, locked): keep the delivery held, with backoff, until the
    // outcome is stored. Never send it again meanwhile (ADR-0007).
    const recorded = retryStorage(() => driver.deliveryRecord({ id: d.id, now, outcome }), {
      signal: this.stopCtl.signal,
      maxWaitMs: 30_000,
      onRetry: (err, wait) => {
        this.recording.add(d.id);
        log.error({ err, retry_in_ms: wait }, 'could not record the webhook attempt; retrying');
      },
    })
      .finally(() => this.recording.delete(d.id))
      .then(
        () => {
          this.deps.onOutcome?.(outcome.kind === 'retry' ? 'retried' : outcome.kind, outcome.kind === 'delivered' ? (now - d.occurredAt) / 1000 : null);
          this.logOutcome(log, outcome, now);
        },
        (err: unknown) => {
          // Shutting down with storage still failing: the attempt stays pending and is sent again after restart.
          log.error({ err }, 'could not record the webhook attempt');
          return driver.deliveryRelease({ id: d.id });
        },
      );
    // Acknowledged: the job's next event can go now, while the record commits.
    const next =
      outcome.kind === 'delivered' && !this.stopCtl.signal.aborted
        ? await driver.deliveryClaimNext({ afterId: d.id, now: clock.now(), inlineMax: options.inlineArtifactMaxBytes }).catch((err: unknown) => {
            log.error({ err }, "could not claim the job's next event; it is sent in turn");
            return null;
          })
        : null;
    return { next, recorded };
  }

  private logOutcome(log: Logger, outcome: DeliveryOutcome, now: number): void {
    switch (outcome.kind) {
      case 'delivered':
        log.debug({ status: outcome.status }, 'webhook delivered');
        break;
      case 'gone':
        log.warn({ status: 410 }, "webhook receiver answered 410 Gone; giving up on this job's webhook");
        break;
      case 'failed':
        log.warn({ status: outcome.status, last_error: outcome.error }, 'webhook delivery failed after the last attempt');
        break;
      case 'retry':
        log.info({ status: outcome.status, last_error: outcome.error, retry_in_ms: outcome.at - now }, 'webhook attempt failed; will retry');
    }
  }

  private outcomeOf(a: Attempt, attempts: number, now: number): DeliveryOutcome {
    const { options } = this.deps;
    if (a.kind === 'delivered') return a;
    if (a.kind === 'gone') return { kind: 'gone', status: a.status, error: 'receiver answered 410 Gone; no further events for this job' };
    if (attempts >= options.maxAttempts) return { kind: 'failed', status: a.status, error: a.error };
    // The receiver's own Retry-After is honoured as given (up to its own cap), not cut to the backoff maximum.
    const delay =
      a.retryAfterMs !== undefined
        ? Math.min(a.retryAfterMs, options.retryAfterMaxMs)
        : backoffDelay(options.backoffBaseMs, options.backoffMaxMs, attempts, this.random);
    return { kind: 'retry', at: now + delay, status: a.status, error: a.error };
  }

  private async attempt(eventId: string, body: Buffer, url: string): Promise<Attempt> {
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
    this.detach?.();
    await this.loop.stop();
    for (const off of this.unsubscribe) off();
    // Rows claimed on write and never sent: given back, so they are due again at once.
    for (const id of this.held.splice(0)) await this.deps.driver.deliveryRelease({ id }).catch(() => {});
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
