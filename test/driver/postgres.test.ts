/**
 * The queue driver conformance suite against the PostgreSQL driver (a fresh database per test, in
 * this run's private cluster: test/support/postgres.ts), plus what only a shared driver promises.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { migrate } from '../../src/queue/postgres/db.js';
import type { ClaimHost, EngineView } from '../../src/queue/driver.js';
import { PostgresDriver } from '../../src/queue/postgres/driver.js';
import { createDatabase } from '../support/postgres.js';
import { startReceiver } from '../support/receiver.js';
import { until } from '../support/util.js';
import { pino } from 'pino';
import { Dispatcher } from '../../src/webhooks/dispatcher.js';
import { blockListOf } from '../../src/webhooks/ssrf.js';
import { systemClock } from '../../src/domain.js';
import { StorageUnavailable } from '../../src/errors.js';
import { driverConformance, newJob } from './conformance.js';

/** A template database migrated once; each test gets a copy (CREATE DATABASE … TEMPLATE is fast). */
let template: Awaited<ReturnType<typeof createDatabase>>;
beforeAll(async () => {
  template = await createDatabase('foreman_tpl');
  const d = new PostgresDriver({ url: template.url, crossInstance: false });
  await d.ready;
  await d.close();
});
afterAll(async () => {
  await template?.drop();
});

async function freshDb(): Promise<{ url: string; drop: () => Promise<void> }> {
  return createDatabase('foreman_t', template.name);
}

driverConformance('postgres driver', async () => {
  const db = await freshDb();
  const driver = new PostgresDriver({ url: db.url, instanceId: 'test-a' });
  await driver.ready;
  return {
    driver,
    cleanup: async () => {
      await driver.close();
      await db.drop();
    },
  };
});

const T0 = 1_700_000_000_000;

