/**
 * API keys (issue 11): key CRUD (admin only), 401/403, per-key isolation on every job route,
 * idempotency scoped per key, raw keys never stored, fair sharing between keys, per-key
 * concurrency, max_queued, daily_limit scheduling (with an injectable clock), priority_max,
 * the audit log, usage, signed artifact URLs, the ollama client with a key, start-up checks,
 * and auth off.
 *
 * Every service here listens on 127.0.0.1 with a fake Ollama; most hold the only worker slot
 * with a chat the fake never answers ({kind:'hang'}) so queued jobs stay queued.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import type { IncomingHttpHeaders } from 'node:http';
import path from 'node:path';
import { Ollama } from 'ollama';
import { pino } from 'pino';
import { Webhook } from 'standardwebhooks';
import { afterEach, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, type Config } from '../src/config.js';
import type { Clock } from '../src/domain.js';
import { Service } from '../src/service.js';
import { startFakeOllama, type FakeOllama, type FakeOllamaOptions, type RecordedRequest } from './support/fake-ollama.js';
import { hello, testConfig } from './support/harness.js';
import { startReceiver, type Received, type Receiver } from './support/receiver.js';
import { sleep, until } from './support/util.js';

const ADMIN = 'admin-token-for-tests-0123456789';
const SECRET = 'webhook-secret-for-key-tests';
const KEY_RE = /^fm_[A-Za-z0-9_-]{43}$/;
const ISO = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
const BLOCKING = { concurrency: 1, engineIdleTimeoutMs: 60_000 } as const;

interface Res {
  status: number;
  headers: Headers;
  body: any;
  raw: Buffer;
  text: string;
}

interface T {
  service: Service;
  fake: FakeOllama;
  url: string;
  config: Config;
  /** A request with `Authorization: Bearer <token>` (none when token is null). */
  call(token: string | null, p: string, init?: RequestInit & { json?: unknown }): Promise<Res>;
}

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function fetchRes(url: string, init: RequestInit = {}): Promise<Res> {
  const res = await fetch(url, init);
  const raw = Buffer.from(await res.arrayBuffer());
  const text = raw.toString('utf8');
  let body: unknown = null;
  try {
    body = raw.length ? JSON.parse(text) : null;
  } catch {
    body = text;
  }
  return { status: res.status, headers: res.headers, body, raw, text };
}

/** A service with authentication on (unless `over` says otherwise), cleaned up after the test. */
async function boot(over: Partial<Config> = {}, fakeOpts: FakeOllamaOptions = {}, clock?: Clock): Promise<T> {
  const fake = await startFakeOllama(fakeOpts);
  const config = testConfig({ ollamaUrl: fake.url, adminToken: ADMIN, webhookSecrets: [SECRET], ...over });
  const service = new Service({ config, logger: pino({ level: config.logLevel }), ...(clock ? { clock } : {}) });
  const url = await service.start();
  cleanups.push(async () => {
    await service.stop();
    await fake.close();
    fs.rmSync(config.dataDir, { recursive: true, force: true });
  });
  const call: T['call'] = (token, p, init = {}) => {
    const { json, ...rest } = init;
    const headers = new Headers(rest.headers);
    if (token !== null) headers.set('authorization', `Bearer ${token}`);
    if (json !== undefined) headers.set('content-type', 'application/json');
    return fetchRes(`${url}${p}`, { ...rest, headers, ...(json !== undefined ? { body: JSON.stringify(json) } : {}) });
  };
  return { service, fake, url, config, call };
}

async function receiver(): Promise<Receiver> {
  const r = await startReceiver();
  cleanups.push(() => r.close());
  return r;
}

/** A clock that runs with real time, shifted; `advance` jumps it forward. */
function shiftedClock(startIso: string): Clock & { advance(ms: number): void } {
  let offset = Date.parse(startIso) - Date.now();
  return {
    now: () => Date.now() + offset,
    advance(ms: number) {
      offset += ms;
    },
  };
}

async function createKey(t: T, body: Record<string, unknown>): Promise<{ id: string; key: string; body: any }> {
  const r = await t.call(ADMIN, '/keys', { method: 'POST', json: body });
  expect(r.status, r.text).toBe(201);
  return { id: r.body.id, key: r.body.key, body: r.body };
}

function submit(t: T, token: string | null, body: Record<string, unknown>, headers: Record<string, string> = {}): Promise<Res> {
  return t.call(token, '/jobs', { method: 'POST', json: body, headers });
}

async function submitOk(t: T, token: string | null, body: Record<string, unknown>): Promise<string> {
  const r = await submit(t, token, body);
  expect(r.status, r.text).toBe(202);
  return r.body.job_id as string;
}

async function waitState(t: T, token: string, id: string, states: string[], timeoutMs = 10_000): Promise<any> {
  const end = Date.now() + timeoutMs;
  let last: any;
  while (Date.now() < end) {
    const r = await t.call(token, `/jobs/${id}`);
    last = r.body;
    if (r.status === 200 && states.includes(last.state)) return last;
    await sleep(10);
  }
  throw new Error(`job ${id} did not reach ${states.join('|')} in ${timeoutMs}ms; last: ${JSON.stringify(last)}`);
}

function lastContent(r: RecordedRequest): string {
  const m = r.body?.messages;
  return Array.isArray(m) && m.length > 0 ? String(m[m.length - 1]?.content ?? '') : '';
}

const chatContents = (t: T) => t.fake.requests.filter((r) => r.kind === 'chat').map(lastContent);

/** The admin submits a job whose chat hangs, holding the only worker slot; resolves once it is working. */
async function occupy(t: T, text = 'occupier'): Promise<string> {
  t.fake.enqueue({ kind: 'hang' });
  const id = await submitOk(t, ADMIN, hello(text));
  await t.fake.waitForRequests(1, (r) => r.kind === 'chat' && lastContent(r) === text, 5_000);
  await waitState(t, ADMIN, id, ['working']);
  return id;
}

function expectError(r: Res, status: number, code: string): void {
  expect(r.status, r.text).toBe(status);
  expect(r.body.code, r.text).toBe(code);
  expect(typeof r.body.message).toBe('string');
}

function expect401(r: Res): void {
  expectError(r, 401, 'unauthorized');
  expect(r.headers.get('www-authenticate') ?? '').toMatch(/^Bearer/);
}

const asHeaderRecord = (h: IncomingHttpHeaders): Record<string, string> => {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(h)) if (typeof v === 'string') out[k] = v;
  return out;
};

/**
 * Checks a delivery's Standard Webhooks signature. The service's clock is shifted here, so the
 * library's timestamp tolerance (against the real time) cannot apply: the signature is recomputed
 * with the library for the delivery's own id and timestamp instead.
 */
function expectSigned(r: Received): void {
  const wh = new Webhook(SECRET, { format: 'raw' });
  const h = asHeaderRecord(r.headers);
  const ts = Number(h['webhook-timestamp']);
  expect(Number.isInteger(ts)).toBe(true);
  const want = wh.sign(h['webhook-id']!, new Date(ts * 1000), r.raw.toString('utf8'));
  expect(h['webhook-signature']!.split(' ')).toContain(want);
  const other = new Webhook(`${SECRET}-wrong`, { format: 'raw' }).sign(h['webhook-id']!, new Date(ts * 1000), r.raw.toString('utf8'));
  expect(h['webhook-signature']!.split(' ')).not.toContain(other);
}

const eventsFor = (rcv: Receiver, id: string): Received[] => rcv.received.filter((r) => r.event?.job_id === id);

/** Every state change of the job has been delivered (or failed for good). */
async function deliveriesSettled(t: T, token: string, id: string): Promise<any> {
  return until(
    `deliveries of ${id} settled`,
    async () => {
      const j = (await t.call(token, `/jobs/${id}`)).body;
      return j.webhook && j.webhook.deliveries.length > 0 && j.webhook.deliveries.every((d: any) => d.status !== 'pending') ? j : null;
    },
    10_000,
  );
}

// ---------------------------------------------------------------------------

