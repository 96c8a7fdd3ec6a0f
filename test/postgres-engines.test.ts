/**
 * Instances on one PostgreSQL database may list different engine hosts (ADR-0011, "Engine hosts
 * per instance"): the leader's routing and outage policies judge by every live instance's hosts,
 * not by its own. Two in-process instances with a fake Ollama each; a fresh database per test.
 */
import pg from 'pg';
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import type { Config } from '../src/config.js';
import { SWEEP_CHUNK } from '../src/maintenance/maintainer.js';
import { PostgresDriver } from '../src/queue/postgres/driver.js';
import { Service } from '../src/service.js';
import { startFakeOllama, type FakeOllama } from './support/fake-ollama.js';
import { testConfig } from './support/harness.js';
import { createDatabase } from './support/postgres.js';
import { sleep, until } from './support/util.js';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
});

/**
 * An instance with one engine host of one slot. Its engine view is refreshed every 200 ms, so a
 * stopped instance's view is no longer fresh 1.6 s (three refreshes and a second) after its last.
 */
async function instance(url: string, id: string, fake: FakeOllama, over: Partial<Config> = {}) {
  const driver = new PostgresDriver({ url, instanceId: id, heartbeatMs: 200 });
  await driver.ready;
  cleanups.push(() => driver.close());
  const config = testConfig({ ollamaUrl: fake.url, databaseUrl: url, instanceId: id, concurrency: 1, ...over });
  const svc = new Service({ config, logger: pino({ level: 'silent' }), driver, engineViewRefreshMs: 200 });
  const base = await svc.start();
  let stopped = false;
  const stop = async () => {
    if (stopped) return;
    stopped = true;
    await svc.stop();
  };
  cleanups.unshift(stop); // stopped before its driver is closed
  return { base, svc, stop };
}

async function fakeWith(models: string[]): Promise<FakeOllama> {
  const fake = await startFakeOllama({ models });
  cleanups.push(() => fake.close());
  return fake;
}

async function submit(base: string, model: string): Promise<string> {
  const r = await fetch(`${base}/jobs`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model, messages: [{ role: 'user', content: `hi ${Math.random()}` }] }),
  });
  expect(r.status).toBe(202);
  return ((await r.json()) as { job_id: string }).job_id;
}

type Job = { state: string; instance: string | null; error: { code: string } | null };
const jobOf = async (base: string, id: string): Promise<Job> => (await (await fetch(`${base}/jobs/${id}`)).json()) as Job;
const settled = async (base: string, id: string): Promise<Job> => {
  let job: Job | undefined;
  await until(`job ${id} to end`, async () => ['done', 'failed', 'canceled'].includes((job = await jobOf(base, id)).state), 15_000);
  return job!;
};

