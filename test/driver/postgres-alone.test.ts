/**
 * The conformance suite again, against a PostgreSQL driver that knows it is alone on its database
 * (`crossInstance: false`): the one-statement paths (a submit far from the caps, loading → working,
 * a completion) run without BEGIN and COMMIT. The default driver in postgres.test.ts runs them in
 * transactions with NOTIFY (an instance counts as not alone for its first heartbeat period).
 */
import { afterAll, beforeAll } from 'vitest';
import { PostgresDriver } from '../../src/queue/postgres/driver.js';
import { createDatabase } from '../support/postgres.js';
import { driverConformance } from './conformance.js';

let template: Awaited<ReturnType<typeof createDatabase>>;
beforeAll(async () => {
  template = await createDatabase('foreman_tpl_alone');
  const d = new PostgresDriver({ url: template.url, crossInstance: false });
  await d.ready;
  await d.close();
});
afterAll(async () => {
  await template?.drop();
});

driverConformance('postgres driver, alone on its database', async () => {
  const db = await createDatabase('foreman_ta', template.name);
  const driver = new PostgresDriver({ url: db.url, instanceId: 'test-alone', crossInstance: false });
  await driver.ready;
  return {
    driver,
    cleanup: async () => {
      await driver.close();
      await db.drop();
    },
  };
});
