/**
 * `npm run bench:instances`: throughput with 1, 2 and 3 Foreman instances on one PostgreSQL
 * database. Starts a private PostgreSQL server (fsync and synchronous_commit on, as in
 * production), a zero-latency fake Ollama and a webhook receiver; then, for each instance count
 * N, a fresh database and N instances (child processes sharing the one fake engine's
 * FOREMAN_CONCURRENCY slots: a host's slots are counted across instances, ADR-0011), a short warm-up, then `--n` jobs submitted round-robin over the
 * instances with every state subscribed, until every job's `done` event has arrived. It prints
 * submit req/s, end-to-end jobs/s and the CPU seconds of the Foreman processes and of
 * PostgreSQL (the postmaster and every backend, including ended ones), per run.
 *
 * A measurement, not a test: nothing here asserts (except that every job finished). On a
 * machine with few cores every instance, PostgreSQL, the fake engine and this client share the
 * same cores, so the figures show the cost of coordination, not scale-out.
 *
 * Flags: --n 1000 (jobs per run), --instances 1,2,3, --concurrency 4 (per instance),
 * --clients 64 (submitting connections in all), --warmup 50.
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { Pool } from 'undici';
import { startFakeOllama, type FakeOllama } from '../test/support/fake-ollama.js';
import { startReceiver, type Receiver } from '../test/support/receiver.js';
import { spawnChild, type Spawned } from '../test/support/child.js';
import { startPostgresCluster, type PostgresCluster } from '../test/support/postgres.js';

const { values: args } = parseArgs({
  options: {
    n: { type: 'string', default: '1000' },
    instances: { type: 'string', default: '1,2,3' },
    concurrency: { type: 'string', default: '4' },
    clients: { type: 'string', default: '64' },
    warmup: { type: 'string', default: '50' },
  },
});
const whole = (name: string, v: string, min: number): number => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) {
    console.error(`bench:instances: --${name} must be a whole number ≥ ${min}, got ${JSON.stringify(v)}`);
    process.exit(2);
  }
  return n;
};
const N = whole('n', args.n, 1);
const COUNTS = args.instances.split(',').map((x) => whole('instances', x.trim(), 1));
const CONCURRENCY = whole('concurrency', args.concurrency, 1);
const CLIENTS = whole('clients', args.clients, 1);
const WARMUP = whole('warmup', args.warmup, 0);

let clkTck = 100;
try {
  clkTck = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;
} catch {
  /* Linux's usual value */
}

/** /proc/<pid>/stat fields after the command name: [0] is field 3 (state), [1] ppid, [11..14] utime, stime, cutime, cstime. */
function statOf(pid: number): string[] | null {
  try {
    const raw = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return raw.slice(raw.lastIndexOf(')') + 2).split(' ');
  } catch {
    return null; // gone
  }
}

/** CPU seconds a process has used so far (user + system). */
function cpuOf(pid: number): number {
  const f = statOf(pid);
  return f ? (Number(f[11]) + Number(f[12])) / clkTck : 0;
}

/**
 * CPU seconds of PostgreSQL so far: the postmaster's own, what its ended children (backends,
 * which it reaps) used, and what its live children have used so far.
 */
function postgresCpu(postmaster: number): number {
  const f = statOf(postmaster);
  if (!f) return 0;
  let ticks = Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]);
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    const c = statOf(Number(d));
    if (c && Number(c[1]) === postmaster) ticks += Number(c[11]) + Number(c[12]) + Number(c[13]) + Number(c[14]);
  }
  return ticks / clkTck;
}

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? NaN;
};

interface RunResult {
  instances: number;
  submitRate: number;
  submitP50: number;
  submitP99: number;
  e2eRate: number;
  e2eSecs: number;
  foremanCpu: number;
  postgresCpu: number;
  benchCpu: number;
  outOfOrder: number;
  perInstance: string;
}

