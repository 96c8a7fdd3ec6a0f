/**
 * Conversations through the queue (ADR-0016): continue_from, wait_for_previous, the
 * conversation resource, retention that keeps chains whole, the /api/chat header, and terminal
 * events that say how the run went.
 */
import { Ollama } from 'ollama';
import { describe, expect, it } from 'vitest';
import { hello, type Harness } from './support/harness.js';
import type { Receiver } from './support/receiver.js';
import { scoped } from './support/scoped.js';
import type { RecordedRequest } from './support/fake-ollama.js';
import { sleep } from './support/util.js';

const { harness, receiver } = scoped();

const user = (content: string) => ({ role: 'user', content });
const chats = (h: Harness): RecordedRequest[] => h.fake.requests.filter((r) => r.kind === 'chat');
const eventOf = (rcv: Receiver, id: string, state: string) => rcv.received.find((r) => r.event?.job_id === id && r.event.state === state)?.event;

describe('continue_from', () => {
  it('three turns through webhooks only: each turn sent on the previous done event, with exactly the whole history', async () => {
    const h = await harness();
    const rcv = await receiver();
    const toolCall = { function: { name: 'get_weather', arguments: { city: 'Paris' } } };
    h.fake.enqueue({ kind: 'ok', chunks: [{ content: 'Let me check.' }, { tool_calls: [toolCall] }] });
    const t1 = await h.submit({ model: 'llama3.2', messages: [user('weather in Paris?')], state_webhook_url: rcv.url });
    await rcv.waitFor((rs) => rs.some((r) => r.event?.job_id === t1 && r.event.state === 'done'));
    const done1 = eventOf(rcv, t1, 'done');
    // Turn 2: nothing but the id and the new message (a tool result); the model comes from turn 1.
    const r2 = await h.api('/jobs', {
      method: 'POST',
      json: { continue_from: t1, messages: [{ role: 'tool', content: '18 degrees', tool_name: 'get_weather' }], state_webhook_url: rcv.url },
    });
    expect(r2.status).toBe(202);
    const t2 = r2.body.job_id as string;
    await rcv.waitFor((rs) => rs.some((r) => r.event?.job_id === t2 && r.event.state === 'done'));
    const t3 = await h.submit({ continue_from: t2, messages: [user('and tomorrow?')], state_webhook_url: rcv.url } as never);
    await rcv.waitFor((rs) => rs.some((r) => r.event?.job_id === t3 && r.event.state === 'done'));

    const [c1, c2, c3] = chats(h);
    expect(c1!.body.messages).toEqual([user('weather in Paris?')]);
    const reply1 = { role: 'assistant', content: 'Let me check.', tool_calls: [toolCall] };
    expect(c2!.body.model).toBe('llama3.2');
    expect(c2!.body.messages).toEqual([user('weather in Paris?'), reply1, { role: 'tool', content: '18 degrees', tool_name: 'get_weather' }]);
    const j2 = (await h.api(`/jobs/${t2}`)).body;
    const reply2 = j2.result.message;
    expect(c3!.body.messages).toEqual([
      user('weather in Paris?'),
      reply1,
      { role: 'tool', content: '18 degrees', tool_name: 'get_weather' },
      reply2,
      user('and tomorrow?'),
    ]);

    // One conversation, shown in order; each job knows its place.
    expect(done1.conversation_id).toBe(t1);
    expect(j2).toMatchObject({ conversation_id: t1, continue_from: t1, model: 'llama3.2', waiting_for_previous: false });
    expect(eventOf(rcv, t3, 'done').conversation_id).toBe(t1);
    const conv = await h.api(`/conversations/${t1}`);
    expect(conv.status).toBe(200);
    expect(conv.body.status).toBe('idle');
    expect(conv.body.turns.map((t: any) => [t.job_id, t.state])).toEqual([
      [t1, 'done'],
      [t2, 'done'],
      [t3, 'done'],
    ]);
    expect(conv.body.turns.map((t: any) => t.messages)).toEqual([[user('weather in Paris?')], [{ role: 'tool', content: '18 degrees', tool_name: 'get_weather' }], [user('and tomorrow?')]]);
    expect(conv.body.turns[0].reply).toEqual(reply1);
    const listed = await h.api(`/jobs?conversation_id=${t1}`);
    expect(listed.body.jobs.map((j: any) => j.job_id)).toEqual([t3, t2, t1]);
  });

  it('a turn that is not done yet: 409 conversation_not_ready naming its state; unknown ids: 404', async () => {
    const h = await harness();
    h.fake.enqueue({ kind: 'hang' });
    const t1 = await h.submit(hello('slow'));
    await h.waitForState(t1, ['working']);
    const r = await h.api('/jobs', { method: 'POST', json: { continue_from: t1, messages: [user('next')] } });
    expect(r.status).toBe(409);
    expect(r.body).toMatchObject({ code: 'conversation_not_ready', field: 'continue_from' });
    expect(r.body.message).toContain('working');
    const unknown = await h.api('/jobs', { method: 'POST', json: { continue_from: '01a23016-b8e3-7000-8261-91d4c62b68ee', messages: [user('next')] } });
    expect(unknown.status).toBe(404);
    expect(unknown.body.code).toBe('job_not_found');
    const noModel = await h.api('/jobs', { method: 'POST', json: { messages: [user('next')] } });
    expect(noModel.status).toBe(400);
    expect(noModel.body.field).toBe('model');
    await h.api(`/jobs/${t1}/cancel`, { method: 'POST' });
  });

  it('wait_for_previous: queued at once, run once the earlier turn is done, with its reply in the history', async () => {
    const h = await harness();
    h.fake.enqueue({ kind: 'ok', chunkDelayMs: 100 });
    const t1 = await h.submit(hello('first'));
    const r = await h.api('/jobs', { method: 'POST', json: { continue_from: t1, wait_for_previous: true, messages: [user('second')] } });
    expect(r.status).toBe(202);
    const t2 = r.body.job_id as string;
    const waiting = (await h.api(`/jobs/${t2}`)).body;
    expect(waiting).toMatchObject({ state: 'queued', waiting_for_previous: true });
    const d2 = await h.waitForState(t2, ['done', 'failed'], 10_000);
    expect(d2.state).toBe('done');
    const j1 = (await h.api(`/jobs/${t1}`)).body;
    expect(Date.parse(d2.started_at)).toBeGreaterThanOrEqual(Date.parse(j1.finished_at));
    const last = chats(h).at(-1)!;
    expect(last.body.messages).toEqual([user('first'), j1.result.message, user('second')]);
  });

  it('wait_for_previous: when the earlier turn fails, the waiting turn fails previous_failed (and so does one waiting on it)', async () => {
    const h = await harness();
    const rcv = await receiver();
    h.fake.enqueue({ kind: 'http_error', status: 400, error: 'bad request from the engine' });
    h.fake.setLoadDelay(300);
    const t1 = await h.submit(hello('doomed'));
    const t2 = (await h.api('/jobs', { method: 'POST', json: { continue_from: t1, wait_for_previous: true, messages: [user('2')], state_webhook_url: rcv.url } })).body.job_id;
    const t3 = (await h.api('/jobs', { method: 'POST', json: { continue_from: t2, wait_for_previous: true, messages: [user('3')] } })).body.job_id;
    expect((await h.waitForState(t1, ['failed', 'done'])).state).toBe('failed');
    const f2 = await h.waitForState(t2, ['failed', 'done']);
    const f3 = await h.waitForState(t3, ['failed', 'done']);
    expect(f2.state).toBe('failed');
    expect(f2.error.code).toBe('previous_failed');
    expect(f2.error.message).toContain(t1);
    expect(f3.error.code).toBe('previous_failed');
    expect(chats(h)).toHaveLength(1); // neither waiting turn ever reached the engine
    await rcv.waitFor((rs) => rs.some((r) => r.event?.job_id === t2 && r.event.state === 'failed'));
    const ev = eventOf(rcv, t2, 'failed');
    expect(ev.error).toEqual(f2.error);
    expect(ev).toMatchObject({ started_at: null, duration_ms: null, attempt: 0, conversation_id: t1 });
    const conv = (await h.api(`/conversations/${t1}`)).body;
    expect(conv.status).toBe('failed');
  });
});

