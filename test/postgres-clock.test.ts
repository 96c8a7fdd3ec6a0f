/**
 * Instances on one PostgreSQL database keep time on the database server's clock (ADR-0011,
 * "Time"): a leader whose own clock runs ten minutes ahead does not take a live instance's job
 * as expired. A fresh database per test, in this run's private cluster.
 */
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import type { Clock } from '../src/domain.js';
import { PostgresDriver } from '../src/queue/postgres/driver.js';
import { Service } from '../src/service.js';
import { startFakeOllama } from './support/fake-ollama.js';
import { testConfig } from './support/harness.js';
import { createDatabase } from './support/postgres.js';
import { sleep, until } from './support/util.js';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
});

const AHEAD_MS = 10 * 60_000;

/**
 * An instance with one engine host of one slot that has `models`. Its loads take a minute, so a
 * job it claims stays `loading` for the whole test. `clock`: the instance's own clock.
 */
async function instance(url: string, id: string, models: string[], opts: { clock?: Clock; alignClock?: boolean } = {}) {
  const fake = await startFakeOllama({ models, loadDelayMs: 60_000 });
  cleanups.push(() => fake.close());
  const driver = new PostgresDriver({ url, instanceId: id, heartbeatMs: 200 });
  await driver.ready;
  cleanups.push(() => driver.close());
  const config = testConfig({ ollamaUrl: fake.url, databaseUrl: url, instanceId: id, concurrency: 1, jobLeaseMs: 1_000, engineIdleTimeoutMs: 120_000 });
  const svc = new Service({ config, logger: pino({ level: 'silent' }), driver, ...opts });
  const base = await svc.start();
  cleanups.unshift(() => svc.stop()); // stopped before its driver is closed
  return { base, svc };
}

async function submit(base: string, model: string): Promise<string> {
  const r = await fetch(`${base}/jobs`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model, messages: [{ role: 'user', content: 'hi' }] }),
  });
  expect(r.status).toBe(202);
  return ((await r.json()) as { job_id: string }).job_id;
}

type Job = { state: string; instance: string; transitions: { state: string; attempt: number }[] };
const jobOf = async (base: string, id: string): Promise<Job> => (await (await fetch(`${base}/jobs/${id}`)).json()) as Job;

describe('time across instances', () => {
  it("a leader whose clock runs ten minutes ahead reads the database's time and leaves a live instance's job alone", async () => {
    const db = await createDatabase('foreman_clock');
    cleanups.push(db.drop);
    const ahead: Clock = { now: () => Date.now() + AHEAD_MS };
    // A leads maintenance (it starts first), and its one slot is taken by a job of its own, so
    // B runs the next one.
    const a = await instance(db.url, 'a', ['mistral', 'llama3.2'], { clock: ahead, alignClock: true });
    await until('a.svc.leader', async () => a.svc.leader, 5_000);
    expect(Math.abs(a.svc.clock.now() - Date.now())).toBeLessThan(2_000);
    const own = await submit(a.base, 'mistral');
    await until('A to run its own job', async () => (await jobOf(a.base, own)).state === 'loading');
    const b = await instance(db.url, 'b', ['mistral', 'llama3.2']);
    expect(b.svc.leader).toBe(false);
    const id = await submit(b.base, 'llama3.2');
    // Five of the rescuer's rounds (every half lease), more than two leases: by A's own clock,
    // B's lease ran out ten minutes ago all along.
    await sleep(2_500);
    for (const [jobId, by] of [
      [id, 'b'],
      [own, 'a'],
    ] as const) {
      const job = await jobOf(a.base, jobId);
      expect([job.state, job.instance]).toEqual(['loading', by]);
      expect(job.transitions.map((t) => [t.state, t.attempt])).toEqual([
        ['queued', 0],
        ['loading', 1],
      ]);
    }
  });
});
