/**
 * One private PostgreSQL cluster per test run (vitest `globalSetup`), and a fresh database per
 * test file. The server runs on 127.0.0.1 on a free port, in the foreground as our own child (not
 * daemonized), in a temporary directory that is removed afterwards. PostgreSQL refuses to run as
 * root: when the tests run as root, the cluster belongs to the `postgres` OS user.
 *
 * `FOREMAN_TEST_DATABASE_URL` (an admin URL of a server that is already running) skips all this.
 * Binaries: /usr/lib/postgresql/<newest>/bin, else `postgres` and `initdb` on PATH (.ci/run
 * installs Debian's `postgresql` package when neither exists).
 */
import { spawn, execFileSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';

function which(cmd: string): string | null {
  try {
    return execFileSync('sh', ['-c', `command -v ${cmd}`]).toString().trim() || null;
  } catch {
    return null;
  }
}

export function postgresBinDir(): string | null {
  const base = '/usr/lib/postgresql';
  if (fs.existsSync(base)) {
    const vers = fs
      .readdirSync(base)
      .filter((v) => fs.existsSync(path.join(base, v, 'bin', 'postgres')))
      .sort((a, b) => Number(b) - Number(a));
    if (vers.length) return path.join(base, vers[0]!, 'bin');
  }
  const bin = which('postgres');
  if (!bin) return null;
  const dir = path.dirname(bin);
  return fs.existsSync(path.join(dir, 'initdb')) ? dir : null;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface PostgresCluster {
  /** postgres://foreman@127.0.0.1:<port>/postgres */
  adminUrl: string;
  port: number;
  /** The postmaster's process id (its backends are its children): CPU accounting in tools/bench-instances.ts. */
  pid(): number | undefined;
  stop(): Promise<void>;
  restart(downMs?: number): Promise<void>;
  /** A fresh, empty database `name` on this server (an older one of that name is dropped first). */
  database(name: string): Promise<{ url: string; drop: () => Promise<void> }>;
}

/** initdb + postgres in a temporary directory; resolves once the server answers. */
/** Debian's server package, when it is missing and we may install it (root), as .ci/run does. */
function aptInstallPostgres(): void {
  if (process.getuid?.() !== 0) return;
  const env = { ...process.env, DEBIAN_FRONTEND: 'noninteractive' };
  const install = () => execFileSync('apt-get', ['install', '-y', '--no-install-recommends', 'postgresql'], { env, stdio: 'ignore' });
  try {
    install();
  } catch {
    execFileSync('apt-get', ['update'], { env, stdio: 'ignore' });
    install();
  }
}

export interface PostgresClusterOptions {
  /** true: fsync and full-page writes on, as in production (benches); default off, for test speed. */
  durable?: boolean;
}

export async function startPostgresCluster(opts: PostgresClusterOptions = {}): Promise<PostgresCluster> {
  let bin = postgresBinDir();
  if (!bin) {
    aptInstallPostgres();
    bin = postgresBinDir();
  }
  if (!bin) throw new Error('PostgreSQL server binaries (initdb, postgres) not found: install Debian\'s `postgresql` package (.ci/run does; as root the tests do)');
  let ids: { uid?: number; gid?: number } = {};
  if (process.getuid?.() === 0) {
    ids = { uid: Number(execFileSync('id', ['-u', 'postgres']).toString()), gid: Number(execFileSync('id', ['-g', 'postgres']).toString()) };
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'foreman-pg-'));
  if (ids.uid !== undefined) fs.chownSync(dir, ids.uid, ids.gid!);
  const data = path.join(dir, 'data');
  const port = await freePort();
  const init = await new Promise<{ code: number | null; out: string }>((resolve) => {
    const c = spawn(path.join(bin, 'initdb'), ['-D', data, '-U', 'foreman', '--auth=trust', '-E', 'UTF8', '--locale=C', '--no-sync'], {
      ...ids,
      cwd: dir,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    c.stdout.on('data', (b: Buffer) => (out += b.toString()));
    c.stderr.on('data', (b: Buffer) => (out += b.toString()));
    c.on('exit', (code) => resolve({ code, out }));
  });
  if (init.code !== 0) {
    fs.rmSync(dir, { recursive: true, force: true });
    throw new Error(`initdb failed:\n${init.out.slice(-2000)}`);
  }
  const logPath = path.join(dir, 'postgres.log');
  const adminUrl = `postgres://foreman@127.0.0.1:${port}/postgres`;
  let proc: ChildProcess;
  let exited = false;
  let done: Promise<void> = Promise.resolve();
  const spawnServer = () => {
    const logFd = fs.openSync(logPath, 'a');
    if (ids.uid !== undefined) fs.fchownSync(logFd, ids.uid, ids.gid!);
    // Tests: fsync off for speed (the durability settings are the server's business in production).
    const speed = opts.durable ? [] : ['-c', 'fsync=off', '-c', 'full_page_writes=off'];
    proc = spawn(
      path.join(bin, 'postgres'),
      ['-D', data, '-c', 'listen_addresses=127.0.0.1', '-c', `port=${port}`, '-c', `unix_socket_directories=${dir}`,
        '-c', 'max_connections=300', ...speed],
      { ...ids, cwd: dir, stdio: ['ignore', logFd, logFd] },
    );
    fs.closeSync(logFd);
    exited = false;
    done = new Promise<void>((resolve) => proc.on('exit', () => ((exited = true), resolve())));
  };
  const halt = async () => {
    if (!exited) {
      proc.kill('SIGINT'); // fast shutdown
      const t = setTimeout(() => proc.kill('SIGKILL'), 15_000);
      await done;
      clearTimeout(t);
    }
  };
  const stop = async () => {
    await halt();
    fs.rmSync(dir, { recursive: true, force: true });
  };
  const answering = async () => {
    for (let i = 0; ; i++) {
      const c = new pg.Client({ connectionString: adminUrl });
      try {
        await c.connect();
        await c.query('SELECT 1');
        await c.end();
        return;
      } catch (err) {
        await c.end().catch(() => {});
        if (exited || i > 300) {
          const log = fs.existsSync(logPath) ? fs.readFileSync(logPath, 'utf8').slice(-2000) : '';
          await stop();
          throw new Error(`postgres did not start: ${(err as Error).message}\n${log}`);
        }
        await sleep(100);
      }
    }
  };
  spawnServer();
  await answering();
  /** Stops the server (fast shutdown: every session ends) and starts it again on the same data and port. */
  const restart = async (downMs = 0) => {
    await halt();
    await sleep(downMs);
    spawnServer();
    await answering();
  };
  const admin = async (...statements: string[]): Promise<void> => {
    const c = new pg.Client({ connectionString: adminUrl });
    await c.connect();
    try {
      for (const q of statements) await c.query(q);
    } finally {
      await c.end();
    }
  };
  const database = async (name: string): Promise<{ url: string; drop: () => Promise<void> }> => {
    await admin(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`, `CREATE DATABASE ${name}`);
    const u = new URL(adminUrl);
    u.pathname = `/${name}`;
    return { url: u.toString(), drop: () => admin(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`) };
  };
  return { adminUrl, port, pid: () => (exited ? undefined : proc.pid), stop, restart, database };
}

/** The admin URL of this run's cluster (set by the global setup). */
export function adminUrl(): string {
  const url = process.env.FOREMAN_TEST_DATABASE_URL;
  if (!url) throw new Error('FOREMAN_TEST_DATABASE_URL is not set: run through vitest (test/support/pg-global-setup.ts starts the cluster)');
  return url;
}

/** A fresh, empty database; `drop()` removes it (ends its connections first). */
export async function createDatabase(prefix = 'foreman_test', template?: string): Promise<{ url: string; name: string; drop: () => Promise<void> }> {
  const admin = adminUrl();
  const name = `${prefix}_${randomBytes(6).toString('hex')}`;
  const c = new pg.Client({ connectionString: admin });
  await c.connect();
  try {
    await c.query(`CREATE DATABASE ${name}${template ? ` TEMPLATE ${template}` : ''}`);
  } finally {
    await c.end();
  }
  const u = new URL(admin);
  u.pathname = `/${name}`;
  return {
    url: u.toString(),
    name,
    drop: async () => {
      const d = new pg.Client({ connectionString: admin });
      await d.connect();
      try {
        await d.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
      } finally {
        await d.end();
      }
    },
  };
}