describe('keys: CRUD (admin only)', () => {
  it('POST /keys answers 201 with the key once; GET lists without secrets and with usage; PATCH changes limits (null removes); unknown ids 404', async () => {
    const t = await boot();
    const r = await t.call(ADMIN, '/keys', { method: 'POST', json: { name: 'alpha', concurrency: 2, max_queued: 5, daily_limit: 100, priority_max: 3 } });
    expect(r.status, r.text).toBe(201);
    expect(Object.keys(r.body).sort()).toEqual(['concurrency', 'created_at', 'daily_limit', 'id', 'key', 'max_queued', 'name', 'priority_max', 'revoked_at']);
    expect(r.body).toMatchObject({ name: 'alpha', concurrency: 2, max_queued: 5, daily_limit: 100, priority_max: 3, revoked_at: null });
    expect(r.body.key).toMatch(KEY_RE);
    expect(Buffer.from(r.body.key.slice(3), 'base64url')).toHaveLength(32);
    expect(r.body.created_at).toMatch(ISO);
    expect(typeof r.body.id).toBe('string');
    const alpha = r.body;

    const b = await t.call(ADMIN, '/keys', { method: 'POST', json: { name: 'beta' } });
    expect(b.status).toBe(201);
    expect(b.body).toMatchObject({ name: 'beta', concurrency: null, max_queued: null, daily_limit: null, priority_max: null, revoked_at: null });
    expect(b.body.key).toMatch(KEY_RE);
    expect(b.body.key).not.toBe(alpha.key);
    expect(b.body.id).not.toBe(alpha.id);

    // Invalid bodies create nothing.
    for (const bad of [{}, { name: '' }, { name: 'x', concurrency: 0 }, { name: 'x', extra: 1 }, { name: 'x', max_queued: -1 }]) {
      const e = await t.call(ADMIN, '/keys', { method: 'POST', json: bad });
      expect(e.status, JSON.stringify(bad)).toBe(400);
    }

    const list = await t.call(ADMIN, '/keys');
    expect(list.status).toBe(200);
    expect(list.text).not.toContain(alpha.key);
    expect(list.text).not.toContain(b.body.key);
    expect(list.text).not.toContain('"key"');
    const zero = { jobs_today: 0, running: 0, queued: 0, tokens_today: 0 };
    expect(list.body).toEqual({
      keys: [
        { ...alpha, key: undefined, usage: { ...zero, daily_limit: 100, concurrency: 2, max_queued: 5 } },
        { ...b.body, key: undefined, usage: { ...zero, daily_limit: null, concurrency: null, max_queued: null } },
      ].map((k) => JSON.parse(JSON.stringify(k))),
    });

    const one = await t.call(ADMIN, `/keys/${alpha.id}`);
    expect(one.status).toBe(200);
    expect(one.body.key).toBeUndefined();
    expect(one.body).toMatchObject({ id: alpha.id, name: 'alpha', concurrency: 2 });

    const p = await t.call(ADMIN, `/keys/${alpha.id}`, { method: 'PATCH', json: { concurrency: 3, daily_limit: null } });
    expect(p.status, p.text).toBe(200);
    expect(p.body).toMatchObject({ id: alpha.id, name: 'alpha', concurrency: 3, max_queued: 5, daily_limit: null, priority_max: 3, revoked_at: null });
    expect(p.body.key).toBeUndefined();
    const renamed = await t.call(ADMIN, `/keys/${alpha.id}`, { method: 'PATCH', json: { name: 'alpha2' } });
    expect(renamed.body).toMatchObject({ name: 'alpha2', concurrency: 3, max_queued: 5, daily_limit: null, priority_max: 3 });
    expect((await t.call(ADMIN, `/keys/${alpha.id}`)).body).toMatchObject({ name: 'alpha2', concurrency: 3, daily_limit: null, usage: { concurrency: 3, daily_limit: null } });
    expect((await t.call(ADMIN, `/keys/${alpha.id}`, { method: 'PATCH', json: {} })).status).toBe(400);

    const unknown = '01900000-0000-7000-8000-000000000000';
    expectError(await t.call(ADMIN, `/keys/${unknown}`), 404, 'key_not_found');
    expectError(await t.call(ADMIN, `/keys/${unknown}`, { method: 'PATCH', json: { concurrency: 1 } }), 404, 'key_not_found');
    expectError(await t.call(ADMIN, `/keys/${unknown}`, { method: 'DELETE' }), 404, 'key_not_found');

    // The key authenticates.
    const u = await t.call(alpha.key, '/usage');
    expect(u.status).toBe(200);
    expect(u.body).toEqual({ jobs_today: 0, daily_limit: null, running: 0, concurrency: 3, queued: 0, max_queued: 5, tokens_today: 0 });
  });

  it('DELETE revokes: the key gets 401 on its next request; its queued jobs stay, the admin still sees and cancels them', async () => {
    const t = await boot(BLOCKING);
    const k = await createKey(t, { name: 'doomed' });
    await occupy(t);
    const j1 = await submitOk(t, k.key, hello('queued before revocation'));
    const j2 = await submitOk(t, k.key, hello('second queued before revocation'));
    expect((await t.call(k.key, `/jobs/${j1}`)).status).toBe(200);

    const d = await t.call(ADMIN, `/keys/${k.id}`, { method: 'DELETE' });
    expect(d.status, d.text).toBe(200);
    expect(d.body.id).toBe(k.id);
    expect(d.body.revoked_at).toMatch(ISO);
    expect(d.body.key).toBeUndefined();

    expect401(await t.call(k.key, `/jobs/${j1}`));
    expect401(await t.call(k.key, '/usage'));
    expect401(await submit(t, k.key, hello('after revocation')));
    expect401(await t.call(k.key, `/jobs/${j1}/cancel`, { method: 'POST' }));

    // The listing shows it revoked.
    const listed = (await t.call(ADMIN, '/keys')).body.keys.find((x: any) => x.id === k.id);
    expect(listed.revoked_at).toBe(d.body.revoked_at);

    const seen = await t.call(ADMIN, `/jobs/${j1}`);
    expect(seen.status).toBe(200);
    expect(seen.body).toMatchObject({ job_id: j1, state: 'queued', key_id: k.id });
    const listing = await t.call(ADMIN, `/jobs?key_id=${k.id}`);
    expect(listing.body.jobs.map((j: any) => j.job_id)).toEqual([j2, j1]);
    const c = await t.call(ADMIN, `/jobs/${j1}/cancel`, { method: 'POST' });
    expect(c.status, c.text).toBe(200);
    expect(c.body).toEqual({ job_id: j1, state: 'canceled' });
    expect((await t.call(ADMIN, `/jobs/${j2}`)).body.state).toBe('queued');
  });
});

