/**
 * Queue API: Idempotency-Key, priority with aging, deadlines, cancel, queue position / ETA,
 * and the GET /jobs listing with keyset cursors.
 *
 * Most tests hold the only worker slot (concurrency 1) with a job whose chat request the fake
 * never answers ({kind:'hang'}); engineIdleTimeoutMs is raised so the engine never gives up on
 * it. Canceling that job frees the slot.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hello, startHarness, type Harness } from './support/harness.js';
import type { RecordedRequest } from './support/fake-ollama.js';
import { startReceiver, type Receiver } from './support/receiver.js';
import { jobCount, modelAvgMs, pollJob, sleep, until } from './support/util.js';

const ISO = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
const BLOCKING = { concurrency: 1, engineIdleTimeoutMs: 60_000 } as const;
const finished = ['done', 'failed', 'canceled'];

/** The content of the last message of a recorded chat request. */
function lastContent(r: RecordedRequest): string {
  const m = r.body?.messages;
  return Array.isArray(m) && m.length > 0 ? String(m[m.length - 1]?.content ?? '') : '';
}

const chatsWith = (h: Harness, pred: (content: string) => boolean) =>
  h.fake.requests.filter((r) => r.kind === 'chat' && pred(lastContent(r)));

/** Submits a job whose chat hangs, and waits until it is `working` with its request at the fake. */
async function occupySlot(h: Harness, text: string): Promise<string> {
  h.fake.enqueue({ kind: 'hang' });
  const id = await h.submit(hello(text));
  await h.fake.waitForRequests(1, (r) => r.kind === 'chat' && lastContent(r) === text, 5_000);
  await h.waitForState(id, ['working']);
  return id;
}

async function cancel(h: Harness, id: string) {
  return h.api(`/jobs/${id}/cancel`, { method: 'POST' });
}

function expectError(res: { status: number; body: any }, status: number, code: string, field?: string): void {
  expect(res.status, JSON.stringify(res.body)).toBe(status);
  expect(res.body.code).toBe(code);
  expect(typeof res.body.message).toBe('string');
  if (field !== undefined) expect(res.body.field).toBe(field);
}

// ---------------------------------------------------------------------------

