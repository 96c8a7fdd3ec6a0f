import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import pg from 'pg';
import { StorageUnavailable } from '../../errors.js';

/** bigint (int8) and numeric come back as JS numbers: every value Foreman stores fits in 2^53. */
export const pgTypes: pg.CustomTypesConfig = {
  getTypeParser: ((oid: number, format?: string) => {
    if (oid === 20 || oid === 1700) return (v: string) => Number(v);
    return pg.types.getTypeParser(oid, format as 'text');
  }) as pg.CustomTypesConfig['getTypeParser'],
};

/** Finds the repository's `migrations/postgres/` folder from src/ (tests) or dist/src/ (built). */
export function defaultMigrationsDir(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (let i = 0; i < 8; i++) {
    const candidate = path.join(dir, 'migrations', 'postgres');
    if (fs.existsSync(candidate) && fs.existsSync(path.join(dir, 'package.json'))) return candidate;
    dir = path.dirname(dir);
  }
  throw new Error('migrations/postgres/ folder not found next to package.json');
}

/** The advisory lock key migrations run under ('foreman-migrate'). */
const MIGRATION_LOCK = 7_466_371_012_345;

/**
 * Applies every numbered `NNNN_name.sql` not yet recorded in `schema_migrations`, each in its own
 * transaction, under a session advisory lock: instances that start at once take turns, and the
 * later ones find the work done.
 */
export async function migrate(client: pg.ClientBase, dir: string = defaultMigrationsDir()): Promise<number[]> {
  await client.query('SELECT pg_advisory_lock($1)', [MIGRATION_LOCK]);
  try {
    await client.query(`CREATE TABLE IF NOT EXISTS schema_migrations (
      version integer PRIMARY KEY, name text NOT NULL, applied_at bigint NOT NULL)`);
    const applied = new Set((await client.query<{ version: number }>('SELECT version FROM schema_migrations')).rows.map((r) => r.version));
    const files = fs
      .readdirSync(dir)
      .filter((f) => /^\d{4}_[a-z0-9_]+\.sql$/.test(f))
      .sort();
    const ran: number[] = [];
    for (const f of files) {
      const version = Number(f.slice(0, 4));
      if (applied.has(version)) continue;
      const sql = fs.readFileSync(path.join(dir, f), 'utf8');
      await client.query('BEGIN');
      try {
        await client.query(sql);
        await client.query('INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)', [version, f, Date.now()]);
        await client.query('COMMIT');
      } catch (err) {
        await client.query('ROLLBACK').catch(() => {});
        throw err;
      }
      ran.push(version);
    }
    return ran;
  } finally {
    await client.query('SELECT pg_advisory_unlock($1)', [MIGRATION_LOCK]).catch(() => {});
  }
}

/** SQLSTATE classes and client errors that mean the server can't be used right now. */
export function isConnectionError(err: unknown): boolean {
  const e = err as { code?: unknown; message?: unknown } | null;
  const code = typeof e?.code === 'string' ? e.code : '';
  if (/^(08|53|57P|58)/.test(code)) return true;
  if (/^(ECONNREFUSED|ECONNRESET|EPIPE|ETIMEDOUT|ENOTFOUND|EHOSTUNREACH|ENETUNREACH|EAI_AGAIN)$/.test(code)) return true;
  const msg = typeof e?.message === 'string' ? e.message : '';
  return /timeout exceeded when trying to connect|Connection terminated|connection error|Client has encountered a connection error|Cannot use a pool after calling end|terminating connection|Query read timeout/i.test(msg);
}

/** Deadlocks and serialization failures: the transaction may simply run again. */
export function isRetryable(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === '40P01' || code === '40001';
}

export function domainError(err: unknown): unknown {
  if (err instanceof StorageUnavailable) return err;
  if (isConnectionError(err)) return new StorageUnavailable(`storage unavailable: ${(err as Error).message}`, err);
  return err;
}

/**
 * What the server does about a client that vanished without closing its connection (a host lost
 * or cut off): TCP keepalive probes from the server after 10 s of silence, every 5 s, 3 of them,
 * so its session ends (and its advisory locks, the maintenance leadership among them, and row
 * locks go) ~25 s after the last packet, not after the kernel's default two hours; and no session
 * sits idle inside a transaction for more than a minute (the driver never waits on the network
 * inside one, so only a stopped or lost process does). The URL's own `options` come after these
 * and may change them.
 */
