/**
 * Engine fault matrix, engine outages, backpressure and disk trouble.
 *
 * Each fault mode runs one job through a real Service against the fake Ollama and asserts the
 * exact outcome (state, error.code, attempt, the load/chat requests the engine saw), then that
 * the next job on the same service is done (the worker survived).
 */
import { createHash } from 'node:crypto';
import path from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hello, startHarness, type Harness } from './support/harness.js';
import type { FakeBehaviour, RecordedRequest } from './support/fake-ollama.js';
import { SWEEP_CHUNK } from '../src/maintenance/maintainer.js';
import { PostgresDriver } from '../src/queue/postgres/driver.js';
import { sleep, until, jobCount, sqlite, terminal } from './support/util.js';

const BUSY = 'server busy, please try again.  maximum pending requests exceeded';
const OOM = 'an error was encountered while running the model: CUDA error: out of memory';
const MiB = 1024 * 1024;




/** Failed jobs with this error code, read straight from the service's database (either driver). */
async function failedWith(h: Harness, code: string): Promise<number> {
  const d = h.service.driver;
  const sql = 'SELECT count(*) AS n FROM jobs WHERE state = $1 AND error_code = $2';
  if (d instanceof PostgresDriver) return Number((await d.pool.query<{ n: string }>(sql, ['failed', code])).rows[0]!.n);
  return (sqlite(h).prepare(sql.replace('$1', '?').replace('$2', '?')).get('failed', code) as { n: number }).n;
}

/** Submits `n` jobs, 50 requests at a time. */
async function submitMany(h: Harness, n: number, body: (i: number) => Record<string, unknown>): Promise<void> {
  for (let i = 0; i < n; i += 50) await Promise.all(Array.from({ length: Math.min(50, n - i) }, (_, k) => h.submit(body(i + k))));
}

function engineRequests(h: Harness, from: number): { loads: RecordedRequest[]; chats: RecordedRequest[] } {
  const mine = h.fake.requests.slice(from);
  return { loads: mine.filter((r) => r.kind === 'load'), chats: mine.filter((r) => r.kind === 'chat') };
}

/** The next job on the same service is done on its first attempt: the worker survived. */
async function nextJobSucceeds(h: Harness, label: string): Promise<void> {
  const text = `next after ${label}`;
  const id = await h.submit(hello(text));
  const job = await h.waitForState(id, terminal);
  expect(job.state, `next job after ${label}`).toBe('done');
  expect(job.attempt).toBe(1);
  expect(job.error).toBeNull();
  expect(job.result.message.content).toBe(`echo: ${text}`);
}

interface Row {
  mode: string;
  /** Chat behaviours, one per attempt that reaches the chat. */
  chat?: FakeBehaviour[];
  /** Sticky load behaviour for this row only. */
  load?: FakeBehaviour;
  model?: string;
  /** Runs after submit, before waiting for the outcome. */
  during?: (h: Harness, id: string) => Promise<void>;
  before?: (h: Harness) => Promise<void>;
  state: 'done' | 'failed';
  code: string | null;
  attempt: number;
  /** Claims that found the engine unreachable and were given back without costing an attempt. */
  givenBack?: number;
  loads: number;
  chats: number;
  /** Substrings the error message must contain. */
  message?: string[];
  /** Every chat request was closed by Foreman before the fake finished it. */
  chatsAborted?: boolean;
}

const rep = (n: number, b: FakeBehaviour): FakeBehaviour[] => Array.from({ length: n }, () => b);

// ---------------------------------------------------------------------------

