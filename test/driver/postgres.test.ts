/**
 * The queue driver conformance suite against the PostgreSQL driver (a fresh database per test, in
 * this run's private cluster: test/support/postgres.ts), plus what only a shared driver promises.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { PostgresDriver } from '../../src/queue/postgres/driver.js';
import { createDatabase } from '../support/postgres.js';
import { driverConformance, newJob } from './conformance.js';
import { UNSUPPORTED_ON_POSTGRES } from './postgres-unsupported.js';

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
}, { unsupported: UNSUPPORTED_ON_POSTGRES });

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

  it('files and batches are refused with not_supported_on_postgres (the skipped conformance tests)', async () => {
    const db = await freshDb();
    const d = new PostgresDriver({ url: db.url, crossInstance: false });
    try {
      const err = (await d.fileGet({ id: 'file-x' }).catch((e: unknown) => e)) as { code?: string };
      expect(err.code).toBe('not_supported_on_postgres');
      expect(await d.batchesActive({ limit: 10 })).toEqual([]);
    } finally {
      await d.close();
      await db.drop();
    }
  });

  it('NOTIFY payloads stay below the 8000-byte limit', async () => {
    const { payloadsOf, MAX_PAYLOAD } = await import('../../src/queue/postgres/notify.js');
    const t = Array.from({ length: 200 }, (_, n) => ({ jobId: `job-${n}`, state: 'failed' as const, n, at: T0, attempt: 1, error: { code: 'x', message: 'e'.repeat(n === 5 ? 20_000 : 10) } }));
    const ps = payloadsOf('me', { jobReady: true, deliveryReady: false, transitions: t, canceled: [] });
    expect(ps.length).toBeGreaterThan(1);
    for (const p of ps) expect(Buffer.byteLength(p)).toBeLessThanOrEqual(MAX_PAYLOAD);
    expect(ps.flatMap((p) => (JSON.parse(p) as { t: unknown[] }).t).length).toBe(200);
  });
});