describe('retention', () => {
  it('the TTL never leaves a hole: earlier turns stay while a later one is kept; then everything goes, and a continuation answers 410', async () => {
    const h = await harness({ jobTtlMs: 1_000, sweepIntervalMs: 60_000 });
    const t1 = await h.submit(hello('old turn'));
    const d1 = await h.waitForState(t1, ['done']);
    // Turn 2 streams slowly (about 2 s), so it is kept well after turn 1 has expired.
    h.fake.enqueue({ kind: 'ok', chunkDelayMs: 200 });
    const t2 = (await h.api('/jobs', { method: 'POST', json: { continue_from: t1, messages: [user('new turn')] } })).body.job_id;
    await sleep(Math.max(0, Date.parse(d1.finished_at) + 1_300 - Date.now())); // turn 1 has expired
    await h.service.sweepNow();
    expect((await h.api(`/jobs/${t1}`)).status).toBe(200); // kept: turn 2 continues it
    const d2 = await h.waitForState(t2, ['done']);
    await sleep(Math.max(0, Date.parse(d2.finished_at) + 1_100 - Date.now())); // now turn 2 has expired too
    await h.service.sweepNow();
    expect((await h.api(`/jobs/${t2}`)).status).toBe(404);
    expect((await h.api(`/jobs/${t1}`)).status).toBe(404);
    expect((await h.api(`/conversations/${t1}`)).status).toBe(404);
    const gone = await h.api('/jobs', { method: 'POST', json: { continue_from: t2, messages: [user('too late')] } });
    expect(gone.status).toBe(410);
    expect(gone.body).toMatchObject({ code: 'conversation_expired', field: 'continue_from' });
  });
});