describe('Idempotency-Key', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness();
  });
  afterAll(async () => {
    await h.stop();
  });

  const post = (body: unknown, key?: string) =>
    h.api('/jobs', { method: 'POST', json: body, ...(key !== undefined ? { headers: { 'idempotency-key': key } } : {}) });

  it('same key + same body replays the original job (200, idempotent-replayed), one row', async () => {
    const before = (await jobCount(h));
    const body = hello('idem one', { metadata: { a: '1' }, priority: 3 });
    const first = await post(body, 'key-1');
    expect(first.status).toBe(202);
    expect(first.headers.get('idempotent-replayed')).toBeNull();
    const id = first.body.job_id as string;

    const second = await post(body, 'key-1');
    expect(second.status).toBe(200);
    expect(second.headers.get('idempotent-replayed')).toBe('true');
    expect(second.headers.get('location')).toBe(`/jobs/${id}`);
    expect(second.body.job_id).toBe(id);
    expect(second.body.status_url).toBe(`${h.url}/jobs/${id}`);
    expect((await jobCount(h))).toBe(before + 1);

    // Same body with its keys (top level and nested) in another order: still a replay.
    const reordered = {
      priority: 3,
      metadata: { a: '1' },
      messages: [{ content: 'idem one', role: 'user' }],
      model: 'llama3.2',
    };
    const third = await post(reordered, 'key-1');
    expect(third.status).toBe(200);
    expect(third.headers.get('idempotent-replayed')).toBe('true');
    expect(third.body.job_id).toBe(id);
    expect((await jobCount(h))).toBe(before + 1);

    // A replay reports the job's current state.
    await h.waitForState(id, ['done']);
    const fourth = await post(body, 'key-1');
    expect(fourth.status).toBe(200);
    expect(fourth.body).toEqual({ job_id: id, state: 'done', status_url: `${h.url}/jobs/${id}` });
    expect((await jobCount(h))).toBe(before + 1);
  });

  it('same key + different body → 409 idempotency_key_reused on Idempotency-Key', async () => {
    const first = await post(hello('idem two'), 'key-2');
    expect(first.status).toBe(202);
    const before = (await jobCount(h));
    for (const other of [hello('idem two!'), hello('idem two', { priority: 1 }), { ...hello('idem two'), model: 'qwen3' }]) {
      const res = await post(other, 'key-2');
      expectError(res, 409, 'idempotency_key_reused', 'Idempotency-Key');
      expect(Object.keys(res.body).sort()).toEqual(['code', 'field', 'message']);
      // Hardening finding 15: the conflict must not reveal the other request's job id.
      expect(res.body.message).not.toContain(first.body.job_id);
    }
    expect((await jobCount(h))).toBe(before);
    // The original body still replays after the conflicts.
    const again = await post(hello('idem two'), 'key-2');
    expect(again.status).toBe(200);
    expect(again.body.job_id).toBe(first.body.job_id);
  });

  it('20 parallel requests with one key create exactly one job', async () => {
    const before = (await jobCount(h));
    const body = hello('idem parallel');
    const answers = await Promise.all(Array.from({ length: 20 }, () => post(body, 'key-parallel')));
    const ids = new Set(answers.map((a) => a.body.job_id));
    expect(ids.size).toBe(1);
    const statuses = answers.map((a) => a.status).sort();
    expect(statuses.filter((s) => s === 202)).toHaveLength(1);
    expect(statuses.filter((s) => s === 200)).toHaveLength(19);
    for (const a of answers) {
      expect(a.headers.get('idempotent-replayed')).toBe(a.status === 200 ? 'true' : null);
    }
    expect((await jobCount(h))).toBe(before + 1);
  });

  it('different keys with the same body create different jobs; no key never replays', async () => {
    const before = (await jobCount(h));
    const body = hello('idem distinct');
    const a = await post(body, 'key-a');
    const b = await post(body, 'key-b');
    const c = await post(body);
    const d = await post(body);
    expect([a.status, b.status, c.status, d.status]).toEqual([202, 202, 202, 202]);
    expect(new Set([a.body.job_id, b.body.job_id, c.body.job_id, d.body.job_id]).size).toBe(4);
    expect((await jobCount(h))).toBe(before + 4);
  });

  it('rejects invalid keys with 400 and creates nothing', async () => {
    const before = (await jobCount(h));
    for (const key of ['has space', 'x'.repeat(300), 'tab\there', 'ünïcode']) {
      const res = await post(hello('idem bad key'), key).catch((e: unknown) => ({ status: -1, body: String(e), headers: new Headers() }));
      // fetch itself refuses a non-ByteString header value; either way nothing is created.
      if (res.status === -1) continue;
      expectError(res, 400, 'validation_failed', 'idempotency-key');
    }
    expect((await jobCount(h))).toBe(before);
    // The longest legal key (255 printable ASCII characters) is accepted.
    const ok = await post(hello('idem long key'), 'k'.repeat(255));
    expect(ok.status).toBe(202);
    expect((await jobCount(h))).toBe(before + 1);
  });
});

describe('Idempotency-Key expiry', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ idempotencyTtlMs: 100 });
  });
  afterAll(async () => {
    await h.stop();
  });

  it('after the TTL the same key creates a new job, and the new job is then the one replayed', async () => {
    const post = (body: unknown) => h.api('/jobs', { method: 'POST', json: body, headers: { 'idempotency-key': 'ttl-key' } });
    const first = await post(hello('ttl'));
    expect(first.status).toBe(202);
    await sleep(150);
    const second = await post(hello('ttl'));
    expect(second.status).toBe(202);
    expect(second.headers.get('idempotent-replayed')).toBeNull();
    expect(second.body.job_id).not.toBe(first.body.job_id);
    expect((await jobCount(h))).toBe(2);
    await sleep(150);
    // Expired: even a different body is fine (no 409).
    const third = await post(hello('ttl, different'));
    expect(third.status).toBe(202);
    const fourth = await post(hello('ttl, different'));
    expect(fourth.status).toBe(200);
    expect(fourth.body.job_id).toBe(third.body.job_id);
    expect((await jobCount(h))).toBe(3);
  });
});

