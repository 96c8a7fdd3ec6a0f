/**
 * npm run bench: starts the built service as a child process against a zero-latency fake
 * Ollama and prints figures. A baseline, not a test: nothing here asserts. It measures what users
 * do: every state subscribed (queued, loading, working, done, in order), as the shared bench
 * does, plus the cost of a dead receiver with a large backlog, and lookups on a large table.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Pool } from 'undici';
import { startFakeOllama } from '../test/support/fake-ollama.js';
import { startReceiver } from '../test/support/receiver.js';
import { startChild } from '../test/support/child.js';
import { readFileSync } from 'node:fs';

/** CPU seconds (user + system) a process has used so far, from /proc. */
function cpuSeconds(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}
import { seedJobs } from './seed.js';
import Database from 'better-sqlite3';
import pg from 'pg';
import { startPostgresCluster } from '../test/support/postgres.js';

const N_SUBMIT = Number(process.env.BENCH_SUBMIT ?? 5000);
const N_E2E = Number(process.env.BENCH_E2E ?? 2000);
const N_E2E_LARGE = Number(process.env.BENCH_E2E_LARGE ?? 20000);
const N_DEAD = Number(process.env.BENCH_DEAD ?? 10000);
const DEAD_SECONDS = Number(process.env.BENCH_DEAD_SECONDS ?? 60);
const N_IDLE = Number(process.env.BENCH_IDLE ?? 50);
const CLIENTS = Number(process.env.BENCH_CLIENTS ?? 64);

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? NaN;
};
const f = (n: number, d = 2) => n.toFixed(d);

type Row = [string, string];

