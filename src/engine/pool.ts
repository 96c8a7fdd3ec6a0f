import type { Logger } from 'pino';
import type { EngineSpec } from '../config.js';
import { loadKey, type Clock } from '../domain.js';
import { Loop } from '../loop.js';
import type { ClaimHost, EngineView, ModelEntry } from '../queue/driver.js';
import { EngineError, type ChatEngine, type EngineStatus } from './engine.js';
import type { EngineHealth } from './health.js';

/** Consecutive failed probes or unreachable requests that open a host's circuit. */
const FAILS_TO_OPEN = 2;
/** The longest a host's circuit stays open before a half-open probe. */
const MAX_OPEN_MS = 60_000;

/** 'llama3.2' and 'llama3.2:latest' are one model to Ollama. */
export function modelNames(name: string): string[] {
  const tail = name.slice(name.lastIndexOf('/') + 1);
  if (!tail.includes(':')) return [name, `${name}:latest`];
  return name.endsWith(':latest') ? [name, name.slice(0, -':latest'.length)] : [name];
}

/** A model entry's name (`name`, else `model`: some servers send one of them). */
export const modelKey = (m: ModelEntry): string => String(m.name ?? m.model);

/** Model entries in name order. */
export const byModel = (a: ModelEntry, b: ModelEntry): number => (modelKey(a) < modelKey(b) ? -1 : modelKey(a) > modelKey(b) ? 1 : 0);

/** Model lists merged by name, the first list's entry winning. */
export function mergeModels(lists: ModelEntry[][]): ModelEntry[] {
  const seen = new Map<string, ModelEntry>();
  for (const list of lists) for (const m of list) if (!seen.has(modelKey(m))) seen.set(modelKey(m), m);
  return [...seen.values()];
}

/** One Ollama host of the pool: its clients, slots, health, and what it has installed and loaded. */
export class EngineHost {
  inUse = 0;
  jobsRun = 0;
  /** Loads of a model that was not resident (the thrash figure). */
  loads = 0;
  /** null until the first probe answers or fails. */
  up: boolean | null = null;
  circuit: 'closed' | 'open' | 'half_open' = 'closed';
  failures = 0;
  /** While open: when the half-open probe may go. */
  retryAt = 0;
  lastError: string | null = null;
  version: string | null = null;
  /** Installed models (every name a job may use), from /api/tags. */
  installed = new Set<string>();
  /** /api/tags entries, as the host sent them (for the merged /api/tags). */
  tags: ModelEntry[] = [];
  /** /api/ps entries. */
  ps: ModelEntry[] = [];
  /** Resident model → when last used (ms). */
  resident = new Map<string, number>();
  /** Resident model → the `num_ctx` it was last loaded with by a job here (null: the default). */
  ctxOf = new Map<string, number | null>();
  /** Measured load time per model (moving average, ms). */
  loadMs = new Map<string, number>();
  /** Loads per model. */
  loadCount = new Map<string, number>();

  constructor(
    readonly spec: EngineSpec,
    /** The worker's client. */
    readonly engine: ChatEngine,
    /** Probes and pass-through reads: connections of their own. */
    readonly reader: ChatEngine,
  ) {}

  get name(): string {
    return this.spec.name;
  }

  get free(): number {
    return this.spec.slots - this.inUse;
  }

  /** Takes jobs: answered its last probe and its circuit is closed. */
  get usable(): boolean {
    return this.up === true && this.circuit === 'closed';
  }

  /**
   * Whether the host lists its models. One whose `/api/tags` is empty (an Ollama-compatible
   * server that does not list them) is offered every model; its own 404 then decides.
   */
  get listsModels(): boolean {
    return this.installed.size > 0;
  }

  /** Whether a job for `model` may go to this host. */
  mayRun(model: string): boolean {
    return !this.listsModels || modelNames(model).some((n) => this.installed.has(n));
  }

  isResident(model: string): boolean {
    return modelNames(model).some((n) => this.resident.has(n));
  }
}

export interface PoolOptions {
  healthIntervalMs: number;
  affinityMaxWaitMs: number;
}

export interface PoolHooks {
  /** A model that was not resident was loaded (metrics). */
  onLoad?: (engine: string, model: string, seconds: number) => void;
}