describe('keys: 401 and 403', () => {
  it('no, unknown, malformed credentials: 401 unauthorized with WWW-Authenticate: Bearer, on every protected route', async () => {
    const t = await boot();
    const k = await createKey(t, { name: 'k' });
    const job = await submitOk(t, k.key, hello('x'));
    const routes: [string, string, unknown?][] = [
      ['GET', '/jobs'],
      ['POST', '/jobs', hello('x')],
      ['GET', `/jobs/${job}`],
      ['GET', `/jobs/${job}/events`],
      ['GET', `/jobs/${job}/artifacts/completion`],
      ['POST', `/jobs/${job}/cancel`],
      ['POST', `/jobs/${job}/webhooks/redeliver`],
      ['GET', '/conversations'],
      ['GET', `/conversations/${job}`],
      ['GET', '/keys'],
      ['POST', '/keys', { name: 'x' }],
      ['GET', '/usage'],
      ['GET', '/audit'],
      ['GET', '/metrics'],
      ['GET', '/api/tags'],
      ['POST', '/api/chat', { ...hello('x'), stream: false }],
    ];
    const unknownKey = `fm_${'A'.repeat(43)}`;
    for (const [method, p, json] of routes) {
      for (const auth of [null, `Bearer ${unknownKey}`, `Bearer ${ADMIN}x`, `Basic ${Buffer.from(`u:${ADMIN}`).toString('base64')}`, 'Bearer', ADMIN]) {
        const headers: Record<string, string> = auth === null ? {} : { authorization: auth };
        const r = await t.call(null, p, { method, headers, ...(json !== undefined ? { json } : {}) });
        expect401(r);
        // The Ollama-compatible surface adds Ollama's own `error` field (ADR-0008).
        expect(Object.keys(r.body).sort(), `${method} ${p} ${auth}`).toEqual(p.startsWith('/api/') ? ['code', 'error', 'message'] : ['code', 'message']);
      }
    }
    // Nothing was submitted or canceled by any of that.
    const all = await t.call(ADMIN, '/jobs');
    expect(all.body.jobs.map((j: any) => j.job_id)).toEqual([job]);
    expect((await t.call(ADMIN, '/keys')).body.keys).toHaveLength(1);
  });

  it('open routes: /healthz, /readyz, /openapi.json without credentials; the description has securitySchemes.bearer', async () => {
    const t = await boot();
    expect((await t.call(null, '/healthz')).status).toBe(200);
    expect((await t.call(null, '/readyz')).status).toBe(200);
    const o = await t.call(null, '/openapi.json');
    expect(o.status).toBe(200);
    expect(o.body.components.securitySchemes.bearer).toMatchObject({ type: 'http', scheme: 'bearer' });
    expect(o.body.security).toEqual([{ bearer: [] }]);
    // Open paths do not open anything else.
    for (const p of ['/healthz/../keys', '/openapi.json/../keys', '/docs/../keys', '/docs/..%2Fkeys', '/healthzz', '/keys?x=/healthz']) {
      const r = await t.call(null, p);
      expect([401, 404], `${p}: ${r.status} ${r.text}`).toContain(r.status);
      expect(r.text).not.toContain('"keys"');
    }
  });

  it('a key on /keys, /audit, /metrics or GET /jobs?key_id=: 403 forbidden; the admin token passes', async () => {
    const t = await boot();
    const k = await createKey(t, { name: 'k' });
    const forbidden: [string, string, unknown?][] = [
      ['GET', '/keys'],
      ['POST', '/keys', { name: 'mine' }],
      ['GET', `/keys/${k.id}`],
      ['PATCH', `/keys/${k.id}`, { concurrency: 100 }],
      ['DELETE', `/keys/${k.id}`],
      ['GET', '/audit'],
      ['GET', '/metrics'],
      ['GET', `/jobs?key_id=${k.id}`],
    ];
    for (const [method, p, json] of forbidden) {
      const r = await t.call(k.key, p, { method, ...(json !== undefined ? { json } : {}) });
      expectError(r, 403, 'forbidden');
    }
    // None of it happened.
    const keys = (await t.call(ADMIN, '/keys')).body.keys;
    expect(keys).toHaveLength(1);
    expect(keys[0]).toMatchObject({ concurrency: null, revoked_at: null });
    expect((await t.call(ADMIN, '/audit')).body.entries.map((e: any) => e.action)).toEqual(['key.created']);

    for (const p of ['/keys', `/keys/${k.id}`, '/audit', '/metrics', `/jobs?key_id=${k.id}`, '/usage', '/jobs', '/conversations']) {
      expect((await t.call(ADMIN, p)).status, p).toBe(200);
    }
  });

  it('metricsOpen: /metrics answers without credentials and with a key', async () => {
    const t = await boot({ metricsOpen: true });
    const k = await createKey(t, { name: 'k' });
    const open = await t.call(null, '/metrics');
    expect(open.status).toBe(200);
    expect(open.text).toContain('# HELP');
    expect((await t.call(k.key, '/metrics')).status).toBe(200);
    // Only /metrics opened.
    expect401(await t.call(null, '/jobs'));
  });
});

describe('keys: isolation', () => {
  it("key B gets 404 for key A's jobs on every job route, sees nothing of them, and changes nothing", async () => {
    const t = await boot({ ...BLOCKING });
    const rcv = await receiver();
    const A = await createKey(t, { name: 'tenant-a' });
    const B = await createKey(t, { name: 'tenant-b' });
    const PROMPT = 'the secret plans of tenant A zq9x';

    const a1 = await submitOk(t, A.key, hello(PROMPT, { state_webhook_url: rcv.url, metadata: { owner: 'tenant-a-meta' } }));
    await waitState(t, A.key, a1, ['done']);
    const a1Job = await deliveriesSettled(t, A.key, a1);
    expect(a1Job.artifacts).toHaveLength(1);
    t.fake.enqueue({ kind: 'hang' });
    const a2 = await submitOk(t, A.key, hello(`${PROMPT} (running)`, { state_webhook_url: rcv.url }));
    await waitState(t, A.key, a2, ['working']);
    const b1 = await submitOk(t, B.key, hello('tenant B own job'));
    const auditBefore = (await t.call(ADMIN, '/audit')).body.entries.length;
    const receivedBefore = rcv.received.length;

    const leaks = (r: Res, what: string) => {
      expect(r.text, what).not.toContain(PROMPT);
      expect(r.text, what).not.toContain('echo:');
      expect(r.text, what).not.toContain(A.id);
      expect(r.text, what).not.toContain('tenant-a-meta');
      expect(r.text, what).not.toContain(rcv.url);
    };
    for (const id of [a1, a2]) {
      const attempts: [string, Promise<Res>][] = [
        ['GET job', t.call(B.key, `/jobs/${id}`)],
        ['GET artifact', t.call(B.key, `/jobs/${id}/artifacts/completion`)],
        ['GET events', t.call(B.key, `/jobs/${id}/events`, { headers: { accept: 'text/event-stream' } })],
        ['POST cancel', t.call(B.key, `/jobs/${id}/cancel`, { method: 'POST' })],
        ['POST redeliver', t.call(B.key, `/jobs/${id}/webhooks/redeliver`, { method: 'POST' })],
        ['POST redeliver done', t.call(B.key, `/jobs/${id}/webhooks/redeliver?state=queued`, { method: 'POST' })],
        ['POST continue_from', submit(t, B.key, { continue_from: id, messages: [{ role: 'user', content: 'tell me' }] })],
        ['POST continue_from wait', submit(t, B.key, { continue_from: id, wait_for_previous: true, messages: [{ role: 'user', content: 'tell me' }] })],
      ];
      for (const [what, p] of attempts) {
        const r = await p;
        expectError(r, 404, 'job_not_found');
        leaks(r, `${what} ${id}`);
      }
      const conv = await t.call(B.key, `/conversations/${id}`);
      expectError(conv, 404, 'conversation_not_found');
      leaks(conv, `conversation ${id}`);
      // /api/chat continuing A's job.
      const chat = await t.call(B.key, '/api/chat', {
        method: 'POST',
        json: { model: 'llama3.2', messages: [{ role: 'user', content: 'go on' }], stream: false },
        headers: { 'x-foreman-continue-from': id },
      });
      expect(chat.status, chat.text).toBe(404);
      leaks(chat, `api/chat ${id}`);
    }
    // A's jobs are untouched: still done / still working, no redelivery, nothing in the audit log.
    expect((await t.call(A.key, `/jobs/${a1}`)).body.state).toBe('done');
    expect((await t.call(A.key, `/jobs/${a2}`)).body.state).toBe('working');
    const a1After = (await t.call(A.key, `/jobs/${a1}`)).body;
    expect(a1After.webhook.deliveries).toEqual(a1Job.webhook.deliveries);
    await sleep(100);
    expect(rcv.received.length).toBe(receivedBefore);
    expect((await t.call(ADMIN, '/audit')).body.entries.length).toBe(auditBefore);
    // B's failed continuations created nothing.
    expect((await t.call(ADMIN, '/jobs')).body.jobs.map((j: any) => j.job_id)).toEqual([b1, a2, a1]);

    // Listings: each key sees its own; the admin sees all, with key_id, and may filter.
    const bList = await t.call(B.key, '/jobs');
    expect(bList.body.jobs.map((j: any) => [j.job_id, j.key_id])).toEqual([[b1, B.id]]);
    leaks(bList, 'B listing');
    const aList = await t.call(A.key, '/jobs');
    expect(aList.body.jobs.map((j: any) => [j.job_id, j.key_id])).toEqual([
      [a2, A.id],
      [a1, A.id],
    ]);
    for (const q of [`conversation_id=${a1}`, 'metadata.owner=tenant-a-meta', 'state=working', 'state=done']) {
      const r = await t.call(B.key, `/jobs?${q}`);
      expect(r.status).toBe(200);
      expect(r.body.jobs, q).toEqual([]);
    }
    const bConvs = await t.call(B.key, '/conversations');
    expect(bConvs.body.conversations.map((c: any) => c.conversation_id)).toEqual([b1]);
    leaks(bConvs, 'B conversations');
    expect((await t.call(A.key, '/conversations')).body.conversations.map((c: any) => c.conversation_id)).toEqual([a2, a1]);
    expect((await t.call(A.key, `/conversations/${a1}`)).status).toBe(200);
    const all = await t.call(ADMIN, '/jobs');
    expect(all.body.jobs.map((j: any) => [j.job_id, j.key_id])).toEqual([
      [b1, B.id],
      [a2, A.id],
      [a1, A.id],
    ]);
    expect((await t.call(ADMIN, `/jobs?key_id=${A.id}`)).body.jobs.map((j: any) => j.job_id)).toEqual([a2, a1]);
    expect((await t.call(ADMIN, `/jobs?key_id=${B.id}`)).body.jobs.map((j: any) => j.job_id)).toEqual([b1]);
    expect((await t.call(ADMIN, `/jobs/${a1}`)).body.key_id).toBe(A.id);
    expect((await t.call(ADMIN, '/conversations')).body.conversations.map((c: any) => c.conversation_id)).toEqual([b1, a2, a1]);
    // A's own routes work for A.
    expect((await t.call(A.key, `/jobs/${a1}/artifacts/completion`)).status).toBe(200);
    const cancel = await t.call(A.key, `/jobs/${a2}/cancel`, { method: 'POST' });
    expect(cancel.status, cancel.text).toBe(200);
  });

  it('Idempotency-Key is scoped per key: A and B with the same key and body get two jobs; A again replays its own', async () => {
    const t = await boot(BLOCKING);
    await occupy(t);
    const A = await createKey(t, { name: 'a' });
    const B = await createKey(t, { name: 'b' });
    const body = hello('idempotent work');
    const idem = { 'idempotency-key': 'order-42' };
    const ra = await submit(t, A.key, body, idem);
    const rb = await submit(t, B.key, body, idem);
    expect(ra.status).toBe(202);
    expect(rb.status).toBe(202);
    expect(ra.body.job_id).not.toBe(rb.body.job_id);
    const ra2 = await submit(t, A.key, body, idem);
    expect(ra2.status).toBe(200);
    expect(ra2.headers.get('idempotent-replayed')).toBe('true');
    expect(ra2.body.job_id).toBe(ra.body.job_id);
    const rb2 = await submit(t, B.key, body, idem);
    expect(rb2.status).toBe(200);
    expect(rb2.body.job_id).toBe(rb.body.job_id);
    // The admin's (keyless) bucket is a third scope.
    const rAdmin = await submit(t, ADMIN, body, idem);
    expect(rAdmin.status).toBe(202);
    expect([ra.body.job_id, rb.body.job_id]).not.toContain(rAdmin.body.job_id);
    // A different body under A's key: a conflict, for A only.
    const reuse = await submit(t, A.key, hello('something else'), idem);
    expectError(reuse, 409, 'idempotency_key_reused');
    expect((await t.call(A.key, '/jobs')).body.jobs.map((j: any) => j.job_id)).toEqual([ra.body.job_id]);
    expect((await t.call(B.key, '/jobs')).body.jobs.map((j: any) => j.job_id)).toEqual([rb.body.job_id]);
  });
});