/** `auth`: with FOREMAN_ADMIN_TOKEN set, every request made with an API key (ADR-0013). */
async function run(synchronous: 'FULL' | 'NORMAL', auth = false): Promise<Row[]> {
  const fake = await startFakeOllama();
  const receiver = await startReceiver();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'foreman-bench-'));
  const adminToken = 'bench-admin-token-0123456789';
  const child = await startChild({
    FOREMAN_DATA_DIR: dir,
    FOREMAN_OLLAMA_URL: fake.url,
    FOREMAN_LOG_LEVEL: 'warn',
    FOREMAN_CONCURRENCY: process.env.BENCH_CONCURRENCY ?? '4',
    FOREMAN_MAX_QUEUED: '1000000',
    FOREMAN_SQLITE_SYNCHRONOUS: synchronous,
    ...(auth ? { FOREMAN_ADMIN_TOKEN: adminToken } : {}),
  });
  const pool = new Pool(child.url, { connections: CLIENTS, pipelining: 1 });
  const authHeader: Record<string, string> = {};
  if (auth) {
    const res = await pool.request({
      path: '/keys',
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${adminToken}` },
      body: JSON.stringify({ name: 'bench' }),
    });
    authHeader.authorization = `Bearer ${((await res.body.json()) as { key: string }).key}`;
  }
  const body = (i: number, extra: Record<string, unknown> = {}) =>
    JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: `prompt ${i}` }], ...extra });
  const post = async (b: string) => {
    const t0 = performance.now();
    const res = await pool.request({ path: '/jobs', method: 'POST', headers: { 'content-type': 'application/json', ...authHeader }, body: b });
    const j = (await res.body.json()) as { job_id: string };
    if (res.statusCode !== 202) throw new Error(`POST /jobs answered ${res.statusCode}`);
    return { ms: performance.now() - t0, id: j.job_id };
  };
  const getJob = async (id: string) => {
    const res = await pool.request({ path: `/jobs/${id}`, method: 'GET', headers: authHeader });
    return (await res.body.json()) as any;
  };
  async function runClients(n: number, fn: (i: number) => Promise<void>) {
    let next = 0;
    await Promise.all(
      Array.from({ length: CLIENTS }, async () => {
        while (next < n) await fn(next++);
      }),
    );
  }

  // 1. Idle submit → done event received, one job at a time on an idle service, every state subscribed.
  const idle: number[] = [];
  const idleClient: number[] = [];
  for (let i = 0; i < N_IDLE; i++) {
    const tSubmit = performance.now();
    const { id } = await post(body(i, { state_webhook_url: `${receiver.url}/idle` }));
    await receiver.waitFor((rs) => rs.some((r) => r.event?.event_id === `${id}:done`), 10_000);
    idleClient.push(performance.now() - tSubmit);
    const j = await getJob(id);
    const at = (s: string) => Date.parse(j.transitions.find((t: any) => t.state === s).at);
    idle.push(at('working') - at('queued'));
    await new Promise((r) => setTimeout(r, 20)); // let the service go idle again
  }

  // 2. POST /jobs throughput and latency (the worker drains at the same time, as in production).
  const lat: number[] = [];
  let t0 = performance.now();
  await runClients(N_SUBMIT, async (i) => {
    lat.push((await post(body(i))).ms);
  });
  const submitSecs = (performance.now() - t0) / 1000;

  // Let the backlog drain before the end-to-end run: the last job submitted finishes last (FIFO).
  let j = await getJob((await post(body(-1))).id);
  while (j.state !== 'done') {
    await new Promise((r) => setTimeout(r, 50));
    j = await getJob(j.job_id);
  }

  // 3. End to end: N jobs, every state subscribed; done when every job's `done` event arrived.
  //    Run at N and at N_LARGE: the figure must not fall as the backlog grows.
  const e2e = async (n: number, tag: string) => {
    receiver.received.length = 0;
    const cpu0 = cpuSeconds(child.proc.pid!);
    const t = performance.now();
    await runClients(n, async (i) => {
      await post(body(i, { state_webhook_url: `${receiver.url}/${tag}` }));
    });
    // Counted incrementally: the predicate runs on every arrival.
    let scanned = 0;
    let done = 0;
    await receiver.waitFor((rs) => {
      for (; scanned < rs.length; scanned++) if (rs[scanned]!.event?.state === 'done') done++;
      return done >= n;
    }, 600_000);
    const secs = (performance.now() - t) / 1000;
    // Per job, the four events must have arrived in order.
    const seen = new Map<string, string[]>();
    for (const r of receiver.received) seen.set(r.event.job_id, [...(seen.get(r.event.job_id) ?? []), r.event.state]);
    const outOfOrder = [...seen.values()].filter((st) => st.join() !== 'queued,loading,working,done').length;
    return { rate: n / secs, secs, cpuMsPerJob: ((cpuSeconds(child.proc.pid!) - cpu0) * 1000) / n, outOfOrder };
  };
  const small = await e2e(N_E2E, 'e2e');
  const large = await e2e(N_E2E_LARGE, 'e2e-large');

  const rows: Row[] = [
    [`POST /jobs throughput (${N_SUBMIT} requests, ${CLIENTS} connections)`, `${f(N_SUBMIT / submitSecs, 0)} req/s`],
    ['POST /jobs latency p50 / p99', `${f(pct(lat, 50))} ms / ${f(pct(lat, 99))} ms`],
    [`end to end, all 4 events (${N_E2E} jobs, until every done event arrived)`, `${f(small.rate, 0)} jobs/s (${f(small.secs)} s), ${f(small.cpuMsPerJob)} ms CPU/job, ${small.outOfOrder} out of order`],
    [`end to end, all 4 events (${N_E2E_LARGE} jobs)`, `${f(large.rate, 0)} jobs/s (${f(large.secs)} s; ${f((100 * large.rate) / small.rate, 0)} % of the ${N_E2E} run), ${f(large.cpuMsPerJob)} ms CPU/job, ${large.outOfOrder} out of order`],
    [`idle submit → working, server clock (${N_IDLE} jobs) p50 / p99`, `${f(pct(idle, 50), 0)} ms / ${f(pct(idle, 99), 0)} ms`],
    ['idle submit → done event received (all states subscribed), client clock p50 / p99', `${f(pct(idleClient, 50), 1)} ms / ${f(pct(idleClient, 99), 1)} ms`],
  ];
  child.proc.kill('SIGTERM');
  await child.exited;
  await pool.close();
  await receiver.close();
  await fake.close();
  fs.rmSync(dir, { recursive: true, force: true });
  return rows;
}

/**
 * A dead receiver: N_DEAD deliveries pending to a receiver that answers 500 (each retried with
 * a long backoff once it failed), then the service's CPU over DEAD_SECONDS while otherwise idle,
 * and how fast a healthy receiver's events arrive meanwhile.
 */
async function runDead(): Promise<Row[]> {
  const fake = await startFakeOllama();
  const dead = await startReceiver();
  dead.respond(() => 500);
  const healthy = await startReceiver();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'foreman-bench-dead-'));
  const child = await startChild({
    FOREMAN_DATA_DIR: dir,
    FOREMAN_OLLAMA_URL: fake.url,
    FOREMAN_LOG_LEVEL: 'warn',
    FOREMAN_CONCURRENCY: '4',
    FOREMAN_MAX_QUEUED: '1000000',
    FOREMAN_WEBHOOK_BACKOFF_BASE: '10m',
  });
  const pool = new Pool(child.url, { connections: CLIENTS });
  const post = async (extra: Record<string, unknown>) => {
    const res = await pool.request({
      path: '/jobs',
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: 'x' }], ...extra }),
    });
    const j = (await res.body.json()) as { job_id: string };
    return j.job_id;
  };
  let next = 0;
  await Promise.all(
    Array.from({ length: CLIENTS }, async () => {
      while (next++ < N_DEAD) await post({ state_webhook_url: `${dead.url}/dead`, webhook_events: ['done'] });
    }),
  );
  // Every job done and its one delivery attempted once (and failed): the backlog is in place.
  await dead.waitFor((rs) => rs.length >= N_DEAD, 600_000);
  await new Promise((r) => setTimeout(r, 2000));
  const cpu0 = cpuSeconds(child.proc.pid!);
  const t0 = performance.now();
  // Meanwhile a healthy receiver's jobs, one every 2 s: state change → event received.
  const lags: number[] = [];
  while (performance.now() - t0 < DEAD_SECONDS * 1000) {
    const id = await post({ state_webhook_url: `${healthy.url}/ok` });
    await healthy.waitFor((rs) => rs.some((r) => r.event?.event_id === `${id}:done`), 10_000);
    for (const r of healthy.received.filter((x) => x.event?.job_id === id)) lags.push(r.at - Date.parse(r.event.occurred_at));
    await new Promise((r) => setTimeout(r, 2000));
  }
  const secs = (performance.now() - t0) / 1000;
  const cpu = cpuSeconds(child.proc.pid!) - cpu0;
  const jobs = lags.length / 4;
  child.proc.kill('SIGTERM');
  await child.exited;
  await pool.close();
  await dead.close();
  await healthy.close();
  await fake.close();
  fs.rmSync(dir, { recursive: true, force: true });
  return [
    [`dead receiver: ${N_DEAD.toLocaleString('en')} deliveries pending (answers 500); service CPU over ${f(secs, 0)} s, with ${jobs} healthy jobs run meanwhile`, `${f((100 * cpu) / secs, 2)} % of one core`],
    [`healthy receiver meanwhile: state change → event received (${lags.length} events) p50 / max`, `${f(pct(lags, 50), 0)} ms / ${f(Math.max(...lags), 0)} ms`],
  ];
}

/** GET /jobs/<id> and GET /jobs latency with BENCH_ROWS (default 1,000,000) jobs in the table. */
async function runLarge(): Promise<Row[]> {
  const rows = Number(process.env.BENCH_ROWS ?? 1_000_000);
  const fake = await startFakeOllama();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'foreman-bench-1m-'));
  const { ids, ms: seedMs } = seedJobs(path.join(dir, 'foreman.db'), rows);
  const child = await startChild({ FOREMAN_DATA_DIR: dir, FOREMAN_OLLAMA_URL: fake.url, FOREMAN_LOG_LEVEL: 'warn' }, 60_000);
  const pool = new Pool(child.url, { connections: 8 });
  const get = async (p: string) => {
    const t0 = performance.now();
    const res = await pool.request({ path: p, method: 'GET' });
    const body = (await res.body.json()) as { next_cursor?: string };
    if (res.statusCode !== 200) throw new Error(`GET ${p} answered ${res.statusCode}`);
    return { ms: performance.now() - t0, body };
  };
  const measure = async (label: string, paths: () => string, n = 300): Promise<Row> => {
    const lat: number[] = [];
    for (let i = 0; i < n; i++) lat.push((await get(paths())).ms);
    return [`${label} (${rows.toLocaleString('en')} jobs) p50 / p99`, `${f(pct(lat, 50))} ms / ${f(pct(lat, 99))} ms`];
  };
  const rnd = (xs: string[]) => xs[Math.floor(Math.random() * xs.length)]!;
  // A cursor deep into the list, to show pages cost the same at any depth (no OFFSET).
  let deep = await get('/jobs?limit=100');
  for (let i = 0; i < 50; i++) deep = await get(`/jobs?limit=100&cursor=${deep.body.next_cursor}`);
  const deepCursor = deep.body.next_cursor!;
  const out: Row[] = [
    [`seed ${rows.toLocaleString('en')} finished jobs (direct SQL, not timed below)`, `${f(seedMs / 1000, 1)} s`],
    await measure('GET /jobs/<id>', () => `/jobs/${rnd(ids)}`, 1000),
    await measure('GET /jobs?limit=20', () => '/jobs?limit=20'),
    await measure('GET /jobs?limit=100, page 51 by cursor', () => `/jobs?limit=100&cursor=${deepCursor}`),
    await measure('GET /jobs?state=done&model=qwen3&limit=20', () => '/jobs?state=done&model=qwen3&limit=20'),
    await measure('GET /jobs?metadata.batch=b7&limit=20', () => '/jobs?metadata.batch=b7&limit=20'),
    await measure('GET /jobs?created_before=<midpoint>&limit=20', () => `/jobs?created_before=${encodeURIComponent(new Date(Date.now() - rows * 5).toISOString())}&limit=20`),
  ];
  child.proc.kill('SIGTERM');
  await child.exited;
  await pool.close();
  await fake.close();
  fs.rmSync(dir, { recursive: true, force: true });
  return out;
}

/** Peak resident set size of a process so far (VmHWM), in MiB. */
function peakRssMiB(pid: number): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) / 1024 : NaN;
}

/**
 * The Batch API (ADR-0015): a BENCH_BATCH-line (default 10,000) chat batch against the
 * zero-latency fake engine: upload and validation, time until every line is a queued job, the
 * whole batch, the service's peak RSS, and the latency of interactive POST /jobs submits made
 * while the batch's lines are being inserted (target: p99 < 50 ms).
 */
async function runBatch(): Promise<Row[]> {
  const n = Number(process.env.BENCH_BATCH ?? 10_000);
  const fake = await startFakeOllama();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'foreman-bench-batch-'));
  // BENCH_POSTGRES=1: the same run against a private PostgreSQL server (fsync and
  // synchronous_commit on), a fresh database.
  const server = process.env.BENCH_POSTGRES ? await startPostgresCluster({ durable: true }) : null;
  const databaseUrl = server ? (await server.database('foreman_batch_bench')).url : null;
  const child = await startChild({
    FOREMAN_DATA_DIR: dir,
    FOREMAN_OLLAMA_URL: fake.url,
    FOREMAN_LOG_LEVEL: 'warn',
    FOREMAN_CONCURRENCY: process.env.BENCH_CONCURRENCY ?? '4',
    FOREMAN_MAX_QUEUED: '1000000',
    ...(databaseUrl ? { FOREMAN_DATABASE_URL: databaseUrl } : {}),
  });
  const pid = child.proc.pid!;
  const pool = new Pool(child.url, { connections: 8 });
  const json = async (p: string, method = 'GET', body?: unknown) => {
    const res = await pool.request({ path: p, method, headers: body === undefined ? {} : { 'content-type': 'application/json' }, ...(body === undefined ? {} : { body: JSON.stringify(body) }) });
    return { status: res.statusCode, body: (await res.body.json()) as any };
  };
  const lines = Array.from({ length: n }, (_, i) =>
    JSON.stringify({ custom_id: `r${i}`, method: 'POST', url: '/v1/chat/completions', body: { model: 'llama3.2', messages: [{ role: 'user', content: `batch prompt number ${i}` }] } }),
  );
  const content = Buffer.from(lines.join('\n') + '\n');
  const form = new FormData();
  form.append('purpose', 'batch');
  form.append('file', new Blob([content]), 'bench.jsonl');
  let t0 = performance.now();
  const up = await fetch(`${child.url}/v1/files`, { method: 'POST', body: form });
  const file = (await up.json()) as { id: string };
  if (up.status !== 200) throw new Error(`upload answered ${up.status}: ${JSON.stringify(file)}`);
  const uploadMs = performance.now() - t0;
  const rssAfterUpload = peakRssMiB(pid);

  // How many of the batch's lines are jobs, read from the store itself.
  let submitted: (id: string) => Promise<number>;
  let closeStore: () => Promise<void>;
  if (databaseUrl) {
    const c = new pg.Client({ connectionString: databaseUrl });
    await c.connect();
    submitted = async (id) => Number((await c.query<{ n: string }>('SELECT submitted AS n FROM batches WHERE id = $1', [id])).rows[0]?.n ?? 0);
    closeStore = () => c.end();
  } else {
    const db = new Database(path.join(dir, 'foreman.db'), { readonly: true, fileMustExist: true });
    const q = db.prepare('SELECT submitted FROM batches WHERE id = ?').pluck();
    submitted = async (id) => q.get(id) as number;
    closeStore = async () => {
      db.close();
    };
  }
  t0 = performance.now();
  const created = await json('/v1/batches', 'POST', { input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
  if (created.status !== 200) throw new Error(`batch create answered ${created.status}`);
  const id = created.body.id as string;
  // Interactive submits, one at a time, while the lines are being inserted; then, for comparison,
  // while the batch's queued jobs run (the worker busy, nothing inserting).
  const lat: number[] = [];
  const latAfter: number[] = [];
  let phase = 'inserting' as 'inserting' | 'running' | 'over';
  const interactive = (async () => {
    while (phase !== 'over') {
      const into = phase === 'inserting' ? lat : latAfter;
      const s0 = performance.now();
      const r = await json('/jobs', 'POST', { model: 'llama3.2', messages: [{ role: 'user', content: 'interactive' }] });
      if (r.status !== 202) throw new Error(`POST /jobs answered ${r.status}`);
      into.push(performance.now() - s0);
      await new Promise((r) => setTimeout(r, 5));
    }
  })();
  while ((await submitted(id)) < n) await new Promise((r) => setTimeout(r, 10));
  const queuedMs = performance.now() - t0;
  phase = 'running';
  let b = created.body;
  while (b.status !== 'completed') {
    await new Promise((r) => setTimeout(r, 50));
    b = (await json(`/v1/batches/${id}`)).body;
  }
  const e2eMs = performance.now() - t0;
  phase = 'over';
  await interactive;
  const out = await pool.request({ path: `/v1/files/${b.output_file_id}/content`, method: 'GET' });
  const outLines = (await out.body.text()).split('\n').filter(Boolean).length;
  const rss = peakRssMiB(pid);
  await closeStore();
  child.proc.kill('SIGTERM');
  await child.exited;
  await pool.close();
  await fake.close();
  await server?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
  return [
    ['store', server ? 'PostgreSQL (private server, fsync and synchronous_commit on)' : 'SQLite (synchronous=FULL)'],
    [`upload + validation (${n.toLocaleString('en')} lines, ${f(content.length / 1048576, 1)} MiB)`, `${f(uploadMs / 1000)} s`],
    ['batch created → every line a queued job', `${f(queuedMs / 1000)} s`],
    [`batch created → completed (${outLines.toLocaleString('en')} output lines, FOREMAN_CONCURRENCY=${process.env.BENCH_CONCURRENCY ?? '4'})`, `${f(e2eMs / 1000)} s (${f(n / (e2eMs / 1000), 0)} requests/s)`],
    ['service peak RSS (VmHWM): after the upload / whole run', `${f(rssAfterUpload, 0)} MiB / ${f(rss, 0)} MiB`],
    [`interactive POST /jobs while inserting (${lat.length} submits) p50 / p99 / max`, `${f(pct(lat, 50))} ms / ${f(pct(lat, 99))} ms / ${f(Math.max(...lat))} ms`],
    [`the same, after every line is queued, while the batch runs (${latAfter.length} submits)`, `${f(pct(latAfter, 50))} ms / ${f(pct(latAfter, 99))} ms / ${f(Math.max(...latAfter))} ms`],
  ];
}

async function main() {
  if (process.env.BENCH_ONLY_BATCH) {
    const batch = await runBatch();
    console.log('| measure (Batch API) | value |');
    console.log('| --- | --- |');
    for (const [k, v] of batch) console.log(`| ${k} | ${v} |`);
    return;
  }
  console.log(`foreman bench: node ${process.version}, ${os.cpus().length} cpus, ${CLIENTS} client connections`);
  const full = await run('FULL');
  const keyed = process.env.BENCH_SKIP_AUTH ? null : await run('FULL', true);
  const normal = process.env.BENCH_SKIP_NORMAL ? null : await run('NORMAL');
  console.log('');
  console.log(`| measure | synchronous=FULL (default) |${keyed ? ' FULL, auth on (API key) |' : ''}${normal ? ' synchronous=NORMAL |' : ''}`);
  console.log(`| --- | --- |${keyed ? ' --- |' : ''}${normal ? ' --- |' : ''}`);
  full.forEach(([k, v], i) => console.log(`| ${k} | ${v} |${keyed ? ` ${keyed[i]![1]} |` : ''}${normal ? ` ${normal[i]![1]} |` : ''}`));
  if (!process.env.BENCH_SKIP_DEAD) {
    const dead = await runDead();
    console.log('');
    console.log('| measure (dead receiver) | value |');
    console.log('| --- | --- |');
    for (const [k, v] of dead) console.log(`| ${k} | ${v} |`);
  }
  if (!process.env.BENCH_SKIP_BATCH) {
    const batch = await runBatch();
    console.log('');
    console.log('| measure (Batch API) | value |');
    console.log('| --- | --- |');
    for (const [k, v] of batch) console.log(`| ${k} | ${v} |`);
  }
  if (!process.env.BENCH_SKIP_LARGE) {
    const large = await runLarge();
    console.log('');
    console.log('| measure (large table) | value |');
    console.log('| --- | --- |');
    for (const [k, v] of large) console.log(`| ${k} | ${v} |`);
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