describe('engine hosts per instance', () => {
  it("the leader fails a job as model_not_found only when no instance's hosts have its model, and not while a stopped instance that had it may come back", async () => {
    const db = await createDatabase('foreman_engines');
    cleanups.push(db.drop);
    // The grace for a stopped instance's view is the outage timeout; its unroutable check runs each health interval.
    const a = await instance(db.url, 'a', await fakeWith(['mistral']), { engineOutageTimeoutMs: 1_500, engineHealthIntervalMs: 300 });
    await until('a to lead', async () => a.svc.leader, 5_000);
    const bFake = await fakeWith(['llama3.2']);
    const b = await instance(db.url, 'b', bFake);
    expect(b.svc.leader).toBe(false);
    // B's one slot is busy for 1.5 s, so the next llama3.2 job stays queued meanwhile, under the
    // eyes of A's unroutable-models policy, which each submit to A wakes.
    bFake.enqueue({ kind: 'ok', firstByteDelayMs: 1_500 });
    const first = await submit(b.base, 'llama3.2');
    await until('B to run the first job', async () => (await jobOf(a.base, first)).state === 'working', 5_000);
    const second = await submit(a.base, 'llama3.2');
    await sleep(800);
    expect((await jobOf(a.base, second)).state).toBe('queued');
    for (const id of [first, second]) {
      const job = await settled(a.base, id);
      expect([job.state, job.instance]).toEqual(['done', 'b']);
    }
    // A model no instance has still fails at once.
    const nowhere = await submit(a.base, 'qwen-none');
    const job = await settled(b.base, nowhere);
    expect([job.state, job.error?.code]).toEqual(['failed', 'model_not_found']);
    // B stops (a restart, say): its llama3.2 may come back, so a job for it waits; a model it
    // never had still fails at once.
    await b.stop();
    const stoppedAt = Date.now();
    const late = await submit(a.base, 'llama3.2');
    const typo = await submit(a.base, 'qwen-none');
    expect([(await settled(a.base, typo)).error?.code]).toEqual(['model_not_found']);
    await sleep(1_000);
    expect((await jobOf(a.base, late)).state).toBe('queued');
    // Once B's view is past its freshness (1.6 s) and the grace (1.5 s), llama3.2 is nowhere.
    const lateJob = await settled(a.base, late);
    expect([lateJob.state, lateJob.error?.code]).toEqual(['failed', 'model_not_found']);
    expect(Date.now() - stoppedAt).toBeGreaterThanOrEqual(2_500);
  });

  it('every instance counts the same slots for the ETA: all instances\' hosts, whichever it lists itself', async () => {
    const db = await createDatabase('foreman_engines');
    cleanups.push(db.drop);
    const a = await instance(db.url, 'a', await fakeWith(['mistral']), { concurrency: 2 });
    const bFake = await fakeWith(['llama3.2']);
    const b = await instance(db.url, 'b', bFake);
    const slotsOf = (svc: Service) => (svc as unknown as { clusterEngines: { slots: number } }).clusterEngines.slots;
    await until('both to count 2 + 1 slots', async () => slotsOf(a.svc) === 3 && slotsOf(b.svc) === 3, 5_000);
    // B's one slot is busy; the next llama3.2 job is first in line, one job running in the cluster
    // and three slots: it starts now, by either instance's account (by B's own hosts alone, it
    // would wait for the running job, whose length has no history yet: no estimate).
    bFake.enqueue({ kind: 'ok', firstByteDelayMs: 1_500 });
    const first = await submit(b.base, 'llama3.2');
    await until('B to run the first job', async () => (await jobOf(a.base, first)).state === 'working', 5_000);
    const second = await submit(a.base, 'llama3.2');
    for (const base of [a.base, b.base]) {
      const t0 = Date.now();
      const view = (await (await fetch(`${base}/jobs/${second}`)).json()) as { queue_position: number; estimated_start_at: string | null };
      expect(view.queue_position).toBe(0);
      expect(view.estimated_start_at).not.toBeNull();
      expect(Math.abs(Date.parse(view.estimated_start_at!) - t0)).toBeLessThan(2_000);
    }
    expect((await settled(a.base, second)).state).toBe('done');
  });

  it("the leader's engine outage does not fail jobs while another instance's hosts answer; it does once none do", async () => {
    const db = await createDatabase('foreman_engines');
    cleanups.push(db.drop);
    const aFake = await fakeWith(['llama3.2']);
    await aFake.stop(); // A's only host refuses connections from the start
    const outage = { engineOutageTimeoutMs: 300, pollIntervalMs: 200 };
    const a = await instance(db.url, 'a', aFake, outage);
    await until('a to lead', async () => a.svc.leader, 5_000);
    const bFake = await fakeWith(['llama3.2']);
    const b = await instance(db.url, 'b', bFake, outage);
    // B's slot is busy for 2 s: the second job waits in the queue far longer than the outage timeout.
    bFake.enqueue({ kind: 'ok', firstByteDelayMs: 2_000 });
    const first = await submit(b.base, 'llama3.2');
    await until('B to run the first job', async () => (await jobOf(a.base, first)).state === 'working', 5_000);
    const second = await submit(a.base, 'llama3.2');
    await sleep(1_200);
    expect((await jobOf(a.base, second)).state).toBe('queued');
    for (const id of [first, second]) {
      const job = await settled(a.base, id);
      expect([job.state, job.instance]).toEqual(['done', 'b']);
    }
    // B stops: once its view is no longer fresh (1.6 s), its hosts count as down since it was last
    // seen, the whole cluster is out, and a job that waits longer than the timeout fails.
    await b.stop();
    const late = await submit(a.base, 'llama3.2');
    const lateJob = await settled(a.base, late);
    expect([lateJob.state, lateJob.error?.code]).toEqual(['failed', 'engine_unavailable']);
  });

  it('an outage sweep of several chunks stops once another instance\'s host answers: the jobs after it stay queued', async () => {
    const db = await createDatabase('foreman_engines');
    cleanups.push(db.drop);
    const aFake = await fakeWith(['llama3.2']);
    const bFake = await fakeWith(['llama3.2']);
    await aFake.stop();
    await bFake.stop(); // every host of the cluster refuses connections
    const over = { engineOutageTimeoutMs: 300, pollIntervalMs: 200, engineHealthIntervalMs: 100 };
    const a = await instance(db.url, 'a', aFake, over);
    await until('a to lead', async () => a.svc.leader, 5_000);
    const b = await instance(db.url, 'b', bFake, over);
    const admin = new pg.Client({ connectionString: db.url });
    await admin.connect();
    cleanups.push(() => admin.end());
    const bAnswers = async () =>
      (await admin.query<{ up: boolean }>("SELECT down_since IS NULL AND all_up AS up FROM instance_engines WHERE instance_id = 'b'")).rows[0]?.up === true;
    // After the sweep's first chunk B's host comes back (and B says so in its view).
    const driver = a.svc.driver;
    const failStale = driver.jobsFailStale.bind(driver);
    const calls: number[] = [];
    let allIn = false;
    driver.jobsFailStale = async (p) => {
      // Until every job is in, the sweep finds nothing to fail (its first chunk must be a full one).
      if (!allIn) return [];
      const ids = await failStale(p);
      calls.push(ids.length);
      if (calls.length === 1) {
        await bFake.start();
        await until("B's view to show its host answering", bAnswers, 5_000);
      }
      return ids;
    };
    const n = 2 * SWEEP_CHUNK + 10;
    for (let i = 0; i < n; i += 50) await Promise.all(Array.from({ length: Math.min(50, n - i) }, () => submit(a.base, 'llama3.2')));
    allIn = true;
    await until('the first chunk to fail', async () => calls.length >= 1 && (await bAnswers()), 15_000);
    await sleep(800); // the leader's next rounds see B's host answering
    const failed = Number(
      (await admin.query<{ n: string }>("SELECT count(*) AS n FROM jobs WHERE state = 'failed' AND error_code = 'engine_unavailable'")).rows[0]!.n,
    );
    expect(calls[0]).toBe(SWEEP_CHUNK);
    expect(failed).toBe(SWEEP_CHUNK);
    // No second chunk: B's host answers, so the cluster's outage is over.
    expect(calls.length).toBe(1);
    await b.stop();
    await a.stop();
  });

  it('/api/tags, /v1/models and /v1/models/<model> answer the same from every instance: the models of every live instance\'s hosts', async () => {
    const db = await createDatabase('foreman_engines');
    cleanups.push(db.drop);
    const a = await instance(db.url, 'a', await fakeWith(['mistral']));
    const b = await instance(db.url, 'b', await fakeWith(['llama3.2']));
    const tags = async (base: string) => ((await (await fetch(`${base}/api/tags`)).json()) as { models: { name: string; size: number }[] }).models;
    const openai = async (base: string) => ((await (await fetch(`${base}/v1/models`)).json()) as { data: { id: string; object: string }[] }).data;
    const names = async (base: string) => (await tags(base)).map((m) => m.name).sort();
    // Each instance hears of the other's view at its next refresh (200 ms here).
    for (const base of [a.base, b.base]) await until(`${base} to list both instances' models`, async () => (await names(base)).length === 2, 5_000);
    for (const base of [a.base, b.base]) {
      expect(await names(base)).toEqual(['llama3.2:latest', 'mistral:latest']);
      // The entries are the hosts' own (Ollama's fields), not names alone.
      expect((await tags(base)).every((m) => typeof m.size === 'number')).toBe(true);
      expect((await openai(base)).map((m) => m.id).sort()).toEqual(['llama3.2:latest', 'mistral:latest']);
      for (const model of ['llama3.2', 'mistral']) {
        const r = await fetch(`${base}/v1/models/${model}`);
        expect(r.status).toBe(200);
        expect(((await r.json()) as { id: string }).id).toBe(`${model}:latest`);
      }
    }
    // B stops: once its view is no longer fresh (1.6 s), A lists its own hosts' models only.
    await b.stop();
    await until("a to stop listing b's models", async () => (await names(a.base)).length === 1, 5_000);
    expect(await names(a.base)).toEqual(['mistral:latest']);
    expect((await fetch(`${a.base}/v1/models/llama3.2`)).status).toBe(404);
  });
});
