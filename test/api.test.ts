import { createHash } from 'node:crypto';
import os from 'node:os';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hello, startHarness, type Harness } from './support/harness.js';
import type { FakeChunk, RecordedRequest } from './support/fake-ollama.js';
import { sleep, until, jobCount, terminal } from './support/util.js';

/** UUIDv7 (RFC 9562): version nibble 7, variant 10xx. */
const UUIDV7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const ISO = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
/** Numbers the fake puts on every final line (see fake-ollama.ts METRICS / EVAL_DURATION). */
const FAKE_METRICS = {
  total_duration: 182242375,
  load_duration: 41295167,
  prompt_eval_count: 169,
  prompt_eval_duration: 24573166,
  eval_duration: 115959084,
};
const BUSY = 'server busy, please try again.  maximum pending requests exceeded';




/** The error body contract: exactly code + message (+ field), strings, no stack. */
function expectErrorShape(body: any, status: number, actualStatus: number): void {
  expect(actualStatus).toBe(status);
  expect(typeof body).toBe('object');
  expect(typeof body.code).toBe('string');
  expect(typeof body.message).toBe('string');
  const keys = Object.keys(body).sort();
  expect(keys.filter((k) => k !== 'field')).toEqual(['code', 'message']);
  if ('field' in body) expect(typeof body.field).toBe('string');
  expect(JSON.stringify(body)).not.toMatch(/\bat .*\.(ts|js):\d+/);
}


// ---------------------------------------------------------------------------

