/**
 * Leadership that comes back (ADR-0011, "Maintenance on one leader"): an instance that loses the
 * leader's session (its connection ended by the server) and wins it again runs every leader-only
 * loop again, the batch runner included. A fresh database, in this run's private cluster.
 */
import OpenAI, { toFile } from 'openai';
import pg from 'pg';
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { Loop } from '../src/loop.js';
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

describe('a loop', () => {
  it('runs again when started after it stopped', async () => {
    let ticks = 0;
    const loop = new Loop('test', async () => (++ticks, 5), pino({ level: 'silent' }));
    loop.start();
    await until('a first tick', async () => ticks >= 1, 2_000);
    await loop.stop();
    const stoppedAt = ticks;
    await sleep(30);
    expect(ticks).toBe(stoppedAt);
    loop.start();
    await until('ticks after the restart', async () => ticks >= stoppedAt + 2, 2_000);
    await loop.stop();
  });
});

describe('leadership on PostgreSQL', () => {
  it('an instance that loses the leader lock and wins it back runs the batch runner again', async () => {
    const db = await createDatabase('foreman_leader');
    cleanups.push(db.drop);
    const fake = await startFakeOllama({ models: ['llama3.2'] });
    cleanups.push(() => fake.close());
    const driver = new PostgresDriver({ url: db.url, instanceId: 'a' });
    await driver.ready;
    cleanups.push(() => driver.close());
    const svc = new Service({ config: testConfig({ ollamaUrl: fake.url, databaseUrl: db.url, instanceId: 'a' }), logger: pino({ level: 'silent' }), driver });
    const base = await svc.start();
    cleanups.unshift(() => svc.stop());
    await until('a to lead', async () => svc.leader, 5_000);

    // The server ends the leader's session: the instance steps down, then takes the lock again.
    const admin = new pg.Client({ connectionString: db.url });
    await admin.connect();
    const ended = await admin
      .query<{ ok: boolean }>(
        "SELECT pg_terminate_backend(pid) AS ok FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'foreman leader a'",
      )
      .finally(() => admin.end());
    expect(ended.rows.map((r) => r.ok)).toEqual([true]);
    await until('a to step down', async () => !svc.leader, 5_000);
    await until('a to lead again', async () => svc.leader, 5_000);

    const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0 });
    const lines = ['one', 'two', 'three'].map((t) =>
      JSON.stringify({ custom_id: t, method: 'POST', url: '/v1/chat/completions', body: { model: 'llama3.2', messages: [{ role: 'user', content: t }] } }),
    );
    const file = await client.files.create({ file: await toFile(Buffer.from(lines.join('\n') + '\n'), 'b.jsonl'), purpose: 'batch' });
    const batch = await client.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
    let b = batch;
    await until('the batch to complete', async () => (b = await client.batches.retrieve(batch.id)).status === 'completed', 15_000);
    expect(b.request_counts).toEqual({ total: 3, completed: 3, failed: 0 });
  });
});

describe('the batch runner on PostgreSQL', () => {
  it('starts at once on the leader for a batch created on another instance, and a cancel there reaches it at once', async () => {
    const db = await createDatabase('foreman_batch_wake');
    cleanups.push(db.drop);
    // Each request takes a while, so the cancel finds lines still waiting.
    const fake = await startFakeOllama({ models: ['llama3.2'], defaultChunkDelayMs: 40 });
    cleanups.push(() => fake.close());
    // A poll far longer than the test: only a wake-up can move the batch in time.
    const poll = 60_000;
    const start = async (id: string) => {
      const driver = new PostgresDriver({ url: db.url, instanceId: id });
      await driver.ready;
      cleanups.push(() => driver.close());
      const svc = new Service({ config: testConfig({ ollamaUrl: fake.url, databaseUrl: db.url, instanceId: id, pollIntervalMs: poll, concurrency: 1 }), logger: pino({ level: 'silent' }), driver });
      const base = await svc.start();
      cleanups.unshift(() => svc.stop());
      return { svc, base };
    };
    const a = await start('a');
    await until('a to lead', async () => a.svc.leader, 5_000);
    const b = await start('b');
    expect(b.svc.leader).toBe(false);
    // The leader's runner has had its first look and sleeps for the poll.
    await sleep(300);

    const client = new OpenAI({ baseURL: `${b.base}/v1`, apiKey: 'unused', maxRetries: 0 });
    const lines = Array.from({ length: 100 }, (_, i) =>
      JSON.stringify({ custom_id: `l${i}`, method: 'POST', url: '/v1/chat/completions', body: { model: 'llama3.2', messages: [{ role: 'user', content: `line ${i}` }] } }),
    );
    const file = await client.files.create({ file: await toFile(Buffer.from(lines.join('\n') + '\n'), 'b.jsonl'), purpose: 'batch' });
    const batch = await client.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
    let got = batch;
    await until('the leader to submit the lines created on b', async () => (got = await client.batches.retrieve(batch.id)).status === 'in_progress', 3_000);

    // The runner submits the rest (a chunk of 32 lines a turn), then sleeps for the poll; the
    // engine has run only a few lines by then.
    await sleep(500);
    await client.batches.cancel(batch.id);
    await until('the leader to end the waiting lines of the batch cancelled on b', async () => (got = await client.batches.retrieve(batch.id)).status === 'cancelled', 3_000);
    const c = got.request_counts!;
    expect(c.total).toBe(100);
    expect(c.completed + c.failed).toBeLessThan(50);
  });
});