/**
 * The engine pool (ADR-0012): every host's health (a probe each interval, a circuit that opens
 * after consecutive connection failures and half-opens after a backoff), installed models
 * (/api/tags), resident models (/api/ps and the jobs' own loads), load times and slots. The
 * worker asks it which hosts have free slots and what a claim for each should know; the queue
 * driver's claim applies the scheduling policy.
 */
export class EnginePool {
  readonly hosts: EngineHost[];
  private readonly loop: Loop;

  constructor(
    hosts: { spec: EngineSpec; engine: ChatEngine; reader: ChatEngine }[],
    private readonly health: EngineHealth,
    private readonly clock: Clock,
    private readonly logger: Logger,
    readonly options: PoolOptions,
    readonly hooks: PoolHooks = {},
  ) {
    this.hosts = hosts.map((h) => new EngineHost(h.spec, h.engine, h.reader));
    this.loop = new Loop('engine health', () => this.tick(), logger, options.healthIntervalMs);
  }

  /** Probes every host once (start-up), then keeps probing each interval. */
  async start(): Promise<void> {
    await this.probeAll();
    this.loop.start();
  }

  async stop(): Promise<void> {
    await this.loop.stop();
    for (const h of this.hosts) {
      await h.engine.close();
      if (h.reader !== h.engine) await h.reader.close();
    }
  }

  private async tick(): Promise<number> {
    await this.probeAll();
    const now = this.clock.now();
    // Wake for the earliest half-open probe if it comes before the next interval.
    const next = Math.min(...this.hosts.filter((h) => h.circuit === 'open').map((h) => h.retryAt - now), this.options.healthIntervalMs);
    return Math.max(10, next);
  }

  private probedAt = 0;
  private probing: Promise<void> | null = null;

  /** Probes now unless the last round is younger than `ms` (readiness: fresh, but not per request). */
  async refreshIfOlder(ms: number): Promise<void> {
    if (this.clock.now() - this.probedAt < ms) return;
    this.probing ??= this.probeAll().finally(() => (this.probing = null));
    await this.probing;
  }

  /** Probes every host that may be probed now (closed, or open with its backoff over). */
  async probeAll(): Promise<void> {
    const now = this.clock.now();
    this.probedAt = now;
    await Promise.all(this.hosts.filter((h) => h.circuit !== 'open' || h.retryAt <= now).map((h) => this.probe(h)));
    this.updateHealth();
  }

  /** One probe: /api/tags and /api/ps (and /api/version). */
  async probe(h: EngineHost): Promise<void> {
    if (h.circuit === 'open') h.circuit = 'half_open';
    try {
      const [tags, ps, version] = await Promise.all([h.reader.passthrough('/api/tags'), h.reader.passthrough('/api/ps'), h.reader.passthrough('/api/version')]);
      if (tags.status !== 200) throw new Error(`/api/tags answered ${tags.status}`);
      const models = (JSON.parse(tags.body.toString('utf8')) as { models?: ModelEntry[] }).models ?? [];
      h.tags = models;
      h.installed = new Set(models.flatMap((m) => modelNames(String(m.name ?? m.model ?? ''))).filter((n) => n !== ''));
      if (ps.status === 200) this.setResident(h, (JSON.parse(ps.body.toString('utf8')) as { models?: ModelEntry[] }).models ?? []);
      if (version.status === 200) h.version = (JSON.parse(version.body.toString('utf8')) as { version?: string }).version ?? null;
      const wasUp = h.up;
      h.up = true;
      h.failures = 0;
      h.lastError = null;
      if (h.circuit !== 'closed') this.logger.info({ engine: h.name }, 'engine host answers again; circuit closed');
      h.circuit = 'closed';
      if (wasUp !== true) this.updateHealth();
    } catch (err) {
      this.failed(h, (err as Error).message);
    }
  }

  /** What `/api/ps` lists is resident; `loaded`, a model whose load just answered, stays so whatever the list says. */
  private setResident(h: EngineHost, models: ModelEntry[], loaded?: string): void {
    const now = this.clock.now();
    const next = new Map<string, number>();
    for (const m of models) for (const n of modelNames(String(m.name ?? m.model ?? ''))) next.set(n, h.resident.get(n) ?? now);
    if (loaded !== undefined) for (const n of modelNames(loaded)) next.set(n, h.resident.get(n) ?? now);
    h.resident = next;
    for (const n of [...h.ctxOf.keys()]) if (!next.has(n)) h.ctxOf.delete(n);
    h.ps = models;
  }

