import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, describe, expect, it } from 'vitest';
import { startFakeOllama, type FakeOllama } from './support/fake-ollama.js';
import { startReceiver } from './support/receiver.js';
import { runChild, startChild, type Child } from './support/child.js';
import { tempDir } from './support/harness.js';

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function json(url: string, init?: RequestInit): Promise<any> {
  const r = await fetch(url, init);
  return { status: r.status, body: await r.json() };
}

async function waitAllDone(url: string, ids: string[], timeoutMs = 20_000): Promise<any[]> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const jobs = await Promise.all(ids.map((id) => json(`${url}/jobs/${id}`).then((r) => r.body)));
    if (jobs.every((j) => j.state === 'done' || j.state === 'failed')) return jobs;
    if (Date.now() > end) throw new Error(`not finished: ${jobs.map((j) => `${j.job_id}=${j.state}`).join(' ')}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

function env(dataDir: string, fake: FakeOllama, extra: Record<string, string> = {}) {
  return {
    FOREMAN_DATA_DIR: dataDir,
    FOREMAN_OLLAMA_URL: fake.url,
    FOREMAN_JOB_RETRY_BASE: '10ms',
    FOREMAN_WEBHOOK_BACKOFF_BASE: '10ms',
    FOREMAN_WEBHOOK_BACKOFF_MAX: '100ms',
    FOREMAN_SHUTDOWN_GRACE: '200ms',
    ...extra,
  };
}

describe('a real process', () => {
  it('SIGKILL mid-generation: after a restart every job runs again, finishes, and every event arrives', async () => {
    const fake = await startFakeOllama({ defaultChunkDelayMs: 150 });
    const receiver = await startReceiver();
    const dir = tempDir();
    cleanups.push(() => fake.close(), () => receiver.close(), () => fs.rmSync(dir, { recursive: true, force: true }));

    let child: Child = await startChild(env(dir, fake, { FOREMAN_CONCURRENCY: '2' }));
    cleanups.push(() => void child.proc.kill('SIGKILL'));
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      const r = await json(`${child.url}/jobs`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: `job ${i}` }], state_webhook_url: `${receiver.url}/hook` }),
      });
      expect(r.status).toBe(202);
      ids.push(r.body.job_id);
    }
    // Two generations are streaming (each takes ~1 s): kill the process without warning.
    await fake.waitForRequests(2, (q) => q.kind === 'chat');
    child.proc.kill('SIGKILL');
    expect(await child.exited).toBe(null);

    const db = new Database(path.join(dir, 'foreman.db'), { readonly: true });
    const states = db.prepare('SELECT state, count(*) AS n FROM jobs GROUP BY state ORDER BY state').all();
    // The claim names the instance: FOREMAN_INSTANCE_ID unset, <hostname>-<pid> of the process.
    const runners = db.prepare(`SELECT DISTINCT instance FROM jobs WHERE state = 'working'`).pluck().all();
    db.close();
    expect(runners).toEqual([`${os.hostname()}-${child.proc.pid}`]);
    expect(states).toEqual([
      { state: 'queued', n: 3 },
      { state: 'working', n: 2 },
    ]);

    child = await startChild(env(dir, fake, { FOREMAN_CONCURRENCY: '2', FOREMAN_INSTANCE_ID: 'process-b' }));
    const requeued = child.logs.filter((l) => /re-queued/.test(l.msg)).map((l) => l.job_id).sort();
    expect(requeued).toEqual([ids[0], ids[1]].sort());

    const jobs = await waitAllDone(child.url, ids);
    expect(jobs.map((j) => j.state)).toEqual(['done', 'done', 'done', 'done', 'done']);
    // Every job, the interrupted two included, last ran on the restarted instance: its FOREMAN_INSTANCE_ID.
    expect(jobs.map((j) => j.instance)).toEqual(Array(5).fill('process-b'));
    // The two interrupted jobs show the interruption; the attempt it cost does not count.
    for (const j of jobs.slice(0, 2)) {
      expect(j.transitions.map((t: any) => t.state)).toEqual(['queued', 'loading', 'working', 'queued', 'loading', 'working', 'done']);
      expect(j.attempt).toBe(1);
      expect(j.result.message.content).toBe(`echo: job ${ids.indexOf(j.job_id)}`);
    }
    // Every job's done event arrives; each state at least once, and each first arrival in order.
    await receiver.waitFor((rs) => ids.every((id) => rs.some((r) => r.event.event_id === `${id}:done`)), 15_000);
    for (const id of ids) {
      const firsts: string[] = [];
      for (const r of receiver.received) if (r.event.job_id === id && !firsts.includes(r.event.state)) firsts.push(r.event.state);
      expect(firsts).toEqual(['queued', 'loading', 'working', 'done']);
    }
    child.proc.kill('SIGTERM');
    expect(await child.exited).toBe(0);
  });

  it('SIGTERM: stops claiming, gives the running job its grace, re-queues it, and exits 0 with the database closed cleanly', async () => {
    const fake = await startFakeOllama();
    const dir = tempDir();
    cleanups.push(() => fake.close(), () => fs.rmSync(dir, { recursive: true, force: true }));
    fake.enqueue({ kind: 'ok', chunkDelayMs: 2_000 });
    const child = await startChild(env(dir, fake, { FOREMAN_SHUTDOWN_GRACE: '100ms' }));
    cleanups.push(() => void child.proc.kill('SIGKILL'));
    const r = await json(`${child.url}/jobs`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: 'slow' }] }),
    });
    const id = r.body.job_id as string;
    const [chat] = await fake.waitForRequests(1, (q) => q.kind === 'chat');
    child.proc.kill('SIGTERM');
    expect(await child.exited).toBe(0);
    expect(chat!.aborted).toBe(true); // the engine request was closed, which stops Ollama's work
    expect(fs.existsSync(path.join(dir, 'foreman.db-wal')) ? fs.statSync(path.join(dir, 'foreman.db-wal')).size : 0).toBe(0);
    const db = new Database(path.join(dir, 'foreman.db'), { readonly: true });
    const row = db.prepare('SELECT state, attempt, lease_owner FROM jobs WHERE id = ?').get(id);
    const transitions = db.prepare('SELECT t.state FROM job_transitions t JOIN jobs j ON j.seq = t.job_seq WHERE j.id = ? ORDER BY n').pluck().all(id);
    db.close();
    expect(row).toEqual({ state: 'queued', attempt: 0, lease_owner: null });
    expect(transitions).toEqual(['queued', 'loading', 'working', 'queued']);
  });

  it('an invalid setting stops start-up with a message naming the variable', async () => {
    const bad: [Record<string, string>, RegExp][] = [
      [{ FOREMAN_PORT: 'eighty' }, /FOREMAN_PORT: "eighty" is not a whole number/],
      [{ FOREMAN_PORT: '70000' }, /FOREMAN_PORT: 70000 is out of range/],
      [{ FOREMAN_JOB_TTL: '7 weeks' }, /FOREMAN_JOB_TTL: "7 weeks" is not a duration/],
      [{ FOREMAN_OLLAMA_URL: 'ftp://x' }, /FOREMAN_OLLAMA_URL: "ftp:\/\/x" must be an http or https URL/],
      [{ FOREMAN_LOG_LEVEL: 'loud' }, /FOREMAN_LOG_LEVEL: "loud" must be one of/],
      [{ FOREMAN_WEBHOOK_BLOCK_PRIVATE: 'maybe' }, /FOREMAN_WEBHOOK_BLOCK_PRIVATE: "maybe" is not a boolean/],
      [{ FOREMAN_CONCURRENCY: '0' }, /FOREMAN_CONCURRENCY: 0 is out of range/],
    ];
    const results = await Promise.all(bad.map(([e]) => runChild({ FOREMAN_DATA_DIR: tempDir(), ...e })));
    results.forEach((r, i) => {
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(bad[i]![1]);
    });
  });
});