describe('keys: storage', () => {
  it('the raw key never reaches the database files (db, wal, shm); only its sha256', async () => {
    const t = await boot();
    const rcv = await receiver();
    const keys = [await createKey(t, { name: 'one', daily_limit: 10 }), await createKey(t, { name: 'two' })];
    for (const k of keys) {
      const id = await submitOk(t, k.key, hello(`work of ${k.id}`, { state_webhook_url: rcv.url }));
      await t.call(k.key, '/jobs', { method: 'POST', json: hello('again'), headers: { 'idempotency-key': `idem-${k.id}` } });
      await waitState(t, k.key, id, ['done']);
      await deliveriesSettled(t, k.key, id);
      expect((await t.call(k.key, '/usage')).status).toBe(200);
    }
    await t.call(ADMIN, `/keys/${keys[1]!.id}`, { method: 'PATCH', json: { concurrency: 4 } });
    await t.call(ADMIN, `/keys/${keys[1]!.id}`, { method: 'DELETE' });

    const hashes = keys.map((k) => createHash('sha256').update(k.key).digest('hex'));
    const stored = (t.service.driver as unknown as { db: import('better-sqlite3').Database }).db
      .prepare('SELECT key_hash FROM api_keys')
      .pluck()
      .all() as string[];
    expect(stored.sort()).toEqual(hashes.sort());

    const check = (when: string) => {
      const files = fs.readdirSync(t.config.dataDir, { recursive: true, withFileTypes: true }).filter((e) => e.isFile());
      expect(files.map((f) => f.name)).toContain('foreman.db');
      let bytes = 0;
      for (const f of files) {
        const data = fs.readFileSync(path.join(f.parentPath, f.name));
        bytes += data.length;
        for (const k of keys) {
          const body = k.key.slice(3);
          const secret = Buffer.from(body, 'base64url');
          for (const [what, needle] of [
            ['raw key', Buffer.from(k.key)],
            ['base64url body', Buffer.from(body)],
            ['random bytes', secret],
            ['random bytes as hex', Buffer.from(secret.toString('hex'))],
            ['random bytes as base64', Buffer.from(secret.toString('base64'))],
          ] as const) {
            expect(data.includes(needle), `${when}: ${what} of ${k.id} in ${f.name}`).toBe(false);
          }
        }
      }
      expect(bytes).toBeGreaterThan(0);
    };
    check('running');
    await t.service.stop();
    check('stopped');
  });
});

