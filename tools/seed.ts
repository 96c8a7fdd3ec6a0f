/**
 * Seeds a Foreman database with many finished jobs, straight through SQLite, for the listing and
 * lookup benchmarks. A tool, not part of the service: it writes rows in the service's schema
 * (migrated by the service's own `migrate`) so the service can then be started on the file.
 */
import Database from 'better-sqlite3';
import { migrate } from '../src/queue/sqlite/db.js';
import { uuidv7 } from '../src/ids.js';

export function seedJobs(file: string, n: number, opts: { models?: string[]; batches?: number } = {}): { ids: string[]; ms: number } {
  const t0 = performance.now();
  const db = new Database(file);
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = OFF');
  migrate(db);
  const models = opts.models ?? ['llama3.2', 'qwen3', 'mistral'];
  const batches = opts.batches ?? 100;
  const insJob = db.prepare(`INSERT INTO jobs (id, state, model, request, metadata, max_attempts, run_at, created_at,
      started_at, finished_at, updated_at, result, attempt)
    VALUES (?, 'done', ?, '{}', ?, 3, ?, ?, ?, ?, ?, '{"message":{"role":"assistant","content":"ok"}}', 1) RETURNING seq`);
  const insMeta = db.prepare(`INSERT INTO job_metadata (key, value, job_seq) VALUES (?, ?, ?)`);
  const insT = db.prepare(`INSERT INTO job_transitions (job_seq, n, state, at, attempt) VALUES (?, ?, ?, ?, 1)`);
  const ids: string[] = [];
  const start = Date.now() - n * 10;
  const chunk = 50_000;
  for (let base = 0; base < n; base += chunk) {
    db.transaction(() => {
      for (let i = base; i < Math.min(n, base + chunk); i++) {
        const at = start + i * 10;
        const id = uuidv7(at);
        const batch = `b${i % batches}`;
        const seq = (insJob.get(id, models[i % models.length], JSON.stringify({ batch }), at, at, at, at + 5, at + 5) as { seq: number }).seq;
        insMeta.run('batch', batch, seq);
        insT.run(seq, 1, 'queued', at);
        insT.run(seq, 2, 'loading', at);
        insT.run(seq, 3, 'working', at + 1);
        insT.run(seq, 4, 'done', at + 5);
        ids.push(id);
      }
    })();
  }
  db.pragma('wal_checkpoint(TRUNCATE)');
  db.close();
  return { ids, ms: performance.now() - t0 };
}