// ---------------------------------------------------------------------------

describe('priority', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness(BLOCKING);
  });
  afterAll(async () => {
    await h.stop();
  });

  it('queue_position follows (priority desc, FIFO) and jobs run in that order', async () => {
    const blocker = await occupySlot(h, 'prio-blocker');
    const plan = [
      { name: 'p0a', priority: 0 },
      { name: 'p5a', priority: 5 },
      { name: 'p0b', priority: 0 },
      { name: 'p10', priority: 10 },
      { name: 'p5b', priority: 5 },
    ];
    const ids: Record<string, string> = {};
    for (const p of plan) ids[p.name] = await h.submit(hello(`prio-${p.name}`, { priority: p.priority }));

    const positions: Record<string, number | null> = {};
    for (const p of plan) {
      const j = (await h.api(`/jobs/${ids[p.name]}`)).body;
      expect(j.state).toBe('queued');
      expect(j.priority).toBe(p.priority);
      expect(j.started_at).toBeNull();
      positions[p.name] = j.queue_position;
    }
    // Soft, so the run order below is still checked when this fails.
    expect.soft(positions).toEqual({ p10: 0, p5a: 1, p5b: 2, p0a: 3, p0b: 4 });

    const blockerView = (await h.api(`/jobs/${blocker}`)).body;
    expect(blockerView.queue_position).toBeNull();
    expect(blockerView.estimated_start_at).toBeNull();

    expect((await cancel(h, blocker)).status).toBe(200);
    for (const p of plan) expect((await h.waitForState(ids[p.name]!, finished)).state).toBe('done');
    const order = chatsWith(h, (c) => c.startsWith('prio-p')).map((r) => lastContent(r));
    expect(order).toEqual(['prio-p10', 'prio-p5a', 'prio-p5b', 'prio-p0a', 'prio-p0b']);
  });

  it('validates priority: integers -1000..1000 only', async () => {
    const before = (await jobCount(h));
    for (const priority of [1001, -1001, 1.5, '5', null]) {
      expectError(await h.api('/jobs', { method: 'POST', json: hello('bad prio', { priority }) }), 400, 'validation_failed', 'priority');
    }
    expect((await jobCount(h))).toBe(before);
    for (const priority of [1000, -1000]) {
      const id = await h.submit(hello(`edge prio ${priority}`, { priority }));
      expect((await h.api(`/jobs/${id}`)).body.priority).toBe(priority);
    }
    const dflt = await h.submit(hello('default prio'));
    expect((await h.api(`/jobs/${dflt}`)).body.priority).toBe(0);
  });
});

describe('priority aging', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ ...BLOCKING, priorityAgingMs: 200 });
  });
  afterAll(async () => {
    await h.stop();
  });

  it('a priority-0 job that waited 700 ms (effective 0 + floor(700/200) = 3) goes before a fresh priority-2 job', async () => {
    const blocker = await occupySlot(h, 'aging-blocker');
    const low = await h.submit(hello('aging-L', { priority: 0 }));
    await sleep(700);
    const high = await h.submit(hello('aging-H', { priority: 2 }));
    const low2 = await h.submit(hello('aging-L2', { priority: 0 }));

    const pos = async (id: string) => (await h.api(`/jobs/${id}`)).body.queue_position as number;
    const positions = { L: await pos(low), H: await pos(high), L2: await pos(low2) };
    expect.soft(positions).toEqual({ L: 0, H: 1, L2: 2 });

    expect((await cancel(h, blocker)).status).toBe(200);
    for (const id of [low, high, low2]) expect((await h.waitForState(id, finished)).state).toBe('done');
    const order = chatsWith(h, (c) => c.startsWith('aging-L') || c.startsWith('aging-H')).map(lastContent);
    expect(order).toEqual(['aging-L', 'aging-H', 'aging-L2']);
  });
});

// ---------------------------------------------------------------------------