describe('engine fault matrix (jobMaxAttempts 2, retry base 1 ms, idle timeout 300 ms)', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ jobMaxAttempts: 2, jobRetryBaseMs: 1, engineIdleTimeoutMs: 300 });
  });
  afterAll(async () => {
    await h?.stop();
  });

  const rows: Row[] = [
    {
      mode: 'connection refused, engine back after ~1.5 s',
      before: async (hh) => hh.fake.stop(),
      during: async (hh, id) => {
        // While the engine is down the job keeps its place: queued (or briefly loading), never failed.
        const seen = new Set<string>();
        const end = Date.now() + 1_500;
        while (Date.now() < end) {
          seen.add((await hh.api(`/jobs/${id}`)).body.state);
          await sleep(20);
        }
        expect([...seen].filter((s) => s !== 'queued' && s !== 'loading'), 'states while down').toEqual([]);
        const j = (await hh.api(`/jobs/${id}`)).body;
        expect(j.state).toBe('queued');
        expect(j.attempt).toBe(0); // an unreachable engine does not cost the job an attempt
        expect(j.error).toBeNull();
        await hh.fake.start();
      },
      state: 'done',
      code: null,
      attempt: 1,
      givenBack: 1,
      loads: 1, // the refused attempt never reached the fake
      chats: 1,
    },
    {
      mode: 'connection reset mid-stream once, then ok',
      chat: [{ kind: 'reset', after: 2 }],
      state: 'done',
      code: null,
      attempt: 2,
      loads: 2,
      chats: 2,
    },
    {
      mode: 'connection reset mid-stream on every attempt',
      chat: rep(2, { kind: 'reset', after: 2 }),
      state: 'failed',
      code: 'engine_unavailable',
      attempt: 2,
      loads: 2,
      chats: 2,
      message: ['gave up after 2 attempts'],
    },
    {
      mode: '503 server busy',
      chat: rep(2, { kind: 'http_error', status: 503, error: BUSY }),
      state: 'failed',
      code: 'engine_busy',
      attempt: 2,
      loads: 2,
      chats: 2,
      message: [BUSY, 'gave up after 2 attempts'],
    },
    {
      mode: '429 rate limited',
      chat: rep(2, { kind: 'http_error', status: 429, error: 'too many requests' }),
      state: 'failed',
      code: 'engine_busy',
      attempt: 2,
      loads: 2,
      chats: 2,
      message: ['too many requests'],
    },
    {
      mode: '500 runner crash',
      chat: rep(2, { kind: 'http_error', status: 500, error: 'llama runner process has terminated: signal: killed' }),
      state: 'failed',
      code: 'engine_error',
      attempt: 2,
      loads: 2,
      chats: 2,
      message: ['llama runner process has terminated: signal: killed', 'gave up after 2 attempts'],
    },
    {
      mode: '503 on the load',
      load: { kind: 'http_error', status: 503, error: BUSY },
      state: 'failed',
      code: 'engine_busy',
      attempt: 2,
      loads: 2,
      chats: 0,
      message: [BUSY],
    },
    {
      // A model the host lists but answers 404 for: its models are refreshed, it still lists it,
      // so the engine's answer stands. (A model no host lists fails from the queue: api.test.ts.)
      mode: '404 unknown model (at the load)',
      load: { kind: 'http_error', status: 404, error: "model 'llama3.2' not found" },
      state: 'failed',
      code: 'model_not_found',
      attempt: 1,
      loads: 1,
      chats: 0,
      message: ["model 'llama3.2' not found"],
    },
    {
      mode: '404 model not found (at the chat)',
      chat: [{ kind: 'http_error', status: 404, error: "model 'llama3.2' not found" }],
      state: 'failed',
      code: 'model_not_found',
      attempt: 1,
      loads: 1,
      chats: 1,
      message: ["model 'llama3.2' not found"],
    },
    {
      mode: '400 bad request',
      chat: [{ kind: 'http_error', status: 400, error: 'invalid options: num_ctx' }],
      state: 'failed',
      code: 'engine_bad_request',
      attempt: 1,
      loads: 1,
      chats: 1,
      message: ['invalid options: num_ctx'],
    },
    {
      mode: '422 other 4xx',
      chat: [{ kind: 'http_error', status: 422, error: 'unprocessable' }],
      state: 'failed',
      code: 'engine_rejected',
      attempt: 1,
      loads: 1,
      chats: 1,
      message: ['unprocessable'],
    },
    {
      mode: '{"error"} line mid-stream',
      chat: rep(2, { kind: 'error_mid_stream', after: 2, error: OOM }),
      state: 'failed',
      code: 'engine_stream_error',
      attempt: 2,
      loads: 2,
      chats: 2,
      message: [OOM],
    },
    {
      mode: 'stream ends without done (cut)',
      chat: rep(2, { kind: 'cut', after: 3 }),
      state: 'failed',
      code: 'engine_stream_incomplete',
      attempt: 2,
      loads: 2,
      chats: 2,
    },
    {
      mode: 'no bytes at all (hang)',
      chat: rep(2, { kind: 'hang' }),
      state: 'failed',
      code: 'engine_timeout',
      attempt: 2,
      loads: 2,
      chats: 2,
      chatsAborted: true,
    },
    {
      mode: 'stream stalls after 2 lines',
      chat: rep(2, { kind: 'stall', after: 2 }),
      state: 'failed',
      code: 'engine_timeout',
      attempt: 2,
      loads: 2,
      chats: 2,
      chatsAborted: true,
    },
    {
      mode: 'malformed NDJSON line',
      chat: rep(2, { kind: 'malformed', after: 2 }),
      state: 'failed',
      code: 'engine_protocol_error',
      attempt: 2,
      loads: 2,
      chats: 2,
    },
    {
      mode: '50 MB response over the default 32 MiB limit',
      chat: [{ kind: 'huge', bytes: 50 * MiB }],
      state: 'failed',
      code: 'engine_response_too_large',
      attempt: 1,
      loads: 1,
      chats: 1,
      message: ['FOREMAN_ENGINE_MAX_RESPONSE_BYTES'],
      chatsAborted: true,
    },
  ];

  it.each(rows)('$mode → $state $code (attempt $attempt)', async (row) => {
    const from = h.fake.requests.length;
    try {
      await row.before?.(h);
      if (row.load) h.fake.setLoadBehaviour(row.load);
      if (row.chat) h.fake.enqueue(...row.chat);
      const id = await h.submit(row.model ? { ...hello(), model: row.model } : hello());
      await row.during?.(h, id);
      const job = await h.waitForState(id, terminal);

      expect(job.state).toBe(row.state);
      expect(job.error?.code ?? null).toBe(row.code);
      expect(job.attempt).toBe(row.attempt);
      for (const m of row.message ?? []) expect(job.error.message).toContain(m);
      if (row.state === 'failed') {
        expect(job.result).toBeNull();
        expect(job.artifacts).toEqual([]);
        expect(job.transitions.at(-1).state).toBe('failed');
        expect(job.transitions.at(-1).attempt).toBe(row.attempt);
      } else {
        expect(job.error).toBeNull();
        expect(job.result.message.content).toBe('echo: hello world');
        expect(job.transitions.slice(-3).map((t: any) => t.state)).toEqual(['loading', 'working', 'done']);
      }
      // One `loading` transition per attempt (plus any claim given back because the engine was
      // unreachable): no attempt was burned or skipped silently.
      expect(job.transitions.filter((t: any) => t.state === 'loading').length).toBe(row.attempt + (row.givenBack ?? 0));

      const { loads, chats } = engineRequests(h, from);
      expect(loads.length, 'load requests').toBe(row.loads);
      expect(chats.length, 'chat requests').toBe(row.chats);
      for (const c of chats) expect(c.body.stream).toBe(true);
      if (row.chatsAborted) {
        await h.fake.waitForRequests(row.chats, (r) => chats.includes(r) && r.aborted, 3_000);
      }
    } finally {
      h.fake.setLoadBehaviour(null);
    }
    await nextJobSucceeds(h, row.mode);
  });
});