describe('postgres driver only', () => {
  it('recover() on a shared database leaves another instance\'s running jobs alone, and re-queues its own', async () => {
    const db = await freshDb();
    const a = new PostgresDriver({ url: db.url, instanceId: 'inst-a' });
    const b = new PostgresDriver({ url: db.url, instanceId: 'inst-b' });
    try {
      const [j1, j2] = [newJob(), newJob()];
      await a.jobsInsert({ jobs: [j1, j2], now: T0, maxQueued: 10 });
      const [c1] = await a.jobsClaim({ owner: 'w', limit: 1, now: T0 + 1, leaseMs: 60_000 });
      const [c2] = await b.jobsClaim({ owner: 'w', limit: 1, now: T0 + 2, leaseMs: 60_000 });
      expect([c1!.id, c2!.id]).toEqual([j1.id, j2.id]);
      expect((await b.recover({ now: T0 + 3 })).requeued).toEqual([j2.id]);
      expect((await a.jobGet({ id: j1.id }))?.state).toBe('loading');
      expect((await a.jobGet({ id: j2.id }))?.state).toBe('queued');
      // The rescuer takes a's job only once its lease has expired.
      expect(await b.jobsRescue({ now: T0 + 60_000 })).toEqual([]);
      expect(await b.jobsRescue({ now: T0 + 60_002 })).toEqual([j1.id]);
    } finally {
      await a.close();
      await b.close();
      await db.drop();
    }
  });

  it('two instances claiming at once never take the same job', async () => {
    const db = await freshDb();
    const ds = [0, 1, 2].map((i) => new PostgresDriver({ url: db.url, instanceId: `i${i}` }));
    try {
      const jobs = Array.from({ length: 60 }, () => newJob());
      await ds[0]!.jobsInsert({ jobs, now: T0, maxQueued: 1000 });
      const got = await Promise.all(
        Array.from({ length: 30 }, (_, k) => ds[k % 3]!.jobsClaim({ owner: 'w', limit: 3, now: T0 + 1, leaseMs: 60_000 })),
      );
      const ids = got.flat().map((c) => c.id);
      expect(ids).toHaveLength(60);
      expect(new Set(ids).size).toBe(60);
    } finally {
      for (const d of ds) await d.close();
      await db.drop();
    }
  });

  it('announces effects to the other instances (LISTEN/NOTIFY), not twice to its own', async () => {
    const db = await freshDb();
    const a = new PostgresDriver({ url: db.url, instanceId: 'na' });
    const b = new PostgresDriver({ url: db.url, instanceId: 'nb' });
    try {
      await Promise.all([a.ready, b.ready]);
      const seenA: string[] = [];
      const seenB: string[] = [];
      a.notifier.on('stateChanged', (e) => seenA.push(e.state));
      b.notifier.on('stateChanged', (e) => seenB.push(e.state));
      const cancels: string[] = [];
      b.notifier.on('cancelRequested', (id) => cancels.push(id));
      const j = newJob();
      await a.jobsInsert({ jobs: [j], now: T0, maxQueued: 10 });
      await b.jobsClaim({ owner: 'w', limit: 1, now: T0 + 1, leaseMs: 60_000 });
      expect(await a.jobCancel({ id: j.id, now: T0 + 2 })).toEqual({ canceled: true, wasRunning: true, state: 'canceled' });
      for (let i = 0; i < 100 && (seenB.length < 3 || seenA.length < 3); i++) await new Promise((r) => setTimeout(r, 20));
      expect(seenA).toEqual(['queued', 'loading', 'canceled']);
      expect(seenB).toEqual(['queued', 'loading', 'canceled']);
      expect(cancels).toEqual([j.id]);
    } finally {
      await a.close();
      await b.close();
      await db.drop();
    }
  });

  it('an unreachable server: start-up fails naming FOREMAN_DATABASE_URL, never the password', async () => {
    const d = new PostgresDriver({ url: 'postgres://u:s3cret@127.0.0.1:1/x', crossInstance: false, connectTimeoutMs: 500 });
    const err = (await d.recover({ now: T0 }).catch((e: unknown) => e)) as Error;
    expect(err.message).toContain('FOREMAN_DATABASE_URL');
    expect(err.message).not.toContain('s3cret');
    await d.close();
  });

  it('pool exhausted: a call waits briefly, then StorageUnavailable (503), never hangs', async () => {
    const db = await freshDb();
    const d = new PostgresDriver({ url: db.url, crossInstance: false, poolSize: 1, connectTimeoutMs: 300 });
    try {
      await d.ready;
      const held = await d.pool.connect(); // the only connection
      const t0 = Date.now();
      const err = (await d.jobsInsert({ jobs: [newJob()], now: T0, maxQueued: 10 }).catch((e: unknown) => e)) as { code?: string };
      const waited = Date.now() - t0;
      expect(err.code).toBe('storage_unavailable');
      expect(waited).toBeGreaterThanOrEqual(250);
      expect(waited).toBeLessThan(3000);
      held.release();
      expect(await d.ping()).toBe(true);
    } finally {
      await d.close();
      await db.drop();
    }
  });

  it('a batch over three instances: a chunk submitted twice goes in once; concurrent ends count exactly; the batch ends once, with one event', async () => {
    const db = await freshDb();
    const ds = [0, 1, 2].map((i) => new PostgresDriver({ url: db.url, instanceId: `b${i}` }));
    const [a, b] = [ds[0]!, ds[1]!];
    try {
      const N = 30;
      const fileSeq = await a.fileInsert({
        file: { id: 'file-in', keyId: '', filename: 'in.jsonl', endpoint: '/v1/chat/completions', createdAt: T0, expiresAt: null },
        lines: Array.from({ length: N }, (_, i) => ({ n: i + 1, customId: `c${i + 1}`, body: '{}' })),
      });
      expect(await a.fileFinish({ fileSeq, bytes: 2 * N, lines: N })).toBe(true);
      const batch = (await a.batchInsert({
        now: T0,
        batch: {
          id: 'batch_x', keyId: '', inputFileSeq: fileSeq, inputFileId: 'file-in', endpoint: '/v1/chat/completions', completionWindow: '24h',
          metadata: null, webhookUrl: 'http://127.0.0.1:9/hook', priority: 0, total: N, outputFileId: 'file-out', errorFileId: 'file-err',
          expiresAt: T0 + 86_400_000, fileExpiresAt: null,
        },
      }))!;
      const chunk = (from: number, n: number) =>
        Array.from({ length: n }, (_, i) => ({ ...newJob({ metadata: { custom_id: `c${from + i}` } }), line: from + i }));
      // Two runners (a leader that just stepped down, and the next) submit the same lines at once.
      const both = await Promise.all([
        a.batchJobsInsert({ batchSeq: batch.seq, jobs: chunk(1, 15), now: T0 + 1, maxQueued: 1000 }),
        b.batchJobsInsert({ batchSeq: batch.seq, jobs: chunk(1, 15), now: T0 + 1, maxQueued: 1000 }),
      ]);
      expect(both.map((r) => r.inserted).sort((x, y) => x - y)).toEqual([0, 15]);
      expect(await b.batchJobsInsert({ batchSeq: batch.seq, jobs: chunk(16, 15), now: T0 + 2, maxQueued: 1000 })).toEqual({ inserted: 15, stopped: null });
      // Every job claimed, then ended at once from three instances: 20 done, 10 failed.
      const claimed = (await Promise.all(ds.map((d) => d.jobsClaim({ owner: 'w', limit: N, now: T0 + 3, leaseMs: 60_000 })))).flatMap((cs, k) => cs.map((c) => ({ c, d: ds[k]! })));
      expect(claimed).toHaveLength(N);
      await Promise.all(
        claimed.map(async ({ c, d }, i) => {
          expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: T0 + 4, leaseMs: 60_000 })).toBe(true);
          if (i % 3 === 0) expect(await d.jobFail({ seq: c.seq, lease: c.lease, now: T0 + 5, error: { code: 'x', message: 'no' } })).toBe(true);
          else expect(await d.jobComplete({ seq: c.seq, lease: c.lease, now: T0 + 5, result: { i }, artifacts: [], runMs: 1 })).toBe(true);
        }),
      );
      expect(await a.batchGet({ id: 'batch_x' })).toMatchObject({ status: 'completed', submitted: N, completed: 20, failed: 10, canceled: 0, completedAt: T0 + 5 });
      const events = (await a.deliveriesClaim({ now: T0 + 6, limit: 10, perOriginLimit: 10, inlineMax: 0 })).deliveries;
      expect(events.map((e) => [e.jobId, e.state])).toEqual([['batch_x', 'batch.completed']]);
      expect((await a.batchResultsPage({ batchSeq: batch.seq, role: 'output', afterSeq: 0, limit: 100 })).length).toBe(20);
    } finally {
      for (const d of ds) await d.close();
      await db.drop();
    }
  });

  it("a batch job's end settles its batch in the same statement, whatever wrote it (here a bare UPDATE, in its own transaction)", async () => {
    const db = await freshDb();
    const d = new PostgresDriver({ url: db.url, crossInstance: false });
    try {
      const fileSeq = await d.fileInsert({
        file: { id: 'file-1', keyId: '', filename: 'in.jsonl', endpoint: '/v1/embeddings', createdAt: T0, expiresAt: null },
        lines: [{ n: 1, customId: 'only', body: '{}' }],
      });
      await d.fileFinish({ fileSeq, bytes: 2, lines: 1 });
      const b = (await d.batchInsert({
        now: T0,
        batch: {
          id: 'batch_1', keyId: '', inputFileSeq: fileSeq, inputFileId: 'file-1', endpoint: '/v1/embeddings', completionWindow: '24h',
          metadata: null, webhookUrl: 'http://127.0.0.1:9/b', priority: 0, total: 1, outputFileId: 'file-o', errorFileId: 'file-e',
          expiresAt: T0 + 86_400_000, fileExpiresAt: null,
        },
      }))!;
      const job = { ...newJob({ kind: 'embed', request: { model: 'm1', input: 'x' } }), line: 1 };
      expect(await d.batchJobsInsert({ batchSeq: b.seq, jobs: [job], now: T0 + 1, maxQueued: 10 })).toEqual({ inserted: 1, stopped: null });
      await d.pool.query(`UPDATE jobs SET state = 'canceled', finished_at = $2, updated_at = $2 WHERE id = $1`, [job.id, T0 + 5]);
      expect(await d.batchGet({ id: 'batch_1' })).toMatchObject({ status: 'completed', canceled: 1, finalizingAt: T0 + 5, completedAt: T0 + 5 });
      const [ev] = (await d.deliveriesClaim({ now: T0 + 6, limit: 10, perOriginLimit: 10, inlineMax: 0 })).deliveries;
      expect(ev).toMatchObject({ jobId: 'batch_1', state: 'batch.completed', origin: 'http://127.0.0.1:9', occurredAt: T0 + 5 });
      // A status the batch may not go to is refused by the database (OpenAI's edges only).
      await expect(d.pool.query(`UPDATE batches SET status = 'in_progress' WHERE id = 'batch_1'`)).rejects.toThrow(/illegal batch status transition/);
    } finally {
      await d.close();
      await db.drop();
    }
  });

  it('migrations 0004 and 0007 on a database migrated without them (to 0006, 0008, …) give the schema a fresh database gets', async () => {
    const all = fileURLToPath(new URL('../../migrations/postgres/', import.meta.url));
    const early = fs.mkdtempSync(path.join(os.tmpdir(), 'foreman-migrations-'));
    for (const f of fs.readdirSync(all)) if (!/^000[47]_/.test(f)) fs.copyFileSync(path.join(all, f), path.join(early, f));
    const schema = async (c: pg.Client) => {
      const rows = async (sql: string) => (await c.query(sql)).rows.map((r) => JSON.stringify(r)).sort();
      return [
        await rows(`SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns WHERE table_schema = 'public'`),
        await rows(`SELECT conrelid::regclass::text AS t, pg_get_constraintdef(oid) AS d FROM pg_constraint WHERE connamespace = 'public'::regnamespace`),
        await rows(`SELECT indexdef FROM pg_indexes WHERE schemaname = 'public'`),
        await rows(`SELECT pg_get_triggerdef(oid) AS d FROM pg_trigger WHERE NOT tgisinternal`),
        await rows(`SELECT proname, prosrc FROM pg_proc WHERE pronamespace = 'public'::regnamespace`),
      ];
    };
    const [a, b] = [await createDatabase('foreman_order'), await createDatabase('foreman_order')];
    const [ca, cb] = [new pg.Client({ connectionString: a.url }), new pg.Client({ connectionString: b.url })];
    try {
      await ca.connect();
      await cb.connect();
      const versions = fs.readdirSync(all).filter((f) => /^\d{4}_/.test(f)).sort().map((f) => Number(f.slice(0, 4)));
      expect(await migrate(ca, early)).toEqual(versions.filter((v) => v !== 4 && v !== 7));
      expect(await migrate(ca, all)).toEqual([4, 7]);
      expect(await migrate(cb, all)).toEqual(versions);
      expect(await schema(ca)).toEqual(await schema(cb));
    } finally {
      await ca.end();
      await cb.end();
      await a.drop();
      await b.drop();
      fs.rmSync(early, { recursive: true, force: true });
    }
  });

  it("a host's slots are shared by the instances: a claim takes only what is free on it anywhere, and is woken when a job ends elsewhere", async () => {
    const db = await freshDb();
    const [a, b] = [new PostgresDriver({ url: db.url, instanceId: 'inst-a' }), new PostgresDriver({ url: db.url, instanceId: 'inst-b' })];
    const host = (name: string): ClaimHost => ({ name, models: ['m1'], resident: [], loadMs: {}, affinityMaxWaitMs: 0, slots: 3 });
    const claim = (d: PostgresDriver, limit: number, h: ClaimHost, now: number) => d.jobsClaim({ owner: 'w', limit, now, leaseMs: 60_000, engine: h });
    try {
      await Promise.all([a.ready, b.ready]);
      await a.jobsInsert({ jobs: Array.from({ length: 8 }, () => newJob()), now: T0, maxQueued: 100 });
      const onA = await claim(a, 2, host('gpu1'), T0 + 1);
      expect(onA.length).toBe(2);
      // b's worker has all 3 of its own slots free; 2 of the host's are taken on a.
      expect((await claim(b, 3, host('gpu1'), T0 + 2)).length).toBe(1);
      expect(await claim(b, 2, host('gpu1'), T0 + 3)).toEqual([]);
      expect(await claim(a, 1, host('gpu1'), T0 + 3)).toEqual([]);
      // Another host's slots are its own.
      const onGpu2 = await claim(b, 3, host('gpu2'), T0 + 4);
      expect(onGpu2.length).toBe(3);
      let wakes = 0;
      const woken = new Promise<void>((resolve) => {
        b.notifier.on('jobReady', () => {
          wakes++;
          resolve();
        });
      });
      // A job ending on gpu2 frees none of gpu1's slots: b's worker, waiting for gpu1, sleeps on.
      const g = onGpu2[0]!;
      expect(await b.jobSetWorking({ seq: g.seq, lease: g.lease, now: T0 + 5, leaseMs: 60_000 })).toBe(true);
      expect(await b.jobComplete({ seq: g.seq, lease: g.lease, now: T0 + 5, result: { ok: 1 }, artifacts: [], runMs: 1 })).toBe(true);
      await new Promise((r) => setTimeout(r, 300));
      expect(wakes).toBe(0);
      // A job that ends on a, on gpu1, wakes b's worker, whose claim then takes the freed slot.
      const j = onA[0]!;
      expect(await a.jobSetWorking({ seq: j.seq, lease: j.lease, now: T0 + 5, leaseMs: 60_000 })).toBe(true);
      expect(await a.jobComplete({ seq: j.seq, lease: j.lease, now: T0 + 5, result: { ok: 1 }, artifacts: [], runMs: 1 })).toBe(true);
      await woken;
      expect((await claim(b, 3, host('gpu1'), T0 + 6)).length).toBe(1);
      expect(await claim(b, 3, host('gpu1'), T0 + 7)).toEqual([]);
    } finally {
      await a.close();
      await b.close();
      await db.drop();
    }
  });

  it("an instance that hears no other on the channel still counts a host's slots across the cluster while another keeps its engine view fresh", async () => {
    const db = await freshDb();
    // Neither listens: as if each one's LISTEN connection were down, no heartbeat is heard.
    const [a, b] = ['inst-a', 'inst-b'].map((instanceId) => new PostgresDriver({ url: db.url, instanceId, crossInstance: false }));
    const host: ClaimHost = { name: 'gpu1', models: ['m1'], resident: [], loadMs: {}, affinityMaxWaitMs: 0, slots: 1 };
    const view = { allUp: true, downSince: null, anyModel: false, models: ['m1'], hosts: [{ name: 'gpu1', slots: 1 }], tags: [] };
    const put = (d: PostgresDriver, now: number) => d.instanceEnginesPut({ now, view, deleteBefore: 0, freshSince: now - 16_000 });
    try {
      await a!.jobsInsert({ jobs: [newJob(), newJob()], now: T0, maxQueued: 10 });
      expect(await put(b!, T0)).toEqual({ others: 0 });
      expect((await b!.jobsClaim({ owner: 'w', limit: 1, now: T0 + 1, leaseMs: 60_000, engine: host })).length).toBe(1);
      expect(await put(a!, T0 + 2)).toEqual({ others: 1 });
      // gpu1's one slot is taken on b: a, which has its own slot free, takes nothing.
      expect(await a!.jobsClaim({ owner: 'w', limit: 1, now: T0 + 3, leaseMs: 60_000, engine: host })).toEqual([]);
      // b's view goes stale (b is gone): a no longer counts on it.
      expect(await put(a!, T0 + 20_000)).toEqual({ others: 0 });
    } finally {
      for (const d of [a, b]) await d!.close();
      await db.drop();
    }
  });

  it("a 410 recorded while the job changes state waits for the job's row: no deadlock", async () => {
    const db = await freshDb();
    const d = new PostgresDriver({ url: db.url, instanceId: 'inst-a', crossInstance: false });
    const c = new pg.Client({ connectionString: db.url });
    try {
      await c.connect();
      const j = newJob({ webhookUrl: 'http://127.0.0.1:9/h' });
      await d.jobsInsert({ jobs: [j], now: T0, maxQueued: 10 });
      const [ev] = (await d.deliveriesClaim({ now: T0 + 1, limit: 10, perOriginLimit: 10, inlineMax: 0 })).deliveries;
      // A transition in flight holds the job's row and takes the line's lock next (foreman_record).
      await c.query('BEGIN');
      const { seq } = (await c.query<{ seq: string }>('UPDATE jobs SET updated_at = updated_at WHERE id = $1 RETURNING seq', [j.id])).rows[0]!;
      const gone = d.deliveryRecord({ id: ev!.id, now: T0 + 2, outcome: { kind: 'gone', status: 410, error: 'HTTP 410' } });
      await new Promise((r) => setTimeout(r, 300)); // the record is waiting by now
      const t0 = performance.now();
      await c.query('SELECT pg_advisory_xact_lock($1)', [-Number(seq)]); // line lock first: a deadlock (1 s)
      const waited = performance.now() - t0;
      await c.query('COMMIT');
      await gone;
      expect(waited).toBeLessThan(500);
      const view = (await d.jobGet({ id: j.id }))!;
      expect(view.deliveries.map((x) => [x.state, x.status, x.lastStatusCode])).toEqual([['queued', 'failed', 410]]);
    } finally {
      await c.end();
      await d.close();
      await db.drop();
    }
  });

  it("instances' engine views: a put replaces the instance's own; the list gives the others' seen within maxAgeMs; a put deletes the views seen before deleteBefore", async () => {
    const db = await freshDb();
    const [a, b, c] = ['inst-a', 'inst-b', 'inst-c'].map((instanceId) => new PostgresDriver({ url: db.url, instanceId, crossInstance: false }));
    const view = (o: Partial<EngineView> = {}): EngineView => ({ allUp: true, downSince: null, anyModel: false, models: [], hosts: [], tags: [], ...o });
    const tag = { name: 'llama3.2:latest', model: 'llama3.2:latest', modified_at: '2026-01-02T03:04:05Z', size: 2019393189, digest: 'a80c4f17acd5', details: { family: 'llama' } };
    const keep = T0 - 1;
    try {
      await a!.instanceEnginesPut({ now: T0, view: view({ models: ['llama3.2', 'llama3.2:latest'], hosts: [{ name: 'gpu1', slots: 2 }], tags: [tag] }), deleteBefore: keep, freshSince: T0 });
      await b!.instanceEnginesPut({ now: T0 + 10, view: view({ anyModel: true }), deleteBefore: keep, freshSince: T0 });
      await b!.instanceEnginesPut({ now: T0 + 20, view: view({ allUp: false, downSince: T0 + 15, anyModel: true }), deleteBefore: keep, freshSince: T0 });
      expect(await c!.instanceEnginesList({ now: T0 + 1_000, maxAgeMs: 1_000 })).toEqual([
        { instance: 'inst-a', seenAt: T0, allUp: true, downSince: null, anyModel: false, models: ['llama3.2', 'llama3.2:latest'], hosts: [{ name: 'gpu1', slots: 2 }], tags: [tag] },
        { instance: 'inst-b', seenAt: T0 + 20, allUp: false, downSince: T0 + 15, anyModel: true, models: [], hosts: [], tags: [] },
      ]);
      // Not its own; and a view older than maxAgeMs is left out.
      expect((await b!.instanceEnginesList({ now: T0 + 1_000, maxAgeMs: 1_000 })).map((v) => v.instance)).toEqual(['inst-a']);
      expect((await c!.instanceEnginesList({ now: T0 + 1_001, maxAgeMs: 1_000 })).map((v) => v.instance)).toEqual(['inst-b']);
      // The table's CHECK: hosts down since some time are not all up.
      await expect(a!.instanceEnginesPut({ now: T0, view: view({ downSince: T0 }), deleteBefore: keep, freshSince: T0 })).rejects.toThrow();
      // A put deletes the others' views seen before deleteBefore, never its own.
      await c!.instanceEnginesPut({ now: T0 + 30, view: view(), deleteBefore: T0 + 15, freshSince: T0 });
      await a!.instanceEnginesPut({ now: T0 + 40, view: view(), deleteBefore: T0 + 50, freshSince: T0 });
      const client = new pg.Client({ connectionString: db.url });
      await client.connect();
      try {
        expect((await client.query('SELECT instance_id FROM instance_engines ORDER BY instance_id')).rows.map((r) => r.instance_id)).toEqual(['inst-a']);
      } finally {
        await client.end();
      }
    } finally {
      for (const d of [a, b, c]) await d!.close();
      await db.drop();
    }
  });

  it("deliveriesNextDueAt counts a delivery whose claim's lease ran out as unclaimed, and not against its origin's cap", async () => {
    const db = await freshDb();
    const d = new PostgresDriver({ url: db.url, instanceId: 'inst-a', crossInstance: false, deliveryLeaseMs: 1_000 });
    try {
      const hook = { webhookUrl: 'http://127.0.0.1:9/hook', webhookEvents: ['queued' as const] };
      await d.jobsInsert({ jobs: [newJob(hook)], now: T0, maxQueued: 10 });
      await d.jobsInsert({ jobs: [newJob(hook)], now: T0 + 5, maxQueued: 10 });
      const got = await d.deliveriesClaim({ now: T0 + 10, limit: 10, perOriginLimit: 1, inlineMax: 1024 });
      expect(got.deliveries).toHaveLength(1);
      // Its lease runs to T0 + 1010: until then the origin is at its cap of 1.
      expect(await d.deliveriesNextDueAt({ now: T0 + 1_009, perOriginLimit: 1 })).toBeNull();
      expect(await d.deliveriesNextDueAt({ now: T0 + 1_009, perOriginLimit: 2 })).toBe(T0 + 5);
      // After it, the claim counts for nothing: the first row is due again, first.
      expect(await d.deliveriesNextDueAt({ now: T0 + 1_010, perOriginLimit: 1 })).toBe(T0);
    } finally {
      await d.close();
      await db.drop();
    }
  });

  it("a late outcome from an instance whose webhook claim another instance has since taken changes nothing; with nobody holding it, it is recorded", async () => {
    const db = await freshDb();
    const [a, b] = ['inst-a', 'inst-b'].map((instanceId) => new PostgresDriver({ url: db.url, instanceId, crossInstance: false, deliveryLeaseMs: 1_000 }));
    const client = new pg.Client({ connectionString: db.url });
    await client.connect();
    const row = async (id: number) =>
      (await client.query('SELECT status, attempts, claimed_by, due_at IS NOT NULL AS due FROM webhook_deliveries WHERE id = $1', [id])).rows[0];
    const claim = async (d: PostgresDriver, now: number) => (await d.deliveriesClaim({ now, limit: 10, perOriginLimit: 10, inlineMax: 1024 })).deliveries;
    try {
      const hook = { webhookUrl: 'http://127.0.0.1:9/hook', webhookEvents: ['queued' as const, 'loading' as const] };
      await a!.jobsInsert({ jobs: [newJob(hook), newJob(hook)], now: T0, maxQueued: 10 });
      const [d1, d2] = await claim(a!, T0 + 1);
      // A's lease (to T0 + 1001) runs out; B claims both and is sending them.
      expect((await claim(b!, T0 + 1_001)).map((d) => d.id)).toEqual([d1!.id, d2!.id]);
      // A's late outcomes: a retry, a failure, and a delivered record with the claim of the job's next event.
      await a!.deliveryRecord({ id: d1!.id, now: T0 + 1_002, outcome: { kind: 'retry', at: T0 + 1_003, status: 503, error: 'HTTP 503' } });
      await a!.deliveryRecord({ id: d1!.id, now: T0 + 1_002, outcome: { kind: 'failed', status: 400, error: 'HTTP 400' } });
      expect(await a!.deliveryRecordClaimNext!({ id: d2!.id, now: T0 + 1_002, status: 200, inlineMax: 1024 })).toEqual({ recorded: false, next: null });
      for (const d of [d1!, d2!]) expect(await row(d.id)).toEqual({ status: 'pending', attempts: 0, claimed_by: 'inst-b', due: true });
      // B records its own attempts.
      await b!.deliveryRecord({ id: d1!.id, now: T0 + 1_004, outcome: { kind: 'delivered', status: 200 } });
      expect((await b!.deliveryRecordClaimNext!({ id: d2!.id, now: T0 + 1_004, status: 200, inlineMax: 1024 })).recorded).toBe(true);
      for (const d of [d1!, d2!]) expect(await row(d.id)).toMatchObject({ status: 'delivered', attempts: 1, claimed_by: null });
      // A job event nobody holds (its claim expired and was released) takes a late record.
      const [j3] = await a!.jobsInsert({ jobs: [newJob(hook)], now: T0 + 2_000, maxQueued: 10 });
      const [d3] = await claim(a!, T0 + 2_001);
      expect(await b!.jobsRescue({ now: T0 + 3_002 })).toEqual([]); // the leader's round releases expired webhook claims
      expect(await row(d3!.id)).toMatchObject({ status: 'pending', claimed_by: null });
      await a!.deliveryRecord({ id: d3!.id, now: T0 + 3_003, outcome: { kind: 'delivered', status: 200 } });
      expect(await row(d3!.id)).toMatchObject({ status: 'delivered', attempts: 1, claimed_by: null });
      expect(j3).toMatchObject({ ok: true });
    } finally {
      await client.end();
      for (const d of [a, b]) await d!.close();
      await db.drop();
    }
  });

  it('NOTIFY payloads stay below the 8000-byte limit', async () => {
    const { payloadsOf, MAX_PAYLOAD } = await import('../../src/queue/postgres/notify.js');
    // Two long messages: one of plain letters, one of control characters (six bytes each as JSON).
    const message = (n: number) => (n === 5 ? 'e'.repeat(20_000) : n === 7 ? '\u0001'.repeat(20_000) : 'e'.repeat(10));
    const t = Array.from({ length: 200 }, (_, n) => ({ jobId: `job-${n}`, state: 'failed' as const, n, at: T0, attempt: 1, error: { code: 'x', message: message(n) } }));
    const ps = payloadsOf('me', { jobReady: true, deliveryReady: false, batchReady: false, transitions: t, canceled: [] });
    expect(ps.length).toBeGreaterThan(1);
    for (const p of ps) expect(Buffer.byteLength(p)).toBeLessThanOrEqual(MAX_PAYLOAD);
    expect(ps.flatMap((p) => (JSON.parse(p) as { t: unknown[] }).t).length).toBe(200);
  });
});

