import { afterAll, beforeAll, expect, it } from 'vitest';
import { formatPgReport, pgChaosPassed, runPgChaos } from '../tools/chaos-postgres.js';
import { createDatabase } from './support/postgres.js';

// The small version of `npm run chaos -- --postgres --instances 3`: two instances as real child
// processes on one database (this run's private server), each kind of SIGKILL once.
let db: Awaited<ReturnType<typeof createDatabase>>;
beforeAll(async () => {
  db = await createDatabase('foreman_chaos');
});
afterAll(async () => {
  await db?.drop();
});

it('SIGKILL chaos on PostgreSQL, 2 instances: nothing lost, order kept, never run twice at once, one leader at a time', async () => {
  const r = await runPgChaos({ jobs: 40, kills: 4, instances: 2, seed: 4242, databaseUrl: db.url });
  const table = formatPgReport(r);
  console.log(table);
  expect(r.kills.map((k) => k.kind), table).toEqual(['submit', 'generation', 'delivery', 'leader']);
  expect(r.submitted, table).toBe(40);
  expect(r.lost, table).toBe(0);
  expect(r.stuck, table).toBe(0);
  expect(r.failed, table).toBe(0);
  expect(r.missingArtifacts, table).toBe(0);
  expect(r.eventsDelivered, table).toBe(160);
  expect(r.lostEvents, table).toBe(0);
  expect(r.pendingDeliveries, table).toBe(0);
  expect(r.orderViolations, table).toBe(0);
  expect(r.overlapping, table).toBe(0);
  expect(r.unknownInstance, table).toBe(0);
  expect(r.instanceMismatches, table).toBe(0);
  expect(r.instanceConfirmed, table).toBeGreaterThanOrEqual(36);
  expect(r.leaderOverlaps, table).toBe(0);
  expect(r.restarts, table).toBe(4);
  // The leader kill moved maintenance: at least two instances led it.
  expect(new Set(r.leadership.map((l) => l.instance)).size, table).toBeGreaterThanOrEqual(2);
  expect(pgChaosPassed(r), table).toBe(true);
}, 120_000);