describe('job lifecycle and engine pass-through', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ instanceId: 'api-instance-a' });
  });
  afterAll(async () => {
    await h.stop();
  });

  it('runs a job from submission to done with an exact record', async () => {
    const metadata = { customer: 'acme', ticket: 'T-42' };
    const res = await h.api('/jobs', { method: 'POST', json: hello('hello world', { metadata }) });
    expect(res.status).toBe(202);
    const id = res.body.job_id as string;
    expect(id).toMatch(UUIDV7);
    expect(res.headers.get('location')).toBe(`/jobs/${id}`);
    expect(res.body).toEqual({ job_id: id, state: 'queued', status_url: `${h.url}/jobs/${id}` });

    const job = await h.waitForState(id, terminal);
    expect(job.state).toBe('done');
    expect(job.job_id).toBe(id);
    expect(job.model).toBe('llama3.2');
    expect(job.attempt).toBe(1);
    expect(job.max_attempts).toBe(3);
    expect(job.metadata).toEqual(metadata);
    expect(job.error).toBeNull();
    expect(job.webhook).toBeNull();
    // The instance that ran it (FOREMAN_INSTANCE_ID), on either driver.
    expect(job.instance).toBe('api-instance-a');

    expect(job.transitions.map((t: any) => t.state)).toEqual(['queued', 'loading', 'working', 'done']);
    expect(job.transitions.map((t: any) => t.attempt)).toEqual([0, 1, 1, 1]);
    const ats: string[] = job.transitions.map((t: any) => t.at);
    for (const at of ats) expect(at).toMatch(ISO);
    for (let i = 1; i < ats.length; i++) expect(Date.parse(ats[i]!)).toBeGreaterThanOrEqual(Date.parse(ats[i - 1]!));

    for (const k of ['created_at', 'started_at', 'finished_at', 'updated_at']) expect(job[k]).toMatch(ISO);
    const created = Date.parse(job.created_at);
    const started = Date.parse(job.started_at);
    const finished = Date.parse(job.finished_at);
    expect(started).toBeGreaterThanOrEqual(created);
    expect(finished).toBeGreaterThanOrEqual(started);
    expect(ats[0]).toBe(job.created_at);
    expect(ats[3]).toBe(job.finished_at);

    // defaultChunks('hello world'): 3 thinking pieces + 'echo: ', 'hello ', 'world' = 6 chunks.
    expect(job.result).toEqual({
      model: 'llama3.2',
      created_at: expect.any(String),
      message: { role: 'assistant', content: 'echo: hello world', thinking: 'Let me think.' },
      done: true,
      done_reason: 'stop',
      ...FAKE_METRICS,
      eval_count: 6,
      foreman: { load_ms: expect.any(Number) },
    });
    expect(job.result.foreman.load_ms).toBeGreaterThanOrEqual(0);
  });

  it('merges streamed thinking, content and tool_calls in order', async () => {
    const call1 = { function: { name: 'get_weather', arguments: { city: 'Paris', unit: 'celsius' } } };
    const call2 = { function: { name: 'get_time', arguments: { tz: 'Europe/Paris' } } };
    const chunks: FakeChunk[] = [
      { thinking: 'I should ' },
      { thinking: 'call tools.' },
      { content: 'Checking ' },
      { content: 'two ' },
      { content: 'things.' },
      { tool_calls: [call1] },
      { tool_calls: [call2] },
    ];
    h.fake.enqueue({ kind: 'ok', chunks });
    const id = await h.submit(hello('weather and time in Paris?'));
    const job = await h.waitForState(id, terminal);
    expect(job.state).toBe('done');
    expect(job.result.message).toEqual({
      role: 'assistant',
      content: 'Checking two things.',
      thinking: 'I should call tools.',
      tool_calls: [call1, call2],
    });
    expect(job.result.eval_count).toBe(7);
    expect(job.result.done_reason).toBe('stop');
  });

  it('passes engine fields unchanged, streams, and keeps Foreman fields to itself', async () => {
    const format = {
      type: 'object',
      properties: { city: { type: 'string' }, temp: { type: 'number' } },
      required: ['city', 'temp'],
    };
    const options = { temperature: 0.2, num_ctx: 8192 };
    const tools = [
      {
        type: 'function',
        function: {
          name: 'get_weather',
          description: 'Current weather for a city',
          parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
        },
      },
    ];
    const messages = [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'weather?' },
    ];
    const before = h.fake.requests.length;
    const id = await h.submit({
      model: 'llama3.2',
      messages,
      format,
      options,
      tools,
      keep_alive: '10m',
      think: 'high',
      stream: false,
      metadata: { secret_ref: 'do-not-forward' },
      state_webhook_url: 'http://127.0.0.1:9/hook',
    });
    const job = await h.waitForState(id, terminal);
    expect(job.state).toBe('done');

    const mine = h.fake.requests.slice(before).filter((r) => r.path === '/api/chat');
    const loads = mine.filter((r) => r.kind === 'load');
    const chats = mine.filter((r) => r.kind === 'chat');
    expect(loads).toHaveLength(1);
    expect(chats).toHaveLength(1);
    expect(loads[0]!.body).toEqual({ model: 'llama3.2', messages: [], keep_alive: '10m' });
    expect(chats[0]!.body).toEqual({
      model: 'llama3.2',
      messages,
      format,
      options,
      tools,
      keep_alive: '10m',
      think: 'high',
      stream: true,
    });
    const raw = JSON.stringify(chats[0]!.body);
    for (const k of ['state_webhook_url', 'metadata', 'webhook_events', 'do-not-forward']) expect(raw).not.toContain(k);
  });

  it('fails at once with model_not_found for a model no engine host has, without reaching the engine (ADR-0012)', async () => {
    const before = h.fake.requests.length;
    const id = await h.submit({ model: 'llama9', messages: [{ role: 'user', content: 'hi' }] });
    const job = await h.waitForState(id, terminal);
    expect(job.state).toBe('failed');
    expect(job.attempt).toBe(0);
    expect(job.error).toEqual({ code: 'model_not_found', message: "model 'llama9' not found" });
    expect(job.result).toBeNull();
    expect(job.artifacts).toEqual([]);
    expect(job.engine).toBeNull();
    expect(job.instance).toBeNull(); // never claimed
    expect(job.transitions.map((t: any) => t.state)).toEqual(['queued', 'failed']);
    const mine = h.fake.requests.slice(before).filter((r) => r.body?.model === 'llama9');
    expect(mine).toEqual([]);
  });

  it('fails permanently with engine_bad_request and the engine text on a 400', async () => {
    h.fake.enqueue({ kind: 'http_error', status: 400, error: '"bert" does not support chat' });
    const id = await h.submit(hello());
    const job = await h.waitForState(id, terminal);
    expect(job.state).toBe('failed');
    expect(job.attempt).toBe(1);
    expect(job.error).toEqual({ code: 'engine_bad_request', message: '"bert" does not support chat' });
  });
});

// ---------------------------------------------------------------------------