describe('deadline', () => {
  let h: Harness;
  let rcv: Receiver;
  beforeAll(async () => {
    // The production poll interval (5 s): a deadline must not depend on it.
    h = await startHarness({ ...BLOCKING, pollIntervalMs: 5_000 });
    rcv = await startReceiver();
  });
  afterAll(async () => {
    await h.stop();
    await rcv.close();
  });

  it('a job still queued at its deadline fails deadline_exceeded (queued → failed), promptly', async () => {
    const blocker = await occupySlot(h, 'deadline-blocker');
    const t0 = Date.now();
    const id = await h.submit(hello('deadline-short', { deadline: '300ms', state_webhook_url: rcv.url }));
    const queued = (await h.api(`/jobs/${id}`)).body;
    expect(queued.state).toBe('queued');
    expect(queued.deadline).toMatch(ISO);
    const ahead = Date.parse(queued.deadline) - Date.parse(queued.created_at);
    expect(ahead).toBeLessThanOrEqual(300);
    expect(ahead).toBeGreaterThanOrEqual(200);

    const j = await pollJob(h, id, (x) => x.state !== 'queued', 'leaves queued', 10_000);
    const tookMs = Date.now() - t0;
    expect(j.state).toBe('failed');
    expect(j.error.code).toBe('deadline_exceeded');
    expect(typeof j.error.message).toBe('string');
    expect(j.transitions.map((t: any) => t.state)).toEqual(['queued', 'failed']);
    expect(j.attempt).toBe(0);
    expect(j.started_at).toBeNull();
    expect(j.result).toBeNull();
    expect(j.queue_position).toBeNull();
    expect(Date.parse(j.finished_at)).toBeGreaterThanOrEqual(Date.parse(j.deadline));
    expect(chatsWith(h, (c) => c === 'deadline-short')).toHaveLength(0);

    const got = await rcv.waitFor((r) => r.some((x) => x.event?.state === 'failed'));
    const events = got.filter((r) => r.event?.job_id === id).map((r) => r.event);
    expect(events.map((e) => [e.state, e.sequence])).toEqual([
      ['queued', 1],
      ['failed', 4],
    ]);
    expect(events[1].error.code).toBe('deadline_exceeded');

    // The blocker still holds the slot: nothing else should be needed to enforce the deadline.
    expect((await h.api(`/jobs/${blocker}`)).body.state).toBe('working');
    expect((await cancel(h, blocker)).status).toBe(200);
    // Generous: 2.2 s of slack on a 300 ms deadline (the worker is woken by nothing else here).
    expect(tookMs, `a 300 ms deadline was enforced only after ${tookMs} ms`).toBeLessThan(2_500);
  });

  it('rejects a past, empty or malformed deadline with 400 on field deadline', async () => {
    const before = (await jobCount(h));
    for (const deadline of [new Date(Date.now() - 60_000).toISOString(), '0ms', 'garbage', 'soon', '-5m', '2020-01-01', '', '10 parsecs']) {
      expectError(await h.api('/jobs', { method: 'POST', json: hello('bad deadline', { deadline }) }), 400, 'validation_failed', 'deadline');
    }
    expect((await jobCount(h))).toBe(before);
  });

  it('a job that starts before its deadline is unaffected', async () => {
    const at = new Date(Date.now() + 10 * 60_000).toISOString();
    const a = await h.submit(hello('deadline-iso', { deadline: at }));
    const b = await h.submit(hello('deadline-duration', { deadline: '10m' }));
    const ja = await h.waitForState(a, finished);
    const jb = await h.waitForState(b, finished);
    expect(ja.state).toBe('done');
    expect(ja.deadline).toBe(at);
    expect(ja.error).toBeNull();
    expect(jb.state).toBe('done');
    expect(Date.parse(jb.deadline) - Date.parse(jb.created_at)).toBeGreaterThan(9 * 60_000);
    const none = await h.submit(hello('no-deadline'));
    expect((await h.api(`/jobs/${none}`)).body.deadline).toBeNull();
  });
});

// ---------------------------------------------------------------------------