// ---------------------------------------------------------------------------

describe('slow loads and large responses (idle timeout 3 s, max response 64 MiB)', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({
      jobMaxAttempts: 2,
      jobRetryBaseMs: 1,
      engineIdleTimeoutMs: 3_000,
      engineMaxResponseBytes: 64 * MiB,
    });
  });
  afterAll(async () => {
    await h?.stop();
  });

  it('a load that takes 1.5 s (under the idle timeout) → done, with load_ms measured', async () => {
    const from = h.fake.requests.length;
    h.fake.setLoadDelay(1_500);
    let job: any;
    try {
      const id = await h.submit(hello());
      job = await h.waitForState(id, terminal);
    } finally {
      h.fake.setLoadDelay(0);
    }
    expect(job.state).toBe('done');
    expect(job.attempt).toBe(1);
    expect(job.error).toBeNull();
    expect(job.result.foreman.load_ms).toBeGreaterThanOrEqual(1_400);
    expect(job.result.message.content).toBe('echo: hello world');
    const { loads, chats } = engineRequests(h, from);
    expect([loads.length, chats.length]).toEqual([1, 1]);
    expect(loads[0]!.aborted).toBe(false);
    await nextJobSucceeds(h, 'slow load');
  });

  it('a 5 MB response under a 64 MiB limit → done, with a completion artifact whose sha256 matches', async () => {
    const from = h.fake.requests.length;
    h.fake.enqueue({ kind: 'huge', bytes: 5 * MiB });
    const id = await h.submit(hello());
    const job = await h.waitForState(id, terminal, 20_000);
    expect(job.state).toBe('done');
    expect(job.attempt).toBe(1);
    expect(job.error).toBeNull();
    expect(job.result.message.content.length).toBe(5 * MiB);
    const { loads, chats } = engineRequests(h, from);
    expect([loads.length, chats.length]).toEqual([1, 1]);
    expect(chats[0]!.aborted).toBe(false);

    expect(job.artifacts).toHaveLength(1);
    const meta = job.artifacts[0];
    expect(meta.name).toBe('completion');
    expect(meta.size).toBeGreaterThan(5 * MiB);
    const art = await h.api(`/jobs/${id}/artifacts/completion`);
    expect(art.status).toBe(200);
    expect(art.raw.length).toBe(meta.size);
    const sha = createHash('sha256').update(art.raw).digest('hex');
    expect(sha).toBe(meta.sha256);
    expect(art.headers.get('etag')).toBe(`"${sha}"`);
    expect(JSON.parse(art.raw.toString('utf8')).message.content.length).toBe(5 * MiB);
    await nextJobSucceeds(h, '5 MB response');
  });
});

