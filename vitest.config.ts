import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 30_000,
    hookTimeout: 30_000,
    pool: 'forks',
    // One private PostgreSQL cluster per run (test/support/postgres.ts); each test file makes its own database.
    globalSetup: ['test/support/pg-global-setup.ts'],
  },
});