describe('engine down, then up', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ jobMaxAttempts: 50, jobRetryBaseMs: 20 });
  });
  afterAll(async () => {
    await h.stop();
  });

  it('retries while the engine is unreachable and finishes once it is back', async () => {
    await h.fake.stop();
    const id = await h.submit(hello());
    // The claim found the engine down: the job went back to the queue, keeping its attempt.
    const waiting = await until('the job re-queued after finding the engine down', async () => {
      const j = (await h.api(`/jobs/${id}`)).body;
      return j.state === 'queued' && j.transitions.some((t: any) => t.state === 'loading') ? j : null;
    });
    expect(waiting.attempt).toBe(0);
    // Claimed once (and given back): the claim named the instance, FOREMAN_INSTANCE_ID unset: <hostname>-<pid>.
    expect(waiting.instance).toBe(`${os.hostname()}-${process.pid}`);
    await h.fake.start();
    const job = await h.waitForState(id, terminal);
    expect(job.state).toBe('done');
    expect(job.attempt).toBe(1);
    expect(job.error).toBeNull();
    expect(job.result.message.content).toBe('echo: hello world');
    expect(job.transitions.map((t: any) => t.state)).toEqual(['queued', 'loading', 'queued', 'loading', 'working', 'done']);
  });
});

// ---------------------------------------------------------------------------

describe('transient failures and retries (jobMaxAttempts 3)', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ jobMaxAttempts: 3 });
  });
  afterAll(async () => {
    await h.stop();
  });

  it('gives up with engine_busy after three 503s', async () => {
    const busy = { kind: 'http_error', status: 503, error: BUSY } as const;
    h.fake.enqueue(busy, busy, busy);
    const id = await h.submit(hello());
    const job = await h.waitForState(id, terminal);
    expect(job.state).toBe('failed');
    expect(job.attempt).toBe(3);
    expect(job.error.code).toBe('engine_busy');
    expect(job.error.message).toContain(BUSY);
    expect(job.transitions.map((t: any) => t.state)).toEqual([
      'queued', 'loading', 'working', 'queued', 'loading', 'working', 'queued', 'loading', 'working', 'failed',
    ]);
  });

  it('gives up with engine_stream_error after three error lines mid-stream', async () => {
    const text = 'an error was encountered while running the model: CUDA error: out of memory';
    const b = { kind: 'error_mid_stream', after: 2, error: text } as const;
    h.fake.enqueue(b, b, b);
    const id = await h.submit(hello());
    const job = await h.waitForState(id, terminal);
    expect(job.state).toBe('failed');
    expect(job.attempt).toBe(3);
    expect(job.error.code).toBe('engine_stream_error');
    expect(job.error.message).toContain(text);
  });

  it('gives up with engine_stream_incomplete after three cut streams', async () => {
    const b = { kind: 'cut', after: 3 } as const;
    h.fake.enqueue(b, b, b);
    const id = await h.submit(hello());
    const job = await h.waitForState(id, terminal);
    expect(job.state).toBe('failed');
    expect(job.attempt).toBe(3);
    expect(job.error.code).toBe('engine_stream_incomplete');
  });

  it('succeeds on attempt 2 after one transient failure', async () => {
    h.fake.enqueue({ kind: 'http_error', status: 503, error: BUSY });
    const id = await h.submit(hello());
    const job = await h.waitForState(id, terminal);
    expect(job.state).toBe('done');
    expect(job.attempt).toBe(2);
    expect(job.error).toBeNull();
    expect(job.result.message.content).toBe('echo: hello world');
    expect(job.transitions.map((t: any) => [t.state, t.attempt])).toEqual([
      ['queued', 0], ['loading', 1], ['working', 1], ['queued', 1], ['loading', 2], ['working', 2], ['done', 2],
    ]);
  });
});

// ---------------------------------------------------------------------------