describe('cancel', () => {
  let h: Harness;
  let rcv: Receiver;
  beforeAll(async () => {
    h = await startHarness(BLOCKING);
    rcv = await startReceiver();
  });
  afterAll(async () => {
    await h.stop();
    await rcv.close();
  });

  it('a queued job becomes canceled at once and never reaches the engine; its webhook gets canceled (sequence 4)', async () => {
    const blocker = await occupySlot(h, 'cancel-blocker');
    const q = await h.submit(hello('cancel-queued', { state_webhook_url: rcv.url, metadata: { k: 'v' } }));
    const res = await cancel(h, q);
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ job_id: q, state: 'canceled' });

    const j = (await h.api(`/jobs/${q}`)).body;
    expect(j.state).toBe('canceled');
    expect(j.finished_at).toMatch(ISO);
    expect(j.started_at).toBeNull();
    expect(j.attempt).toBe(0);
    expect(j.error).toBeNull();
    expect(j.result).toBeNull();
    expect(j.queue_position).toBeNull();
    expect(j.estimated_start_at).toBeNull();
    expect(j.transitions.map((t: any) => t.state)).toEqual(['queued', 'canceled']);
    expect(j.transitions[1].at).toBe(j.finished_at);

    const got = await rcv.waitFor((r) => r.some((x) => x.event?.job_id === q && x.event?.state === 'canceled'));
    const events = got.filter((r) => r.event?.job_id === q).map((r) => r.event);
    expect(events.map((e) => [e.state, e.sequence])).toEqual([
      ['queued', 1],
      ['canceled', 4],
    ]);
    const ev = events[1];
    expect(ev.event_id).toBe(`${q}:canceled`);
    expect(ev.type).toBe('job.state_changed');
    expect(ev.metadata).toEqual({ k: 'v' });
    expect(ev.occurred_at).toBe(j.finished_at);

    // Free the slot; a later job runs, and the canceled one never did.
    expect((await cancel(h, blocker)).status).toBe(200);
    const next = await h.submit(hello('cancel-after-queued'));
    expect((await h.waitForState(next, finished)).state).toBe('done');
    expect(chatsWith(h, (c) => c === 'cancel-queued')).toHaveLength(0);
    expect((await h.api(`/jobs/${q}`)).body.state).toBe('canceled');
  });

  it('a running job has its engine request closed, stays canceled, and the next job succeeds', async () => {
    h.fake.enqueue({ kind: 'ok', chunkDelayMs: 200 });
    const id = await h.submit(hello('cancel-running slow stream'));
    const [req] = await h.fake.waitForRequests(1, (r) => r.kind === 'chat' && lastContent(r) === 'cancel-running slow stream');
    await h.waitForState(id, ['working']);
    expect(req!.aborted).toBe(false);

    const res = await cancel(h, id);
    expect(res.status).toBe(200);
    expect(res.body).toEqual({ job_id: id, state: 'canceled' });
    await until('the fake sees the chat request aborted', async () => req!.aborted, 5_000);

    const next = await h.submit(hello('cancel-next'));
    expect((await h.waitForState(next, finished)).state).toBe('done');
    await sleep(300);
    const j = (await h.api(`/jobs/${id}`)).body;
    expect(j.state).toBe('canceled');
    expect(j.result).toBeNull();
    expect(j.error).toBeNull();
    expect(j.artifacts).toEqual([]);
    expect(j.transitions.map((t: any) => t.state)).toEqual(['queued', 'loading', 'working', 'canceled']);
    expect(chatsWith(h, (c) => c === 'cancel-running slow stream')).toHaveLength(1);
  });

  it('a finished job → 409 job_finished; unknown → 404 job_not_found', async () => {
    const done = await h.submit(hello('cancel-finished'));
    await h.waitForState(done, ['done']);
    const r1 = await cancel(h, done);
    expectError(r1, 409, 'job_finished');
    expect((await h.api(`/jobs/${done}`)).body.state).toBe('done');

    // Canceling twice: the second is a 409 too.
    const blocker = await occupySlot(h, 'cancel-blocker-2');
    expect((await cancel(h, blocker)).status).toBe(200);
    expectError(await cancel(h, blocker), 409, 'job_finished');

    expectError(await cancel(h, '01890000-0000-7000-8000-000000000000'), 404, 'job_not_found');
    expectError(await cancel(h, 'nope'), 404, 'job_not_found');
  });
});

