/**
 * npm run compare: Foreman against Fastify+BullMQ and Fastify+pg-boss doing the same work
 * (zero-latency fake Ollama: load + stream + merge, then a `done` webhook), each service in its
 * own process on this machine. Needs Redis and PostgreSQL listening (REDIS_PORT, PG_URL); see
 * README "Comparison". Prints figures; asserts nothing.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Pool } from 'undici';
import { startFakeOllama, type FakeOllama } from '../../test/support/fake-ollama.js';
import { startReceiver, type Receiver } from '../../test/support/receiver.js';
import { freePort, MAIN } from '../../test/support/child.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const N = Number(process.env.COMPARE_JOBS ?? 2000);
const N_IDLE = Number(process.env.COMPARE_IDLE ?? 20);
const CLIENTS = 64;
const CONCURRENCY = '4';

const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))] ?? NaN;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function start(script: string, env: Record<string, string>): Promise<{ proc: ChildProcess; url: string }> {
  const port = await freePort();
  const proc = spawn(process.execPath, [script], { env: { PATH: process.env.PATH ?? '', ...env, PORT: String(port), FOREMAN_PORT: String(port) }, stdio: ['ignore', 'ignore', 'inherit'] });
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 500; i++) {
    try {
      if ((await fetch(`${url}/healthz`)).ok) return { proc, url };
    } catch {
      /* not yet */
    }
    await sleep(20);
  }
  proc.kill('SIGKILL');
  throw new Error(`${script} did not start`);
}

async function measure(name: string, script: string, env: Record<string, string>, fake: FakeOllama, receiver: Receiver) {
  const { proc, url } = await start(script, { OLLAMA_URL: fake.url, FOREMAN_OLLAMA_URL: fake.url, CONCURRENCY, FOREMAN_CONCURRENCY: CONCURRENCY, ...env });
  const pool = new Pool(url, { connections: CLIENTS });
  const submit = async (i: number, hook: string) => {
    const res = await pool.request({
      path: '/jobs',
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: `prompt ${i}` }], state_webhook_url: `${receiver.url}/${hook}`, webhook_events: ['done'] }),
    });
    const j = (await res.body.json()) as { job_id: string };
    if (res.statusCode !== 202) throw new Error(`${name}: POST /jobs answered ${res.statusCode}`);
    return j.job_id;
  };
  const doneFor = (hook: string) => receiver.received.filter((r) => r.path === `/${hook}`).length;
  // Warm up (connections, JIT, model "load").
  for (let i = 0; i < 20; i++) await submit(i, `${name}-warm`);
  await receiver.waitFor(() => doneFor(`${name}-warm`) >= 20, 60_000);
  // Idle: one job at a time, submit → done webhook received.
  const idle: number[] = [];
  for (let i = 0; i < N_IDLE; i++) {
    await sleep(100);
    const t0 = performance.now();
    await submit(i, `${name}-idle`);
    await receiver.waitFor(() => doneFor(`${name}-idle`) >= i + 1, 30_000);
    idle.push(performance.now() - t0);
  }
  // Throughput: N jobs from 64 connections, until every done webhook arrived.
  const t0 = performance.now();
  let next = 0;
  await Promise.all(Array.from({ length: CLIENTS }, async () => {
    while (next < N) await submit(next++, `${name}-bulk`);
  }));
  const submitSecs = (performance.now() - t0) / 1000;
  await receiver.waitFor(() => doneFor(`${name}-bulk`) >= N, 600_000);
  const e2eSecs = (performance.now() - t0) / 1000;
  proc.kill('SIGTERM');
  await pool.close();
  await sleep(300);
  return { name, idleP50: pct(idle, 50), idleP99: pct(idle, 99), submitRate: N / submitSecs, e2eRate: N / e2eSecs };
}

async function main() {
  const fake = await startFakeOllama();
  const receiver = await startReceiver();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'foreman-compare-'));
  const rows = [];
  rows.push(await measure('foreman', MAIN, { FOREMAN_DATA_DIR: dir, FOREMAN_LOG_LEVEL: 'warn', FOREMAN_MAX_QUEUED: '1000000' }, fake, receiver));
  rows.push(await measure('bullmq', path.join(here, 'bullmq-service.js'), { REDIS_PORT: process.env.REDIS_PORT ?? '6379' }, fake, receiver));
  rows.push(await measure('pg-boss', path.join(here, 'pgboss-service.js'), { PG_URL: process.env.PG_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres' }, fake, receiver));
  console.log(`\ncompare: node ${process.version}, ${os.cpus().length} cpus, ${N} jobs, ${CLIENTS} connections, worker concurrency ${CONCURRENCY}, zero-latency fake engine\n`);
  console.log('| service | POST /jobs (req/s) | end to end, submit → done webhook (jobs/s) | idle job, submit → done webhook p50 / p99 |');
  console.log('| --- | --- | --- | --- |');
  for (const r of rows) console.log(`| ${r.name} | ${r.submitRate.toFixed(0)} | ${r.e2eRate.toFixed(0)} | ${r.idleP50.toFixed(1)} ms / ${r.idleP99.toFixed(1)} ms |`);
  await receiver.close();
  await fake.close();
  fs.rmSync(dir, { recursive: true, force: true });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