describe('engine idle timeout', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ engineIdleTimeoutMs: 300, jobMaxAttempts: 1 });
  });
  afterAll(async () => {
    await h.stop();
  });

  async function timesOut(b: { kind: 'stall'; after: number } | { kind: 'hang' }): Promise<void> {
    const before = h.fake.requests.length;
    h.fake.enqueue(b);
    const id = await h.submit(hello());
    const job = await h.waitForState(id, terminal);
    expect(job.state).toBe('failed');
    expect(job.attempt).toBe(1);
    expect(job.error.code).toBe('engine_timeout');
    const chat = h.fake.requests.slice(before).find((r) => r.kind === 'chat') as RecordedRequest;
    expect(chat).toBeDefined();
    await h.fake.waitForRequests(1, (r) => r === chat && r.aborted, 2_000);
    expect(chat.aborted).toBe(true);
  }

  it('a stream that stalls fails with engine_timeout and the request is closed', async () => {
    await timesOut({ kind: 'stall', after: 2 });
  });

  it('an engine that never answers fails with engine_timeout and the request is closed', async () => {
    await timesOut({ kind: 'hang' });
  });

  it('the worker survives: the next job is done', async () => {
    const id = await h.submit(hello('still alive'));
    const job = await h.waitForState(id, terminal);
    expect(job.state).toBe('done');
    expect(job.result.message.content).toBe('echo: still alive');
  });
});

// ---------------------------------------------------------------------------

describe('artifacts', () => {
  let h: Harness;
  let id: string;
  let job: any;
  beforeAll(async () => {
    h = await startHarness();
    id = await h.submit(hello());
    job = await h.waitForState(id, terminal);
  });
  afterAll(async () => {
    await h.stop();
  });

  it('lists the completion artifact with an absolute URL', async () => {
    expect(job.state).toBe('done');
    expect(job.artifacts).toEqual([
      {
        name: 'completion',
        content_type: 'application/json',
        size: expect.any(Number),
        sha256: expect.stringMatching(/^[0-9a-f]{64}$/),
        url: `${h.url}/jobs/${id}/artifacts/completion`,
      },
    ]);
    const res = await fetch(job.artifacts[0].url);
    expect(res.status).toBe(200);
    const bytes = Buffer.from(await res.arrayBuffer());
    expect(bytes.length).toBe(job.artifacts[0].size);
  });

  it('serves the bytes with content-type, length, sha256 and a strong ETag', async () => {
    const a = job.artifacts[0];
    const r = await h.api(`/jobs/${id}/artifacts/completion`);
    expect(r.status).toBe(200);
    expect(r.headers.get('content-type')).toBe('application/json');
    expect(Number(r.headers.get('content-length'))).toBe(r.raw.length);
    expect(r.raw.length).toBe(a.size);
    const sha = createHash('sha256').update(r.raw).digest('hex');
    expect(sha).toBe(a.sha256);
    expect(r.headers.get('etag')).toBe(`"${sha}"`);
    expect(JSON.parse(r.raw.toString('utf8'))).toEqual(job.result);
  });

  it('answers conditional GETs with 304 and an empty body when the ETag matches', async () => {
    const sha = job.artifacts[0].sha256 as string;
    for (const inm of [`"${sha}"`, `W/"${sha}"`, `"0000", "${sha}"`, `"aaaa",W/"${sha}"`, '*']) {
      const r = await h.api(`/jobs/${id}/artifacts/completion`, { headers: { 'if-none-match': inm } });
      expect(r.status, inm).toBe(304);
      expect(r.raw.length, inm).toBe(0);
      expect(r.headers.get('etag')).toBe(`"${sha}"`);
    }
    const other = await h.api(`/jobs/${id}/artifacts/completion`, { headers: { 'if-none-match': `"${'0'.repeat(64)}"` } });
    expect(other.status).toBe(200);
    expect(other.raw.length).toBe(job.artifacts[0].size);
    // An unquoted sha is not the same entity-tag.
    const unquoted = await h.api(`/jobs/${id}/artifacts/completion`, { headers: { 'if-none-match': sha } });
    expect(unquoted.status).toBe(200);
  });

  const hostileNames = [
    '../foreman.db',
    '..%2Fforeman.db',
    '..%2F..%2Fetc%2Fpasswd',
    '%2e%2e',
    '%2e%2e%2fforeman.db',
    'COMPLETION',
    '.hidden',
    'completion%00',
    'completion%2F',
    'completion.',
    'a'.repeat(100),
    'a'.repeat(200),
  ];
  for (const n of hostileNames) {
    it(`never resolves an artifact name as a path: ${n.length > 40 ? `'a' x ${n.length}` : n}`, async () => {
      const r = await h.api(`/jobs/${id}/artifacts/${n}`);
      expect(r.status).toBe(404);
      expectErrorShape(r.body, 404, r.status);
      expect(['artifact_not_found', 'route_not_found']).toContain(r.body.code);
      expect(r.headers.get('x-content-type-options')).toBe('nosniff');
    });
  }

  it('malformed percent-encoding in a name is a 4xx in the API error format, with security headers', async () => {
    for (const n of ['%E0%A4%A', '%zz', '..%c0%af']) {
      const r = await h.api(`/jobs/${id}/artifacts/${n}`);
      expect(r.status, n).toBeGreaterThanOrEqual(400);
      expect(r.status, n).toBeLessThan(500);
      expectErrorShape(r.body, r.status, r.status);
      expect(r.headers.get('x-content-type-options'), n).toBe('nosniff');
      expect(r.headers.get('x-request-id'), n).not.toBeNull();
    }
  });

  it('unknown jobs are 404 job_not_found, also for their artifacts', async () => {
    const unknown = '01890a5d-ac96-774b-bcce-b302099a8057';
    const r1 = await h.api(`/jobs/${unknown}`);
    expectErrorShape(r1.body, 404, r1.status);
    expect(r1.body.code).toBe('job_not_found');
    const r2 = await h.api(`/jobs/${unknown}/artifacts/completion`);
    expectErrorShape(r2.body, 404, r2.status);
    expect(r2.body.code).toBe('job_not_found');
    const r3 = await h.api(`/jobs/not-a-job`);
    expect(r3.status).toBe(404);
    expect(r3.body.code).toBe('job_not_found');
  });
});

