/**
 * A cluster: 3 Foreman instances as real child processes (dist/src/main.js) on one PostgreSQL
 * database, one fake Ollama, one webhook receiver. Jobs are submitted round-robin; instances are
 * SIGKILLed mid-generation and mid-delivery (the leader among them) and restarted. Then: no job is
 * lost or stuck, every job's events arrive in order, no job ran on two instances at once, and
 * maintenance moved to another leader. Also: cross-instance cancel within 1 s, and one
 * Idempotency-Key sent 20 times at once over the three instances makes exactly one job.
 */
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import pg from 'pg';
import { spawnChild, type Spawned } from './support/child.js';
import { startFakeOllama, type FakeOllama } from './support/fake-ollama.js';
import { startReceiver, type Receiver } from './support/receiver.js';
import { createDatabase } from './support/postgres.js';
import { sleep } from './support/util.js';

const SEQ: Record<string, number> = { queued: 1, loading: 2, working: 3, done: 4, failed: 4, canceled: 4 };

describe('postgres cluster: 3 instances on one database', () => {
  let db: Awaited<ReturnType<typeof createDatabase>>;
  let fake: FakeOllama;
  let rcv: Receiver;
  let sql: pg.Client;
  const live = new Map<string, Spawned>();
  /** Every instance started, killed ones included (their logs are kept). */
  const started: { id: string; child: Spawned }[] = [];
  let env: Record<string, string>;

  const start = async (id: string): Promise<Spawned> => {
    const c = await spawnChild({ ...env, FOREMAN_INSTANCE_ID: id });
    await c.ready(20_000);
    live.set(id, c);
    started.push({ id, child: c });
    return c;
  };
  const kill = async (id: string): Promise<void> => {
    const c = live.get(id)!;
    live.delete(id);
    c.proc.kill('SIGKILL');
    await c.exited;
  };
  const leaderOf = (): string | undefined => {
    let best: { id: string; at: number } | undefined;
    for (const [id, c] of live) {
      for (const l of c.logs) if (l.leader === true && (!best || l.time > best.at)) best = { id, at: l.time };
    }
    return best?.id;
  };
  const post = async (c: Spawned, path: string, body: unknown, headers: Record<string, string> = {}) => {
    const r = await fetch(`${c.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) });
    return { status: r.status, body: (await r.json()) as any };
  };

  beforeAll(async () => {
    db = await createDatabase('foreman_cluster');
    fake = await startFakeOllama({ defaultChunkDelayMs: 15 });
    rcv = await startReceiver();
    sql = new pg.Client({ connectionString: db.url });
    await sql.connect();
    env = {
      FOREMAN_DATABASE_URL: db.url,
      FOREMAN_OLLAMA_URL: fake.url,
      FOREMAN_CONCURRENCY: '4',
      FOREMAN_LOG_LEVEL: 'info',
      FOREMAN_JOB_LEASE: '1500ms',
      FOREMAN_POLL_INTERVAL: '1s',
      FOREMAN_JOB_RETRY_BASE: '20ms',
      FOREMAN_WEBHOOK_BACKOFF_BASE: '20ms',
      FOREMAN_WEBHOOK_BACKOFF_MAX: '200ms',
      FOREMAN_WEBHOOK_TIMEOUT: '1s',
      FOREMAN_SHUTDOWN_GRACE: '500ms',
      FOREMAN_DATABASE_POOL: '5',
    };
    // All three at once: the migrations run under an advisory lock, once.
    await Promise.all(['i0', 'i1', 'i2'].map((id) => start(id)));
  }, 60_000);

  afterAll(async () => {
    for (const c of live.values()) c.proc.kill('SIGKILL');
    await Promise.all([...live.values()].map((c) => c.exited));
    await sql?.end();
    await rcv?.close();
    await fake?.close();
    await db?.drop();
  });

  it('applied the migrations once, with three instances starting together', async () => {
    const r = await sql.query('SELECT version FROM schema_migrations ORDER BY version');
    const files = fs.readdirSync(new URL('../migrations/postgres/', import.meta.url)).filter((f) => /^\d{4}_/.test(f)).sort();
    expect(files.length).toBeGreaterThanOrEqual(2);
    expect(r.rows.map((x) => x.version)).toEqual(files.map((f) => Number(f.slice(0, 4))));
  });

  it('SIGKILL mid-generation and mid-delivery, the leader too: 0 lost, 0 stuck, order kept, never run twice at once', async () => {
    const N = 90;
    const ids: string[] = [];
    for (let i = 0; i < 100 && leaderOf() === undefined; i++) await sleep(50);
    const firstLeader = leaderOf();
    expect(firstLeader).toBeDefined();
    let restarted = 0;
    const submit = async (c: Spawned) => {
      const r = await post(c, '/jobs', { model: 'llama3.2', messages: [{ role: 'user', content: `job ${ids.length}` }], state_webhook_url: `${rcv.url}/h` });
      expect(r.status).toBe(202);
      ids.push(r.body.job_id as string);
    };
    // Mid-generation: the victim is killed while it runs a job (more are submitted until it does).
    const killRunning = async (victim: string) => {
      for (let i = 0; i < 200; i++) {
        const running = await sql.query("SELECT 1 FROM jobs WHERE instance = $1 AND state IN ('loading', 'working') LIMIT 1", [victim]);
        if (running.rowCount) break;
        await submit(live.get(victim)!);
      }
      await kill(victim);
    };
    for (let k = 0; k < N; k++) {
      const targets = [...live.values()];
      await submit(targets[k % targets.length]!);
      if (k === 30) {
        // Mid-generation (and mid-delivery): the leader dies first.
        await killRunning(firstLeader!);
      }
      if (k === 45) {
        const victim = [...live.keys()][0]!;
        await killRunning(victim);
        restarted++;
        await start(`${victim}-r`);
      }
      if (k === 60) {
        restarted++;
        await start(`${firstLeader}-r`);
      }
      await sleep(10);
    }
    expect(restarted).toBe(2);
    // Maintenance moved: someone else leads now.
    const end = Date.now() + 10_000;
    while (Date.now() < end && (leaderOf() === undefined || leaderOf() === firstLeader)) await sleep(100);
    expect(leaderOf()).toBeDefined();
    expect(leaderOf()).not.toBe(firstLeader);

    // Every job done, every delivery settled.
    const until = Date.now() + 90_000;
    let states: { state: string; n: number }[] = [];
    let pending = -1;
    while (Date.now() < until) {
      states = (await sql.query("SELECT state, count(*)::int AS n FROM jobs GROUP BY state ORDER BY state")).rows;
      pending = (await sql.query("SELECT count(*)::int AS n FROM webhook_deliveries WHERE status = 'pending'")).rows[0].n;
      if (states.length === 1 && states[0]!.state === 'done' && pending === 0) break;
      await sleep(200);
    }
    expect(states).toEqual([{ state: 'done', n: ids.length }]);
    expect(pending).toBe(0);
    // No job ran on two instances at once (the fake counts overlapping generations of one job).
    expect(fake.stats.overlapping).toBe(0);
    // The host's 4 slots (FOREMAN_CONCURRENCY) are shared by the three instances, not 4 each.
    expect(fake.stats.maxConcurrent).toBeGreaterThanOrEqual(2);
    expect(fake.stats.maxConcurrent).toBeLessThanOrEqual(4);
    // Each job's events, in order: every state first arrives after all earlier ones. A crash
    // between a receiver's answer and the record sends the unrecorded events again, in order
    // (at least once): such a replay starts over at the first unrecorded one.
    for (const id of ids) {
      const seq = rcv.received.filter((r) => r.event?.job_id === id).map((r) => SEQ[r.event.state as string]!);
      const first = seq.filter((x, i) => seq.indexOf(x) === i);
      expect(first).toEqual([1, 2, 3, 4]);
      for (let i = 1; i < seq.length; i++) {
        // Going back is only a replay of events already received, never a new one out of turn.
        if (seq[i]! < seq[i - 1]!) expect(seq.slice(0, i)).toContain(seq[i]!);
      }
      expect(seq.at(-1)).toBe(4);
    }
    // GET /jobs/<id> names the instance that ran each job: one of those started, and the one
    // whose log says it finished it (a log line can be lost only with a SIGKILL right after the commit).
    const ranBy = new Map<string, string>();
    for (const { child } of started) for (const l of child.logs) if (l.msg === 'job done') ranBy.set(l.job_id as string, l.instance as string);
    const names = new Set(started.map((x) => x.id));
    const viewer = [...live.values()][0]!;
    let matched = 0;
    for (const id of ids) {
      const view = (await (await fetch(`${viewer.url}/jobs/${id}`)).json()) as { instance: string | null };
      expect(names.has(view.instance!)).toBe(true);
      if (ranBy.has(id)) {
        expect(view.instance).toBe(ranBy.get(id));
        matched++;
      }
    }
    expect(matched).toBeGreaterThanOrEqual(ids.length - 2);
    const dupes = rcv.received.length - ids.length * 4;
    expect(dupes).toBeGreaterThanOrEqual(0);
    // The kills did hit running jobs: some were rescued (re-queued after their lease expired) and run again.
    const rescued = (await sql.query("SELECT count(DISTINCT job_seq)::int AS n FROM job_transitions WHERE state = 'queued' AND n > 1")).rows[0].n;
    expect(rescued).toBeGreaterThan(0);
    console.log(`cluster: ${ids.length} jobs, ${rescued} rescued after a SIGKILL, ${dupes} webhook events sent again`);
  }, 180_000);

  it('cancel on one instance aborts the engine request on the instance running the job within 1 s', async () => {
    fake.enqueue({ kind: 'ok', chunkDelayMs: 1000 });
    const [a] = [...live.values()];
    const r = await post(a!, '/jobs', { model: 'llama3.2', messages: [{ role: 'user', content: 'long one' }] });
    const id = r.body.job_id as string;
    let runner: string | null = null;
    for (let i = 0; i < 200 && runner === null; i++) {
      const row = (await sql.query("SELECT instance FROM jobs WHERE id = $1 AND state = 'working'", [id])).rows[0];
      runner = row?.instance ?? null;
      if (runner === null) await sleep(25);
    }
    expect(runner).not.toBeNull();
    const other = [...live.entries()].find(([k]) => k !== runner)![1];
    const t0 = Date.now();
    const c = await post(other, `/jobs/${id}/cancel`, {});
    expect(c.status).toBe(200);
    expect(c.body.state).toBe('canceled');
    const end = t0 + 1000;
    let aborted = false;
    while (Date.now() < end && !aborted) {
      aborted = fake.requests.some((q) => q.kind === 'chat' && q.aborted && JSON.stringify(q.body).includes('long one'));
      if (!aborted) await sleep(10);
    }
    expect(aborted).toBe(true);
  }, 30_000);

  it('SSE on one instance sees every state event and the token deltas of a job running on another; Last-Event-ID resumes anywhere', async () => {
    // Deltas are live only (never replayed), so the engine holds its first byte until the watcher is connected.
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    fake.enqueue({ kind: 'ok', gate, chunkDelayMs: 60, chunks: [{ content: 'one ' }, { content: 'two ' }, { content: 'three ' }, { content: 'four' }] });
    const cs = [...live.entries()];
    // Submit on the first; watch on each other one (whichever runs it, a watcher elsewhere sees it).
    const r = await post(cs[0]![1], '/jobs', { model: 'llama3.2', messages: [{ role: 'user', content: 'watched' }] });
    const id = r.body.job_id as string;
    let runner: string | null = null;
    for (let i = 0; i < 200 && runner === null; i++) {
      runner = (await sql.query('SELECT instance FROM jobs WHERE id = $1 AND instance IS NOT NULL', [id])).rows[0]?.instance ?? null;
      if (runner === null) await sleep(5);
    }
    const watcher = cs.find(([k]) => k !== runner)![1];
    const res = await fetch(`${watcher.url}/jobs/${id}/events`);
    expect(res.status).toBe(200); // the headers come after the watcher has subscribed
    open();
    const text = await res.text(); // the stream ends after the terminal event
    const states = [...text.matchAll(/event: state\ndata: (.*)\n/g)].map((m) => JSON.parse(m[1]!).state as string);
    expect(states).toEqual(['queued', 'loading', 'working', 'done']);
    const deltas = [...text.matchAll(/event: delta\ndata: (.*)\n/g)].map((m) => JSON.parse(m[1]!) as { content?: string });
    expect(deltas.map((d) => d.content ?? '').join('')).toBe('one two three four');
    // Resume on yet another instance after the second event: the rest, by id.
    const third = cs.find(([k]) => k !== watcher.url)![1];
    const resumed = await (await fetch(`${third.url}/jobs/${id}/events`, { headers: { 'last-event-id': '2' } })).text();
    expect([...resumed.matchAll(/id: (\d+)\nevent: state/g)].map((m) => Number(m[1]))).toEqual([3, 4]);
  }, 30_000);

  it('20 parallel requests with one Idempotency-Key over the 3 instances create exactly one job', async () => {
    const cs = [...live.values()];
    const body = { model: 'llama3.2', messages: [{ role: 'user', content: 'idem' }] };
    const out = await Promise.all(Array.from({ length: 20 }, (_, i) => post(cs[i % cs.length]!, '/jobs', body, { 'idempotency-key': 'one-key-3-instances' })));
    expect(out.every((o) => o.status === 202 || o.status === 200)).toBe(true);
    expect(new Set(out.map((o) => o.body.job_id)).size).toBe(1);
    const n = (await sql.query("SELECT count(*)::int AS n FROM jobs WHERE request LIKE '%\"idem\"%'")).rows[0].n;
    expect(n).toBe(1);
  }, 30_000);
});