export const SESSION_DEFAULTS = [
  '-c tcp_keepalives_idle=10',
  '-c tcp_keepalives_interval=5',
  '-c tcp_keepalives_count=3',
  '-c idle_in_transaction_session_timeout=60s',
];

/** The session options of every connection (pooled, LISTEN and leader): SESSION_DEFAULTS, the URL's own `options`, then `jit=off`. */
export function sessionOptions(url: string): string {
  let own: string | null = null;
  try {
    own = new URL(url).searchParams.get('options');
  } catch {
    // an unparseable URL is refused at start-up, with its own message
  }
  return [...SESSION_DEFAULTS, own, '-c jit=off'].filter(Boolean).join(' ');
}

/**
 * What every connection (pooled, LISTEN, leader) is made with: the URL, the session options, and
 * TCP keepalive from this side too (it probes a server that went silent after 10 s).
 */
export function connectionConfig(url: string): { connectionString: string; options: string; keepAlive: true; keepAliveInitialDelayMillis: number } {
  return { connectionString: url, options: sessionOptions(url), keepAlive: true, keepAliveInitialDelayMillis: 10_000 };
}

/** `postgres://user:secret@host/db?password=…` with every password masked, for messages and logs. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = '***';
    // pg also takes the password (and a client key's) from the query string.
    for (const k of [...u.searchParams.keys()]) if (/password/i.test(k)) u.searchParams.set(k, '***');
    return u.toString();
  } catch {
    return '(unparseable URL)';
  }
}

interface Compiled {
  name: string;
  text: string;
  names: string[];
}

/**
 * Statements are written with `@name` parameters (like the SQLite driver's) and camelCase
 * aliases; this turns them into `$n` and quoted aliases once, and names them so each connection
 * prepares each statement once.
 */
export class SqlCache {
  private readonly cache = new Map<string, Compiled>();
  private n = 0;

  compile(sql: string): Compiled {
    let c = this.cache.get(sql);
    if (c) return c;
    const names: string[] = [];
    const text = sql
      .replace(/@([a-zA-Z_]\w*)/g, (_, name: string) => {
        let i = names.indexOf(name);
        if (i < 0) i = names.push(name) - 1;
        return `$${i + 1}`;
      })
      .replace(/\bAS ([a-z]+[A-Z][A-Za-z0-9]*)\b/g, 'AS "$1"');
    c = { name: `f${++this.n}`, text, names };
    if (this.cache.size < 2048) this.cache.set(sql, c);
    return c;
  }
}

/** One connection (or the pool) with the named-parameter helpers. */
export class Conn {
  constructor(
    readonly c: pg.Pool | pg.PoolClient,
    private readonly sql: SqlCache,
  ) {}

  async all<R>(sql: string, params: Record<string, unknown> = {}): Promise<R[]> {
    const k = this.sql.compile(sql);
    const values = k.names.map((n) => {
      const v = params[n];
      if (v === undefined) throw new Error(`missing SQL parameter @${n}`);
      return v;
    });
    const r = await this.c.query({ name: k.name, text: k.text, values });
    return r.rows as R[];
  }

  async get<R>(sql: string, params: Record<string, unknown> = {}): Promise<R | undefined> {
    return (await this.all<R>(sql, params))[0];
  }

  /** The first column of the first row. */
  async one<T>(sql: string, params: Record<string, unknown> = {}): Promise<T | undefined> {
    const r = await this.get<Record<string, unknown>>(sql, params);
    return r === undefined ? undefined : (Object.values(r)[0] as T);
  }

  async run(sql: string, params: Record<string, unknown> = {}): Promise<number> {
    const k = this.sql.compile(sql);
    const values = k.names.map((n) => {
      const v = params[n];
      if (v === undefined) throw new Error(`missing SQL parameter @${n}`);
      return v;
    });
    const r = await this.c.query({ name: k.name, text: k.text, values });
    return r.rowCount ?? 0;
  }
}