// ---------------------------------------------------------------------------

describe('request validation', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ maxBodyBytes: 4096 });
  });
  afterAll(async () => {
    await h.stop();
  });

  const user = [{ role: 'user', content: 'hi' }];
  const cases: [string, unknown, string | RegExp][] = [
    ['missing model', { messages: user }, 'model'],
    ['model 123 (no coercion)', { model: 123, messages: user }, 'model'],
    ['empty model', { model: '', messages: user }, 'model'],
    ['missing messages', { model: 'llama3.2' }, 'messages'],
    ['messages []', { model: 'llama3.2', messages: [] }, 'messages'],
    ['role robot', { model: 'llama3.2', messages: [{ role: 'robot', content: 'hi' }] }, 'messages[0].role'],
    ['message content a number', { model: 'llama3.2', messages: [{ role: 'user', content: 5 }] }, 'messages[0].content'],
    ['messages not an array', { model: 'llama3.2', messages: { role: 'user', content: 'hi' } }, 'messages'],
    ['unknown field foo', { model: 'llama3.2', messages: user, foo: 1 }, 'foo'],
    ['metadata non-string value', { model: 'llama3.2', messages: user, metadata: { n: 1 } }, 'metadata.n'],
    ['metadata not an object', { model: 'llama3.2', messages: user, metadata: 'x' }, 'metadata'],
    ['webhook ftp', { model: 'llama3.2', messages: user, state_webhook_url: 'ftp://x' }, 'state_webhook_url'],
    ['webhook javascript:', { model: 'llama3.2', messages: user, state_webhook_url: 'javascript:alert(1)' }, 'state_webhook_url'],
    ['webhook credentials', { model: 'llama3.2', messages: user, state_webhook_url: 'http://user:pw@host/' }, 'state_webhook_url'],
    ['webhook not a url', { model: 'llama3.2', messages: user, state_webhook_url: 'not a url' }, 'state_webhook_url'],
    [
      'webhook_events bogus',
      { model: 'llama3.2', messages: user, state_webhook_url: 'http://127.0.0.1:9/h', webhook_events: ['bogus'] },
      /^webhook_events/,
    ],
    ['webhook_events without url', { model: 'llama3.2', messages: user, webhook_events: ['done'] }, 'webhook_events'],
    ['think extreme', { model: 'llama3.2', messages: user, think: 'extreme' }, 'think'],
    ['options not an object', { model: 'llama3.2', messages: user, options: [1] }, 'options'],
  ];

  for (const [name, body, field] of cases) {
    it(`400 validation_failed: ${name}`, async () => {
      const before = (await jobCount(h));
      const r = await h.api('/jobs', { method: 'POST', json: body });
      expectErrorShape(r.body, 400, r.status);
      expect(r.body.code).toBe('validation_failed');
      if (typeof field === 'string') expect(r.body.field).toBe(field);
      else expect(r.body.field).toMatch(field);
      expect((await jobCount(h))).toBe(before);
    });
  }

  for (const key of ['', 'k'.repeat(65)]) {
    it(`400 validation_failed: metadata key of length ${key.length} (keys must be 1..64 characters)`, async () => {
      const before = (await jobCount(h));
      const r = await h.api('/jobs', { method: 'POST', json: { model: 'llama3.2', messages: user, metadata: { [key]: 'v' } } });
      expect(r.status).toBe(400);
      expectErrorShape(r.body, 400, r.status);
      expect(r.body.code).toBe('validation_failed');
      expect(r.body.field).toMatch(/^metadata/);
      expect((await jobCount(h))).toBe(before);
    });
  }

  it('400 invalid_json for a body that is not JSON, or empty', async () => {
    const before = (await jobCount(h));
    for (const body of ['{"model":', '{model: x}', '']) {
      const r = await h.api('/jobs', { method: 'POST', headers: { 'content-type': 'application/json' }, body });
      expectErrorShape(r.body, 400, r.status);
      expect(r.body.code).toBe('invalid_json');
    }
    expect((await jobCount(h))).toBe(before);
  });

  it('415 unsupported_media_type for text/plain', async () => {
    const before = (await jobCount(h));
    const r = await h.api('/jobs', {
      method: 'POST',
      headers: { 'content-type': 'text/plain' },
      body: JSON.stringify(hello()),
    });
    expectErrorShape(r.body, 415, r.status);
    expect(r.body.code).toBe('unsupported_media_type');
    expect((await jobCount(h))).toBe(before);
  });

  it('415 unsupported_media_type for application/xml', async () => {
    const before = (await jobCount(h));
    const r = await h.api('/jobs', { method: 'POST', headers: { 'content-type': 'application/xml' }, body: '<job/>' });
    expectErrorShape(r.body, 415, r.status);
    expect(r.body.code).toBe('unsupported_media_type');
    expect((await jobCount(h))).toBe(before);
  });

  it('413 payload_too_large above FOREMAN_MAX_BODY_BYTES', async () => {
    const before = (await jobCount(h));
    const r = await h.api('/jobs', { method: 'POST', json: hello('x'.repeat(10 * 1024)) });
    expectErrorShape(r.body, 413, r.status);
    expect(r.body.code).toBe('payload_too_large');
    expect((await jobCount(h))).toBe(before);
  });

  it('400 for a __proto__ key at the top level', async () => {
    const before = (await jobCount(h));
    const body = '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"__proto__":{"polluted":"yes"}}';
    const r = await h.api('/jobs', { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    expectErrorShape(r.body, 400, r.status);
    expect(({} as any).polluted).toBeUndefined();
    expect((await jobCount(h))).toBe(before);
  });

  it('a valid body is accepted by the same harness (the cases above were the only cause)', async () => {
    const before = (await jobCount(h));
    const r = await h.api('/jobs', { method: 'POST', json: hello('ok') });
    expect(r.status).toBe(202);
    expect((await jobCount(h))).toBe(before + 1);
    await h.waitForState(r.body.job_id, terminal);
  });
});