describe('conversations listing', () => {
  it('newest activity first, paged with the job listing cursors', async () => {
    const h = await harness();
    const a = await h.submit(hello('a'));
    const b = await h.submit(hello('b'));
    await h.waitForState(a, ['done']);
    const c = (await h.api('/jobs', { method: 'POST', json: { continue_from: a, messages: [user('a2')] } })).body.job_id;
    await h.waitForState(c, ['done']);
    await h.waitForState(b, ['done']);
    const p1 = await h.api('/conversations?limit=1');
    expect(p1.status).toBe(200);
    expect(p1.body.conversations.map((x: any) => [x.conversation_id, x.turns, x.last_job_id, x.last_state])).toEqual([[a, 2, c, 'done']]);
    expect(p1.body.conversations[0].url).toBe(`${h.url}/conversations/${a}`);
    const p2 = await h.api(`/conversations?limit=1&cursor=${p1.body.next_cursor}`);
    expect(p2.body.conversations.map((x: any) => x.conversation_id)).toEqual([b]);
    expect(p2.body.next_cursor).toBeNull();
    expect((await h.api('/conversations/no-such-conversation')).body.code).toBe('conversation_not_found');
  });
});

describe('/api/chat continuation', () => {
  it('the official ollama client continues a job with the X-Foreman-Continue-From header', async () => {
    const h = await harness();
    const t1 = await h.submit(hello('remember the number 7'));
    const j1 = await h.waitForState(t1, ['done']);
    const ollama = new Ollama({ host: h.url, headers: { 'X-Foreman-Continue-From': t1 } });
    const res = await ollama.chat({ model: 'llama3.2', messages: [user('which number?')] });
    expect(res.done).toBe(true);
    const last = chats(h).at(-1)!;
    expect(last.body.messages).toEqual([user('remember the number 7'), j1.result.message, user('which number?')]);
    const conv = (await h.api(`/conversations/${t1}`)).body;
    expect(conv.turns).toHaveLength(2);
  });
});

describe('terminal events say how the run went', () => {
  it('done (webhook and SSE replay) carries times, attempt, model, load time, token counts and the conversation, matching the job record', async () => {
    const h = await harness();
    const rcv = await receiver();
    const id = await h.submit(hello('measure me', { state_webhook_url: rcv.url }));
    await rcv.waitFor((rs) => rs.some((r) => r.event?.job_id === id && r.event.state === 'done'));
    const j = (await h.api(`/jobs/${id}`)).body;
    const ev = eventOf(rcv, id, 'done');
    const run = {
      started_at: j.started_at,
      finished_at: j.finished_at,
      duration_ms: Date.parse(j.finished_at) - Date.parse(j.started_at),
      queue_ms: Date.parse(j.started_at) - Date.parse(j.created_at),
      load_ms: j.result.foreman.load_ms,
      attempt: 1,
      model: 'llama3.2',
      usage: { prompt_tokens: 169, completion_tokens: j.result.eval_count },
      conversation_id: id,
    };
    expect(ev).toMatchObject(run);
    expect(j.load_ms).toBe(j.result.foreman.load_ms);
    expect(j.usage).toEqual(run.usage);
    expect(j.result.eval_count).toBeGreaterThan(0);
    // The same fields on the SSE terminal event (replayed after the end).
    const res = await fetch(`${h.url}/jobs/${id}/events`, { headers: { 'last-event-id': '3' } });
    const text = await res.text();
    const data = JSON.parse(/event: state\ndata: (.*)\n/.exec(text)![1]!);
    expect(data).toMatchObject({ state: 'done', ...run });
  });

  it('canceled while queued: no start, no duration, the queue time until the cancel', async () => {
    const h = await harness({ concurrency: 1 });
    const rcv = await receiver();
    h.fake.enqueue({ kind: 'hang' });
    const blocker = await h.submit(hello('blocker'));
    await h.waitForState(blocker, ['working']);
    const id = await h.submit(hello('never runs', { state_webhook_url: rcv.url }));
    await sleep(50);
    expect((await h.api(`/jobs/${id}/cancel`, { method: 'POST' })).status).toBe(200);
    await rcv.waitFor((rs) => rs.some((r) => r.event?.job_id === id && r.event.state === 'canceled'));
    const j = (await h.api(`/jobs/${id}`)).body;
    const ev = eventOf(rcv, id, 'canceled');
    expect(ev).toMatchObject({
      started_at: null,
      finished_at: j.finished_at,
      duration_ms: null,
      queue_ms: Date.parse(j.finished_at) - Date.parse(j.created_at),
      load_ms: null,
      attempt: 0,
      usage: { prompt_tokens: null, completion_tokens: null },
      conversation_id: id,
    });
    expect(ev.queue_ms).toBeGreaterThanOrEqual(50);
    await h.api(`/jobs/${blocker}/cancel`, { method: 'POST' });
  });
});