/** A dispatcher's options for these tests: loopback receivers, short backoff. */
const dispatcherOptions = (o: { concurrency: number; pollIntervalMs: number }): ConstructorParameters<typeof Dispatcher>[0]['options'] => ({
  ...o,
  perOriginConcurrency: 8,
  timeoutMs: 5_000,
  backoffBaseMs: 100,
  backoffMaxMs: 1_000,
  retryAfterMaxMs: 1_000,
  maxAttempts: 3,
  blockPrivate: false,
  allow: blockListOf([]),
  self: () => null,
  inlineArtifactMaxBytes: 1024,
  secrets: [],
  userAgent: 'foreman-test',
  artifactUrl: () => 'http://127.0.0.1:1/unused',
});

describe('the dispatcher on PostgreSQL (ADR-0007: never sent again while its outcome is being recorded)', () => {
  it('a delivery whose record keeps failing past its lease is claimed again by this instance, and not sent again', async () => {
    const db = await freshDb();
    const driver = new PostgresDriver({ url: db.url, instanceId: 'disp-r', crossInstance: false, deliveryLeaseMs: 300 });
    const receiver = await startReceiver(() => 200);
    // The real driver; only its records of outcomes fail, for 1.5 s (the database unreachable for them).
    let failUntil = 0;
    let claims = 0;
    const faulty = new Proxy(driver, {
      get(target, prop, recv) {
        const v = Reflect.get(target, prop, recv);
        if (typeof v !== 'function') return v;
        if (prop === 'deliveryRecord' || prop === 'deliveryRecordClaimNext') {
          return (...args: unknown[]) =>
            Date.now() < failUntil ? Promise.reject(new StorageUnavailable('storage unavailable: test')) : (v as (...a: unknown[]) => unknown).apply(target, args);
        }
        if (prop === 'deliveriesClaim') {
          return async (...args: unknown[]) => {
            const out = await (v as (...a: unknown[]) => Promise<{ deliveries: unknown[] }>).apply(target, args);
            claims += out.deliveries.length;
            return out;
          };
        }
        return (v as (...a: unknown[]) => unknown).bind(target);
      },
    });
    const dispatcher = new Dispatcher({
      driver: faulty,
      clock: systemClock,
      logger: pino({ level: 'silent' }),
      options: dispatcherOptions({ concurrency: 4, pollIntervalMs: 50 }),
    });
    try {
      await driver.ready;
      dispatcher.start();
      failUntil = Date.now() + 1_500;
      const job = newJob({ webhookUrl: `${receiver.url}/h`, webhookEvents: ['queued'] });
      await driver.jobsInsert({ jobs: [job], now: Date.now(), maxQueued: 10 });
      await receiver.waitFor((r) => r.length === 1);
      await until('the outcome to be recorded', async () => (await driver.jobGet({ id: job.id }))!.deliveries[0]!.status === 'delivered', 10_000);
      // Its lease ran out several times while the record failed, and this instance's claim took it back.
      expect(claims).toBeGreaterThan(0);
      expect(receiver.received.map((r) => r.event.state)).toEqual(['queued']);
    } finally {
      await dispatcher.stop(1_000);
      await receiver.close();
      await driver.close();
      await db.drop();
    }
  });
});

