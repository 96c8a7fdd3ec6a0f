/**
 * The lease fence: a run that cannot renew its job's lease (storage unreachable for it) stops
 * before the lease runs out, so the job, rescued once the lease has expired, never runs twice at
 * the same time (on PostgreSQL the rescued job may run on another instance). Storage fails only
 * for the renewals, injected in front of the real driver; everything else is real.
 */
import fs from 'node:fs';
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { StorageUnavailable } from '../src/errors.js';
import type { QueueDriver } from '../src/queue/driver.js';
import { PostgresDriver } from '../src/queue/postgres/driver.js';
import { SqliteDriver } from '../src/queue/sqlite/driver.js';
import { Service } from '../src/service.js';
import { startFakeOllama } from './support/fake-ollama.js';
import { tempDir, testConfig } from './support/harness.js';
import { createDatabase } from './support/postgres.js';
import { until } from './support/util.js';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
});

const LEASE_MS = 600;

describe('the lease fence', () => {
  for (const kind of ['sqlite', 'postgres'] as const) {
    it(`${kind}: a run whose lease renewals fail stops before the lease runs out; the rescued job runs again, never beside it`, async () => {
      const dir = tempDir();
      cleanups.push(async () => fs.rmSync(dir, { recursive: true, force: true }));
      const db = kind === 'postgres' ? await createDatabase('foreman_fence') : null;
      if (db) cleanups.push(db.drop);
      const real: QueueDriver = db ? new PostgresDriver({ url: db.url, instanceId: 'fence-a' }) : new SqliteDriver({ dataDir: dir });
      let failRenewals = false;
      let failed = 0;
      const driver = new Proxy(real, {
        get(target, key) {
          if (key === 'jobLeaseRenew') {
            return (p: Parameters<QueueDriver['jobLeaseRenew']>[0]) => {
              if (!failRenewals) return target.jobLeaseRenew(p);
              failed++;
              return Promise.reject(new StorageUnavailable('injected: the lease renewal cannot reach storage'));
            };
          }
          const v = Reflect.get(target, key, target) as unknown;
          return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(target) : v;
        },
      });
      const fake = await startFakeOllama();
      cleanups.push(() => fake.close());
      // Two slots: without the fence the rescued job would start in the second while the first still streams.
      const config = testConfig({ ollamaUrl: fake.url, dataDir: dir, jobLeaseMs: LEASE_MS, concurrency: 2, ...(db ? { databaseUrl: db.url } : {}) });
      const svc = new Service({ config, logger: pino({ level: 'silent' }), driver });
      const base = await svc.start();
      cleanups.push(() => svc.stop());
      const text = 'fence me';
      // The first run streams for 4 s; the second (after the rescue) at once.
      fake.enqueue({ kind: 'ok', chunks: Array.from({ length: 40 }, (_, i) => ({ content: `t${i} ` })), chunkDelayMs: 100 }, { kind: 'ok' });
      const r = await fetch(`${base}/jobs`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: text }] }),
      });
      expect(r.status).toBe(202);
      const { job_id: id } = (await r.json()) as { job_id: string };
      const state = async () => ((await (await fetch(`${base}/jobs/${id}`)).json()) as { state: string; attempt: number }).state;
      await until('working', async () => (await state()) === 'working', 5_000);
      failRenewals = true;
      const chats = () => fake.requests.filter((q) => q.kind === 'chat');
      await until('the first run stopped', async () => chats()[0]?.aborted === true, 3_000).catch((e: unknown) => { throw new Error(`${String(e)}: ${JSON.stringify(fake.requests.map((q) => [q.kind, q.path, q.aborted]))}`); });
      expect(failed).toBeGreaterThan(0);
      // The fence stopped it before its lease ran out: the job is still `working`, not yet rescued.
      expect(chats()).toHaveLength(1);
      failRenewals = false;
      await until('done', async () => (await state()) === 'done', 10_000);
      expect(chats()).toHaveLength(2);
      expect(fake.stats.overlapping).toBe(0);
      const job = (await (await fetch(`${base}/jobs/${id}`)).json()) as { attempt: number };
      expect(job.attempt).toBe(1); // a rescue does not count an attempt
    });
  }
});
