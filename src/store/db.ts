import Database from 'better-sqlite3';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export type DB = Database.Database;

/** Finds the repository's `migrations/` folder whether we run from src/ (tests) or dist/src/ (built). */
export function defaultMigrationsDir(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 6; i++) {
    const candidate = path.join(dir, 'migrations');
    if (fs.existsSync(candidate) && fs.existsSync(path.join(dir, 'package.json'))) return candidate;
    dir = path.dirname(dir);
  }
  throw new Error('migrations/ folder not found next to package.json');
}

/**
 * Opens (creating if needed) the database with the durability settings of ADR-0002:
 * WAL, synchronous=FULL (a commit survives power loss), foreign keys on, a busy timeout.
 */
export function openDatabase(
  file: string,
  opts: { busyTimeoutMs?: number; readonly?: boolean; synchronous?: 'FULL' | 'NORMAL' } = {},
): DB {
  const db = new Database(file, { readonly: opts.readonly ?? false, fileMustExist: opts.readonly ?? false });
  db.pragma(`busy_timeout = ${Math.trunc(opts.busyTimeoutMs ?? 5000)}`);
  if (!opts.readonly) {
    db.pragma('journal_mode = WAL');
    db.pragma(`synchronous = ${opts.synchronous === 'NORMAL' ? 'NORMAL' : 'FULL'}`);
  }
  db.pragma('foreign_keys = ON');
  return db;
}

/** Applies every numbered `NNNN_name.sql` not yet recorded in `schema_migrations`, each in its own transaction. */
export function migrate(db: DB, dir: string = defaultMigrationsDir()): number[] {
  db.exec(`CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at INTEGER NOT NULL
  )`);
  const applied = new Set(
    (db.prepare('SELECT version FROM schema_migrations').all() as { version: number }[]).map((r) => r.version),
  );
  const files = fs
    .readdirSync(dir)
    .filter((f) => /^\d{4}_[a-z0-9_]+\.sql$/.test(f))
    .sort();
  const ran: number[] = [];
  const record = db.prepare('INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)');
  for (const f of files) {
    const version = Number(f.slice(0, 4));
    if (applied.has(version)) continue;
    const sql = fs.readFileSync(path.join(dir, f), 'utf8');
    db.transaction(() => {
      db.exec(sql);
      record.run(version, f, Date.now());
    })();
    ran.push(version);
  }
  return ran;
}

/** SQLite errors that mean storage is unavailable (locked, read-only, full, I/O), not a bug. */
export function isStorageError(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /^SQLITE_(BUSY|LOCKED|FULL|IOERR|READONLY|CANTOPEN|PROTOCOL|CORRUPT|NOTADB)/.test(code);
}
