/**
 * The LISTEN connection and the channel between instances, when things go wrong: a connection
 * that stays up but hears nothing (deaf) is made again, and what it missed reaches the watchers
 * (`resync`); two processes with one instance id tell each other apart; metrics count only what
 * an instance committed. Also the session settings every connection gets, and the settings'
 * checks. A fresh database per test, in this run's private cluster.
 */
import pg from 'pg';
import { pino } from 'pino';
import { afterEach, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../src/config.js';
import { pgTypes, redactUrl, sessionOptions } from '../src/queue/postgres/db.js';
import { ClusterNotifier } from '../src/queue/postgres/notify.js';
import { LocalNotifier } from '../src/queue/notifier.js';
import { PostgresDriver } from '../src/queue/postgres/driver.js';
import { Service } from '../src/service.js';
import { newJob } from './driver/conformance.js';
import { startFakeOllama, type FakeOllama } from './support/fake-ollama.js';
import { testConfig } from './support/harness.js';
import { createDatabase } from './support/postgres.js';
import { sleep, until } from './support/util.js';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
});

async function database(): Promise<string> {
  const db = await createDatabase('foreman_listen');
  cleanups.push(db.drop);
  return db.url;
}

async function driver(
  url: string,
  instanceId: string,
  extra: { onDuplicateId?: (id: string) => void; heartbeatMs?: number; deltaCoalesceMs?: number } = {},
): Promise<PostgresDriver> {
  const d = new PostgresDriver({ url, instanceId, heartbeatMs: 200, ...extra });
  await d.ready;
  cleanups.push(() => d.close());
  return d;
}

/** A service on `url` with the given driver, and a fake engine whose loads take a minute (a job stays `loading`). */
async function service(url: string, d: PostgresDriver): Promise<{ url: string; fake: FakeOllama; svc: Service }> {
  const fake = await startFakeOllama({ loadDelayMs: 60_000 });
  cleanups.push(() => fake.close());
  // The load outlasts the test: only a cancel (or a lost lease) ends it.
  const config = testConfig({ ollamaUrl: fake.url, databaseUrl: url, instanceId: d.instanceId, engineIdleTimeoutMs: 120_000 });
  const svc = new Service({ config, logger: pino({ level: 'silent' }), driver: d });
  const base = await svc.start();
  cleanups.unshift(() => svc.stop()); // stopped before its driver is closed
  return { url: base, fake, svc };
}

/** The `state` events of an SSE stream, as they arrive. */
function watchStates(url: string): { states: { id: number; state: string }[]; ended: Promise<void> } {
  const states: { id: number; state: string }[] = [];
  const ended = (async () => {
    const res = await fetch(url);
    const reader = res.body!.getReader();
    const dec = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += dec.decode(value, { stream: true });
      let at: number;
      while ((at = buf.indexOf('\n\n')) >= 0) {
        const frame = buf.slice(0, at);
        buf = buf.slice(at + 2);
        const id = /^id: (\d+)$/m.exec(frame)?.[1];
        const data = /^data: (.*)$/m.exec(frame)?.[1];
        if (/^event: state$/m.test(frame) && id && data) states.push({ id: Number(id), state: (JSON.parse(data) as { state: string }).state });
      }
    }
  })();
  return { states, ended };
}

/** What the tests look at inside a driver: its pool, its LISTEN connection, whether it thinks it is alone. */
const inside = (d: PostgresDriver) => d as unknown as { pool: pg.Pool; cluster: { client: pg.Client }; alone: boolean };

