/**
 * Integration tests for webhook delivery: the real service (fake Ollama) delivering job
 * state changes to real HTTP receivers on loopback. Exact bodies, orders and counts.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import type { IncomingHttpHeaders } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { verify as verifyGithub } from '@octokit/webhooks-methods';
import { Webhook } from 'standardwebhooks';
import { hello, startHarness, type Harness } from './support/harness.js';
import { startReceiver, type Received, type Receiver } from './support/receiver.js';
import { sleep, pollJob, settled } from './support/util.js';

const VERSION = (JSON.parse(fs.readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version;
const LIFECYCLE = ['queued', 'loading', 'working', 'done'] as const;
const SEQ: Record<string, number> = { queued: 1, loading: 2, working: 3, done: 4, failed: 4 };

const sha256 = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

/** The deliveries one job's receiver saw, in arrival order. */
const forJob = (rs: Received[], id: string) => rs.filter((r) => r.event?.job_id === id);
const statesOf = (rs: Received[]) => rs.map((r) => r.event.state as string);

/** A promise with its resolver, to hold a receiver's answer until the test says so. */
function gate() {
  let open!: () => void;
  const p = new Promise<void>((r) => (open = r));
  return { p, open };
}



/** What a terminal event says about the run, from the job record (ADR-0016). */
const runOf = (j: any) => ({
  started_at: j.started_at,
  finished_at: j.finished_at,
  duration_ms: j.started_at === null ? null : Date.parse(j.finished_at) - Date.parse(j.started_at),
  queue_ms: Date.parse(j.started_at ?? j.finished_at) - Date.parse(j.created_at),
  load_ms: j.load_ms,
  attempt: j.attempt,
  model: j.model,
  usage: j.usage,
  conversation_id: j.conversation_id,
});
const delivery = (j: any, state: string) => j.webhook.deliveries.find((d: any) => d.state === state);
const transitionAt = (j: any, state: string) => j.transitions.find((t: any) => t.state === state)?.at;

function expectCommonHeaders(r: Received, signed: boolean) {
  expect(r.headers['content-type']).toBe('application/json');
  expect(r.headers['user-agent']).toBe(`foreman/${VERSION}`);
  expect(r.headers['webhook-id']).toBe(r.event.event_id);
  const ts = String(r.headers['webhook-timestamp']);
  expect(ts).toMatch(/^\d+$/);
  expect(Math.abs(Number(ts) - Date.now() / 1000)).toBeLessThan(120);
  if (!signed) {
    expect(r.headers['x-foreman-signature']).toBeUndefined();
    expect(r.headers['webhook-signature']).toBeUndefined();
  }
}

const asHeaderRecord = (h: IncomingHttpHeaders): Record<string, string> => {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(h)) if (typeof v === 'string') out[k] = v;
  return out;
};

// ---------------------------------------------------------------------------