// ---------------------------------------------------------------------------

describe('TTL sweep', () => {
  let h: Harness;
  beforeAll(async () => {
    // Long enough that the finished job is still there when the test first reads it (on a
    // loaded machine 50 ms was not: the cleaner's own timer swept it first).
    h = await startHarness({ jobTtlMs: 1_000, concurrency: 1, engineIdleTimeoutMs: 30_000 });
  });
  afterAll(async () => {
    await h.stop();
  });

  it('deletes finished jobs past the TTL, never queued or running ones', async () => {
    const doneId = await h.submit(hello());
    expect((await h.waitForState(doneId, terminal)).state).toBe('done');
    expect((await h.api(`/jobs/${doneId}/artifacts/completion`)).status).toBe(200);

    h.fake.enqueue({ kind: 'hang' });
    const runningId = await h.submit(hello('hang'));
    await h.waitForState(runningId, ['working']);
    const queuedId = await h.submit(hello('waits'));

    await sleep(1_100);
    await h.service.sweepNow();

    const gone = await h.api(`/jobs/${doneId}`);
    expectErrorShape(gone.body, 404, gone.status);
    expect(gone.body.code).toBe('job_not_found');
    const art = await h.api(`/jobs/${doneId}/artifacts/completion`);
    expect(art.status).toBe(404);
    expect(art.body.code).toBe('job_not_found');

    const running = await h.api(`/jobs/${runningId}`);
    expect(running.status).toBe(200);
    expect(running.body.state).toBe('working');
    const queued = await h.api(`/jobs/${queuedId}`);
    expect(queued.status).toBe(200);
    expect(queued.body.state).toBe('queued');
    expect((await jobCount(h))).toBe(2);
  });
});