// ---------------------------------------------------------------------------

describe('engine down for a while', () => {
  it('jobs wait in order while the engine is down and all finish once it is back, with no manual step', async () => {
    const h = await startHarness({ engineOutageTimeoutMs: 60_000, jobRetryBaseMs: 1 });
    try {
      await h.fake.stop();
      const from = h.fake.requests.length;
      const ids: string[] = [];
      for (let i = 0; i < 5; i++) ids.push(await h.submit(hello(`job ${i}`)));
      await sleep(1_500);

      const waiting = await Promise.all(ids.map(async (id) => (await h.api(`/jobs/${id}`)).body));
      expect(waiting.map((j) => j.state)).toEqual(['queued', 'queued', 'queued', 'queued', 'queued']);
      // The first job was tried and found the engine down; it got its attempt back, and the
      // others were never claimed.
      expect(waiting.map((j) => j.attempt)).toEqual([0, 0, 0, 0, 0]);
      for (const j of waiting) expect(j.error).toBeNull();

      const ready = await until(
        '/readyz to report the engine down',
        async () => {
          const r = await h.api('/readyz');
          return r.body?.engine?.status === 'down' ? r : null;
        },
        3_000,
      );
      // Not ready while no engine host is healthy (ADR-0012); jobs are still accepted meanwhile.
      expect(ready.status).toBe(503);
      expect(ready.body.database).toBe('ok');
      expect(typeof ready.body.engine.error).toBe('string');

      await h.fake.start();
      const jobs = await Promise.all(ids.map((id) => h.waitForState(id, terminal, 15_000)));
      expect(jobs.map((j) => j.state)).toEqual(['done', 'done', 'done', 'done', 'done']);
      expect(jobs.map((j) => j.attempt)).toEqual([1, 1, 1, 1, 1]);
      jobs.forEach((j, i) => expect(j.result.message.content).toBe(`echo: job ${i}`));

      // Submission order: the engine saw the chats in order, and they finished in order.
      const chats = engineRequests(h, from).chats.map((r) => r.body.messages.at(-1).content);
      expect(chats).toEqual(['job 0', 'job 1', 'job 2', 'job 3', 'job 4']);
      const finished = jobs.map((j) => Date.parse(j.finished_at));
      for (let i = 1; i < finished.length; i++) expect(finished[i]).toBeGreaterThanOrEqual(finished[i - 1]!);
      const doneAt = jobs.map((j) => Date.parse(j.transitions.at(-1).at));
      for (let i = 1; i < doneAt.length; i++) expect(doneAt[i]).toBeGreaterThanOrEqual(doneAt[i - 1]!);

      const up = await until('/readyz to report the engine up', async () => {
        const r = await h.api('/readyz');
        return r.body?.engine?.status === 'up' ? r : null;
      }, 3_000);
      expect(up.status).toBe(200);
    } finally {
      await h.stop();
    }
  });

  it('a refused connection does not burn the last attempt: with jobMaxAttempts 1 the job waits for the engine', async () => {
    // Per the worker's outage handling ("jobs stay queued, no attempts are burned"), an unreachable
    // engine is an outage, not a failed attempt of this job.
    const h = await startHarness({ engineOutageTimeoutMs: 60_000, jobMaxAttempts: 1, jobRetryBaseMs: 1 });
    try {
      await h.fake.stop();
      const id = await h.submit(hello('only one attempt'));
      await sleep(1_200);
      const waiting = (await h.api(`/jobs/${id}`)).body;
      expect(waiting.error).toBeNull();
      expect(waiting.state).toBe('queued');
      await h.fake.start();
      const job = await h.waitForState(id, terminal);
      expect(job.state).toBe('done');
      expect(job.result.message.content).toBe('echo: only one attempt');
    } finally {
      await h.stop();
    }
  });

  // The sweeps are the driver's chunks (the conformance suite runs them on both drivers) in a loop
  // of the maintenance services, which is the same code on either driver: run once, on SQLite.
  it.skipIf(process.env.FOREMAN_TEST_DRIVER === 'postgres')('a missing model, then an outage, fails a backlog of more than two sweep chunks: every job of it', async () => {
    // Attempts to spare: a job the worker tries while the engine goes away is retried, not failed
    // by the worker, so the outage policy's sweep is what fails them.
    const h = await startHarness({ engineOutageTimeoutMs: 500, jobRetryBaseMs: 1, jobMaxAttempts: 1_000 });
    const n = SWEEP_CHUNK * 2 + 10;
    try {
      await submitMany(h, n, (i) => ({ model: 'llama9', messages: [{ role: 'user', content: `missing ${i}` }] }));
      await until('every job of the missing model to fail', async () => (await failedWith(h, 'model_not_found')) === n, 30_000);

      // The outage policy probes the engine once a round, then fails the stale jobs in chunks
      // within that round: the three chunks come with no probe between them.
      const driver = h.service.driver;
      const pool = h.service.pool;
      const failStale = driver.jobsFailStale.bind(driver);
      const status = pool.status.bind(pool);
      let probes = 0;
      const chunks: { n: number; probes: number }[] = [];
      pool.status = async () => (probes++, status());
      let allIn = false;
      driver.jobsFailStale = async (p) => {
        if (!allIn) return []; // until every job is in, the sweep finds none stale
        const ids = await failStale(p);
        chunks.push({ n: ids.length, probes });
        return ids;
      };
      await h.fake.stop();
      await submitMany(h, n, (i) => hello(`outage ${i}`));
      await sleep(600); // every job has waited longer than the outage timeout
      allIn = true;
      await until('the sweep to fail every job of the outage', async () => chunks.reduce((sum, c) => sum + c.n, 0) === n, 30_000);
      expect(await failedWith(h, 'engine_unavailable')).toBe(n);
      // One round failed them all: two full chunks and the rest, with no probe between them.
      expect(chunks.slice(0, 3).map((c) => c.n)).toEqual([SWEEP_CHUNK, SWEEP_CHUNK, 10]);
      expect(new Set(chunks.slice(0, 3).map((c) => c.probes)).size).toBe(1);
      expect(await h.service.driver.jobsCountActive()).toEqual([]);
      expect(await jobCount(h)).toBe(2 * n);

      await h.fake.start();
      await nextJobSucceeds(h, 'a large outage');
    } finally {
      await h.stop();
    }
  });

  it('an outage longer than FOREMAN_ENGINE_OUTAGE_TIMEOUT fails the waiting jobs with engine_unavailable', async () => {
    const h = await startHarness({ engineOutageTimeoutMs: 500, jobRetryBaseMs: 1 });
    try {
      await h.fake.stop();
      const ids = [await h.submit(hello('a')), await h.submit(hello('b'))];
      const jobs = await Promise.all(ids.map((id) => h.waitForState(id, terminal, 5_000)));
      for (const j of jobs) {
        expect(j.state).toBe('failed');
        expect(j.error.code).toBe('engine_unavailable');
        expect(j.error.message).toContain('FOREMAN_ENGINE_OUTAGE_TIMEOUT');
        expect(j.result).toBeNull();
        expect(j.transitions.at(-1).state).toBe('failed');
      }
      expect(jobs.map((j) => j.attempt)).toEqual([0, 0]);
      expect(engineRequests(h, 0).chats).toEqual([]);

      // The engine comes back: the service picks up new work by itself.
      await h.fake.start();
      await nextJobSucceeds(h, 'outage timeout');
    } finally {
      await h.stop();
    }
  });
});