describe('webhooks with default settings', () => {
  let h: Harness;
  const receivers: Receiver[] = [];
  const receiver = async (...a: Parameters<typeof startReceiver>) => {
    const r = await startReceiver(...a);
    receivers.push(r);
    return r;
  };

  beforeAll(async () => {
    h = await startHarness();
  });
  afterAll(async () => {
    await h?.stop();
    await Promise.all(receivers.map((r) => r.close()));
  });

  it('delivers queued, loading, working, done in order with exact bodies and headers', async () => {
    const rcv = await receiver();
    const metadata = { customer: 'acme', ticket: 'T-1' };
    const id = await h.submit(hello('hello world', { metadata, state_webhook_url: `${rcv.url}/hook?x=1` }));
    const job = await settled(h, id);
    expect(job.state).toBe('done');
    const got = forJob(rcv.received, id);
    expect(got).toHaveLength(4);
    expect(rcv.received).toHaveLength(4);
    expect(statesOf(got)).toEqual(['queued', 'loading', 'working', 'done']);

    const base = (state: string) => ({
      event_id: `${id}:${state}`,
      type: 'job.state_changed',
      job_id: id,
      state,
      sequence: SEQ[state],
      occurred_at: transitionAt(job, state),
      metadata,
    });
    for (const s of ['queued', 'loading', 'working'] as const) {
      expect(got[LIFECYCLE.indexOf(s)]!.event).toStrictEqual(base(s));
    }
    const art = job.artifacts[0];
    expect(job.artifacts).toHaveLength(1);
    expect(got[3]!.event).toStrictEqual({
      ...base('done'),
      ...runOf(job),
      artifacts: [
        {
          name: 'completion',
          content_type: 'application/json',
          size: art.size,
          sha256: art.sha256,
          url: `${h.url}/jobs/${id}/artifacts/completion`,
          inline: true,
          content: expect.any(String),
        },
      ],
    });
    const a = got[3]!.event.artifacts[0];
    expect(a.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/jobs\//);
    expect(JSON.parse(a.content)).toEqual(job.result);
    expect(sha256(Buffer.from(a.content, 'utf8'))).toBe(a.sha256);
    expect(Buffer.byteLength(a.content)).toBe(a.size);
    for (const r of got) {
      expect(r.path).toBe('/hook?x=1');
      expectCommonHeaders(r, false);
      expect(r.answered).toBe(200);
    }
    // Every delivery recorded as delivered once.
    expect(job.webhook.deliveries.map((d: any) => [d.event_id, d.state, d.status, d.attempts, d.last_status_code, d.last_error])).toEqual(
      LIFECYCLE.map((s) => [`${id}:${s}`, s, 'delivered', 1, 200, null]),
    );
  });

  it('a failed job gives queued, loading, failed with the error', async () => {
    const rcv = await receiver();
    // The engine refuses the load (a model it lists but cannot load): the job fails from loading.
    h.fake.setLoadBehaviour({ kind: 'http_error', status: 404, error: "model 'llama3.2' not found" });
    const id = await h.submit({ ...hello(), state_webhook_url: rcv.url });
    const job = await settled(h, id);
    h.fake.setLoadBehaviour(null);
    expect(job.state).toBe('failed');
    const got = forJob(rcv.received, id);
    expect(statesOf(got)).toEqual(['queued', 'loading', 'failed']);
    expect(got[2]!.event).toStrictEqual({
      event_id: `${id}:failed`,
      type: 'job.state_changed',
      job_id: id,
      state: 'failed',
      sequence: 4,
      occurred_at: transitionAt(job, 'failed'),
      metadata: {},
      error: { code: 'model_not_found', message: "model 'llama3.2' not found" },
      ...runOf(job),
    });
    expect(got.map((r) => r.event.sequence)).toEqual([1, 2, 4]);
    for (const r of got) expectCommonHeaders(r, false);
  });

  it('webhook_events filters which states are sent', async () => {
    const rcv = await receiver();
    const onlyDone = await h.submit(hello('a', { state_webhook_url: `${rcv.url}/a`, webhook_events: ['done'] }));
    const queuedOrFailed = await h.submit(hello('b', { state_webhook_url: `${rcv.url}/b`, webhook_events: ['queued', 'failed'] }));
    const j1 = await settled(h, onlyDone);
    const j2 = await settled(h, queuedOrFailed);
    expect(j1.state).toBe('done');
    expect(j2.state).toBe('done');
    expect(j1.webhook.events).toEqual(['done']);
    expect(j2.webhook.events).toEqual(['queued', 'failed']);
    expect(j1.webhook.deliveries.map((d: any) => d.state)).toEqual(['done']);
    expect(j2.webhook.deliveries.map((d: any) => d.state)).toEqual(['queued']);
    const got1 = forJob(rcv.received, onlyDone);
    const got2 = forJob(rcv.received, queuedOrFailed);
    expect(statesOf(got1)).toEqual(['done']);
    expect(got1[0]!.event.sequence).toBe(4);
    expect(got1[0]!.path).toBe('/a');
    expect(statesOf(got2)).toEqual(['queued']);
    expect(got2[0]!.path).toBe('/b');
    expect(rcv.received).toHaveLength(2);
  });

  it('retries a failing event with the same id, does not block the job, and keeps the order', async () => {
    const hold = gate();
    let queuedAttempts = 0;
    const rcv = await receiver(async (r) => {
      if (r.event?.state !== 'queued') return 200;
      queuedAttempts++;
      if (queuedAttempts === 1) await hold.p;
      return queuedAttempts <= 3 ? 500 : 200;
    });
    const id = await h.submit(hello('retry me', { state_webhook_url: rcv.url }));
    // The first attempt is held open: the job must still run to the end.
    const doneJob = await h.waitForState(id, ['done']);
    expect(doneJob.state).toBe('done');
    expect(statesOf(forJob(rcv.received, id))).toEqual(['queued']);
    expect(delivery(doneJob, 'queued').status).toBe('pending');
    for (const s of ['loading', 'working', 'done']) {
      expect(delivery(doneJob, s)).toMatchObject({ status: 'pending', attempts: 0 });
    }
    hold.open();
    const job = await settled(h, id);
    const got = forJob(rcv.received, id);
    expect(statesOf(got)).toEqual(['queued', 'queued', 'queued', 'queued', 'loading', 'working', 'done']);
    expect(got.map((r) => r.answered)).toEqual([500, 500, 500, 200, 200, 200, 200]);
    const queued = got.filter((r) => r.event.state === 'queued');
    for (const r of queued) {
      expect(r.headers['webhook-id']).toBe(`${id}:queued`);
      expect(r.event.event_id).toBe(`${id}:queued`);
      expect(r.raw.equals(queued[0]!.raw)).toBe(true);
    }
    expect(delivery(job, 'queued')).toMatchObject({ status: 'delivered', attempts: 4, last_status_code: 200, last_error: null });
    for (const s of ['loading', 'working', 'done']) {
      expect(delivery(job, s)).toMatchObject({ status: 'delivered', attempts: 1, last_status_code: 200, last_error: null });
    }
  });

  it('rejects invalid webhook URLs at submit', async () => {
    for (const url of ['ftp://x', 'http://user:pass@x/', 'not a url', '/relative/path']) {
      const r = await h.api('/jobs', { method: 'POST', json: hello('x', { state_webhook_url: url }) });
      expect(r.status, url).toBe(400);
      expect(r.body, url).toMatchObject({ code: 'validation_failed', field: 'state_webhook_url' });
    }
  });

  it('keeps per-job order under load with a flaky receiver (20 jobs, every 3rd request answered 500)', async () => {
    let n = 0;
    const rcv = await receiver(() => (++n % 3 === 0 ? 500 : 200));
    const ids = await Promise.all(Array.from({ length: 20 }, (_, i) => h.submit(hello(`load ${i}`, { state_webhook_url: rcv.url }))));
    for (const id of ids) {
      const j = await settled(h, id, 20_000);
      expect(j.state).toBe('done');
      expect(j.webhook.deliveries.map((d: any) => d.status)).toEqual(['delivered', 'delivered', 'delivered', 'delivered']);
    }
    const all = rcv.received;
    const distinct = new Set(all.map((r) => r.event.event_id));
    expect(distinct.size).toBe(80);
    expect(all.filter((r) => r.answered === 500).length).toBe(Math.floor(all.length / 3));
    for (const id of ids) {
      const got = forJob(all, id);
      const firsts: string[] = [];
      for (const r of got) if (!firsts.includes(r.event.state)) firsts.push(r.event.state);
      expect(firsts, id).toEqual(['queued', 'loading', 'working', 'done']);
      // No event is sent before the previous one was delivered: sequences never go down.
      const seqs = got.map((r) => r.event.sequence as number);
      expect(seqs, id).toEqual([...seqs].sort((a, b) => a - b));
      // Each event was accepted (2xx) exactly once.
      for (const s of LIFECYCLE) {
        expect(got.filter((r) => r.event.state === s && r.answered === 200).length, `${id}:${s}`).toBe(1);
      }
      for (const r of got) expect(r.headers['webhook-id']).toBe(r.event.event_id);
    }
  });

  it('410 Gone stops the job\'s webhook; redeliver re-opens it', async () => {
    const hold = gate();
    let gone = true;
    const rcv = await receiver(async () => {
      if (!gone) return 200;
      await hold.p;
      return 410;
    });
    const id = await h.submit(hello('gone', { state_webhook_url: rcv.url }));
    await h.waitForState(id, ['done']); // all four outbox rows exist now
    hold.open();
    const job = await settled(h, id);
    expect(job.state).toBe('done');
    expect(delivery(job, 'queued')).toMatchObject({ status: 'failed', attempts: 1, last_status_code: 410 });
    expect(delivery(job, 'queued').last_error).toMatch(/410/);
    for (const s of ['loading', 'working', 'done']) {
      expect(delivery(job, s)).toMatchObject({ status: 'failed', attempts: 0, last_status_code: null, delivered_at: null });
    }
    await sleep(150);
    expect(rcv.received).toHaveLength(1);
    expect(rcv.received[0]!.event.state).toBe('queued');

    gone = false;
    const r = await h.api(`/jobs/${id}/webhooks/redeliver`, { method: 'POST' });
    expect(r.status).toBe(202);
    expect(r.body.job_id).toBe(id);
    expect([...r.body.requeued].sort()).toEqual(LIFECYCLE.map((s) => `${id}:${s}`).sort());
    await rcv.waitFor((rs) => forJob(rs, id).some((x) => x.event.state === 'done'));
    expect(statesOf(rcv.received)).toEqual(['queued', 'queued', 'loading', 'working', 'done']);
  });
});

// ---------------------------------------------------------------------------

describe('webhook timeout', () => {
  let h: Harness;
  let hanging: Receiver;
  let fine: Receiver;
  beforeAll(async () => {
    h = await startHarness({ webhookTimeoutMs: 300 });
    hanging = await startReceiver(() => 'hang');
    fine = await startReceiver(() => 200);
  });
  afterAll(async () => {
    await h?.stop();
    await hanging?.close();
    await fine?.close();
  });

  it('a hanging receiver times out without holding up other jobs\' webhooks', async () => {
    const a = await h.submit(hello('A', { state_webhook_url: hanging.url }));
    const b = await h.submit(hello('B', { state_webhook_url: fine.url }));
    await fine.waitFor((rs) => forJob(rs, b).length >= 4);
    expect(statesOf(forJob(fine.received, b))).toEqual(['queued', 'loading', 'working', 'done']);
    const jobA = await h.waitForState(a, ['done']);
    expect(jobA.webhook.deliveries.every((d: any) => d.status === 'pending')).toBe(true);
    expect(statesOf(hanging.received).every((s) => s === 'queued')).toBe(true);
    const timedOut = await pollJob(h, a, (j) => /timed out/.test(delivery(j, 'queued')?.last_error ?? ''), 'queued delivery timed out');
    const q = delivery(timedOut, 'queued');
    expect(q.status).toBe('pending');
    expect(q.attempts).toBeGreaterThanOrEqual(1);
    expect(q.last_status_code).toBeNull();
    for (const s of ['loading', 'working', 'done']) {
      expect(delivery(timedOut, s)).toMatchObject({ status: 'pending', attempts: 0 });
    }
    expect(fine.received).toHaveLength(4);
  });
});

// ---------------------------------------------------------------------------

describe('Retry-After', () => {
  let h: Harness;
  let rcv: Receiver;
  beforeAll(async () => {
    h = await startHarness({ webhookBackoffMaxMs: 5000 });
    rcv = await startReceiver();
  });
  afterAll(async () => {
    await h?.stop();
    await rcv?.close();
  });

  const retryAfterOnce = () => {
    let first = true;
    rcv.respond((_r, res) => {
      if (!first) return 200;
      first = false;
      res.writeHead(503, { 'retry-after': '1', 'content-length': '0' }).end();
      return 'handled';
    });
  };

  it('honours Retry-After on a 503', async () => {
    retryAfterOnce();
    const id = await h.submit(hello('later', { state_webhook_url: rcv.url }));
    const job = await settled(h, id);
    const got = forJob(rcv.received, id);
    expect(statesOf(got)).toEqual(['queued', 'queued', 'loading', 'working', 'done']);
    expect(got[1]!.at - got[0]!.at).toBeGreaterThanOrEqual(900);
    expect(delivery(job, 'queued')).toMatchObject({ status: 'delivered', attempts: 2, last_status_code: 200 });
  });

  it('does not busy-poll the outbox while a job\'s head event waits for its retry', async () => {
    const driver = h.service.driver;
    const orig = driver.deliveriesClaim.bind(driver);
    let claims = 0;
    driver.deliveriesClaim = (...a: Parameters<typeof orig>) => {
      claims++;
      return orig(...a);
    };
    try {
      retryAfterOnce();
      const id = await h.submit(hello('no spin', { state_webhook_url: rcv.url }));
      await rcv.waitFor((rs) => forJob(rs, id).length >= 1);
      await h.waitForState(id, ['done']); // loading, working, done now wait behind queued
      const before = claims;
      await sleep(600); // inside the 1 s Retry-After window: nothing is due
      const during = claims - before;
      await settled(h, id);
      // A sleeping dispatcher claims a handful of times at most; a spinning one hundreds.
      expect(during).toBeLessThan(20);
    } finally {
      driver.deliveriesClaim = orig;
    }
  });
});

// ---------------------------------------------------------------------------

describe('redirects', () => {
  let h: Harness;
  let rcv: Receiver;
  let target: Receiver;
  beforeAll(async () => {
    h = await startHarness({ webhookMaxAttempts: 2 });
    target = await startReceiver(() => 200);
    rcv = await startReceiver((_r, res) => {
      res.writeHead(302, { location: `${target.url}/elsewhere`, 'content-length': '0' }).end();
      return 'handled';
    });
  });
  afterAll(async () => {
    await h?.stop();
    await rcv?.close();
    await target?.close();
  });

  it('does not follow a 302 and gives up after the last attempt', async () => {
    const id = await h.submit(hello('redirect', { state_webhook_url: rcv.url }));
    const job = await settled(h, id);
    expect(job.state).toBe('done');
    for (const s of LIFECYCLE) {
      const d = delivery(job, s);
      expect(d).toMatchObject({ status: 'failed', attempts: 2, last_status_code: 302, delivered_at: null });
      expect(d.last_error).toMatch(/redirect/);
    }
    expect(target.received).toHaveLength(0);
    expect(statesOf(rcv.received)).toEqual(['queued', 'queued', 'loading', 'loading', 'working', 'working', 'done', 'done']);
  });
});

// ---------------------------------------------------------------------------

describe('large artifacts are linked, not inlined', () => {
  let h: Harness;
  let rcv: Receiver;
  beforeAll(async () => {
    h = await startHarness({ inlineArtifactMaxBytes: 64 });
    rcv = await startReceiver();
  });
  afterAll(async () => {
    await h?.stop();
    await rcv?.close();
  });

  it('sends a URL whose bytes match the sha256, and a small body', async () => {
    const id = await h.submit(hello('a reasonably long prompt so the completion is well over sixty-four bytes', { state_webhook_url: rcv.url }));
    const job = await settled(h, id);
    const done = forJob(rcv.received, id).find((r) => r.event.state === 'done')!;
    expect(done).toBeDefined();
    expect(done.raw.length).toBeLessThan(2048);
    expect(done.event.artifacts).toStrictEqual([
      {
        name: 'completion',
        content_type: 'application/json',
        size: job.artifacts[0].size,
        sha256: job.artifacts[0].sha256,
        url: `${h.url}/jobs/${id}/artifacts/completion`,
        inline: false,
      },
    ]);
    const a = done.event.artifacts[0];
    expect(a.size).toBeGreaterThan(64);
    const res = await fetch(a.url);
    expect(res.status).toBe(200);
    const bytes = Buffer.from(await res.arrayBuffer());
    expect(bytes.length).toBe(a.size);
    expect(sha256(bytes)).toBe(a.sha256);
    expect(JSON.parse(bytes.toString('utf8'))).toEqual(job.result);
  });
});

// ---------------------------------------------------------------------------

describe('signatures with one secret', () => {
  let h: Harness;
  let rcv: Receiver;
  beforeAll(async () => {
    h = await startHarness({ webhookSecrets: ['topsecret'] });
    rcv = await startReceiver();
  });
  afterAll(async () => {
    await h?.stop();
    await rcv?.close();
  });

  it('X-Foreman-Signature and webhook-signature verify with the reference libraries', async () => {
    const id = await h.submit(hello('signed', { state_webhook_url: rcv.url }));
    await settled(h, id);
    const got = forJob(rcv.received, id);
    expect(statesOf(got)).toEqual(['queued', 'loading', 'working', 'done']);
    const wh = new Webhook('topsecret', { format: 'raw' });
    for (const r of got) {
      expectCommonHeaders(r, true);
      const body = r.raw.toString('utf8');
      const sig = String(r.headers['x-foreman-signature']);
      expect(sig).toMatch(/^sha256=[0-9a-f]{64}$/);
      expect(await verifyGithub('topsecret', body, sig)).toBe(true);
      expect(await verifyGithub('wrongsecret', body, sig)).toBe(false);
      expect(String(r.headers['webhook-signature']).split(' ')).toHaveLength(1);
      expect(wh.verify(body, asHeaderRecord(r.headers))).toEqual(r.event);
      expect(() => wh.verify(body.replace('job.state_changed', 'job.state_changeD'), asHeaderRecord(r.headers))).toThrow();
    }
  });
});

describe('signatures during a secret rotation', () => {
  let h: Harness;
  let rcv: Receiver;
  const key1 = randomBytes(24);
  const first = `whsec_${key1.toString('base64')}`;
  beforeAll(async () => {
    h = await startHarness({ webhookSecrets: [first, 'second-secret'] });
    rcv = await startReceiver();
  });
  afterAll(async () => {
    await h?.stop();
    await rcv?.close();
  });

  it('sends one v1 entry per secret; each verifies on its own', async () => {
    const id = await h.submit(hello('rotated', { state_webhook_url: rcv.url }));
    await settled(h, id);
    const got = forJob(rcv.received, id);
    expect(got).toHaveLength(4);
    const whFirst = new Webhook(first);
    const whSecond = new Webhook('second-secret', { format: 'raw' });
    for (const r of got) {
      const body = r.raw.toString('utf8');
      const headers = asHeaderRecord(r.headers);
      const entries = headers['webhook-signature']!.split(' ');
      expect(entries).toHaveLength(2);
      for (const e of entries) expect(e).toMatch(/^v1,[A-Za-z0-9+/]+={0,2}$/);
      const ts = new Date(Number(headers['webhook-timestamp']) * 1000);
      expect(entries[0]).toBe(whFirst.sign(headers['webhook-id']!, ts, body));
      expect(entries[1]).toBe(whSecond.sign(headers['webhook-id']!, ts, body));
      expect(whFirst.verify(body, headers)).toEqual(r.event);
      expect(whSecond.verify(body, headers)).toEqual(r.event);
      expect(() => new Webhook(`whsec_${randomBytes(24).toString('base64')}`).verify(body, headers)).toThrow();
      expect(await verifyGithub(first, body, headers['x-foreman-signature']!)).toBe(true);
      expect(await verifyGithub('second-secret', body, headers['x-foreman-signature']!)).toBe(false);
    }
  });
});

// ---------------------------------------------------------------------------

describe('a dropped event and redelivery', () => {
  let h: Harness;
  let rcv: Receiver;
  let healed = false;
  beforeAll(async () => {
    h = await startHarness({ webhookMaxAttempts: 2 });
    rcv = await startReceiver((r) => (r.event?.state === 'working' && !healed ? 500 : 200));
  });
  afterAll(async () => {
    await h?.stop();
    await rcv?.close();
  });

  it('gives up on working after 2 attempts, still delivers done, and redelivers on request', async () => {
    const id = await h.submit(hello('drop', { state_webhook_url: rcv.url }));
    const job = await settled(h, id);
    expect(job.state).toBe('done');
    expect(delivery(job, 'working')).toMatchObject({ status: 'failed', attempts: 2, last_status_code: 500, last_error: 'HTTP 500' });
    expect(delivery(job, 'done')).toMatchObject({ status: 'delivered', attempts: 1 });
    expect(statesOf(forJob(rcv.received, id))).toEqual(['queued', 'loading', 'working', 'working', 'done']);
    const firstDone = forJob(rcv.received, id)[4]!;

    healed = true;
    const r = await h.api(`/jobs/${id}/webhooks/redeliver`, { method: 'POST' });
    expect(r.status).toBe(202);
    expect(r.body).toStrictEqual({ job_id: id, requeued: [`${id}:working`] });
    await rcv.waitFor((rs) => forJob(rs, id).length >= 6);
    const again = forJob(rcv.received, id)[5]!;
    expect(again.event.state).toBe('working');
    expect(again.answered).toBe(200);
    expect(again.headers['webhook-id']).toBe(`${id}:working`);
    const j2 = await settled(h, id);
    expect(delivery(j2, 'working')).toMatchObject({ status: 'delivered', attempts: 1, last_status_code: 200, last_error: null });

    // A delivered event can be sent again on request: the same event, byte for byte.
    const r2 = await h.api(`/jobs/${id}/webhooks/redeliver?state=done`, { method: 'POST' });
    expect(r2.status).toBe(202);
    expect(r2.body).toStrictEqual({ job_id: id, requeued: [`${id}:done`] });
    await rcv.waitFor((rs) => forJob(rs, id).length >= 7);
    const doneAgain = forJob(rcv.received, id)[6]!;
    expect(doneAgain.event).toStrictEqual(firstDone.event);
    expect(doneAgain.raw.equals(firstDone.raw)).toBe(true);
    expect(doneAgain.headers['webhook-id']).toBe(`${id}:done`);
    await settled(h, id);

    // Nothing failed now: a bare redeliver requeues nothing.
    const r3 = await h.api(`/jobs/${id}/webhooks/redeliver`, { method: 'POST' });
    expect(r3.status).toBe(202);
    expect(r3.body).toStrictEqual({ job_id: id, requeued: [] });
    // A state this job never had.
    const r4 = await h.api(`/jobs/${id}/webhooks/redeliver?state=failed`, { method: 'POST' });
    expect(r4.status).toBe(409);
    expect(r4.body.code).toBe('no_such_event');
    await sleep(100);
    expect(forJob(rcv.received, id)).toHaveLength(7);
  });

  it('redeliver answers 409 without a webhook and 404 for an unknown job', async () => {
    const id = await h.submit(hello('no hook'));
    await h.waitForState(id, ['done']);
    const r = await h.api(`/jobs/${id}/webhooks/redeliver`, { method: 'POST' });
    expect(r.status).toBe(409);
    expect(r.body).toMatchObject({ code: 'no_webhook' });
    const r2 = await h.api(`/jobs/01890000-0000-7000-8000-000000000000/webhooks/redeliver`, { method: 'POST' });
    expect(r2.status).toBe(404);
    expect(r2.body).toMatchObject({ code: 'job_not_found' });
  });
});

// ---------------------------------------------------------------------------

/** Submits a job to `url`, waits until it is done and its first delivery has failed once. */
async function refusedDelivery(h: Harness, url: string): Promise<any> {
  const id = await h.submit(hello('ssrf', { state_webhook_url: url }));
  await h.waitForState(id, ['done']);
  const j = await pollJob(h, id, (x) => delivery(x, 'queued')?.last_error != null, 'a refused attempt');
  expect(j.state).toBe('done');
  expect(j.webhook.deliveries.some((d: any) => d.status === 'delivered')).toBe(false);
  expect(['pending', 'failed']).toContain(delivery(j, 'queued').status);
  expect(delivery(j, 'queued').last_status_code).toBeNull();
  return delivery(j, 'queued');
}

describe('SSRF guard, default settings', () => {
  let h: Harness;
  let rcv: Receiver;
  beforeAll(async () => {
    h = await startHarness();
    rcv = await startReceiver();
  });
  afterAll(async () => {
    await h?.stop();
    await rcv?.close();
  });

  it('refuses the cloud metadata address', async () => {
    const d = await refusedDelivery(h, 'http://169.254.169.254/latest/meta-data');
    expect(d.last_error).toMatch(/link-local/);
  });

  it('refuses link-local written as an IPv4-mapped IPv6 literal', async () => {
    const d = await refusedDelivery(h, 'http://[::ffff:169.254.169.254]/latest/meta-data');
    expect(d.last_error).toMatch(/link-local/);
  });

  it('refuses 0.0.0.0 even though it would reach a local listener', async () => {
    const port = new URL(rcv.url).port;
    const d = await refusedDelivery(h, `http://0.0.0.0:${port}/hook`);
    expect(d.last_error).toMatch(/refused/);
    expect(rcv.received).toHaveLength(0);
  });
});

describe('SSRF guard, FOREMAN_WEBHOOK_BLOCK_PRIVATE=true', () => {
  let h: Harness;
  let rcv: Receiver;
  beforeAll(async () => {
    h = await startHarness({ webhookBlockPrivate: true });
    rcv = await startReceiver();
  });
  afterAll(async () => {
    await h?.stop();
    await rcv?.close();
  });

  it('refuses loopback by IP literal, by name (DNS path) and as mapped IPv6', async () => {
    const port = new URL(rcv.url).port;
    for (const url of [rcv.url, `http://localhost:${port}/hook`, `http://[::ffff:127.0.0.1]:${port}/hook`]) {
      const d = await refusedDelivery(h, url);
      expect(d.last_error, url).toMatch(/refused/);
      expect(d.last_error, url).toMatch(/loopback/);
    }
    expect(rcv.received).toHaveLength(0);
  });
});
