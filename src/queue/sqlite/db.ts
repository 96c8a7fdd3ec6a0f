import Database from 'better-sqlite3';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export type DB = Database.Database;

/** Finds the repository's `migrations/sqlite/` folder whether we run from src/ (tests) or dist/src/ (built). */
export function defaultMigrationsDir(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 8; i++) {
    const candidate = path.join(dir, 'migrations', 'sqlite');
    if (fs.existsSync(candidate) && fs.existsSync(path.join(dir, 'package.json'))) return candidate;
    dir = path.dirname(dir);
  }
  throw new Error('migrations/sqlite/ folder not found next to package.json');
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
  db.pragma(`busy_timeout = ${Math.trunc(opts.busyTimeoutMs ?? 1000)}`);
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
    // A migration that rebuilds a table others reference asks for foreign keys to be off while it
    // runs (SQLite's documented procedure: a DROP would otherwise cascade); they are checked before
    // it commits. The pragma has no effect inside a transaction, so it is set around it.
    const fkOff = sql.startsWith('-- foreman:foreign-keys-off');
    if (fkOff) db.pragma('foreign_keys = OFF');
    try {
      db.transaction(() => {
        db.exec(sql);
        if (fkOff) {
          const bad = db.pragma('foreign_key_check') as unknown[];
          if (bad.length > 0) throw new Error(`migration ${f} left ${bad.length} broken foreign keys`);
        }
        record.run(version, f, Date.now());
      })();
    } finally {
      if (fkOff) db.pragma('foreign_keys = ON');
    }
    ran.push(version);
  }
  return ran;
}

/** SQLite errors that mean storage is unavailable (locked, read-only, full, I/O), not a bug. */
export function isSqliteStorageError(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && /^SQLITE_(BUSY|LOCKED|FULL|IOERR|READONLY|CANTOPEN|PROTOCOL|CORRUPT|NOTADB)/.test(code);
}

/** The data directory is already used by a live process. */
export class DataDirLocked extends Error {
  constructor(dir: string) {
    super(
      `the data directory ${dir} is in use by another running Foreman process; ` +
        'a SQLite data directory belongs to exactly one process (use FOREMAN_DATABASE_URL=postgres://… to run several)',
    );
    this.name = 'DataDirLocked';
  }
}

/**
 * Takes the data directory for this process: an exclusive lock on `foreman.lock`, held by an open
 * SQLite connection in EXCLUSIVE locking mode. It is an OS file lock, so the kernel releases it
 * when the process dies, even by SIGKILL; a second process gets `DataDirLocked` at once.
 */
export function lockDataDir(dir: string): { release(): void } {
  const lock = new Database(path.join(dir, 'foreman.lock'));
  try {
    lock.pragma('busy_timeout = 0');
    lock.pragma('locking_mode = EXCLUSIVE');
    lock.exec('CREATE TABLE IF NOT EXISTS holder (pid INTEGER, since INTEGER)');
    lock.exec('BEGIN EXCLUSIVE');
    lock.prepare('DELETE FROM holder').run();
    lock.prepare('INSERT INTO holder VALUES (?, ?)').run(process.pid, Date.now());
    lock.exec('COMMIT'); // in EXCLUSIVE locking mode the lock stays after the commit
  } catch (err) {
    lock.close();
    if ((err as { code?: string }).code?.startsWith('SQLITE_BUSY')) throw new DataDirLocked(dir);
    throw err;
  }
  return { release: () => lock.close() };
}