  /** A connection to the host failed (a probe, or a job's request): count it; open the circuit. */
  failed(h: EngineHost, error: string): void {
    h.failures++;
    h.lastError = error;
    const wasUsable = h.usable;
    if (h.circuit === 'half_open' || h.failures >= FAILS_TO_OPEN || h.up !== true) {
      h.up = false;
      h.circuit = 'open';
      const backoff = Math.min(MAX_OPEN_MS, this.options.healthIntervalMs * 2 ** Math.min(10, Math.max(0, h.failures - FAILS_TO_OPEN)));
      h.retryAt = this.clock.now() + backoff;
      if (wasUsable) this.logger.warn({ engine: h.name, error, retry_in_ms: backoff }, 'engine host unreachable; circuit open');
      this.loop.wake.notify();
    }
    this.updateHealth();
  }

  /** A job's request could not reach the host: no new job goes there until a probe succeeds. */
  unreachable(h: EngineHost, error: string): void {
    h.failures = Math.max(h.failures, FAILS_TO_OPEN - 1);
    this.failed(h, error);
  }

  /** The pool is up while any host is; the worker and the outage policy follow EngineHealth. */
  private updateHealth(): void {
    if (this.hosts.some((h) => h.usable)) this.health.markUp();
    else if (this.hosts.every((h) => h.up === false)) this.health.markDown(this.clock.now());
    this.viewMayHaveChanged();
  }

  private readonly viewListeners = new Set<() => void>();
  private lastView = '';

  /**
   * What this instance's hosts can run, as the other instances' leader reads it (ADR-0011,
   * "Engine hosts per instance"): whether all answer, since when none does, and what they have
   * installed as last probed (a host not probed yet lists nothing: it may have any model).
   */
  view(): EngineView {
    return {
      allUp: this.allUp,
      downSince: this.health.downSince,
      anyModel: this.hosts.some((h) => !h.listsModels),
      models: [...new Set(this.hosts.flatMap((h) => [...h.installed]))].sort(),
      hosts: this.hosts.map((h) => ({ name: h.name, slots: h.spec.slots })),
      // By name: hosts may list models in any order (Ollama's list is a map's, sorted by a time in seconds).
      tags: this.tags().models.sort(byModel),
    };
  }

  /** `fn` runs after `view()` changed. Returns a function that removes it. */
  onViewChange(fn: () => void): () => void {
    this.viewListeners.add(fn);
    return () => this.viewListeners.delete(fn);
  }

  private viewMayHaveChanged(): void {
    if (this.viewListeners.size === 0) return;
    const v = JSON.stringify(this.view());
    if (v === this.lastView) return;
    this.lastView = v;
    for (const fn of this.viewListeners) fn();
  }

  /** Every host answered its last probe: a model none of them has can fail at once. */
  get allUp(): boolean {
    return this.hosts.every((h) => h.usable);
  }

  /** Models installed on some usable host. */
  installedAnywhere(model: string): boolean {
    return this.hosts.some((h) => h.usable && h.mayRun(model));
  }

  /** Usable hosts with a free slot, the emptiest first. */
  withFreeSlots(): EngineHost[] {
    return this.hosts.filter((h) => h.usable && h.free > 0).sort((a, b) => b.free / b.spec.slots - a.free / a.spec.slots);
  }

  /** What a claim for this host passes to the driver. */
  claimContext(h: EngineHost): ClaimHost {
    const loadMs: Record<string, number> = {};
    for (const [m, ms] of h.loadMs) for (const n of modelNames(m)) loadMs[n] = ms;
    return {
      name: h.name,
      models: [...h.installed],
      anyModel: !h.listsModels,
      resident: [...h.resident.keys()].map((n) => loadKey(n, h.ctxOf.get(n) ?? null)),
      loadMs,
      affinityMaxWaitMs: this.options.affinityMaxWaitMs,
      slots: h.spec.slots,
    };
  }