const listenPid = async (d: PostgresDriver): Promise<number> =>
  (await inside(d).cluster.client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')).rows[0]!.pid;

describe('the LISTEN connection', () => {
  it('goes deaf: it is made again, and a watcher gets the state change it missed meanwhile, once', async () => {
    const url = await database();
    const a = await driver(url, 'inst-a');
    const b = await driver(url, 'inst-b');
    const { url: base, fake } = await service(url, a);
    const r = await fetch(`${base}/jobs`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: 'hi' }] }),
    });
    expect(r.status).toBe(202);
    const { job_id: id } = (await r.json()) as { job_id: string };
    const watch = watchStates(`${base}/jobs/${id}/events`);
    await until('watch.states.length === 2', async () => watch.states.length === 2, 5_000); // queued, loading (the load takes a minute)
    // B knows A is there (so its writes NOTIFY), then A's LISTEN connection stops hearing.
    await until('!inside(b).alone', async () => !inside(b).alone, 5_000);
    const deafPid = await listenPid(a);
    await inside(a).cluster.client.query('UNLISTEN *');
    // Canceled on B while A hears nothing: without a new connection and a re-read, A's watcher would wait forever.
    expect(await b.jobCancel({ id, now: Date.now() })).toMatchObject({ canceled: true });
    await Promise.race([watch.ended, sleep(8_000).then(() => Promise.reject(new Error('the watcher never heard the cancel')))]);
    expect(watch.states).toEqual([
      { id: 1, state: 'queued' },
      { id: 2, state: 'loading' },
      { id: 3, state: 'canceled' },
    ]);
    expect(await listenPid(a)).not.toBe(deafPid);
    // The cancel A did not hear stops its run too (its lease, renewed at the resync, is gone),
    // long before the next heartbeat (a third of the 60 s lease).
    await until('the load request to be closed', async () => fake.requests.some((q) => q.kind === 'load' && q.aborted), 3_000);
  });

  it('two live processes with one instance id: each reports the other, and hears its announcements (not taken for its own)', async () => {
    const url = await database();
    const dup: string[] = [];
    const x = await driver(url, 'same', { onDuplicateId: (i) => dup.push(`x:${i}`) });
    const y = await driver(url, 'same', { onDuplicateId: (i) => dup.push(`y:${i}`) });
    await until('dup.length === 2', async () => dup.length === 2, 5_000);
    expect(dup.sort()).toEqual(['x:same', 'y:same']);
    const heard: string[] = [];
    y.notifier.on('stateChanged', (e) => heard.push(`${e.jobId}:${e.state}:${e.remote === true}`));
    await until('!inside(x).alone', async () => !inside(x).alone, 5_000);
    const [out] = await x.jobsInsert({ jobs: [newJob({ model: 'llama3.2' })], now: Date.now(), maxQueued: 1000 });
    const id = out?.ok ? out.jobId : '';
    await until('heard.length === 1', async () => heard.length === 1, 5_000);
    expect(heard).toEqual([`${id}:queued:true`]);
  });

  it("a transition sends its job's pending token deltas in its own transaction: it never waits on the LISTEN connection, and the tokens still arrive first", async () => {
    const url = await database();
    // Heartbeats every second: A's busy LISTEN connection is not taken for deaf (and remade) within
    // the test; and A's coalescing timer never sends the deltas first (on that busy connection).
    const a = await driver(url, 'inst-a', { heartbeatMs: 1_000, deltaCoalesceMs: 60_000 });
    const b = await driver(url, 'inst-b', { heartbeatMs: 1_000 });
    const cluster = (a as unknown as { cluster: { peers: boolean; client: pg.Client } }).cluster;
    await until('a to hear b', async () => cluster.peers, 5_000);
    const job = newJob();
    const heard: string[] = [];
    b.onRemoteDelta((jobId, chunk) => jobId === job.id && heard.push(`delta ${(chunk as { n: number }).n}`));
    b.notifier.on('stateChanged', (e) => e.jobId === job.id && heard.push(e.state));
    await a.jobsInsert({ jobs: [job], now: Date.now(), maxQueued: 10 });
    const [claimed] = await a.jobsClaim({ owner: 'w', limit: 1, now: Date.now(), leaseMs: 60_000 });
    await until('b to hear the loading state', async () => heard.includes('loading'), 5_000);
    heard.length = 0;
    // A's LISTEN connection is busy for 3 s (as a half-open one would be for longer).
    const busy = cluster.client.query('SELECT pg_sleep(3)').then(() => {}, () => {});
    a.relayDelta(job.id, { n: 1 });
    a.relayDelta(job.id, { n: 2 });
    a.relayDelta('another-job', { n: 3 }); // not this transition's job: left to the timer
    const t0 = performance.now();
    expect(await a.jobSetWorking({ seq: claimed!.seq, lease: claimed!.lease, now: Date.now(), leaseMs: 60_000 })).toBe(true);
    expect(performance.now() - t0).toBeLessThan(1_000);
    await until('b to hear the working state', async () => heard.includes('working'), 5_000);
    expect(heard).toEqual(['delta 1', 'delta 2', 'working']);
    expect((a as unknown as { cluster: { deltasPending: boolean } }).cluster.deltasPending).toBe(true);
    await busy;
  });

  it('a coalescing timer that fires with no LISTEN connection does not stop the next one from starting', async () => {
    const n = new ClusterNotifier({ url: 'postgres://127.0.0.1:1/none', instanceId: 'x', local: new LocalNotifier(), types: pgTypes, deltaCoalesceMs: 10 });
    const timer = () => (n as unknown as { deltaTimer: NodeJS.Timeout | null }).deltaTimer;
    n.restoreDeltas(new Map([['job-1', [{ n: 1 }]]])); // gathered deltas, and a timer for them
    expect(timer()).not.toBeNull();
    await sleep(50); // it fired: no connection, nothing to send them on
    expect(timer()).toBeNull();
    expect(n.deltasPending).toBe(false);
    n.restoreDeltas(new Map([['job-2', [{ n: 2 }]]]));
    expect(timer()).not.toBeNull();
    await n.stop();
  });

  it("metrics count what this instance committed, not what it hears of the others'", async () => {
    const url = await database();
    const a = await driver(url, 'inst-a');
    const b = await driver(url, 'inst-b');
    const { url: base } = await service(url, a);
    const heard: string[] = [];
    a.notifier.on('stateChanged', (e) => e.remote && heard.push(e.state));
    await until('!inside(b).alone', async () => !inside(b).alone, 5_000);
    // A job taken in on B and canceled there: A hears both (its worker may claim it meanwhile: that transition is A's).
    const [out] = await b.jobsInsert({ jobs: [newJob({ model: 'llama3.2' })], now: Date.now(), maxQueued: 1000 });
    const id = out?.ok ? out.jobId : '';
    expect(await b.jobCancel({ id, now: Date.now() })).toMatchObject({ canceled: true });
    await until('canceled to be heard', async () => heard.includes('canceled'), 5_000);
    expect(heard[0]).toBe('queued');
    const text = await (await fetch(`${base}/metrics`)).text();
    expect(text).not.toMatch(/^foreman_jobs_submitted_total\{[^}]*\} [1-9]/m);
    expect(text).not.toMatch(/^foreman_jobs_finished_total\{[^}]*\} [1-9]/m);
  });
});

