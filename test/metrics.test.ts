/**
 * GET /metrics: Prometheus text format, parsed with a real parser; the values move exactly as
 * jobs run and webhooks are delivered, and no label carries an id or a URL.
 */
import parsePrometheusTextFormat from 'parse-prometheus-text-format';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hello, startHarness, type Harness } from './support/harness.js';
import { startReceiver, type Receiver } from './support/receiver.js';
import { settled } from './support/util.js';

type Families = ReturnType<typeof parsePrometheusTextFormat>;

let h: Harness;
let rcv: Receiver;
beforeAll(async () => {
  h = await startHarness({ concurrency: 2 });
  rcv = await startReceiver();
});
afterAll(async () => {
  await h?.stop();
  await rcv?.close();
});

async function scrape(): Promise<Families> {
  const res = await fetch(`${h.url}/metrics`);
  expect(res.status).toBe(200);
  expect(res.headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
  return parsePrometheusTextFormat(await res.text());
}

function family(f: Families, name: string) {
  const x = f.find((m) => m.name === name);
  expect(x, name).toBeDefined();
  return x!;
}

/** The value of one sample (counters, gauges), 0 when the label set has no sample yet. */
function value(f: Families, name: string, labels: Record<string, string> = {}): number {
  const s = family(f, name).metrics.find((m) => Object.entries(labels).every(([k, v]) => m.labels?.[k] === v));
  return s ? Number(s.value) : 0;
}

/**
 * A histogram's count for one label set. The text parser folds labelled histograms into one
 * sample (it only handles unlabelled ones), so the count is read from the same registry as JSON.
 */
async function count(name: string, labels: Record<string, string>): Promise<number> {
  const all = await h.service.metrics.registry.getMetricsAsJSON();
  const m = all.find((x) => x.name === name);
  expect(m, name).toBeDefined();
  const v = (m!.values as { metricName?: string; labels: Record<string, string | number>; value: number }[]).find(
    (x) => x.metricName === `${name}_count` && Object.entries(labels).every(([k, val]) => x.labels[k] === val),
  );
  return v?.value ?? 0;
}

describe('GET /metrics', () => {
  it('exposes every series, with foreman_ names and units', async () => {
    const f = await scrape();
    for (const [name, type] of [
      ['foreman_jobs_submitted_total', 'COUNTER'],
      ['foreman_jobs_finished_total', 'COUNTER'],
      ['foreman_jobs', 'GAUGE'],
      ['foreman_job_queue_wait_seconds', 'HISTOGRAM'],
      ['foreman_job_load_seconds', 'HISTOGRAM'],
      ['foreman_job_generation_seconds', 'HISTOGRAM'],
      ['foreman_job_first_token_seconds', 'HISTOGRAM'],
      ['foreman_job_run_seconds', 'HISTOGRAM'],
      ['foreman_tokens_generated_total', 'COUNTER'],
      ['foreman_prompt_tokens_total', 'COUNTER'],
      ['foreman_webhook_deliveries_total', 'COUNTER'],
      ['foreman_webhook_delivery_latency_seconds', 'HISTOGRAM'],
      ['foreman_webhook_deliveries_pending', 'GAUGE'],
      ['foreman_webhook_oldest_pending_age_seconds', 'GAUGE'],
      ['foreman_engine_up', 'GAUGE'],
      ['foreman_engine_host_up', 'GAUGE'],
      ['foreman_engine_circuit_state', 'GAUGE'],
      ['foreman_engine_slots', 'GAUGE'],
      ['foreman_engine_slots_in_use', 'GAUGE'],
      ['foreman_engine_resident_models', 'GAUGE'],
      ['foreman_engine_loads_total', 'COUNTER'],
      ['foreman_engine_load_seconds_total', 'COUNTER'],
      ['foreman_http_requests_total', 'COUNTER'],
      ['foreman_http_request_duration_seconds', 'HISTOGRAM'],
      ['foreman_store_commit_batch_size', 'HISTOGRAM'],
      ['foreman_store_commit_duration_seconds', 'HISTOGRAM'],
      ['process_cpu_user_seconds_total', 'COUNTER'],
      ['nodejs_eventloop_lag_seconds', 'GAUGE'],
    ] as const) {
      expect(family(f, name).type, name).toBe(type);
    }
    expect(value(f, 'foreman_engine_up')).toBe(1);
    const engine = h.service.pool.hosts[0]!.name;
    expect(value(f, 'foreman_engine_host_up', { engine })).toBe(1);
    expect(value(f, 'foreman_engine_circuit_state', { engine, state: 'closed' })).toBe(1);
    expect(value(f, 'foreman_engine_circuit_state', { engine, state: 'open' })).toBe(0);
    expect(value(f, 'foreman_engine_slots', { engine })).toBe(h.config.concurrency);
  });

  it('counts a load of a model that was not resident, per engine host and model, once', async () => {
    const engine = h.service.pool.hosts[0]!.name;
    const before = await scrape();
    const loads = (f: Families) => value(f, 'foreman_engine_loads_total', { engine, model: 'qwen3' });
    await h.waitForState(await h.submit(hello('q1', { model: 'qwen3' })), ['done']);
    await h.waitForState(await h.submit(hello('q2', { model: 'qwen3' })), ['done']);
    const after = await scrape();
    expect(loads(after) - loads(before)).toBe(1);
    expect(value(after, 'foreman_engine_load_seconds_total', { engine, model: 'qwen3' })).toBeGreaterThan(0);
  });

  it('finishing 3 jobs adds exactly 3 to the finished total, their tokens to the token totals, and 12 delivered events', async () => {
    const before = await scrape();
    const hists = ['foreman_job_queue_wait_seconds', 'foreman_job_run_seconds', 'foreman_job_generation_seconds', 'foreman_job_load_seconds', 'foreman_job_first_token_seconds'];
    const histBefore = await Promise.all(hists.map((n) => count(n, { model: 'llama3.2' })));
    const ids = [await h.submit(hello('m1', { state_webhook_url: rcv.url })), await h.submit(hello('m2', { state_webhook_url: rcv.url })), await h.submit(hello('m3', { state_webhook_url: rcv.url }))];
    const jobs = await Promise.all(ids.map((id) => settled(h, id)));
    // A record is visible to GET once committed; its effects (and so the counters) follow once it
    // is on disk, a moment later. Wait for the last one, then check every figure exactly.
    const delivered = (f: Families) => value(f, 'foreman_webhook_deliveries_total', { outcome: 'delivered' });
    const base = delivered(before);
    let after = await scrape();
    for (const end = Date.now() + 5_000; delivered(after) - base < 12 && Date.now() < end; ) {
      await new Promise((r) => setTimeout(r, 20));
      after = await scrape();
    }
    const done = { model: 'llama3.2', state: 'done', code: '' };
    expect(value(after, 'foreman_jobs_finished_total', done) - value(before, 'foreman_jobs_finished_total', done)).toBe(3);
    expect(value(after, 'foreman_jobs_submitted_total', { model: 'llama3.2' }) - value(before, 'foreman_jobs_submitted_total', { model: 'llama3.2' })).toBe(3);
    const evals = jobs.reduce((a, j) => a + j.result.eval_count, 0);
    const prompts = jobs.reduce((a, j) => a + j.result.prompt_eval_count, 0);
    expect(value(after, 'foreman_tokens_generated_total', { model: 'llama3.2' }) - value(before, 'foreman_tokens_generated_total', { model: 'llama3.2' })).toBe(evals);
    expect(value(after, 'foreman_prompt_tokens_total', { model: 'llama3.2' }) - value(before, 'foreman_prompt_tokens_total', { model: 'llama3.2' })).toBe(prompts);
    for (const [i, hist] of hists.entries()) expect((await count(hist, { model: 'llama3.2' })) - histBefore[i]!, hist).toBe(3);
    // The page carries the same histograms (each with its +Inf bucket).
    for (const hist of hists) expect(family(after, hist).metrics[0]!.buckets?.['+Inf'], hist).toBeDefined();
    expect(value(after, 'foreman_webhook_deliveries_total', { outcome: 'delivered' }) - value(before, 'foreman_webhook_deliveries_total', { outcome: 'delivered' })).toBe(12);
    expect(value(after, 'foreman_webhook_deliveries_pending')).toBe(0);
    expect(value(after, 'foreman_webhook_oldest_pending_age_seconds')).toBe(0);
    const posts = { method: 'POST', route: '/jobs', status: '202' };
    expect(value(after, 'foreman_http_requests_total', posts) - value(before, 'foreman_http_requests_total', posts)).toBe(3);
  });

  it('a failed job counts under its error code; queued and running jobs show in the gauge', async () => {
    const before = await scrape();
    const failed = await h.submit({ ...hello('nope'), model: 'llama9' });
    await h.waitForState(failed, ['failed']);
    h.fake.enqueue({ kind: 'hang' }, { kind: 'hang' });
    const a = await h.submit(hello('hang a'));
    const b = await h.submit(hello('hang b'));
    const c = await h.submit(hello('waits'));
    await h.waitForState(a, ['working']);
    await h.waitForState(b, ['working']);
    const failedCount = (x: Families) => value(x, 'foreman_jobs_finished_total', { model: 'llama9', state: 'failed', code: 'model_not_found' });
    let f = await scrape();
    for (const end = Date.now() + 5_000; failedCount(f) - failedCount(before) < 1 && Date.now() < end; ) {
      await new Promise((r) => setTimeout(r, 20));
      f = await scrape();
    }
    expect(
      value(f, 'foreman_jobs_finished_total', { model: 'llama9', state: 'failed', code: 'model_not_found' }) -
        value(before, 'foreman_jobs_finished_total', { model: 'llama9', state: 'failed', code: 'model_not_found' }),
    ).toBe(1);
    expect(value(f, 'foreman_jobs', { state: 'working', model: 'llama3.2' })).toBe(2);
    expect(value(f, 'foreman_jobs', { state: 'queued', model: 'llama3.2' })).toBe(1);
    for (const id of [c, a, b]) await h.api(`/jobs/${id}/cancel`, { method: 'POST' });
    const g = await scrape();
    expect(value(g, 'foreman_jobs', { state: 'working', model: 'llama3.2' })).toBe(0);
    expect(value(g, 'foreman_jobs_finished_total', { model: 'llama3.2', state: 'canceled', code: '' }) - value(f, 'foreman_jobs_finished_total', { model: 'llama3.2', state: 'canceled', code: '' })).toBe(3);
  });

  it('no label value is a job id or a URL: label sets stay bounded', async () => {
    await h.api(`/jobs/01a23016-b8e3-7000-8261-91d4c62b68ee`);
    const f = await scrape();
    const values = f.flatMap((m) => m.metrics.flatMap((s) => Object.values(s.labels ?? {})));
    expect(values.length).toBeGreaterThan(0);
    for (const v of values) {
      expect(v).not.toMatch(/[0-9a-f]{8}-[0-9a-f]{4}-/);
      expect(v).not.toMatch(/^https?:/);
    }
    expect(value(f, 'foreman_http_requests_total', { method: 'GET', route: '/jobs/:id', status: '404' })).toBeGreaterThanOrEqual(1);
  });
});