// ---------------------------------------------------------------------------

describe('backpressure (maxQueued 3)', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ maxQueued: 3, engineIdleTimeoutMs: 30_000 });
  });
  afterAll(async () => {
    await h?.stop();
  });

  it('answers 503 queue_full with Retry-After once FOREMAN_MAX_QUEUED jobs are waiting, and stores nothing', async () => {
    h.fake.enqueue({ kind: 'hang' }, { kind: 'hang' }, { kind: 'hang' }, { kind: 'hang' }, { kind: 'hang' });
    const running = await h.submit(hello('runs and hangs'));
    await h.waitForState(running, ['working']);

    // Five at once with room for three: exactly three get in.
    const burst = await Promise.all(
      Array.from({ length: 5 }, (_, i) => h.api('/jobs', { method: 'POST', json: hello(`burst ${i}`) })),
    );
    expect(burst.map((r) => r.status).sort()).toEqual([202, 202, 202, 503, 503]);

    const accepted = burst.filter((r) => r.status === 202).map((r) => r.body.job_id as string);
    const states = await Promise.all([running, ...accepted].map(async (id) => (await h.api(`/jobs/${id}`)).body.state));
    const queued = states.filter((s) => s === 'queued').length;
    const active = states.filter((s) => s === 'loading' || s === 'working').length;
    expect(queued).toBe(3);
    expect(active).toBe(1);

    const countBefore = (await jobCount(h));
    expect(countBefore).toBe(4);
    for (let i = 0; i < 3; i++) {
      const r = await h.api('/jobs', { method: 'POST', json: hello(`over ${i}`) });
      expect(r.status).toBe(503);
      expect(r.body).toEqual({ code: 'queue_full', message: expect.stringContaining('FOREMAN_MAX_QUEUED') });
      expect(r.headers.get('retry-after')).toMatch(/^\d+$/);
    }
    for (const r of burst.filter((b) => b.status === 503)) {
      expect(r.body.code).toBe('queue_full');
      expect(r.headers.get('retry-after')).toMatch(/^\d+$/);
    }
    expect((await jobCount(h))).toBe(countBefore);
  });
});