describe('keys: fair sharing and per-key limits', () => {
  it('fairness: A queues 200 jobs, then B queues 3; B starts in round-robin with A (A, B, A, B, A, B), not after A', async () => {
    const t = await boot(BLOCKING);
    const A = await createKey(t, { name: 'bulk' });
    const B = await createKey(t, { name: 'interactive' });
    t.fake.enqueue({ kind: 'hang' });
    const a0 = await submitOk(t, A.key, hello('A-0'));
    await t.fake.waitForRequests(1, (r) => r.kind === 'chat', 5_000);
    await waitState(t, A.key, a0, ['working']);
    const aIds = [a0];
    for (let i = 1; i < 200; i++) aIds.push(await submitOk(t, A.key, hello(`A-${i}`)));
    const bIds: string[] = [];
    for (let i = 1; i <= 3; i++) bIds.push(await submitOk(t, B.key, hello(`B-${i}`)));
    expect((await t.call(A.key, '/usage')).body).toMatchObject({ jobs_today: 200, queued: 199, running: 1 });
    expect((await t.call(B.key, '/usage')).body).toMatchObject({ jobs_today: 3, queued: 3, running: 0 });
    // Free the slot: from here on one job at a time, in the claim order.
    expect((await t.call(A.key, `/jobs/${a0}/cancel`, { method: 'POST' })).status).toBe(200);
    for (const id of bIds) await waitState(t, B.key, id, ['done']);
    await until('9 chats', async () => chatContents(t).length >= 9);
    expect(chatContents(t).slice(0, 9)).toEqual(['A-0', 'B-1', 'A-1', 'B-2', 'A-2', 'B-3', 'A-3', 'A-4', 'A-5']);
    // The job records agree: B's jobs started between A's first ones.
    const started = async (token: string, id: string) => Date.parse((await t.call(token, `/jobs/${id}`)).body.started_at);
    await waitState(t, A.key, aIds[3]!, ['done']);
    expect(await started(B.key, bIds[0]!)).toBeLessThanOrEqual(await started(A.key, aIds[1]!));
    expect(await started(B.key, bIds[2]!)).toBeLessThanOrEqual(await started(A.key, aIds[3]!));
  });

  it('per-key concurrency: a key with concurrency 2 never runs more than 2 at once, while another key uses the other slots', async () => {
    const t = await boot({ concurrency: 6, engineIdleTimeoutMs: 60_000 }, { defaultChunkDelayMs: 40 });
    const K = await createKey(t, { name: 'capped', concurrency: 2 });
    const L = await createKey(t, { name: 'free' });
    const kIds: string[] = [];
    for (let i = 0; i < 10; i++) kIds.push(await submitOk(t, K.key, hello(`K-${i}`)));
    const lIds: string[] = [];
    for (let i = 0; i < 4; i++) lIds.push(await submitOk(t, L.key, hello(`L-${i}`)));

    let maxK = 0;
    let maxKListed = 0;
    let maxTotal = 0;
    const finishedAll = async () => {
      const listed = (await t.call(ADMIN, '/jobs?limit=100')).body.jobs as any[];
      return listed.every((j) => j.state === 'done' || j.state === 'failed') ? listed : null;
    };
    const end = Date.now() + 20_000;
    for (;;) {
      const [uk, ul, lk] = await Promise.all([t.call(K.key, '/usage'), t.call(L.key, '/usage'), t.call(ADMIN, `/jobs?key_id=${K.id}&limit=100`)]);
      maxK = Math.max(maxK, uk.body.running);
      const runningListed = lk.body.jobs.filter((j: any) => j.state === 'loading' || j.state === 'working').length;
      maxKListed = Math.max(maxKListed, runningListed);
      maxTotal = Math.max(maxTotal, uk.body.running + ul.body.running);
      expect(uk.body.running, 'usage.running of the capped key').toBeLessThanOrEqual(2);
      expect(runningListed, 'running jobs of the capped key').toBeLessThanOrEqual(2);
      if (await finishedAll()) break;
      if (Date.now() > end) throw new Error('jobs did not finish');
      await sleep(5);
    }
    expect(maxK).toBe(2);
    expect(maxKListed).toBe(2);
    expect(maxTotal).toBeGreaterThanOrEqual(5);

    // From the job records: intervals [started_at, finished_at) of the capped key overlap at most 2-deep.
    const intervals = async (token: string, ids: string[]) =>
      Promise.all(
        ids.map(async (id) => {
          const j = (await t.call(token, `/jobs/${id}`)).body;
          expect(j.state).toBe('done');
          expect(j.attempt).toBe(1);
          return [Date.parse(j.started_at), Date.parse(j.finished_at)] as [number, number];
        }),
      );
    const depth = (xs: [number, number][]) => {
      const ev = xs.flatMap(([s, f]) => [
        [s, 1],
        [f, -1],
      ]);
      ev.sort((a, b) => a[0]! - b[0]! || a[1]! - b[1]!);
      let d = 0;
      let m = 0;
      for (const [, dx] of ev) m = Math.max(m, (d += dx!));
      return m;
    };
    const kIv = await intervals(K.key, kIds);
    const lIv = await intervals(L.key, lIds);
    expect(depth(kIv)).toBe(2);
    expect(depth(lIv)).toBe(4);
    expect(depth([...kIv, ...lIv])).toBe(6);
    expect((await t.call(K.key, '/usage')).body).toMatchObject({ jobs_today: 10, running: 0, queued: 0, concurrency: 2 });
  });

  it('max_queued: with 2 queued, the 3rd submit gets 429 quota_exceeded with Retry-After and writes nothing', async () => {
    const t = await boot(BLOCKING);
    await occupy(t);
    const k = await createKey(t, { name: 'small', max_queued: 2 });
    const r1 = await submit(t, k.key, hello('q1'));
    const r2 = await submit(t, k.key, hello('q2'));
    expect([r1.status, r2.status]).toEqual([202, 202]);
    expect(r1.body.usage).toMatchObject({ queued: 1, max_queued: 2, jobs_today: 1 });
    expect(r2.body.usage).toMatchObject({ queued: 2, max_queued: 2, jobs_today: 2 });
    const before = (await t.call(ADMIN, '/jobs')).body.jobs.length;
    const r3 = await submit(t, k.key, hello('q3'), { 'idempotency-key': 'third' });
    expectError(r3, 429, 'quota_exceeded');
    expect(r3.headers.get('retry-after')).toMatch(/^\d+$/);
    expect(Number(r3.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    expect((await t.call(ADMIN, '/jobs')).body.jobs.length).toBe(before);
    expect(before).toBe(3);
    expect((await t.call(k.key, '/usage')).body).toEqual({ jobs_today: 2, daily_limit: null, running: 0, concurrency: null, queued: 2, max_queued: 2, tokens_today: 0 });
    // The refused idempotency key was not taken: once a slot frees, it makes a job.
    expect((await t.call(k.key, `/jobs/${r1.body.job_id}/cancel`, { method: 'POST' })).status).toBe(200);
    const r4 = await submit(t, k.key, hello('q3'), { 'idempotency-key': 'third' });
    expect(r4.status, r4.text).toBe(202);
    // Other callers are not limited by this key's quota.
    expect((await submit(t, ADMIN, hello('admin'))).status).toBe(202);

    // Submissions racing each other: exactly max_queued accepted.
    const racer = await createKey(t, { name: 'racer', max_queued: 2 });
    const raced = await Promise.all(Array.from({ length: 10 }, (_, i) => submit(t, racer.key, hello(`race ${i}`))));
    expect(raced.filter((r) => r.status === 202)).toHaveLength(2);
    expect(raced.filter((r) => r.status === 429 && r.body.code === 'quota_exceeded')).toHaveLength(8);
    expect((await t.call(ADMIN, `/jobs?key_id=${racer.id}`)).body.jobs).toHaveLength(2);
  });
});

describe('keys: daily_limit, with an injectable clock', () => {
  it('past daily_limit a job is scheduled for the next UTC midnight, announced, and runs once the day comes; a scheduled job can be canceled', async () => {
    const clock = shiftedClock('2030-01-01T23:59:30.000Z');
    const t = await boot({ pollIntervalMs: 50, concurrency: 1 }, {}, clock);
    const rcv = await receiver();
    const k = await createKey(t, { name: 'daily', daily_limit: 2 });

    const r1 = await submit(t, k.key, hello('day one, first'));
    const r2 = await submit(t, k.key, hello('day one, second'));
    expect(r1.status).toBe(202);
    expect(r2.status).toBe(202);
    expect(r1.body.state).toBe('queued');
    expect(r2.body.state).toBe('queued');
    expect(r1.body.scheduled_for).toBeUndefined();
    expect(r1.body.usage.jobs_today).toBe(1);
    expect(r2.body.usage.jobs_today).toBe(2);
    const d1 = await waitState(t, k.key, r1.body.job_id, ['done']);
    const d2 = await waitState(t, k.key, r2.body.job_id, ['done']);
    const tokensDay1 = [d1, d2].reduce((a, j) => a + j.result.prompt_eval_count + j.result.eval_count, 0);

    const r3 = await submit(t, k.key, hello('day two', { state_webhook_url: rcv.url }));
    expect(r3.status, r3.text).toBe(202);
    expect(r3.body.state).toBe('scheduled');
    expect(r3.body.scheduled_for).toBe('2030-01-02T00:00:00.000Z');
    expect(typeof r3.body.message).toBe('string');
    expect(r3.body.message).toContain('daily_limit');
    expect(r3.body.usage).toEqual({ jobs_today: 3, daily_limit: 2, running: 0, concurrency: null, queued: 1, max_queued: null, tokens_today: tokensDay1 });
    const id = r3.body.job_id as string;
    const s = await t.call(k.key, `/jobs/${id}`);
    expect(s.body).toMatchObject({ state: 'scheduled', scheduled_for: '2030-01-02T00:00:00.000Z', started_at: null, key_id: k.id });
    expect(s.body.transitions.map((x: any) => x.state)).toEqual(['scheduled']);
    expect(s.body.caller_usage).toMatchObject({ jobs_today: 3, queued: 1 });
    expect((await t.call(k.key, `/jobs?state=scheduled`)).body.jobs.map((j: any) => j.job_id)).toEqual([id]);

    // The scheduled event arrives first, with sequence 0, signed.
    await rcv.waitFor((rs) => rs.some((r) => r.event?.job_id === id && r.event.state === 'scheduled'));
    const first = eventsFor(rcv, id)[0]!;
    expect(first.event).toMatchObject({ event_id: `${id}:scheduled`, type: 'job.state_changed', job_id: id, state: 'scheduled', sequence: 0 });
    expectSigned(first);
    // Stamped by the service's clock.
    expect(Number(first.headers['webhook-timestamp'])).toBeGreaterThanOrEqual(Math.floor(Date.parse(first.event.occurred_at) / 1000));
    expect(Number(first.headers['webhook-timestamp'])).toBeLessThanOrEqual(Math.floor(clock.now() / 1000));

    // A 4th: scheduled too, and cancelable.
    const r4 = await submit(t, k.key, hello('day two, canceled'));
    expect(r4.body.state).toBe('scheduled');
    expect(r4.body.usage).toMatchObject({ jobs_today: 4, queued: 2 });
    const c = await t.call(k.key, `/jobs/${r4.body.job_id}/cancel`, { method: 'POST' });
    expect(c.status, c.text).toBe(200);
    expect(c.body).toEqual({ job_id: r4.body.job_id, state: 'canceled' });
    const canceled = (await t.call(k.key, `/jobs/${r4.body.job_id}`)).body;
    expect(canceled.state).toBe('canceled');
    expect(canceled.transitions.map((x: any) => x.state)).toEqual(['scheduled', 'canceled']);
    expect((await t.call(k.key, '/usage')).body).toMatchObject({ jobs_today: 4, queued: 1 });

    // Before midnight nothing moves.
    await sleep(300);
    expect((await t.call(k.key, `/jobs/${id}`)).body.state).toBe('scheduled');
    expect(t.fake.requests.filter((r) => r.kind === 'chat')).toHaveLength(2);

    // Past midnight: queued, then run to done.
    clock.advance(40_000);
    const done = await waitState(t, k.key, id, ['done'], 10_000);
    expect(done.transitions.map((x: any) => x.state)).toEqual(['scheduled', 'queued', 'loading', 'working', 'done']);
    expect(Date.parse(done.transitions[1].at)).toBeGreaterThanOrEqual(Date.parse('2030-01-02T00:00:00.000Z'));
    await rcv.waitFor((rs) => rs.some((r) => r.event?.job_id === id && r.event.state === 'done'));
    await sleep(50);
    const evs = eventsFor(rcv, id);
    expect(evs.map((r) => [r.event.state, r.event.sequence])).toEqual([
      ['scheduled', 0],
      ['queued', 1],
      ['loading', 2],
      ['working', 3],
      ['done', 4],
    ]);
    for (const r of evs) expectSigned(r);
    // The new day: submissions counted afresh; its tokens are the job that finished today.
    const u = (await t.call(k.key, '/usage')).body;
    expect(u).toEqual({
      jobs_today: 0,
      daily_limit: 2,
      running: 0,
      concurrency: null,
      queued: 0,
      max_queued: null,
      tokens_today: done.result.prompt_eval_count + done.result.eval_count,
    });
    // And today's limit applies again: two queued, then scheduled for the day after.
    expect((await submit(t, k.key, hello('d2 a'))).body.state).toBe('queued');
    expect((await submit(t, k.key, hello('d2 b'))).body.state).toBe('queued');
    const r7 = await submit(t, k.key, hello('d2 c'));
    expect(r7.body).toMatchObject({ state: 'scheduled', scheduled_for: '2030-01-03T00:00:00.000Z' });

    // Submissions racing each other: exactly daily_limit of them queued, the rest scheduled.
    const racer = await createKey(t, { name: 'racer', daily_limit: 3 });
    const raced = await Promise.all(Array.from({ length: 8 }, (_, i) => submit(t, racer.key, hello(`race ${i}`))));
    expect(raced.map((r) => r.status)).toEqual(Array(8).fill(202));
    expect(raced.filter((r) => r.body.state === 'queued')).toHaveLength(3);
    expect(raced.filter((r) => r.body.state === 'scheduled' && r.body.scheduled_for === '2030-01-03T00:00:00.000Z')).toHaveLength(5);
    expect((await t.call(racer.key, '/usage')).body).toMatchObject({ jobs_today: 8, daily_limit: 3 });
  });

  it('/api/chat past daily_limit: 429 quota_exceeded with Retry-After until midnight, and the refused call leaves nothing behind', async () => {
    const clock = shiftedClock('2030-01-01T23:00:00.000Z');
    const t = await boot({ pollIntervalMs: 50 }, {}, clock);
    const k = await createKey(t, { name: 'chatty', daily_limit: 1 });
    const ok = await t.call(k.key, '/api/chat', { method: 'POST', json: { ...hello('first'), stream: false } });
    expect(ok.status, ok.text).toBe(200);
    expect(ok.body.message.content).toBe('echo: first');
    const refused = await t.call(k.key, '/api/chat', { method: 'POST', json: { ...hello('second'), stream: false } });
    expectError(refused, 429, 'quota_exceeded');
    const wait = Number(refused.headers.get('retry-after'));
    expect(wait).toBeGreaterThan(3590);
    expect(wait).toBeLessThanOrEqual(3600);
    // A refusal is not a submission: no job appears and the day's count is unchanged (as with max_queued).
    expect((await t.call(k.key, '/jobs')).body.jobs.map((j: any) => j.state)).toEqual(['done']);
    expect((await t.call(k.key, '/usage')).body).toMatchObject({ jobs_today: 1, queued: 0 });
  });
});

describe('keys: priority_max, audit, usage', () => {
  it('priority_max clamps: reply priority 5 with a message, the job has priority 5, the audit log says so', async () => {
    const t = await boot(BLOCKING);
    await occupy(t);
    const k = await createKey(t, { name: 'clamped', priority_max: 5 });
    const r = await submit(t, k.key, hello('urgent!', { priority: 9 }));
    expect(r.status).toBe(202);
    expect(r.body.priority).toBe(5);
    expect(r.body.message).toMatch(/priority_max/);
    expect(r.body.message).toContain('9');
    const j = (await t.call(k.key, `/jobs/${r.body.job_id}`)).body;
    expect(j.priority).toBe(5);
    expect((await t.call(ADMIN, `/jobs?key_id=${k.id}`)).body.jobs[0].priority).toBe(5);
    // At or under the cap: untouched, no message.
    for (const p of [5, 3, -7]) {
      const ok = await submit(t, k.key, hello(`p${p}`, { priority: p }));
      expect(ok.status).toBe(202);
      expect(ok.body.priority).toBeUndefined();
      expect(ok.body.message).toBeUndefined();
      expect((await t.call(k.key, `/jobs/${ok.body.job_id}`)).body.priority).toBe(p);
    }
    // The admin is not clamped.
    const adm = await submit(t, ADMIN, hello('admin urgent', { priority: 9 }));
    expect(adm.body.priority).toBeUndefined();
    expect((await t.call(ADMIN, `/jobs/${adm.body.job_id}`)).body.priority).toBe(9);

    const audit = (await t.call(ADMIN, '/audit')).body.entries as any[];
    const clamps = audit.filter((e) => e.action === 'job.priority_clamped');
    expect(clamps).toHaveLength(1);
    expect(clamps[0]).toMatchObject({ actor: k.id, action: 'job.priority_clamped', target: r.body.job_id });
    expect(clamps[0].detail).toEqual({ asked: 9, given: 5 });
  });

  it('audit: key created/updated/revoked, a cancel and a redelivery, newest first, with limit=1 pagination', async () => {
    const t = await boot(BLOCKING);
    const rcv = await receiver();
    const k = await createKey(t, { name: 'audited' });
    const p = await t.call(ADMIN, `/keys/${k.id}`, { method: 'PATCH', json: { max_queued: 7 } });
    expect(p.status).toBe(200);
    const done = await submitOk(t, k.key, hello('to redeliver', { state_webhook_url: rcv.url }));
    await waitState(t, k.key, done, ['done']);
    await deliveriesSettled(t, k.key, done);
    const rd = await t.call(k.key, `/jobs/${done}/webhooks/redeliver?state=done`, { method: 'POST' });
    expect(rd.status, rd.text).toBe(202);
    expect(rd.body).toEqual({ job_id: done, requeued: [`${done}:done`] });
    await deliveriesSettled(t, k.key, done);
    t.fake.enqueue({ kind: 'hang' });
    const running = await submitOk(t, k.key, hello('to cancel'));
    await waitState(t, k.key, running, ['working']);
    expect((await t.call(k.key, `/jobs/${running}/cancel`, { method: 'POST' })).status).toBe(200);
    expect((await t.call(ADMIN, `/keys/${k.id}`, { method: 'DELETE' })).status).toBe(200);

    const a = await t.call(ADMIN, '/audit');
    expect(a.status).toBe(200);
    expect(a.body.next_cursor).toBeNull();
    const entries = a.body.entries as any[];
    expect(entries.map((e) => [e.action, e.actor, e.target])).toEqual([
      ['key.revoked', 'admin', k.id],
      ['job.canceled', k.id, running],
      ['job.redelivered', k.id, done],
      ['key.updated', 'admin', k.id],
      ['key.created', 'admin', k.id],
    ]);
    for (const e of entries) {
      expect(Object.keys(e).sort()).toEqual(['action', 'actor', 'at', 'detail', 'id', 'target']);
      expect(e.at).toMatch(ISO);
    }
    const ids = entries.map((e) => e.id);
    expect([...ids].sort((x, y) => (x < y ? 1 : x > y ? -1 : 0))).toEqual(ids);
    expect(entries[2].detail).toEqual({ states: ['done'] });
    expect(entries[1].detail).toEqual({ was: 'working' });
    expect(JSON.stringify(entries)).not.toContain(k.key);

    // Page through one at a time.
    const paged: any[] = [];
    let cursor: string | null = null;
    for (let i = 0; i < 10; i++) {
      const page: Res = await t.call(ADMIN, `/audit?limit=1${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`);
      expect(page.status, page.text).toBe(200);
      expect(page.body.entries).toHaveLength(1);
      paged.push(page.body.entries[0]);
      cursor = page.body.next_cursor;
      if (cursor === null) break;
    }
    expect(paged).toEqual(entries);
    expect((await t.call(ADMIN, '/audit?limit=0')).status).toBe(400);
    expect((await t.call(ADMIN, '/audit?cursor=garbage')).status).toBe(400);
  });

  it('usage: the 202 body, GET /usage and GET /jobs/<id> carry exact usage; tokens_today adds up finished jobs', async () => {
    const t = await boot(BLOCKING);
    const hang = await occupy(t);
    const k = await createKey(t, { name: 'metered', concurrency: 2, max_queued: 5, daily_limit: 10 });
    const limits = { daily_limit: 10, concurrency: 2, max_queued: 5 };
    const r1 = await submit(t, k.key, hello('metered one'));
    expect(r1.status).toBe(202);
    expect(r1.body.usage).toEqual({ jobs_today: 1, running: 0, queued: 1, tokens_today: 0, ...limits });
    expect((await t.call(k.key, '/usage')).body).toEqual({ jobs_today: 1, running: 0, queued: 1, tokens_today: 0, ...limits });
    const j1 = await t.call(k.key, `/jobs/${r1.body.job_id}`);
    expect(j1.body.caller_usage).toEqual({ jobs_today: 1, running: 0, queued: 1, tokens_today: 0, ...limits });
    // The admin's usage is the keyless bucket: no limits, the occupier running.
    expect((await t.call(ADMIN, '/usage')).body).toEqual({ jobs_today: 0, daily_limit: null, running: 1, concurrency: null, queued: 0, max_queued: null, tokens_today: 0 });

    // The key's job runs (and hangs): running 1.
    t.fake.enqueue({ kind: 'hang' });
    expect((await t.call(ADMIN, `/jobs/${hang}/cancel`, { method: 'POST' })).status).toBe(200);
    await waitState(t, k.key, r1.body.job_id, ['working']);
    const r2 = await submit(t, k.key, hello('metered two'));
    expect(r2.body.usage).toEqual({ jobs_today: 2, running: 1, queued: 1, tokens_today: 0, ...limits });
    expect((await t.call(ADMIN, `/keys/${k.id}`)).body.usage).toEqual({ jobs_today: 2, running: 1, queued: 1, tokens_today: 0, ...limits });
    // Cancel the hanging one; the second runs to done.
    expect((await t.call(k.key, `/jobs/${r1.body.job_id}/cancel`, { method: 'POST' })).status).toBe(200);
    const d2 = await waitState(t, k.key, r2.body.job_id, ['done']);
    const tokens = d2.result.prompt_eval_count + d2.result.eval_count;
    expect(tokens).toBeGreaterThan(0);
    expect(d2.usage).toEqual({ prompt_tokens: d2.result.prompt_eval_count, completion_tokens: d2.result.eval_count });
    const after = { jobs_today: 2, running: 0, queued: 0, tokens_today: tokens, ...limits };
    expect((await t.call(k.key, '/usage')).body).toEqual(after);
    expect(d2.caller_usage).toEqual(after);
    expect((await t.call(ADMIN, '/keys')).body.keys[0].usage).toEqual(after);
    const d3 = await submitOk(t, k.key, hello('metered three'));
    const j3 = await waitState(t, k.key, d3, ['done']);
    expect((await t.call(k.key, '/usage')).body.tokens_today).toBe(tokens + j3.result.prompt_eval_count + j3.result.eval_count);
  });
});

describe('keys: signed artifact URLs', () => {
  it('GET /jobs/<id> and the done event hand out signed URLs that work without a key, until they expire', async () => {
    const clock = shiftedClock('2030-06-01T12:00:00.000Z');
    const t = await boot({ artifactUrlTtlMs: 60_000 }, {}, clock);
    const rcv = await receiver();
    const k = await createKey(t, { name: 'artifacts' });
    const id = await submitOk(t, k.key, hello('make an artifact', { state_webhook_url: rcv.url }));
    const job = await waitState(t, k.key, id, ['done']);
    const a = job.artifacts[0];
    const m = new RegExp(`^${t.url.replace(/[.]/g, '\\.')}/jobs/${id}/artifacts/completion\\?expires=(\\d+)&sig=([A-Za-z0-9_-]{43})$`).exec(a.url);
    expect(m, a.url).not.toBeNull();
    const expires = Number(m![1]);
    expect(expires * 1000).toBeGreaterThan(clock.now() + 55_000);
    expect(expires * 1000).toBeLessThanOrEqual(clock.now() + 60_000);

    const plain = `${t.url}/jobs/${id}/artifacts/completion`;
    const got = await fetchRes(a.url);
    expect(got.status, got.text).toBe(200);
    expect(createHash('sha256').update(got.raw).digest('hex')).toBe(a.sha256);
    expect(got.body).toEqual(job.result);

    // Tampering: the signature, the expiry, the name, the job.
    const sig = m![2]!;
    const flipped = (sig[0] === 'A' ? 'B' : 'A') + sig.slice(1);
    expectError(await fetchRes(`${plain}?expires=${expires}&sig=${flipped}`), 403, 'invalid_signature');
    expectError(await fetchRes(`${plain}?expires=${expires + 1000}&sig=${sig}`), 403, 'invalid_signature');
    expectError(await fetchRes(`${plain}?expires=${expires}&sig=`), 403, 'invalid_signature');
    expectError(await fetchRes(`${plain}?sig=${sig}`), 403, 'invalid_signature');
    expectError(await fetchRes(`${t.url}/jobs/${id}/artifacts/other?expires=${expires}&sig=${sig}`), 403, 'invalid_signature');
    const other = await submitOk(t, k.key, hello('another'));
    await waitState(t, k.key, other, ['done']);
    expectError(await fetchRes(`${t.url}/jobs/${other}/artifacts/completion?expires=${expires}&sig=${sig}`), 403, 'invalid_signature');
    // The plain URL needs a key, and then only the owner's.
    expect401(await fetchRes(plain));
    expect((await t.call(k.key, `/jobs/${id}/artifacts/completion`)).status).toBe(200);
    const stranger = await createKey(t, { name: 'stranger' });
    expectError(await t.call(stranger.key, `/jobs/${id}/artifacts/completion`), 404, 'job_not_found');
    // A sig on a non-artifact route authenticates nothing.
    expect401(await fetchRes(`${t.url}/jobs/${id}?expires=${expires}&sig=${sig}`));

    // The done event's URL is signed as well and works without a key.
    await rcv.waitFor((rs) => rs.some((r) => r.event?.job_id === id && r.event.state === 'done'));
    const ev = eventsFor(rcv, id).find((r) => r.event.state === 'done')!.event;
    expect(ev.artifacts[0].url).toMatch(new RegExp(`^${plain.replace(/[.]/g, '\\.').replace(/\?/g, '\\?')}\\?expires=\\d+&sig=[A-Za-z0-9_-]{43}$`));
    const viaEvent = await fetchRes(ev.artifacts[0].url);
    expect(viaEvent.status).toBe(200);
    expect(viaEvent.raw.equals(got.raw)).toBe(true);

    // Once the TTL has passed: 403 url_expired; a fresh GET gives a URL that works again.
    clock.advance(61_000);
    expectError(await fetchRes(a.url), 403, 'url_expired');
    expectError(await fetchRes(ev.artifacts[0].url), 403, 'url_expired');
    const fresh = (await t.call(k.key, `/jobs/${id}`)).body.artifacts[0].url;
    expect(fresh).not.toBe(a.url);
    expect((await fetchRes(fresh)).status).toBe(200);
  });
});

describe('keys: clients and configuration', () => {
  it('the ollama npm client works with a key in its headers, and throws 401 without', async () => {
    const t = await boot();
    const k = await createKey(t, { name: 'ollama-client' });
    const withKey = new Ollama({ host: t.url, headers: { Authorization: `Bearer ${k.key}` } });
    const res = await withKey.chat({ model: 'llama3.2', messages: [{ role: 'user', content: 'hi there' }] });
    expect(res.message.content).toBe('echo: hi there');
    expect(res.done).toBe(true);
    // The job it made is the key's.
    const mine = (await t.call(k.key, '/jobs')).body.jobs;
    expect(mine).toHaveLength(1);
    expect(mine[0]).toMatchObject({ key_id: k.id, state: 'done', metadata: { source: 'api/chat' } });
    const tags = await withKey.list();
    expect(tags.models.length).toBeGreaterThan(0);

    const without = new Ollama({ host: t.url });
    const err = await without.chat({ model: 'llama3.2', messages: [{ role: 'user', content: 'hi' }] }).then(
      () => null,
      (e: unknown) => e as { status_code?: number },
    );
    expect(err).not.toBeNull();
    expect(err!.status_code).toBe(401);
    const err2 = await new Ollama({ host: t.url, headers: { Authorization: 'Bearer fm_nope' } }).list().then(
      () => null,
      (e: unknown) => e as { status_code?: number },
    );
    expect(err2?.status_code).toBe(401);
    expect((await t.call(ADMIN, '/jobs')).body.jobs).toHaveLength(1);
  });

  it('start-up: refuses to run open on 0.0.0.0; FOREMAN_AUTH=off with a token and a short token are errors', () => {
    const fail = (env: Record<string, string>): ConfigError => {
      try {
        loadConfig(env);
      } catch (e) {
        expect(e).toBeInstanceOf(ConfigError);
        return e as ConfigError;
      }
      throw new Error(`loadConfig(${JSON.stringify(env)}) did not throw`);
    };
    const open = fail({ FOREMAN_HOST: '0.0.0.0' });
    expect(open.variable).toBe('FOREMAN_HOST');
    expect(open.message).toContain('FOREMAN_HOST');
    expect(open.message).toContain('FOREMAN_ADMIN_TOKEN');
    expect(fail({ FOREMAN_HOST: '::' }).variable).toBe('FOREMAN_HOST');
    expect(fail({ FOREMAN_HOST: '192.168.1.10' }).variable).toBe('FOREMAN_HOST');

    const withToken = loadConfig({ FOREMAN_HOST: '0.0.0.0', FOREMAN_ADMIN_TOKEN: ADMIN });
    expect(withToken.host).toBe('0.0.0.0');
    expect(withToken.adminToken).toBe(ADMIN);
    expect(loadConfig({ FOREMAN_HOST: '0.0.0.0', FOREMAN_AUTH: 'off' }).adminToken).toBeUndefined();
    expect(loadConfig({}).adminToken).toBeUndefined();
    expect(loadConfig({ FOREMAN_HOST: '127.0.0.1' }).host).toBe('127.0.0.1');

    const both = fail({ FOREMAN_AUTH: 'off', FOREMAN_ADMIN_TOKEN: ADMIN });
    expect(both.variable).toBe('FOREMAN_AUTH');
    expect(both.message).toContain('FOREMAN_AUTH');
    const short = fail({ FOREMAN_ADMIN_TOKEN: 'too-short' });
    expect(short.variable).toBe('FOREMAN_ADMIN_TOKEN');
    expect(short.message).toContain('FOREMAN_ADMIN_TOKEN');
    expect(short.message).not.toContain('too-short');
    expect(fail({ FOREMAN_ADMIN_TOKEN: '' }).variable).toBe('FOREMAN_ADMIN_TOKEN');
    expect(loadConfig({ FOREMAN_ADMIN_TOKEN: 'x'.repeat(16) }).adminToken).toBe('x'.repeat(16));
    expect(fail({ FOREMAN_ADMIN_TOKEN: ADMIN, FOREMAN_URL_SIGNING_SECRET: 'short' }).variable).toBe('FOREMAN_URL_SIGNING_SECRET');
  });

  it('auth off: everything works without credentials as before; POST /keys answers 400 auth_off', async () => {
    const t = await boot({ adminToken: undefined });
    const r = await t.call(null, '/keys', { method: 'POST', json: { name: 'nope' } });
    expectError(r, 400, 'auth_off');
    expect((await t.call(null, '/keys')).body).toEqual({ keys: [] });
    const sub = await submit(t, null, hello('open mode'));
    expect(sub.status).toBe(202);
    expect(sub.body.usage).toBeUndefined();
    const job = await waitState(t, 'ignored-anything', sub.body.job_id, ['done']);
    expect(job.key_id).toBeNull();
    expect(job.caller_usage).toBeUndefined();
    expect(job.artifacts[0].url).toBe(`${t.url}/jobs/${sub.body.job_id}/artifacts/completion`);
    expect((await fetchRes(job.artifacts[0].url)).status).toBe(200);
    expect((await t.call(null, '/jobs')).body.jobs.map((j: any) => [j.job_id, j.key_id])).toEqual([[sub.body.job_id, null]]);
    expect((await t.call(null, '/metrics')).status).toBe(200);
    expect((await t.call(null, '/audit')).status).toBe(200);
    expect((await t.call(null, '/usage')).status).toBe(200);
    const o = (await t.call(null, '/openapi.json')).body;
    expect(o.security).toBeUndefined();
    const res = await new Ollama({ host: t.url }).chat({ model: 'llama3.2', messages: [{ role: 'user', content: 'open' }] });
    expect(res.message.content).toBe('echo: open');
  });
});
