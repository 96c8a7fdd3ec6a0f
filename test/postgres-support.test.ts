import { expect, it } from 'vitest';
import pg from 'pg';
import { createDatabase } from './support/postgres.js';
it('a private postgres answers', async () => {
  const db = await createDatabase();
  const c = new pg.Client({ connectionString: db.url });
  await c.connect();
  const r = await c.query('SELECT current_database() AS d, current_setting(\'listen_addresses\') AS l');
  expect(r.rows[0]).toEqual({ d: db.name, l: '127.0.0.1' });
  await c.end();
  await db.drop();
});