// ---------------------------------------------------------------------------

// SQLite's own fault injection (a locked file, query_only, integrity_check): not a PostgreSQL thing.
// test/postgres-engine-faults.test.ts runs the rest of this file against PostgreSQL.
describe.skipIf(process.env.FOREMAN_TEST_DRIVER === 'postgres')('disk trouble', () => {
  it('database locked by another connection → 503 storage_unavailable; after release everything carries on', async () => {
    const h = await startHarness({ sqliteBusyTimeoutMs: 100, jobLeaseMs: 1_000 });
    const other = new Database(path.join(h.config.dataDir, 'foreman.db'));
    try {
      other.pragma('busy_timeout = 5000');
      // A job that is mid-generation when the lock is taken (~0.9 s stream).
      h.fake.enqueue({ kind: 'ok', chunkDelayMs: 150 });
      const before = await h.submit(hello('before the lock'));
      await h.waitForState(before, ['working']);
      const countBefore = (await jobCount(h));

      other.exec('BEGIN EXCLUSIVE');
      const lockedAt = Date.now();
      const r = await h.api('/jobs', { method: 'POST', json: hello('during the lock') });
      expect(r.status).toBe(503);
      expect(r.body).toEqual({ code: 'storage_unavailable', message: expect.any(String) });
      expect(r.headers.get('retry-after')).toMatch(/^\d+$/);
      // Reads still work, and the process is alive.
      expect((await h.api(`/jobs/${before}`)).status).toBe(200);
      expect((await h.api('/healthz')).status).toBe(200);
      // Hold the lock past the end of the running job's stream, so recording its outcome hits the lock.
      await sleep(Math.max(0, 1_500 - (Date.now() - lockedAt)));
      other.exec('COMMIT');

      const after = await h.api('/jobs', { method: 'POST', json: hello('after the lock') });
      expect(after.status).toBe(202);
      expect((await jobCount(h))).toBe(countBefore + 1);

      const a = await h.waitForState(before, terminal, 10_000);
      expect(a.state).toBe('done');
      expect(a.result.message.content).toBe('echo: before the lock');
      const b = await h.waitForState(after.body.job_id, terminal, 10_000);
      expect(b.state).toBe('done');
      expect(b.attempt).toBe(1);

      expect(sqlite(h).pragma('integrity_check', { simple: true })).toBe('ok');
      expect(other.pragma('integrity_check', { simple: true })).toBe('ok');
    } finally {
      if (other.inTransaction) other.exec('ROLLBACK');
      other.close();
      await h.stop();
    }
  });

  it('read-only database (query_only) → 503 storage_unavailable, reads work; writable again → 202', async () => {
    const h = await startHarness({ jobLeaseMs: 1_000 });
    try {
      h.fake.enqueue({ kind: 'ok', chunkDelayMs: 100 });
      const before = await h.submit(hello('before read-only'));
      await h.waitForState(before, ['working']);
      const countBefore = (await jobCount(h));

      sqlite(h).pragma('query_only = 1');
      let restored = false;
      try {
        const r = await h.api('/jobs', { method: 'POST', json: hello('while read-only') });
        expect(r.status).toBe(503);
        expect(r.body).toEqual({ code: 'storage_unavailable', message: expect.any(String) });
        expect(r.headers.get('retry-after')).toMatch(/^\d+$/);
        const g = await h.api(`/jobs/${before}`);
        expect(g.status).toBe(200);
        expect(g.body.job_id).toBe(before);
        const ready = await h.api('/readyz');
        expect(ready.status).toBe(200);
        expect(ready.body.database).toBe('ok');
        await sleep(1_000); // the running job's stream ends while the database is read-only
        sqlite(h).pragma('query_only = 0');
        restored = true;
      } finally {
        if (!restored) sqlite(h).pragma('query_only = 0');
      }
      expect((await jobCount(h))).toBe(countBefore);

      const id = await h.submit(hello('writable again'));
      const job = await h.waitForState(id, terminal, 10_000);
      expect(job.state).toBe('done');
      const a = await h.waitForState(before, terminal, 10_000);
      expect(a.state).toBe('done');
      expect(a.result.message.content).toBe('echo: before read-only');
      expect(sqlite(h).pragma('integrity_check', { simple: true })).toBe('ok');
    } finally {
      await h.stop();
    }
  });
});