async function runWith(
  count: number,
  server: PostgresCluster,
  fake: FakeOllama,
  receiver: Receiver,
): Promise<RunResult> {
  const db = await server.database(`bench_instances_${count}`);
  const url = db.url;
  const children: Spawned[] = [];
  const pools: Pool[] = [];
  try {
    const env = {
      FOREMAN_DATABASE_URL: url,
      FOREMAN_OLLAMA_URL: fake.url,
      FOREMAN_CONCURRENCY: String(CONCURRENCY),
      FOREMAN_LOG_LEVEL: 'warn',
      FOREMAN_MAX_QUEUED: '1000000',
    };
    for (let i = 0; i < count; i++) children.push(await spawnChild({ ...env, FOREMAN_INSTANCE_ID: `n${count}-${i}` }));
    await Promise.all(children.map((c) => c.ready(60_000)));
    for (const c of children) pools.push(new Pool(c.url, { connections: Math.max(1, Math.ceil(CLIENTS / count)), pipelining: 1 }));

    const post = async (i: number, tag: string): Promise<number> => {
      const t0 = performance.now();
      const res = await pools[i % count]!.request({
        path: '/jobs',
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: `${tag} ${i}` }], state_webhook_url: `${receiver.url}/${tag}` }),
      });
      await res.body.dump();
      if (res.statusCode !== 202) throw new Error(`POST /jobs answered ${res.statusCode}`);
      return performance.now() - t0;
    };
    const submitAll = async (n: number, tag: string, lat: number[]) => {
      let next = 0;
      await Promise.all(
        Array.from({ length: CLIENTS }, async () => {
          while (next < n) lat.push(await post(next++, tag));
        }),
      );
    };
    const doneCount = (tag: string) => {
      let scanned = 0;
      let done = 0;
      return (rs: typeof receiver.received) => {
        for (; scanned < rs.length; scanned++) if (rs[scanned]!.event?.state === 'done' && rs[scanned]!.path === `/${tag}`) done++;
        return done;
      };
    };

    // Warm-up (not measured): every instance runs a few jobs first.
    if (WARMUP > 0) {
      receiver.received.length = 0;
      await submitAll(WARMUP, `warm${count}`, []);
      const counted = doneCount(`warm${count}`);
      await receiver.waitFor((rs) => counted(rs) >= WARMUP, 120_000);
    }
    receiver.received.length = 0;

    const pgPid = server.pid();
    const fm0 = children.map((c) => cpuOf(c.proc.pid!));
    const pg0 = pgPid === undefined ? 0 : postgresCpu(pgPid);
    const me0 = process.cpuUsage();
    const tag = `run${count}`;
    const lat: number[] = [];
    const t0 = performance.now();
    await submitAll(N, tag, lat);
    const submitSecs = (performance.now() - t0) / 1000;
    const counted = doneCount(tag);
    await receiver.waitFor((rs) => counted(rs) >= N, 600_000);
    const e2eSecs = (performance.now() - t0) / 1000;
    const foremanCpu = children.reduce((a, c, i) => a + cpuOf(c.proc.pid!) - fm0[i]!, 0);
    const postgresCpuS = pgPid === undefined ? NaN : postgresCpu(pgPid) - pg0;
    const me = process.cpuUsage(me0);

    // Each job's four events in order (no crash here, so exactly once each).
    const seen = new Map<string, string[]>();
    for (const r of receiver.received) if (r.path === `/${tag}`) seen.set(r.event.job_id, [...(seen.get(r.event.job_id) ?? []), r.event.state]);
    const outOfOrder = [...seen.values()].filter((st) => st.join() !== 'queued,loading,working,done').length;
    // Who ran them (`jobs.instance`, as GET /jobs/<id> shows it).
    const sql = new pg.Client({ connectionString: url });
    await sql.connect();
    const rows = (
      await sql.query<{ instance: string; n: number }>(
        "SELECT instance, count(*)::int AS n FROM jobs WHERE state = 'done' AND request LIKE $1 GROUP BY instance ORDER BY instance",
        [`%"${tag} %`],
      )
    ).rows;
    await sql.end();

    return {
      instances: count,
      submitRate: N / submitSecs,
      submitP50: pct(lat, 50),
      submitP99: pct(lat, 99),
      e2eRate: N / e2eSecs,
      e2eSecs,
      foremanCpu,
      postgresCpu: postgresCpuS,
      benchCpu: (me.user + me.system) / 1e6,
      outOfOrder,
      perInstance: rows.map((r) => `${r.instance} ${r.n}`).join(', '),
    };
  } finally {
    for (const c of children) c.proc.kill('SIGTERM');
    await Promise.all(children.map((c) => c.exited));
    await Promise.all(pools.map((p) => p.close()));
    await db.drop().catch(() => {});
  }
}

async function main(): Promise<void> {
  const cpus = os.cpus().length;
  const note =
    cpus <= 2
      ? `NOTE: this machine has ${cpus} cores. Every instance, PostgreSQL, the fake engine and this client share them, so more instances show the overhead of coordination, not scale-out.`
      : `Note: every instance, PostgreSQL, the fake engine and this client share this machine's ${cpus} cores; with few cores the figures show coordination overhead, not scale-out.`;
  console.log(`bench:instances: ${N} jobs per run, instances ${COUNTS.join(', ')}, FOREMAN_CONCURRENCY=${CONCURRENCY} (the fake host's slots, shared by the instances), ${CLIENTS} client connections, node ${process.version}, ${cpus} cpus`);
  console.log(note);
  const server = await startPostgresCluster({ durable: true });
  const fake = await startFakeOllama();
  const receiver = await startReceiver();
  const results: RunResult[] = [];
  try {
    const v = new pg.Client({ connectionString: server.adminUrl });
    await v.connect();
    const version = (await v.query<{ v: string }>("SELECT current_setting('server_version') AS v")).rows[0]!.v;
    await v.end();
    console.log(`PostgreSQL ${version} (private, 127.0.0.1:${server.port}, fsync on, synchronous_commit on); zero-latency fake Ollama; every state subscribed`);
    for (const count of COUNTS) {
      console.log(`… ${count} instance${count === 1 ? '' : 's'}`);
      results.push(await runWith(count, server, fake, receiver));
    }
  } finally {
    await receiver.close();
    await fake.close();
    await server.stop();
  }
  const f = (n: number, d = 1) => (Number.isFinite(n) ? n.toFixed(d) : 'n/a');
  const base = results[0]!;
  console.log('');
  console.log(
    '| instances | slots | submit req/s | submit p50 / p99 ms | end-to-end jobs/s | vs first row | Foreman CPU s | PostgreSQL CPU s | CPU ms/job (Foreman + PostgreSQL) | bench process CPU s | out of order | done per instance |',
  );
  console.log('| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |');
  for (const r of results) {
    console.log(
      `| ${r.instances} | ${CONCURRENCY} (shared) | ${f(r.submitRate, 0)} | ${f(r.submitP50)} / ${f(r.submitP99)} | ${f(r.e2eRate, 0)} (${f(r.e2eSecs)} s) | ${f(r.e2eRate / base.e2eRate, 2)}× | ${f(r.foremanCpu)} | ${f(r.postgresCpu)} | ${f(((r.foremanCpu + r.postgresCpu) * 1000) / N)} | ${f(r.benchCpu)} | ${r.outOfOrder} | ${r.perInstance} |`,
    );
  }
  console.log('');
  console.log(note);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
