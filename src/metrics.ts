import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Clock } from './domain.js';
import type { EngineHealth } from './engine/health.js';
import type { EnginePool } from './engine/pool.js';
import type { QueueDriver, TransitionEvent } from './queue/driver.js';

/** Seconds buckets from 5 ms to about 10 minutes: queue waits, loads and generations all fit. */
const SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600];

/**
 * Prometheus metrics (`GET /metrics`, text format by prom-client). One registry per service, fed
 * by the driver's notifier (job transitions), the dispatcher (delivery outcomes), the HTTP layer
 * and the group commit; queue depth and the outbox backlog are read from the driver at scrape
 * time. Labels are bounded: model, state, error code, route pattern and status, never an id or URL.
 */
export class Metrics {
  readonly registry = new Registry();
  private readonly submitted: Counter<'model'>;
  private readonly finished: Counter<'model' | 'state' | 'code'>;
  private readonly queueWait: Histogram<'model'>;
  private readonly load: Histogram<'model'>;
  private readonly generation: Histogram<'model'>;
  private readonly firstToken: Histogram<'model'>;
  private readonly runTime: Histogram<'model'>;
  private readonly tokens: Counter<'model'>;
  private readonly promptTokens: Counter<'model'>;
  private readonly deliveries: Counter<'outcome'>;
  private readonly deliveryLatency: Histogram;
  private readonly http: Counter<'method' | 'route' | 'status'>;
  private readonly httpDuration: Histogram<'method' | 'route'>;
  private readonly commitSize: Histogram;
  private readonly commitDuration: Histogram;

  private readonly engineLoads: Counter<'engine' | 'model'>;
  private readonly engineLoadSeconds: Counter<'engine' | 'model'>;

