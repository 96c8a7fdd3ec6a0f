/**
 * vitest globalSetup: one private PostgreSQL cluster for the whole run, stopped at the end. Its
 * admin URL reaches the test files (and the child processes they start) as
 * FOREMAN_TEST_DATABASE_URL. An already set FOREMAN_TEST_DATABASE_URL is used as is.
 */
import { startPostgresCluster, type PostgresCluster } from './postgres.js';

let cluster: PostgresCluster | null = null;

export async function setup(): Promise<void> {
  if (process.env.FOREMAN_TEST_DATABASE_URL) return;
  cluster = await startPostgresCluster();
  process.env.FOREMAN_TEST_DATABASE_URL = cluster.adminUrl;
}

export async function teardown(): Promise<void> {
  if (cluster) await cluster.stop();
  cluster = null;
}