// ---------------------------------------------------------------------------

describe('queue_position and estimated_start_at', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness(BLOCKING);
  });
  afterAll(async () => {
    await h.stop();
  });
  const view = async (id: string) => (await h.api(`/jobs/${id}`)).body;

  it('with no run history: position set, estimate null; running and finished jobs: both null', async () => {
    const blocker = await occupySlot(h, 'eta-blocker-1');
    const q = await h.submit(hello('eta-nohist'));
    const j = await view(q);
    expect(j.state).toBe('queued');
    expect(j.estimated_start_at).toBeNull();
    const running = await view(blocker);
    expect(running.state).toBe('working');
    expect(running.queue_position).toBeNull();
    expect(running.estimated_start_at).toBeNull();
    expect.soft(j.queue_position).toBe(0);

    expect((await cancel(h, blocker)).status).toBe(200);
    const done = await h.waitForState(q, finished);
    expect(done.state).toBe('done');
    expect(done.queue_position).toBeNull();
    expect(done.estimated_start_at).toBeNull();
  });

  it('with history: estimate = now + (Σ ahead × avg + remaining of running) / concurrency', async () => {
    // A second, slower run so the average is substantial.
    h.fake.enqueue({ kind: 'ok', chunkDelayMs: 40 });
    const slow = await h.submit(hello('eta-history'));
    expect((await h.waitForState(slow, finished)).state).toBe('done');
    const avg = (await modelAvgMs(h, 'llama3.2')) as number;
    expect(avg).toBeGreaterThan(0);

    const blocker = await occupySlot(h, 'eta-blocker-2');
    const startedAt = Date.parse((await view(blocker)).started_at);
    // qwen3 has no history of its own: it counts at the mean over models (= llama3.2's here).
    const ids = [
      await h.submit({ ...hello('eta-q1'), model: 'qwen3' }),
      await h.submit(hello('eta-q2')),
      await h.submit(hello('eta-q3')),
    ];
    const ests: number[] = [];
    const positions: number[] = [];
    for (const id of ids) {
      const before = Date.now();
      const j = await view(id);
      const after = Date.now();
      expect(j.state).toBe('queued');
      expect(j.estimated_start_at).toMatch(ISO);
      const pos = j.queue_position as number;
      const f = (now: number) => now + Math.round(pos * avg + Math.max(0, avg - (now - startedAt)));
      const est = Date.parse(j.estimated_start_at);
      expect(est).toBeGreaterThanOrEqual(f(before) - 1);
      expect(est).toBeLessThanOrEqual(f(after) + 1);
      expect(est).toBeGreaterThanOrEqual(before);
      ests.push(est);
      positions.push(pos);
    }
    expect(ests[1]!).toBeGreaterThanOrEqual(ests[0]!);
    expect(ests[2]!).toBeGreaterThanOrEqual(ests[1]!);
    expect.soft(positions).toEqual([0, 1, 2]);

    expect((await cancel(h, blocker)).status).toBe(200);
    for (const id of ids) expect((await h.waitForState(id, finished)).state).toBe('done');
  });

  it('a queued job with a free slot (engine down, claims paused) is next: position 0, estimate = now', async () => {
    await h.fake.stop();
    try {
      const id = await h.submit(hello('eta-engine-down'));
      // The first attempt finds the engine unreachable and gives the job back to the queue.
      await pollJob(h, id, (j) => j.state === 'queued' && j.transitions.length === 3, 're-queued after engine down', 5_000);
      const before = Date.now();
      const j = await view(id);
      const after = Date.now();
      expect(j.transitions.map((t: any) => t.state)).toEqual(['queued', 'loading', 'queued']);
      expect(j.attempt).toBe(0);
      expect(j.queue_position).toBe(0);
      const est = Date.parse(j.estimated_start_at);
      expect(est).toBeGreaterThanOrEqual(before);
      expect(est).toBeLessThanOrEqual(after);
      await h.fake.start();
      expect((await h.waitForState(id, finished)).state).toBe('done');
    } finally {
      await h.fake.start();
    }
  });
});