describe('the dispatcher on PostgreSQL (ADR-0017)', () => {
  it("sends a job's events claimed on write, with no claim statement, and claims the ordinary way while it has no room", async () => {
    const db = await freshDb();
    const driver = new PostgresDriver({ url: db.url, instanceId: 'disp-a', crossInstance: false });
    const gate: { open: () => void; p: Promise<void> } = (() => {
      let open!: () => void;
      const p = new Promise<void>((r) => (open = r));
      return { open, p };
    })();
    let holdFirst = true;
    const receiver = await startReceiver(async () => {
      if (holdFirst) {
        holdFirst = false;
        await gate.p;
      }
      return 200;
    });
    // The real driver, with its calls counted (a spy, not a stand-in).
    const calls = { deliveriesClaim: 0, deliveriesClaimed: 0 };
    const counted = new Proxy(driver, {
      get(target, prop, recv) {
        const v = Reflect.get(target, prop, recv);
        if (typeof v !== 'function') return v;
        if (prop === 'deliveriesClaim' || prop === 'deliveriesClaimed') {
          return (...args: unknown[]) => {
            calls[prop]++;
            return (v as (...a: unknown[]) => unknown).apply(target, args);
          };
        }
        return (v as (...a: unknown[]) => unknown).bind(target);
      },
    });
    const dispatcher = new Dispatcher({
      driver: counted,
      clock: systemClock,
      logger: pino({ level: 'silent' }),
      options: dispatcherOptions({ concurrency: 1, pollIntervalMs: 60_000 }),
    });
    try {
      await driver.ready;
      dispatcher.start();
      const claimsAtStart = calls.deliveriesClaim; // the first tick looks once
      const [a, b] = [newJob({ webhookUrl: `${receiver.url}/a`, webhookEvents: ['queued'] }), newJob({ webhookUrl: `${receiver.url}/b`, webhookEvents: ['queued'] })];
      await driver.jobsInsert({ jobs: [a], now: Date.now(), maxQueued: 100 });
      // a's event goes out claimed on write, and its receiver holds it: the dispatcher (one slot) is full.
      await receiver.waitFor((r) => r.length === 1);
      expect(calls).toEqual({ deliveriesClaim: claimsAtStart, deliveriesClaimed: 1 });
      // b's event is written while there is no room: due and unclaimed, for the ordinary claim.
      await driver.jobsInsert({ jobs: [b], now: Date.now(), maxQueued: 100 });
      expect((await driver.jobGet({ id: b.id }))!.deliveries.map((x) => x.status)).toEqual(['pending']);
      gate.open();
      const got = await receiver.waitFor((r) => r.length === 2);
      expect(got.map((r) => r.event.job_id)).toEqual([a.id, b.id]);
      expect(calls.deliveriesClaimed).toBe(1);
      expect(calls.deliveriesClaim).toBeGreaterThan(claimsAtStart);
    } finally {
      await dispatcher.stop(1_000);
      await receiver.close();
      await driver.close();
      await db.drop();
    }
  });
});
