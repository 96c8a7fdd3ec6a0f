/**
 * npm run bench: starts the built service as a child process against a zero-latency fake
 * Ollama and prints figures. A baseline, not a test: nothing here asserts.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Pool } from 'undici';
import { startFakeOllama } from '../test/support/fake-ollama.js';
import { startReceiver } from '../test/support/receiver.js';
import { startChild } from '../test/support/child.js';
import { seedJobs } from './seed.js';

const N_SUBMIT = Number(process.env.BENCH_SUBMIT ?? 5000);
const N_E2E = Number(process.env.BENCH_E2E ?? 2000);
const N_IDLE = Number(process.env.BENCH_IDLE ?? 50);
const CLIENTS = Number(process.env.BENCH_CLIENTS ?? 64);

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? NaN;
};
const f = (n: number, d = 2) => n.toFixed(d);

type Row = [string, string];

async function run(synchronous: 'FULL' | 'NORMAL'): Promise<Row[]> {
  const fake = await startFakeOllama();
  const receiver = await startReceiver();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'foreman-bench-'));
  const child = await startChild({
    FOREMAN_DATA_DIR: dir,
    FOREMAN_OLLAMA_URL: fake.url,
    FOREMAN_LOG_LEVEL: 'warn',
    FOREMAN_CONCURRENCY: process.env.BENCH_CONCURRENCY ?? '4',
    FOREMAN_MAX_QUEUED: '1000000',
    FOREMAN_SQLITE_SYNCHRONOUS: synchronous,
  });
  const pool = new Pool(child.url, { connections: CLIENTS, pipelining: 1 });
  const body = (i: number, extra: Record<string, unknown> = {}) =>
    JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: `prompt ${i}` }], ...extra });
  const post = async (b: string) => {
    const t0 = performance.now();
    const res = await pool.request({ path: '/jobs', method: 'POST', headers: { 'content-type': 'application/json' }, body: b });
    const j = (await res.body.json()) as { job_id: string };
    if (res.statusCode !== 202) throw new Error(`POST /jobs answered ${res.statusCode}`);
    return { ms: performance.now() - t0, id: j.job_id };
  };
  const getJob = async (id: string) => {
    const res = await pool.request({ path: `/jobs/${id}`, method: 'GET' });
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

  // 1. Idle submit → working latency, one job at a time on an idle service.
  const idle: number[] = [];
  const idleClient: number[] = [];
  for (let i = 0; i < N_IDLE; i++) {
    const tSubmit = Date.now();
    const { id } = await post(body(i, { state_webhook_url: `${receiver.url}/idle`, webhook_events: ['working'] }));
    await receiver.waitFor((rs) => rs.some((r) => r.event?.event_id === `${id}:working`), 10_000);
    idleClient.push(Date.now() - tSubmit);
    let j = await getJob(id);
    while (j.state !== 'done') j = await getJob(id);
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

  // 3. End to end: submit N jobs with a `done` webhook; time until every done event arrived.
  receiver.received.length = 0;
  t0 = performance.now();
  await runClients(N_E2E, async (i) => {
    await post(body(i, { state_webhook_url: `${receiver.url}/e2e`, webhook_events: ['done'] }));
  });
  await receiver.waitFor((rs) => rs.length >= N_E2E, 300_000);
  const e2eSecs = (performance.now() - t0) / 1000;

  const rows: Row[] = [
    [`POST /jobs throughput (${N_SUBMIT} requests, ${CLIENTS} connections)`, `${f(N_SUBMIT / submitSecs, 0)} req/s`],
    ['POST /jobs latency p50 / p99', `${f(pct(lat, 50))} ms / ${f(pct(lat, 99))} ms`],
    [`end-to-end (${N_E2E} jobs, submit → done webhook received)`, `${f(N_E2E / e2eSecs, 0)} jobs/s (${f(e2eSecs)} s)`],
    [`idle submit → working, server clock (${N_IDLE} jobs) p50 / p99`, `${f(pct(idle, 50), 0)} ms / ${f(pct(idle, 99), 0)} ms`],
    ['idle submit → working webhook received, client clock p50 / p99', `${f(pct(idleClient, 50), 0)} ms / ${f(pct(idleClient, 99), 0)} ms`],
  ];
  child.proc.kill('SIGTERM');
  await child.exited;
  await pool.close();
  await receiver.close();
  await fake.close();
  fs.rmSync(dir, { recursive: true, force: true });
  return rows;
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

async function main() {
  console.log(`foreman bench: node ${process.version}, ${os.cpus().length} cpus, ${CLIENTS} client connections`);
  const full = await run('FULL');
  const normal = process.env.BENCH_SKIP_NORMAL ? null : await run('NORMAL');
  console.log('');
  console.log(`| measure | synchronous=FULL (default) |${normal ? ' synchronous=NORMAL |' : ''}`);
  console.log(`| --- | --- |${normal ? ' --- |' : ''}`);
  full.forEach(([k, v], i) => console.log(`| ${k} | ${v} |${normal ? ` ${normal[i]![1]} |` : ''}`));
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