// ---------------------------------------------------------------------------

describe('GET /jobs listing', () => {
  let h: Harness;
  /** Submission order: b1 i=0..24, then b2 ×5. b1 i=0 hangs in the engine, so the rest stay queued. */
  const ids: string[] = [];
  beforeAll(async () => {
    h = await startHarness(BLOCKING);
    h.fake.enqueue({ kind: 'hang' });
    for (let i = 0; i < 25; i++) ids.push(await h.submit(hello(`list b1 ${i}`, { metadata: { batch: 'b1', i: String(i) } })));
    for (let i = 0; i < 5; i++) ids.push(await h.submit(hello(`list b2 ${i}`, { metadata: { batch: 'b2' } })));
    await h.waitForState(ids[0]!, ['working']);
  });
  afterAll(async () => {
    await h.stop();
  });

  const list = (qs: string) => h.api(`/jobs${qs}`);

  it('pages newest first through all 30 with stable keyset cursors while new jobs arrive', async () => {
    const first = await list('?limit=10');
    expect(first.status).toBe(200);
    expect(first.body.jobs).toHaveLength(10);
    expect(first.body.jobs.map((j: any) => j.job_id)).toEqual(ids.slice(20).reverse());
    expect(first.body.next_cursor).toEqual(expect.any(String));
    const item = first.body.jobs[0];
    expect(item).toEqual({
      job_id: ids[29],
      key_id: null,
      engine: null,
      instance: null, // never claimed yet
      state: 'queued',
      model: 'llama3.2',
      priority: 0,
      attempt: 0,
      metadata: { batch: 'b2' },
      created_at: expect.stringMatching(ISO),
      finished_at: null,
      status_url: `${h.url}/jobs/${ids[29]}`,
    });
    const created = first.body.jobs.map((j: any) => Date.parse(j.created_at));
    for (let i = 1; i < created.length; i++) expect(created[i]).toBeLessThanOrEqual(created[i - 1]);
    const sortedDesc = [...first.body.jobs.map((j: any) => j.job_id)].sort().reverse();
    expect(first.body.jobs.map((j: any) => j.job_id)).toEqual(sortedDesc);

    const seen: string[] = [...first.body.jobs.map((j: any) => j.job_id)];
    let cursor: string | null = first.body.next_cursor;
    let pages = 1;
    while (cursor !== null) {
      // New jobs between page requests must not shift the pages.
      ids.push(await h.submit(hello(`list b3 ${pages}`, { metadata: { batch: 'b3' } })));
      const page = await list(`?limit=10&cursor=${encodeURIComponent(cursor)}`);
      expect(page.status).toBe(200);
      seen.push(...page.body.jobs.map((j: any) => j.job_id));
      cursor = page.body.next_cursor;
      if (++pages > 6) throw new Error('too many pages');
    }
    expect(seen).toEqual(ids.slice(0, 30).reverse());
    expect(new Set(seen).size).toBe(30);
    expect(ids.length).toBeGreaterThan(30);
  });

  it('filters: state, model, metadata (repeatable), created_after / created_before', async () => {
    const all = (await list('?limit=100')).body.jobs as any[];
    const total = ids.length;
    expect(all).toHaveLength(total);

    const queued = await list('?state=queued&limit=100');
    expect(queued.body.jobs.map((j: any) => j.job_id)).toEqual(ids.slice(1).reverse());
    const working = await list('?state=working');
    expect(working.body.jobs.map((j: any) => j.job_id)).toEqual([ids[0]]);
    expect((await list('?state=done')).body).toEqual({ jobs: [], next_cursor: null });

    expect((await list('?model=qwen3')).body.jobs).toEqual([]);
    expect((await list('?model=llama3.2&limit=100')).body.jobs).toHaveLength(total);

    const b2 = await list('?metadata.batch=b2');
    expect(b2.body.jobs.map((j: any) => j.job_id)).toEqual(ids.slice(25, 30).reverse());
    for (const j of b2.body.jobs) expect(j.metadata).toEqual({ batch: 'b2' });
    const one = await list('?metadata.batch=b1&metadata.i=3');
    expect(one.body.jobs.map((j: any) => j.job_id)).toEqual([ids[3]]);
    expect(one.body.next_cursor).toBeNull();
    expect((await list('?metadata.batch=b2&metadata.i=3')).body.jobs).toEqual([]);
    expect((await list('?metadata.nope=x')).body.jobs).toEqual([]);
    // Metadata filter + cursor paging.
    const b1p1 = await list('?metadata.batch=b1&limit=20');
    expect(b1p1.body.jobs.map((j: any) => j.job_id)).toEqual(ids.slice(5, 25).reverse());
    const b1p2 = await list(`?metadata.batch=b1&limit=20&cursor=${b1p1.body.next_cursor}`);
    expect(b1p2.body.jobs.map((j: any) => j.job_id)).toEqual(ids.slice(0, 5).reverse());
    expect(b1p2.body.next_cursor).toBeNull();

    // Time bounds: after is inclusive, before exclusive, both on created_at.
    const pivot = all.find((j) => j.job_id === ids[12])!.created_at as string;
    const t = Date.parse(pivot);
    const expectAfter = all.filter((j) => Date.parse(j.created_at) >= t).map((j) => j.job_id);
    const expectBefore = all.filter((j) => Date.parse(j.created_at) < t).map((j) => j.job_id);
    const after = await list(`?limit=100&created_after=${pivot}`);
    expect(after.body.jobs.map((j: any) => j.job_id)).toEqual(expectAfter);
    expect(after.body.jobs.map((j: any) => j.job_id)).toContain(ids[12]);
    const beforeRes = await list(`?limit=100&created_before=${pivot}`);
    expect(beforeRes.body.jobs.map((j: any) => j.job_id)).toEqual(expectBefore);
    expect(expectAfter.length + expectBefore.length).toBe(total);
    const window = await list(`?limit=100&created_after=${pivot}&created_before=${encodeURIComponent(new Date(t + 1).toISOString())}`);
    expect(window.body.jobs.map((j: any) => j.job_id)).toEqual(all.filter((j) => j.created_at === pivot).map((j) => j.job_id));
    expect((await list('?created_after=2999-01-01T00:00:00.000Z')).body.jobs).toEqual([]);
    expect((await list('?created_before=2000-01-01T00:00:00.000Z')).body.jobs).toEqual([]);
    expect((await list('?limit=100&created_after=2000-01-01T00:00:00.000Z')).body.jobs).toHaveLength(total);
  });

  it('rejects bad parameters with 400', async () => {
    for (const qs of ['?limit=0', '?limit=101', '?limit=abc', '?limit=-1', '?limit=1.5', '?limit=']) {
      expectError(await list(qs), 400, 'validation_failed', 'limit');
    }
    for (const c of ['abc', Buffer.from('v1:x').toString('base64url'), Buffer.from('v2:10').toString('base64url'), '%00']) {
      expectError(await list(`?cursor=${encodeURIComponent(c)}`), 400, 'invalid_cursor', 'cursor');
    }
    expectError(await list('?foo=1'), 400, 'validation_failed');
    expectError(await list('?state=running'), 400, 'validation_failed', 'state');
    expectError(await list('?created_after=yesterday'), 400, 'validation_failed', 'created_after');
    expectError(await list('?created_before=2024-13-45T00:00:00Z'), 400, 'validation_failed', 'created_before');
  });

  it('state=done and state=canceled after the queue drains', async () => {
    expect((await cancel(h, ids[0]!)).status).toBe(200);
    for (const id of ids.slice(1)) await h.waitForState(id, finished);
    const done = await list('?state=done&limit=100');
    expect(done.body.jobs.map((j: any) => j.job_id)).toEqual(ids.slice(1).reverse());
    for (const j of done.body.jobs) expect(j.finished_at).toMatch(ISO);
    const canceled = await list('?state=canceled');
    expect(canceled.body.jobs.map((j: any) => j.job_id)).toEqual([ids[0]]);
    expect((await list('?state=queued')).body.jobs).toEqual([]);
  });
});