  constructor(driver: QueueDriver, health: EngineHealth, clock: Clock, pool?: EnginePool) {
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry });
    this.submitted = new Counter({ name: 'foreman_jobs_submitted_total', help: 'Jobs accepted, by model', labelNames: ['model'], registers });
    this.finished = new Counter({
      name: 'foreman_jobs_finished_total',
      help: 'Jobs that reached done, failed or canceled, by model, state and error code ("" unless failed)',
      labelNames: ['model', 'state', 'code'],
      registers,
    });
    const h = (name: string, help: string) => new Histogram({ name, help, labelNames: ['model'], buckets: SECONDS, registers });
    this.queueWait = h('foreman_job_queue_wait_seconds', 'Submit to start (or to the end, for a job that never started), by model');
    this.load = h('foreman_job_load_seconds', 'The loading step (model load) of finished jobs, by model');
    this.generation = h('foreman_job_generation_seconds', 'Start to finish less the load, of done jobs, by model');
    this.firstToken = h('foreman_job_first_token_seconds', 'Start of generation to the first streamed chunk, by model');
    this.runTime = h('foreman_job_run_seconds', 'Start to finish of finished jobs, by model');
    this.tokens = new Counter({ name: 'foreman_tokens_generated_total', help: "Tokens generated (Ollama's eval_count), by model", labelNames: ['model'], registers });
    this.promptTokens = new Counter({ name: 'foreman_prompt_tokens_total', help: "Prompt tokens (Ollama's prompt_eval_count), by model", labelNames: ['model'], registers });
    new Gauge({
      name: 'foreman_jobs',
      help: 'Queued and running jobs, by state and model',
      labelNames: ['state', 'model'],
      registers,
      async collect() {
        this.reset();
        for (const r of await driver.jobsCountActive()) this.set({ state: r.state, model: r.model }, r.n);
      },
    });
    this.deliveries = new Counter({
      name: 'foreman_webhook_deliveries_total',
      help: 'Webhook attempts by outcome: delivered, retried, failed (gave up), gone (410)',
      labelNames: ['outcome'],
      registers,
    });
    this.deliveryLatency = new Histogram({
      name: 'foreman_webhook_delivery_latency_seconds',
      help: 'State change to the receiver acknowledging its event',
      buckets: SECONDS,
      registers,
    });
    const pending = { count: 0, oldest: null as number | null };
    const refresh = async () => {
      const s = await driver.deliveriesPendingStats();
      pending.count = s.count;
      pending.oldest = s.oldestOccurredAt;
    };
    new Gauge({
      name: 'foreman_webhook_deliveries_pending',
      help: 'Webhook deliveries not yet delivered or given up',
      registers,
      async collect() {
        await refresh();
        this.set(pending.count);
      },
    });
    new Gauge({
      name: 'foreman_webhook_oldest_pending_age_seconds',
      help: 'Age of the oldest pending delivery (0 when none)',
      registers,
      collect() {
        this.set(pending.oldest === null ? 0 : Math.max(0, (clock.now() - pending.oldest) / 1000));
      },
    });
    new Gauge({
      name: 'foreman_engine_up',
      help: 'Whether some engine host is believed reachable (1) or every one is in an outage (0)',
      registers,
      collect() {
        this.set(health.downSince === null ? 1 : 0);
      },
    });
    // Per engine host (ADR-0012): the label set is the configured hosts (and their models).
    const hosts = () => pool?.hosts ?? [];
    new Gauge({
      name: 'foreman_engine_host_up',
      help: 'Whether the engine host answered its last probe and takes jobs (1) or not (0)',
      labelNames: ['engine'],
      registers,
      collect() {
        for (const h of hosts()) this.set({ engine: h.name }, h.usable ? 1 : 0);
      },
    });
    new Gauge({
      name: 'foreman_engine_circuit_state',
      help: "The engine host's circuit: 1 for its current state (closed, open, half_open), 0 for the others",
      labelNames: ['engine', 'state'],
      registers,
      collect() {
        for (const h of hosts()) for (const s of ['closed', 'open', 'half_open']) this.set({ engine: h.name, state: s }, h.circuit === s ? 1 : 0);
      },
    });
    new Gauge({
      name: 'foreman_engine_slots',
      help: 'Jobs the engine host may run at once',
      labelNames: ['engine'],
      registers,
      collect() {
        for (const h of hosts()) this.set({ engine: h.name }, h.spec.slots);
      },
    });
    new Gauge({
      name: 'foreman_engine_slots_in_use',
      help: 'Jobs running on the engine host',
      labelNames: ['engine'],
      registers,
      collect() {
        for (const h of hosts()) this.set({ engine: h.name }, h.inUse);
      },
    });
    new Gauge({
      name: 'foreman_engine_resident_models',
      help: 'Models loaded on the engine host (1 per resident model)',
      labelNames: ['engine', 'model'],
      registers,
      collect() {
        this.reset();
        for (const h of hosts()) for (const m of h.ps) this.set({ engine: h.name, model: String(m.name ?? m.model ?? '') }, 1);
      },
    });
    this.engineLoads = new Counter({
      name: 'foreman_engine_loads_total',
      help: 'Loads of a model that was not resident on the engine host (the thrash figure)',
      labelNames: ['engine', 'model'],
      registers,
    });
    this.engineLoadSeconds = new Counter({
      name: 'foreman_engine_load_seconds_total',
      help: 'Time spent loading models that were not resident, per engine host',
      labelNames: ['engine', 'model'],
      registers,
    });
    this.http = new Counter({ name: 'foreman_http_requests_total', help: 'HTTP requests by method, route pattern and status', labelNames: ['method', 'route', 'status'], registers });
    this.httpDuration = new Histogram({
      name: 'foreman_http_request_duration_seconds',
      help: 'HTTP request duration by method and route pattern',
      labelNames: ['method', 'route'],
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5],
      registers,
    });
    this.commitSize = new Histogram({
      name: 'foreman_store_commit_batch_size',
      help: 'Writes per group commit',
      buckets: [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024],
      registers,
    });
    this.commitDuration = new Histogram({
      name: 'foreman_store_commit_duration_seconds',
      help: 'Time to run and commit one group (the WAL sync is off the event loop and not included)',
      buckets: [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1],
      registers,
    });
  }

  /** A committed state change (from the driver's notifier). */
  transition = (e: TransitionEvent): void => {
    // Each instance counts what it committed: summed over instances, every job once.
    if (e.remote) return;
    const model = e.model ?? '';
    if (e.n === 1) this.submitted.inc({ model });
    const r = e.run;
    if (!r) return;
    this.finished.inc({ model, state: e.state, code: e.state === 'failed' ? (e.error?.code ?? 'unknown') : '' });
    const waitedUntil = r.startedAt ?? r.finishedAt;
    if (waitedUntil !== null) this.queueWait.observe({ model }, (waitedUntil - r.createdAt) / 1000);
    if (r.loadMs !== null) this.load.observe({ model }, r.loadMs / 1000);
    if (r.startedAt !== null && r.finishedAt !== null) {
      this.runTime.observe({ model }, (r.finishedAt - r.startedAt) / 1000);
      if (e.state === 'done') this.generation.observe({ model }, Math.max(0, r.finishedAt - r.startedAt - (r.loadMs ?? 0)) / 1000);
    }
    if (r.completionTokens !== null) this.tokens.inc({ model }, r.completionTokens);
    if (r.promptTokens !== null) this.promptTokens.inc({ model }, r.promptTokens);
  };

  /** A model that was not resident was loaded on an engine host. */
  engineLoad = (engine: string, model: string, seconds: number): void => {
    this.engineLoads.inc({ engine, model });
    this.engineLoadSeconds.inc({ engine, model }, seconds);
  };

  firstTokenAfter = (model: string, seconds: number): void => {
    this.firstToken.observe({ model }, seconds);
  };

  delivery = (outcome: 'delivered' | 'retried' | 'failed' | 'gone', latencySeconds: number | null): void => {
    this.deliveries.inc({ outcome });
    if (latencySeconds !== null) this.deliveryLatency.observe(latencySeconds);
  };

  request = (method: string, route: string, status: number, seconds: number): void => {
    this.http.inc({ method, route, status: String(status) });
    this.httpDuration.observe({ method, route }, seconds);
  };

  /** The exposition, for GET /metrics. */
  async text(): Promise<{ contentType: string; body: string }> {
    return { contentType: this.registry.contentType, body: await this.registry.metrics() };
  }

  commit = (ops: number, ms: number): void => {
    this.commitSize.observe(ops);
    this.commitDuration.observe(ms / 1000);
  };
}
