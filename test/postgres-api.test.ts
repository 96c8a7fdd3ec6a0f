/**
 * The api suite against the PostgreSQL driver (ADR-0011): the same tests, each service on a fresh database.
 */
process.env.FOREMAN_TEST_DRIVER = 'postgres';
await import('./api.test.js');