  /** The worker ran a job's loading step on `h`: was it a swap, and how long did it take. */
  loaded(h: EngineHost, model: string, ms: number, numCtx: unknown = null): void {
    const ctx = typeof numCtx === 'number' ? numCtx : null;
    // Another context size is another load to Ollama (ADR-0012).
    const wasResident = h.isResident(model) && (h.ctxOf.get(model) ?? null) === ctx;
    const now = this.clock.now();
    for (const n of modelNames(model)) {
      h.resident.set(n, now);
      h.ctxOf.set(n, ctx);
    }
    if (wasResident) return;
    h.loads++;
    this.hooks.onLoad?.(h.name, model, ms / 1000);
    h.loadCount.set(model, (h.loadCount.get(model) ?? 0) + 1);
    const prev = h.loadMs.get(model);
    h.loadMs.set(model, prev === undefined ? ms : prev + 0.3 * (ms - prev));
    // The host may have evicted another model to make room: learn which from /api/ps. The model
    // just loaded stays resident even when the list lacks it: its load answered, and an
    // Ollama-compatible server that lists nothing there (or a list that lags) would otherwise
    // make every later job of the model count as a load and look up the load-cost step's figures.
    void h.reader.passthrough('/api/ps').then(
      (ps) => {
        if (ps.status === 200) this.setResident(h, (JSON.parse(ps.body.toString('utf8')) as { models?: ModelEntry[] }).models ?? [], model);
      },
      () => undefined,
    );
  }

  /** Any host up (the outage policy's probe): probes them all now. */
  async status(): Promise<EngineStatus> {
    await Promise.all(this.hosts.map((h) => this.probe(h)));
    this.updateHealth();
    const up = this.hosts.find((h) => h.usable);
    return up ? { up: true, version: up.version ?? undefined } : { up: false, error: this.hosts.map((h) => `${h.name}: ${h.lastError ?? 'down'}`).join('; ') };
  }

  /**
   * A direct load (`/api/chat` with no messages): on a usable host that has the model, one where
   * it is resident first. No host has it (all up): model_not_found; none usable: unreachable.
   */
  async load(model: string, opts: { keepAlive?: unknown; signal: AbortSignal }): Promise<void> {
    const hosts = this.hosts.filter((h) => h.usable && h.mayRun(model));
    const h = hosts.find((x) => x.isResident(model)) ?? hosts.sort((a, b) => b.free - a.free)[0];
    if (!h) {
      if (this.hosts.some((x) => x.usable)) throw new EngineError('permanent', 'model_not_found', `model '${model}' not found`, 404);
      throw new EngineError('transient', 'engine_unavailable', 'no engine host is reachable', undefined, true);
    }
    const t0 = performance.now();
    await h.reader.load(model, opts);
    this.loaded(h, model, performance.now() - t0);
  }

  /** `/api/tags` of every usable host, merged and deduplicated by name. */
  tags(): { models: ModelEntry[] } {
    return { models: mergeModels(this.hosts.filter((x) => x.usable).map((h) => h.tags)) };
  }

  /** `/api/ps` of every usable host: each resident model with its host. */
  ps(): { models: (ModelEntry & { engine: string })[] } {
    return { models: this.hosts.filter((x) => x.usable).flatMap((h) => h.ps.map((m) => ({ ...m, engine: h.name }))) };
  }

  /** The state of every host (GET /engines, /readyz). */
  describe() {
    return this.hosts.map((h) => ({
      name: h.name,
      url: h.spec.url,
      health: h.up === null ? ('unknown' as const) : h.up ? ('up' as const) : ('down' as const),
      circuit: h.circuit,
      version: h.version,
      last_error: h.lastError,
      slots: h.spec.slots,
      slots_in_use: h.inUse,
      installed_models: [...new Set(h.tags.map((m) => String(m.name)))],
      resident_models: [...new Set(h.ps.map((m) => String(m.name)))],
      load_ms: Object.fromEntries([...h.loadMs].map(([m, ms]) => [m, Math.round(ms * 10) / 10])),
      load_counts: Object.fromEntries(h.loadCount),
      jobs_run: h.jobsRun,
      loads: h.loads,
    }));
  }

  byName(name: string): EngineHost | undefined {
    return this.hosts.find((h) => h.name === name);
  }
}
