/**
 * The Batch API suite (files and batches, ADR-0015) against the PostgreSQL driver (ADR-0011): the
 * same tests, each service on a fresh database.
 */
process.env.FOREMAN_TEST_DRIVER = 'postgres';
await import('./batches.test.js');