describe('session settings', () => {
  it('every pooled and LISTEN connection ends a vanished client by TCP keepalive and an idle transaction after a minute; the URL may change them', async () => {
    const url = await database();
    const a = await driver(url, 'inst-a');
    const show = async (c: { query: pg.Client['query'] }, name: string) => ((await c.query<Record<string, string>>(`SHOW ${name}`)).rows[0]![name]);
    const pool = inside(a).pool;
    const listen = inside(a).cluster.client;
    for (const c of [pool, listen]) {
      expect(await show(c, 'tcp_keepalives_idle')).toBe('10');
      expect(await show(c, 'tcp_keepalives_interval')).toBe('5');
      expect(await show(c, 'tcp_keepalives_count')).toBe('3');
      expect(await show(c, 'idle_in_transaction_session_timeout')).toBe('1min');
      expect(await show(c, 'jit')).toBe('off');
    }
    const own = `${url}${url.includes('?') ? '&' : '?'}options=${encodeURIComponent('-c idle_in_transaction_session_timeout=5s')}`;
    expect(sessionOptions(own)).toContain('-c idle_in_transaction_session_timeout=60s -c idle_in_transaction_session_timeout=5s');
    const b = new PostgresDriver({ url: own, instanceId: 'inst-b', crossInstance: false });
    cleanups.push(() => b.close());
    await b.ready;
    expect(await show(inside(b).pool, 'idle_in_transaction_session_timeout')).toBe('5s');
  });

  it('a password in the query string is never printed either', async () => {
    expect(redactUrl('postgres://u:s3cret@127.0.0.1:1/x?password=t0p&sslpassword=k3y&sslmode=disable')).toBe(
      'postgres://u:***@127.0.0.1:1/x?password=***&sslpassword=***&sslmode=disable',
    );
    const d = new PostgresDriver({ url: 'postgres://u@127.0.0.1:1/x?password=t0p', crossInstance: false, connectTimeoutMs: 500 });
    const err = (await d.recover({ now: Date.now() }).catch((e: unknown) => e)) as Error;
    await d.close();
    expect(err.message).toContain('FOREMAN_DATABASE_URL');
    expect(err.message).not.toContain('t0p');
  });

  it('FOREMAN_INSTANCE_ID must be a plain name; a Unix-socket URL names its host in the query', () => {
    expect(loadConfig({ FOREMAN_INSTANCE_ID: 'web-1.eu_2' }).instanceId).toBe('web-1.eu_2');
    for (const bad of ['web/2', 'a b', '#x', '-x', 'x'.repeat(65)]) {
      expect(() => loadConfig({ FOREMAN_INSTANCE_ID: bad })).toThrow(ConfigError);
      expect(() => loadConfig({ FOREMAN_INSTANCE_ID: bad })).toThrow(/^FOREMAN_INSTANCE_ID: must be 1 to 64 letters/);
    }
    expect(loadConfig({ FOREMAN_DATABASE_URL: 'postgres:///foreman?host=/run/postgresql' }).databaseUrl).toBe('postgres:///foreman?host=/run/postgresql');
    expect(() => loadConfig({ FOREMAN_DATABASE_URL: 'postgres:///foreman' })).toThrow(/^FOREMAN_DATABASE_URL: names no host/);
  });
});
