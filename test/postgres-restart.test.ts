/**
 * The database restarts under a running instance: requests meanwhile get 503 storage_unavailable,
 * the instance reconnects by itself (pool, LISTEN, leader election), and nothing accepted is lost.
 * A private cluster of its own, so the restart touches no other test file.
 */
import { afterAll, beforeAll, expect, it } from 'vitest';
import pg from 'pg';
import { startPostgresCluster, type PostgresCluster } from './support/postgres.js';
import { hello, startHarness, type Harness } from './support/harness.js';
import { sleep } from './support/util.js';

let cluster: PostgresCluster;
let h: Harness;

beforeAll(async () => {
  cluster = await startPostgresCluster();
  const c = new pg.Client({ connectionString: cluster.adminUrl });
  await c.connect();
  await c.query('CREATE DATABASE restart_test');
  await c.end();
  const url = cluster.adminUrl.replace(/\/postgres$/, '/restart_test');
  // A short lease: a transition whose COMMIT the restart cut off leaves its outcome unknown to
  // the worker; if it did commit, the job is rescued once the lease expires.
  h = await startHarness({ databaseUrl: url, pollIntervalMs: 500, jobLeaseMs: 1500 }, { defaultChunkDelayMs: 5 });
}, 60_000);

afterAll(async () => {
  await h?.stop();
  await cluster?.stop();
});

it('a database restart: 503 storage_unavailable meanwhile, then it carries on by itself; nothing accepted is lost', async () => {
  const before = await Promise.all([1, 2, 3].map((i) => h.submit(hello(`before ${i}`))));
  for (const id of before) await h.waitForState(id, ['done']);
  const queuedBefore = await Promise.all([4, 5].map((i) => h.submit(hello(`before ${i}`))));

  const restarting = cluster.restart(1500);
  await sleep(500);
  const during = await h.api('/jobs', { method: 'POST', json: hello('during') });
  expect(during.status).toBe(503);
  expect(during.body.code).toBe('storage_unavailable');
  await restarting;

  // It reconnects by itself: submits work again within a few seconds.
  let after: string | null = null;
  for (let i = 0; i < 100 && after === null; i++) {
    const r = await h.api('/jobs', { method: 'POST', json: hello('after') });
    if (r.status === 202) after = r.body.job_id as string;
    else await sleep(100);
  }
  expect(after).not.toBeNull();
  for (const id of [...before, ...queuedBefore, after!]) expect((await h.waitForState(id, ['done'], 30_000)).state).toBe('done');
}, 90_000);