describe('a run that lost its lease', () => {
  it('stops its engine request within a heartbeat once the job was given to another run, which finishes it', async () => {
    const h = await startHarness({ jobLeaseMs: 1_000, engineIdleTimeoutMs: 5_000 });
    try {
      // First generation: 40 chunks 50 ms apart (2 s); the second answers at once.
      h.fake.enqueue({ kind: 'ok', chunkDelayMs: 50, chunks: Array.from({ length: 40 }, (_, i) => ({ content: `t${i} ` })) });
      const id = await h.submit(hello('lease thief'));
      await h.waitForState(id, ['working']);
      await sleep(200);
      // What the rescuer does to a stalled instance's job once its lease has expired: it is queued
      // again (claimable from that moment, here 1.5 s ahead, so the stop shows before the new run).
      const rescued = await h.service.driver.jobsRescue({ now: Date.now() + 1_500 });
      expect(rescued).toEqual([id]);
      const done = await h.waitForState(id, ['done'], 10_000);
      const gens = h.fake.requests.filter((r) => r.kind === 'chat' && r.body?.messages?.at(-1)?.content === 'lease thief');
      expect(gens.length).toBe(2);
      expect(gens[0]!.aborted).toBe(true); // the first run stopped (its heartbeat found the lease gone)
      expect(gens[1]!.aborted).toBe(false);
      expect(h.fake.stats.overlapping).toBe(0); // stopped within a heartbeat (333 ms), before the new run
      expect(done.result.message.content).not.toContain('t39');
      const states = (await h.api(`/jobs/${id}`)).body.transitions.map((t: { state: string }) => t.state);
      expect(states).toEqual(['queued', 'loading', 'working', 'queued', 'loading', 'working', 'done']);
    } finally {
      await h.stop();
    }
  });
});