// ---------------------------------------------------------------------------

describe('health, readiness and response headers', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness();
  });
  afterAll(async () => {
    await h.stop();
  });

  it('GET /healthz is 200 {status: ok}', async () => {
    const r = await h.api('/healthz');
    expect(r.status).toBe(200);
    expect(r.body).toEqual({ status: 'ok' });
  });

  it('GET /readyz reports the database and the engine version', async () => {
    const r = await h.api('/readyz');
    expect(r.status).toBe(200);
    expect(r.body).toEqual({
      status: 'ready',
      database: 'ok',
      engine: { status: 'up', version: '0.33.0' },
      engines: [{ name: new URL(h.fake.url).host, url: h.fake.url, health: 'up', circuit: 'closed', version: '0.33.0' }],
    });
  });

  it('GET /readyz is 503 with every engine host down (ADR-0012)', async () => {
    const h2 = await startHarness();
    try {
      await h2.fake.stop();
      // Two failed probes open the host's circuit; readiness probes at most once a second.
      let r = await h2.api('/readyz');
      for (let i = 0; i < 60 && r.status !== 503; i++) {
        await new Promise((res) => setTimeout(res, 100));
        r = await h2.api('/readyz');
      }
      expect(r.status).toBe(503);
      expect(r.body.status).toBe('unavailable');
      expect(r.body.engines).toEqual([expect.objectContaining({ health: 'down', circuit: 'open' })]);
      expect(r.body.database).toBe('ok');
      expect(r.body.engine.status).toBe('down');
      expect(typeof r.body.engine.error).toBe('string');
      expect(r.body.engine.version).toBeUndefined();
    } finally {
      await h2.stop();
    }
  });

  it('sets security headers and a request id on every response', async () => {
    for (const p of ['/healthz', '/jobs/nope', '/no/such/route']) {
      const r = await h.api(p);
      expect(r.headers.get('x-content-type-options'), p).toBe('nosniff');
      expect(r.headers.get('x-powered-by'), p).toBeNull();
      expect(r.headers.get('x-request-id'), p).toMatch(/^\S+$/);
    }
    const r = await h.api('/healthz', { headers: { 'x-request-id': 'req-abc-123' } });
    expect(r.headers.get('x-request-id')).toBe('req-abc-123');
    const nf = await h.api('/no/such/route');
    expectErrorShape(nf.body, 404, nf.status);
    expect(nf.body.code).toBe('route_not_found');
  });
});

// ---------------------------------------------------------------------------

describe('concurrency', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ concurrency: 3 });
  });
  afterAll(async () => {
    await h.stop();
  });

  it('runs three jobs at the same time with FOREMAN_CONCURRENCY=3', async () => {
    h.fake.enqueue(
      { kind: 'ok', chunkDelayMs: 100 },
      { kind: 'ok', chunkDelayMs: 100 },
      { kind: 'ok', chunkDelayMs: 100 },
    );
    const ids = await Promise.all([h.submit(hello('one')), h.submit(hello('two')), h.submit(hello('three'))]);
    await until(
      'all three jobs working at once',
      async () => {
        const states = await Promise.all(ids.map(async (id) => (await h.api(`/jobs/${id}`)).body.state));
        return states.every((s) => s === 'working');
      },
      5_000,
    );
    const jobs = await Promise.all(ids.map((id) => h.waitForState(id, terminal)));
    expect(jobs.map((j) => j.state)).toEqual(['done', 'done', 'done']);
    expect(jobs.map((j) => j.result.message.content).sort()).toEqual(
      ['echo: one', 'echo: three', 'echo: two'],
    );
  });
});
