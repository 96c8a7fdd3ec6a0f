import OpenAI, { toFile } from 'openai';
import { Webhook } from 'standardwebhooks';
import { describe, expect, it } from 'vitest';
import type { Clock } from '../src/domain.js';
import { startHarness } from './support/harness.js';
import { fakeEmbedding } from './support/fake-ollama.js';
import { scoped } from './support/scoped.js';
import { rowCount, until } from './support/util.js';

/**
 * The Batch API (ADR-0015) with the official `openai` client: upload, create, poll, download;
 * failures, cancel, expiry, the batch webhook, malformed uploads, isolation between keys.
 */
const s = scoped();

async function setup(over: Parameters<typeof startHarness>[0] = {}, fake: Parameters<typeof startHarness>[1] = {}, clock?: Clock) {
  const h = await startHarness({ concurrency: 4, ...over }, fake, undefined, clock ? { clock } : {});
  s.cleanups.push(() => h.stop());
  const client = new OpenAI({ baseURL: `${h.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  return { h, client };
}

const chatLine = (id: string, text: string, model = 'llama3.2') =>
  JSON.stringify({ custom_id: id, method: 'POST', url: '/v1/chat/completions', body: { model, messages: [{ role: 'user', content: text }], max_tokens: 100 } });

const upload = async (client: OpenAI, lines: string[], name = 'batch.jsonl') =>
  client.files.create({ file: await toFile(Buffer.from(lines.join('\n') + '\n'), name), purpose: 'batch' });

async function waitStatus(client: OpenAI, id: string, statuses: string[], timeoutMs = 60_000) {
  const end = Date.now() + timeoutMs;
  let b = await client.batches.retrieve(id);
  while (!statuses.includes(b.status)) {
    if (Date.now() > end) throw new Error(`batch ${id} stayed ${b.status}: ${JSON.stringify(b.request_counts)}`);
    await new Promise((r) => setTimeout(r, 50));
    b = await client.batches.retrieve(id);
  }
  return b;
}

const jsonl = async (client: OpenAI, fileId: string) =>
  (await (await client.files.content(fileId)).text())
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as any);

describe('the Batch API', () => {
  it('1,000 chat requests: upload, create, poll until completed, every custom_id once with its own answer', async () => {
    const { h, client } = await setup();
    const N = 1000;
    const lines = Array.from({ length: N }, (_, i) => chatLine(`req-${i}`, `item ${i}`));
    const file = await upload(client, lines);
    expect(file).toMatchObject({ object: 'file', purpose: 'batch', filename: 'batch.jsonl', status: 'processed', bytes: Buffer.byteLength(lines.join('\n') + '\n') });
    expect(await client.files.retrieve(file.id)).toMatchObject({ id: file.id, bytes: file.bytes });
    expect(await (await client.files.content(file.id)).text()).toBe(lines.join('\n') + '\n');

    const created = await client.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h', metadata: { run: 'one' } });
    expect(created).toMatchObject({
      object: 'batch',
      endpoint: '/v1/chat/completions',
      input_file_id: file.id,
      completion_window: '24h',
      status: 'validating',
      output_file_id: null,
      error_file_id: null,
      request_counts: { total: N, completed: 0, failed: 0 },
      metadata: { run: 'one' },
      errors: null,
    });
    expect(created.expires_at! - created.created_at).toBe(24 * 3600);
    const done = await waitStatus(client, created.id, ['completed', 'failed', 'expired', 'cancelled']);
    expect(done.status).toBe('completed');
    expect(done.request_counts).toEqual({ total: N, completed: N, failed: 0 });
    expect(done.error_file_id).toBeNull();
    for (const k of ['in_progress_at', 'finalizing_at', 'completed_at'] as const) expect(done[k]).toEqual(expect.any(Number));
    expect(done.failed_at ?? done.expired_at ?? done.cancelled_at ?? done.cancelling_at).toBeNull();

    const out = await jsonl(client, done.output_file_id!);
    expect(out).toHaveLength(N);
    const seen = new Map<string, any>();
    for (const l of out) {
      expect(seen.has(l.custom_id)).toBe(false);
      seen.set(l.custom_id, l);
    }
    for (let i = 0; i < N; i++) {
      const l = seen.get(`req-${i}`);
      expect(l.error).toBeNull();
      expect(l.id).toMatch(/^batch_req_/);
      expect(l.response.status_code).toBe(200);
      expect(l.response.body).toMatchObject({ object: 'chat.completion', model: 'llama3.2', choices: [{ message: { content: `echo: item ${i}` }, finish_reason: 'stop' }] });
      expect(l.response.body.id).toBe(`chatcmpl-${l.response.request_id}`);
    }
    // Each request was a normal job under the batch, with the request mapped as the endpoint maps it.
    const jobs = await h.api(`/jobs?metadata.batch_id=${created.id}&limit=100`);
    expect(jobs.body.jobs).toHaveLength(100);
    expect(h.fake.requests.filter((r) => r.kind === 'chat')).toHaveLength(N);
    expect(h.fake.requests.find((r) => r.kind === 'chat' && r.body.messages[0].content === 'item 7')!.body).toEqual({
      model: 'llama3.2',
      messages: [{ role: 'user', content: 'item 7' }],
      options: { num_predict: 100 },
      stream: true,
    });
    const outMeta = await client.files.retrieve(done.output_file_id!);
    expect(outMeta).toMatchObject({ purpose: 'batch_output', bytes: Buffer.byteLength((await (await client.files.content(done.output_file_id!)).text())) });
    // Listing: OpenAI's list shape, newest first.
    const list = await h.api('/v1/batches?limit=10');
    expect(list.body).toMatchObject({ object: 'list', data: [{ id: created.id }], first_id: created.id, last_id: created.id, has_more: false });
  });

  it('embeddings batches; failing lines go to the error file with the status the request would have had', async () => {
    const { client } = await setup();
    const lines = Array.from({ length: 20 }, (_, i) =>
      JSON.stringify({ custom_id: `e${i}`, method: 'POST', url: '/v1/embeddings', body: { model: i % 5 === 0 ? 'missing-model' : 'qwen3', input: `text ${i}` } }),
    );
    const file = await upload(client, lines);
    const b = await client.batches.create({ input_file_id: file.id, endpoint: '/v1/embeddings', completion_window: '24h' });
    const done = await waitStatus(client, b.id, ['completed']);
    expect(done.request_counts).toEqual({ total: 20, completed: 16, failed: 4 });
    const out = await jsonl(client, done.output_file_id!);
    const errs = await jsonl(client, done.error_file_id!);
    expect(out.map((l) => l.custom_id).sort()).toEqual(Array.from({ length: 20 }, (_, i) => `e${i}`).filter((_, i) => i % 5 !== 0).sort());
    for (const l of out) {
      const i = Number(l.custom_id.slice(1));
      expect(l.response.body).toEqual({ object: 'list', data: [{ object: 'embedding', index: 0, embedding: fakeEmbedding(`text ${i}`) }], model: 'qwen3', usage: { prompt_tokens: 2, total_tokens: 2 } });
    }
    expect(errs.map((l) => l.custom_id)).toEqual(['e0', 'e5', 'e10', 'e15']);
    for (const l of errs) {
      expect(l.error).toBeNull();
      expect(l.response).toEqual({
        status_code: 404,
        request_id: expect.any(String),
        body: { error: { message: "model 'missing-model' not found", type: 'not_found_error', param: null, code: 'model_not_found' } },
      });
    }
  });

  it('a malformed upload names its line and reason, and nothing is stored', async () => {
    const { h, client } = await setup({ batchMaxLines: 5 });
    const good = (i: number) => chatLine(`c${i}`, `t${i}`);
    const cases: [string[], RegExp, string][] = [
      [[good(1), good(2), '{"custom_id": "c3", "method": "POST",', good(4)], /^line 3: is not valid JSON/, 'invalid_json_line'],
      [[good(1), '', good(2), good(1)], /^line 4: custom_id "c1" repeats line 1/, 'duplicate_custom_id'],
      [[good(1), JSON.stringify({ custom_id: 'x', method: 'GET', url: '/v1/chat/completions', body: {} })], /^line 2: method must be "POST"/, 'invalid_value'],
      [[JSON.stringify({ custom_id: 'x', method: 'POST', url: '/v1/chat/completions', body: { model: 'm', messages: [{ role: 'user', content: 'x' }], n: 3 } })], /^line 1: body\.n must be 1/, 'unsupported_value'],
      [[good(1), JSON.stringify({ custom_id: 'y', method: 'POST', url: '/v1/embeddings', body: { model: 'm', input: 'x' } })], /^line 2: url \/v1\/embeddings differs/, 'invalid_value'],
      [Array.from({ length: 6 }, (_, i) => good(i)), /^line 6: the file holds more than FOREMAN_BATCH_MAX_LINES \(5\)/, 'too_many_lines'],
    ];
    for (const [lines, message, code] of cases) {
      const err = await upload(client, lines).then(() => null, (e: unknown) => e);
      expect(err).toBeInstanceOf(OpenAI.BadRequestError);
      const e = (err as InstanceType<typeof OpenAI.BadRequestError>).error as { message: string; code: string };
      expect(e.message).toMatch(message);
      expect(e.code).toBe(code);
    }
    const wrongPurpose = await client.files.create({ file: await toFile(Buffer.from(good(1) + '\n'), 'x.jsonl'), purpose: 'fine-tune' }).then(() => null, (e: unknown) => e);
    expect((wrongPurpose as InstanceType<typeof OpenAI.BadRequestError>).error).toMatchObject({ param: 'purpose' });
    expect(await rowCount(h, 'files')).toBe(0);
    expect(await rowCount(h, 'file_lines')).toBe(0);
    expect((await client.files.list()).data).toEqual([]);
  });

  it('a file larger than FOREMAN_BATCH_MAX_BYTES is a 413 and nothing stays, though its lines were valid', async () => {
    const { h, client } = await setup({ batchMaxBytes: 64 * 1024 });
    const lines = Array.from({ length: 2000 }, (_, i) => chatLine(`big-${i}`, `a line that is valid ${i}`));
    const err = await upload(client, lines).then(() => null, (e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.APIError);
    expect((err as InstanceType<typeof OpenAI.APIError>).status, JSON.stringify((err as InstanceType<typeof OpenAI.APIError>).error)).toBe(413);
    expect((err as InstanceType<typeof OpenAI.APIError>).error).toMatchObject({ code: 'file_too_large', param: 'file' });
    expect(await rowCount(h, 'files')).toBe(0);
    expect(await rowCount(h, 'file_lines')).toBe(0);
  });

  it('cancel mid-batch: queued requests are cancelled, the running one finishes, the output holds what finished; the webhook says so', async () => {
    const secret = 'whsec_' + Buffer.from('0123456789abcdef0123456789abcdef').toString('base64');
    const rcv = await s.receiver();
    const { client } = await setup({ concurrency: 1, webhookSecrets: [secret] }, { defaultChunkDelayMs: 15 });
    const file = await upload(client, Array.from({ length: 40 }, (_, i) => chatLine(`k${i}`, `word ${i}`)));
    const b = await client.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h', metadata: { webhook_url: `${rcv.url}/batches` } });
    await until('two done', async () => (await client.batches.retrieve(b.id)).request_counts!.completed >= 2, 20_000);
    const cancelling = await client.batches.cancel(b.id);
    expect(['cancelling', 'cancelled']).toContain(cancelling.status);
    expect(cancelling.cancelling_at).toEqual(expect.any(Number));
    const end = await waitStatus(client, b.id, ['cancelled']);
    const c = end.request_counts!;
    expect(c.total).toBe(40);
    expect(c.completed).toBeGreaterThanOrEqual(2);
    expect(c.completed).toBeLessThan(40);
    expect(c.failed).toBe(0);
    const out = await jsonl(client, end.output_file_id!);
    const errs = await jsonl(client, end.error_file_id!);
    expect(out).toHaveLength(c.completed);
    expect(errs).toHaveLength(40 - c.completed);
    expect(new Set([...out, ...errs].map((l) => l.custom_id)).size).toBe(40);
    for (const l of errs) expect(l.error).toMatchObject({ code: 'batch_cancelled' });
    for (const l of out) expect(l.response.body.choices[0].message.content).toBe(`echo: word ${l.custom_id.slice(1)}`);
    // Cancelling again is fine; a finished batch cannot be cancelled.
    expect((await client.batches.cancel(b.id)).status).toBe('cancelled');

    const [got] = await rcv.waitFor((r) => r.length >= 1, 10_000);
    const wh = new Webhook(secret);
    const ev = wh.verify(got!.raw.toString('utf8'), {
      'webhook-id': String(got!.headers['webhook-id']),
      'webhook-timestamp': String(got!.headers['webhook-timestamp']),
      'webhook-signature': String(got!.headers['webhook-signature']),
    }) as any;
    expect(ev).toMatchObject({ object: 'event', type: 'batch.cancelled', event_id: `${b.id}:batch.cancelled`, data: { id: b.id, status: 'cancelled', request_counts: c } });
    expect(got!.headers['webhook-id']).toBe(`${b.id}:batch.cancelled`);
    await new Promise((r) => setTimeout(r, 200));
    expect(rcv.received).toHaveLength(1); // no per-request events for batch jobs
  });

  it('completion_window expiry (an injected clock): the batch ends expired; the output holds what finished', async () => {
    let offset = 0;
    const clock: Clock = { now: () => Date.now() + offset };
    const rcv = await s.receiver();
    const { h, client } = await setup({ concurrency: 1, pollIntervalMs: 200 }, { defaultChunkDelayMs: 15 }, clock);
    const file = await upload(client, Array.from({ length: 30 }, (_, i) => chatLine(`x${i}`, `w ${i}`)));
    const b = await client.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h', webhook_url: `${rcv.url}/b` } as never);
    await until('one done', async () => (await client.batches.retrieve(b.id)).request_counts!.completed >= 1, 20_000);
    offset = 24 * 3_600_000 + 1000;
    h.service.batches.wake();
    const end = await waitStatus(client, b.id, ['expired']);
    expect(end.expired_at).toEqual(expect.any(Number));
    const c = end.request_counts!;
    expect(c.completed + c.failed).toBe(30);
    expect(c.completed).toBeGreaterThanOrEqual(1);
    const out = await jsonl(client, end.output_file_id!);
    const errs = await jsonl(client, end.error_file_id!);
    expect(out).toHaveLength(c.completed);
    expect(errs).toHaveLength(c.failed);
    for (const l of errs) expect(l.error).toMatchObject({ code: 'batch_expired' });
    const [got] = await rcv.waitFor((r) => r.length >= 1, 10_000);
    expect(got!.event).toMatchObject({ type: 'batch.expired', data: { id: b.id, status: 'expired' } });
  });

  it('batches and files belong to the key that made them: another key gets 404; admin sees all; jobs run under the owner key', async () => {
    const admin = 'admin-token-0123456789abcdef';
    const { h } = await setup({ adminToken: admin });
    const mk = async (name: string) =>
      (await h.api('/keys', { method: 'POST', headers: { authorization: `Bearer ${admin}` }, json: { name } })).body.key as string;
    const [ka, kb] = [await mk('a'), await mk('b')];
    const a = new OpenAI({ baseURL: `${h.url}/v1`, apiKey: ka, maxRetries: 0 });
    const bcl = new OpenAI({ baseURL: `${h.url}/v1`, apiKey: kb, maxRetries: 0 });
    const ad = new OpenAI({ baseURL: `${h.url}/v1`, apiKey: admin, maxRetries: 0 });
    const file = await upload(a, [chatLine('only', 'mine')]);
    await expect(bcl.files.retrieve(file.id)).rejects.toBeInstanceOf(OpenAI.NotFoundError);
    await expect(bcl.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h' })).rejects.toBeInstanceOf(OpenAI.NotFoundError);
    const batch = await a.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h' });
    await expect(bcl.batches.retrieve(batch.id)).rejects.toBeInstanceOf(OpenAI.NotFoundError);
    await expect(bcl.batches.cancel(batch.id)).rejects.toBeInstanceOf(OpenAI.NotFoundError);
    expect((await bcl.batches.list()).data).toEqual([]);
    const done = await waitStatus(ad, batch.id, ['completed']);
    await expect(bcl.files.content(done.output_file_id!)).rejects.toBeInstanceOf(OpenAI.NotFoundError);
    expect((await jsonl(a, done.output_file_id!))[0].custom_id).toBe('only');
    const keys = (await h.api('/keys', { headers: { authorization: `Bearer ${admin}` } })).body.keys as any[];
    const keyA = keys.find((k) => k.name === 'a');
    const jobs = await h.api(`/jobs?metadata.batch_id=${batch.id}`, { headers: { authorization: `Bearer ${admin}` } });
    expect(jobs.body.jobs.map((j: any) => j.key_id)).toEqual([keyA.id]);
    const noAuth = await h.api('/v1/batches');
    expect(noAuth.status).toBe(401);
    expect(noAuth.body).toEqual({ error: { message: expect.any(String), type: 'authentication_error', param: null, code: 'unauthorized' } });
  });

  it("a key whose queue is full holds up only its own batches: another key's batch behind 40 of them still runs", async () => {
    const admin = 'admin-token-0123456789abcdef';
    const { h } = await setup({ adminToken: admin, concurrency: 1 });
    const mk = async (name: string, over: Record<string, unknown> = {}) =>
      (await h.api('/keys', { method: 'POST', headers: { authorization: `Bearer ${admin}` }, json: { name, ...over } })).body.key as string;
    const a = new OpenAI({ baseURL: `${h.url}/v1`, apiKey: await mk('a', { max_queued: 1 }), maxRetries: 0 });
    const b = new OpenAI({ baseURL: `${h.url}/v1`, apiKey: await mk('b'), maxRetries: 0 });
    // A's first job holds the only slot, its second fills its queue: every later batch of A is blocked.
    h.fake.enqueue({ kind: 'ok', firstByteDelayMs: 20_000 });
    const file = await upload(a, [chatLine('a', 'held')]);
    const aBatches = [];
    for (let i = 0; i < 40; i++) aBatches.push(await a.batches.create({ input_file_id: file.id, endpoint: '/v1/chat/completions', completion_window: '24h' }));
    await until("A's first two jobs to be in", async () => (await h.api('/jobs?limit=100', { headers: { authorization: `Bearer ${admin}` } })).body.jobs.length === 2, 5_000);
    const mine = await b.batches.create({ input_file_id: (await upload(b, [chatLine('b', 'mine')])).id, endpoint: '/v1/chat/completions', completion_window: '24h' });
    await until("B's line to become a job", async () => (await h.api(`/jobs?metadata.batch_id=${mine.id}`, { headers: { authorization: `Bearer ${admin}` } })).body.jobs.length === 1, 5_000);
    // A's batches are still waiting: its queue stays full.
    const all = (await h.api('/jobs?limit=100', { headers: { authorization: `Bearer ${admin}` } })).body.jobs as any[];
    expect(all.length).toBe(3);
    expect((await a.batches.retrieve(aBatches[39]!.id)).status).toBe('validating');
  });

  it("an output file's size read while its batch ends is not kept: the size stored is the whole file's", async () => {
    const { h, client } = await setup({ concurrency: 1 });
    h.fake.enqueue({ kind: 'ok' }, { kind: 'ok', firstByteDelayMs: 800 });
    const batch = await client.batches.create({
      input_file_id: (await upload(client, [chatLine('one', 'first'), chatLine('two', 'second'), chatLine('three', 'third')])).id,
      endpoint: '/v1/chat/completions',
      completion_window: '24h',
    });
    await until('the first line to finish', async () => (await client.batches.retrieve(batch.id)).request_counts?.completed === 1, 5_000);
    // The size is counted page by page; after its last page, and before the count ends, the batch ends.
    const driver = h.service.driver;
    const page = driver.batchResultsPage.bind(driver);
    let held = false;
    driver.batchResultsPage = async (p) => {
      const rows = await page(p);
      if (p.role === 'output' && rows.length === 0 && !held) {
        held = true;
        await waitStatus(client, batch.id, ['completed'], 10_000);
      }
      return rows;
    };
    // While the batch runs, its output file is in the list of files (not yet on the batch).
    const listed = async () => (await client.files.list()).data.find((f) => f.filename === `${batch.id}_output.jsonl`)!;
    const during = await listed();
    expect(held).toBe(true);
    expect(during.bytes).toBeGreaterThan(0);
    const done = await client.batches.retrieve(batch.id);
    expect(done.output_file_id).toBe(during.id);
    const text = await (await client.files.content(during.id)).text();
    expect(text.split('\n').filter(Boolean)).toHaveLength(3);
    expect(during.bytes).toBeLessThan(Buffer.byteLength(text));
    // Asked again once the batch has ended, the size is the whole file's (and from then on stored).
    expect((await client.files.retrieve(during.id)).bytes).toBe(Buffer.byteLength(text));
    expect((await listed()).bytes).toBe(Buffer.byteLength(text));
  });

  // The runner's rounds are the same code on either driver (the conformance suite pages
  // batchesActive on both): run once, on SQLite.
  it.skipIf(process.env.FOREMAN_TEST_DRIVER === 'postgres')('with more active batches than the runner looks at in a turn, every one is submitted without waiting for the poll', async () => {
    // A poll far longer than the test: the runner must go round again by itself while lines are left.
    const { h, client } = await setup({ pollIntervalMs: 60_000 });
    // The batches are all there before the runner's first look.
    await h.service.batches.stop();
    // 32 batches of 100 lines (four chunks of 32 lines or fewer) fill the first page; the 33rd, of
    // one line, is done in its first turn, while the others still have lines left.
    const file = await upload(client, Array.from({ length: 100 }, (_, i) => chatLine(`l${i}`, `line ${i}`)));
    const create = async (id: string) => (await client.batches.create({ input_file_id: id, endpoint: '/v1/chat/completions', completion_window: '24h' })).id;
    const ids = [];
    for (let i = 0; i < 32; i++) ids.push(await create(file.id));
    ids.push(await create((await upload(client, [chatLine('one', 'only line')])).id));
    h.service.batches.start();
    await until('every line of the 33 batches to be a job', async () => (await rowCount(h, 'jobs')) === 32 * 100 + 1, 20_000);
    expect((await Promise.all(ids.map(async (id) => (await client.batches.retrieve(id)).request_counts?.total))).reduce((s, n) => s! + n!, 0)).toBe(32 * 100 + 1);
  });
});
