/**
 * Streaming and compatibility surfaces: Server-Sent Events (GET /jobs/:id/events), the
 * Ollama-compatible /api/* routes (exercised with the official `ollama` client and raw HTTP),
 * and the OpenAPI document.
 */
import http from 'node:http';
import { VERSION } from '../src/version.js';
import { Validator } from '@seriousme/openapi-schema-validator';
import { Ollama } from 'ollama';
import pg from 'pg';
import { request } from 'undici';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { defaultChunks } from './support/fake-ollama.js';
import { hello, startHarness, type Harness } from './support/harness.js';
import { createDatabase } from './support/postgres.js';
import { sleep, until } from './support/util.js';

// ---------------------------------------------------------------------------
// A minimal SSE client over node:http that records every frame as it arrives.

interface SseFrame {
  /** 'comment' for `: ...` lines, otherwise the event name ('message' when absent). */
  type: string;
  id?: string;
  data?: any;
  comment?: string;
  at: number;
}

class SseClient {
  readonly frames: SseFrame[] = [];
  ended = false;
  /** Resolves when the server ends the stream (or the connection closes). */
  readonly done: Promise<void>;
  private buf = '';
  private waiters = new Set<() => void>();
  private resolveDone!: () => void;

  private constructor(
    readonly status: number,
    readonly headers: http.IncomingHttpHeaders,
    private readonly req: http.ClientRequest,
    readonly res: http.IncomingMessage,
  ) {
    this.done = new Promise((r) => (this.resolveDone = r));
    res.setEncoding('utf8');
    res.on('data', (d: string) => this.feed(d));
    const finish = () => {
      if (this.ended) return;
      this.ended = true;
      this.resolveDone();
      this.notify();
    };
    res.on('end', finish);
    res.on('close', finish);
    res.on('error', finish);
  }

  /** Connects; rejects if the response headers have not arrived within headersTimeoutMs. */
  static open(url: string, headers: Record<string, string> = {}, headersTimeoutMs = 5_000): Promise<SseClient> {
    return new Promise((resolve, reject) => {
      const req = http.get(url, { headers: { accept: 'text/event-stream', ...headers } }, (res) => {
        clearTimeout(timer);
        resolve(new SseClient(res.statusCode ?? 0, res.headers, req, res));
      });
      const timer = setTimeout(() => {
        req.destroy();
        reject(new Error(`no response headers from ${url} within ${headersTimeoutMs}ms`));
      }, headersTimeoutMs);
      req.on('error', (e) => {
        clearTimeout(timer);
        reject(e);
      });
    });
  }

  private feed(text: string): void {
    this.buf += text;
    for (;;) {
      const i = this.buf.indexOf('\n\n');
      if (i < 0) break;
      const block = this.buf.slice(0, i);
      this.buf = this.buf.slice(i + 2);
      this.parse(block);
    }
    this.notify();
  }

  private parse(block: string): void {
    const at = Date.now();
    let type = 'message';
    let id: string | undefined;
    const data: string[] = [];
    let sawField = false;
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) {
        this.frames.push({ type: 'comment', comment: line.slice(1).trim(), at });
        continue;
      }
      const c = line.indexOf(':');
      const field = c < 0 ? line : line.slice(0, c);
      let value = c < 0 ? '' : line.slice(c + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      sawField = true;
      if (field === 'event') type = value;
      else if (field === 'id') id = value;
      else if (field === 'data') data.push(value);
      else throw new Error(`unexpected SSE field ${JSON.stringify(field)} in ${JSON.stringify(block)}`);
    }
    if (!sawField) return;
    const raw = data.join('\n');
    let parsed: unknown = raw;
    try {
      parsed = JSON.parse(raw);
    } catch {
      /* keep the raw text */
    }
    this.frames.push({ type, ...(id !== undefined ? { id } : {}), data: parsed, at });
  }

  private notify(): void {
    for (const w of [...this.waiters]) w();
  }

  /** Resolves with the first frame matching pred (already received or future). */
  waitFor(pred: (f: SseFrame) => boolean, what: string, timeoutMs = 5_000): Promise<SseFrame> {
    return new Promise((resolve, reject) => {
      const check = (): boolean => {
        const f = this.frames.find(pred);
        if (f) {
          cleanup();
          resolve(f);
          return true;
        }
        if (this.ended) {
          cleanup();
          reject(new Error(`SSE stream ended before ${what}; frames: ${JSON.stringify(this.frames)}`));
          return true;
        }
        return false;
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new Error(`timed out waiting for ${what}; frames: ${JSON.stringify(this.frames)}`));
      }, timeoutMs);
      const cleanup = () => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      if (check()) return;
      this.waiters.add(check);
    });
  }

  /** Waits for the server to end the stream. */
  async ends(timeoutMs = 5_000): Promise<void> {
    let t: NodeJS.Timeout | undefined;
    await Promise.race([
      this.done,
      new Promise<never>((_, rej) => {
        t = setTimeout(() => rej(new Error(`SSE stream did not end in ${timeoutMs}ms; frames: ${JSON.stringify(this.frames)}`)), timeoutMs);
      }),
    ]).finally(() => clearTimeout(t));
  }

  /** Client-side disconnect. */
  close(): void {
    this.req.destroy();
    this.res.destroy();
  }

  states(): SseFrame[] {
    return this.frames.filter((f) => f.type === 'state');
  }
  deltas(): SseFrame[] {
    return this.frames.filter((f) => f.type === 'delta');
  }
  /** Every non-comment frame, in order, as [type, id?, state?]. */
  events(): SseFrame[] {
    return this.frames.filter((f) => f.type !== 'comment');
  }
}

const ISO = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;
const EXPECTED_CONTENT = (text: string) => `echo: ${text}`;
const THINKING = 'Let me think.';

function joined(frames: SseFrame[], key: 'content' | 'thinking'): string {
  return frames.map((f) => (f.data?.[key] as string | undefined) ?? '').join('');
}

/** Checks a state frame's exact shape. */
function expectState(f: SseFrame | undefined, jobId: string, n: number, state: string, attempt: number): void {
  expect(f, `state frame ${n}`).toBeDefined();
  expect(f!.type).toBe('state');
  expect(f!.id).toBe(String(n));
  // Terminal events also say how the run went (ADR-0016).
  const run = ['done', 'failed', 'canceled'].includes(state)
    ? ['conversation_id', 'duration_ms', 'finished_at', 'load_ms', 'model', 'queue_ms', 'started_at', 'usage']
    : [];
  expect(Object.keys(f!.data).filter((k) => k !== 'error').sort()).toEqual(['at', 'attempt', 'job_id', 'state', ...run].sort());
  if (run.length > 0) {
    expect(f!.data.conversation_id).toBe(jobId);
    expect(f!.data.finished_at).toBe(f!.data.at);
  }
  expect(f!.data.job_id).toBe(jobId);
  expect(f!.data.state).toBe(state);
  expect(f!.data.attempt).toBe(attempt);
  expect(f!.data.at).toMatch(ISO);
}

/** Reads NDJSON lines from an undici body as they arrive. */
async function* ndjsonLines(body: AsyncIterable<Buffer | string>): AsyncGenerator<any> {
  let buf = '';
  for await (const chunk of body) {
    buf += typeof chunk === 'string' ? chunk : chunk.toString('utf8');
    for (;;) {
      const i = buf.indexOf('\n');
      if (i < 0) break;
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (line.trim()) yield JSON.parse(line);
    }
  }
  if (buf.trim()) yield JSON.parse(buf);
}

const chatRequestsFor = (h: Harness, text: string) =>
  h.fake.requests.filter((r) => r.kind === 'chat' && r.body?.messages?.at(-1)?.content === text);

// ---------------------------------------------------------------------------

describe('SSE: GET /jobs/:id/events', () => {
  let h: Harness;
  const open: SseClient[] = [];
  const sse = async (id: string, headers: Record<string, string> = {}) => {
    const c = await SseClient.open(`${h.url}/jobs/${id}/events`, headers);
    open.push(c);
    return c;
  };
  beforeAll(async () => {
    h = await startHarness({ engineIdleTimeoutMs: 30_000 });
  });
  afterEach(() => {
    for (const c of open.splice(0)) c.close();
    h.fake.setLoadDelay(0);
  });
  afterAll(async () => {
    await h.stop();
  });

  it('streams queued, loading, working, the deltas, done, then ends', async () => {
    // The engine holds its first byte until the watcher is attached (deltas are live only).
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    h.fake.enqueue({ kind: 'ok', chunkDelayMs: 30, gate });
    const id = await h.submit(hello('hello world'));
    const c = await sse(id);
    release();
    expect(c.status).toBe(200);
    expect(c.headers['content-type']).toMatch(/^text\/event-stream\b/);
    expect(c.headers['cache-control']).toBe('no-store');
    await c.ends(10_000);

    const ev = c.events();
    expectState(ev[0], id, 1, 'queued', 0);
    expectState(ev[1], id, 2, 'loading', 1);
    expectState(ev[2], id, 3, 'working', 1);
    const last = ev[ev.length - 1];
    expectState(last, id, 4, 'done', 1);
    const middle = ev.slice(3, -1);
    // Between working and done: only deltas, one per chunk the engine streamed, no ids.
    expect(middle.map((f) => f.type)).toEqual(defaultChunks('hello world').map(() => 'delta'));
    for (const f of middle) {
      expect(f.id).toBeUndefined();
      expect(Object.keys(f.data).length).toBe(1);
    }
    expect(middle.map((f) => f.data)).toEqual(defaultChunks('hello world'));
    expect(joined(middle, 'content')).toBe(EXPECTED_CONTENT('hello world'));
    expect(joined(middle, 'thinking')).toBe(THINKING);
    expect(c.frames.filter((f) => f.type === 'comment')).toEqual([]); // keep-alive is 15 s by default
    expect(c.ended).toBe(true);
    // The server dropped its subscription once the stream ended.
    await until('watcher unsubscribed', async () => h.service.events.watchers(id) === 0);
  });

  it('answers 404 job_not_found for an unknown job', async () => {
    const r = await h.api('/jobs/0190c0de-0000-7000-8000-000000000000/events');
    expect(r.status).toBe(404);
    expect(r.headers.get('content-type')).toMatch(/^application\/json/);
    expect(r.body.code).toBe('job_not_found');
    expect(typeof r.body.message).toBe('string');
  });

  it('rejects a malformed Last-Event-ID', async () => {
    const id = await h.submit(hello('bad last id'));
    await h.waitForState(id, ['done']);
    const r = await h.api(`/jobs/${id}/events`, { headers: { 'last-event-id': 'abc' } });
    expect(r.status).toBe(400);
    expect(r.body.code).toBe('validation_failed');
  });

  it('resumes a finished job after Last-Event-ID: 2 with exactly working and done, no deltas', async () => {
    const id = await h.submit(hello('resume me'));
    await h.waitForState(id, ['done']);
    const c = await sse(id, { 'last-event-id': '2' });
    expect(c.status).toBe(200);
    await c.ends(2_000);
    const ev = c.events();
    expect(ev.length).toBe(2);
    expectState(ev[0], id, 3, 'working', 1);
    expectState(ev[1], id, 4, 'done', 1);
    expect(c.deltas()).toEqual([]);
  });

  it('ends at once after Last-Event-ID: 4 on a finished job', async () => {
    const id = await h.submit(hello('all seen'));
    await h.waitForState(id, ['done']);
    const t0 = Date.now();
    const c = await sse(id, { 'last-event-id': '4' });
    expect(c.status).toBe(200);
    await c.ends(1_000);
    expect(Date.now() - t0).toBeLessThan(1_000);
    expect(c.frames).toEqual([]);
  });

  it('resumes mid-job without losing a state event', async () => {
    // The engine holds its first byte until the second watcher is attached (deltas are live only).
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    h.fake.setLoadDelay(400);
    h.fake.enqueue({ kind: 'ok', chunkDelayMs: 30, gate });
    const id = await h.submit(hello('mid job'));
    const first = await sse(id);
    await first.waitFor((f) => f.id === '2', 'state 2');
    first.close();
    expect(first.states().map((f) => f.id)).toEqual(['1', '2']);
    // The server notices the disconnect and drops the watcher.
    await until('first watcher gone', async () => h.service.events.watchers(id) === 0, 2_000);

    const second = await sse(id, { 'last-event-id': '2' });
    release();
    await second.ends(10_000);
    const states = second.states();
    expect(states.length).toBe(2);
    expectState(states[0], id, 3, 'working', 1);
    expectState(states[1], id, 4, 'done', 1);
    // Reconnected while the model was still loading: every token is seen after `working`.
    const ev = second.events();
    expect(ev[0]!.type).toBe('state');
    expect(ev[ev.length - 1]!.type).toBe('state');
    expect(joined(second.deltas(), 'content')).toBe(EXPECTED_CONTENT('mid job'));
    expect(joined(second.deltas(), 'thinking')).toBe(THINKING);
  });

  it('a failed state carries the job error', async () => {
    const id = await h.submit({ ...hello('no such model'), model: 'llama9' });
    const c = await sse(id);
    await c.ends(5_000);
    const states = c.states();
    // No engine host has the model: it fails from the queue, without a load (ADR-0012).
    expect(states.map((f) => f.data.state)).toEqual(['queued', 'failed']);
    const failed = states[1]!;
    expect(failed.id).toBe('2');
    expect(failed.data.error.code).toBe('model_not_found');
    expect(failed.data.error.message).toContain("model 'llama9' not found");
  });

  it('sends the response headers at once when there is nothing to replay', async () => {
    // A resume while nothing new has happened (Last-Event-ID = the job's last state) must still
    // get its 200 and headers promptly, not only with the first keep-alive (15 s by default).
    h.fake.enqueue({ kind: 'hang' });
    const id = await h.submit(hello('nothing new'));
    await h.waitForState(id, ['working']);
    try {
      const c = await SseClient.open(`${h.url}/jobs/${id}/events`, { 'last-event-id': '3' }, 1_000);
      open.push(c);
      expect(c.status).toBe(200);
      expect(c.headers['content-type']).toMatch(/^text\/event-stream\b/);
      expect((await h.api(`/jobs/${id}/cancel`, { method: 'POST' })).status).toBe(200);
      await c.ends(2_000);
      expect(c.events().length).toBe(1);
      expectState(c.events()[0], id, 4, 'canceled', 1);
    } finally {
      await h.api(`/jobs/${id}/cancel`, { method: 'POST' });
    }
  });

  it('fans one engine stream out to 10 watchers', async () => {
    // Hold the single slot so the watched job is still queued when the watchers attach.
    h.fake.enqueue({ kind: 'hang' }, { kind: 'ok', chunkDelayMs: 20 });
    const blocker = await h.submit(hello('blocker'));
    await h.waitForState(blocker, ['working']);
    const text = 'ten watchers';
    const id = await h.submit(hello(text));
    expect((await h.api(`/jobs/${id}`)).body.state).toBe('queued');

    const watchers = await Promise.all(Array.from({ length: 10 }, () => sse(id)));
    for (const w of watchers) await w.waitFor((f) => f.id === '1', 'queued');
    expect(h.service.events.watchers(id)).toBe(10);

    expect((await h.api(`/jobs/${blocker}/cancel`, { method: 'POST' })).status).toBe(200);
    await Promise.all(watchers.map((w) => w.ends(10_000)));

    const reference = watchers[0]!.events().map((f) => ({ type: f.type, id: f.id, data: f.data }));
    expect(reference.filter((f) => f.type === 'state').map((f) => f.data.state)).toEqual(['queued', 'loading', 'working', 'done']);
    expect(joined(watchers[0]!.deltas(), 'content')).toBe(EXPECTED_CONTENT(text));
    expect(joined(watchers[0]!.deltas(), 'thinking')).toBe(THINKING);
    expect(watchers[0]!.deltas().length).toBe(defaultChunks(text).length);
    for (const w of watchers.slice(1)) {
      expect(w.events().map((f) => ({ type: f.type, id: f.id, data: f.data }))).toEqual(reference);
    }
    expect(chatRequestsFor(h, text).length).toBe(1);
    await until('all watchers gone', async () => h.service.events.watchers(id) === 0, 2_000);
  });
});

describe('SSE: the generation starts while `working` commits (PostgreSQL, the commit held back)', () => {
  let h: Harness;
  let db: { url: string; drop: () => Promise<void> };
  const open: SseClient[] = [];
  beforeAll(async () => {
    db = await createDatabase();
    h = await startHarness({ engineIdleTimeoutMs: 30_000, databaseUrl: db.url });
  });
  afterAll(async () => {
    for (const c of open.splice(0)) c.close();
    await h.stop();
    await db.drop();
  });

  it('streams no delta before `working`, though every chunk came while its commit waited', async () => {
    h.fake.setLoadDelay(400);
    h.fake.enqueue({ kind: 'ok', chunkDelayMs: 0 });
    const id = await h.submit(hello('held back'));
    const c = await SseClient.open(`${h.url}/jobs/${id}/events`);
    open.push(c);
    await until('loading', async () => c.states().length >= 2);
    // The job's row locked by another session while the model loads: `working` waits for it.
    const blocker = new pg.Client({ connectionString: db.url });
    await blocker.connect();
    try {
      await blocker.query('BEGIN');
      await blocker.query('SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE', [id]);
      // The generation ran meanwhile: the engine answered in full, and nothing reached the watcher.
      await until('the engine answered', async () => h.fake.requests.some((r) => r.kind === 'chat' && r.body?.messages?.at(-1)?.content === 'held back'));
      await sleep(600);
      expect(c.events().map((f) => (f.type === 'delta' ? 'delta' : f.data.state))).toEqual(['queued', 'loading']);
      await blocker.query('ROLLBACK');
    } finally {
      await blocker.end();
    }
    await c.ends(10_000);
    expect(c.events().map((f) => (f.type === 'delta' ? 'delta' : f.data.state))).toEqual([
      'queued',
      'loading',
      'working',
      ...defaultChunks('held back').map(() => 'delta'),
      'done',
    ]);
    expect(c.deltas().map((f) => f.data)).toEqual(defaultChunks('held back'));
  });
});

describe('A slot is free once the engine has answered (PostgreSQL, the save held back)', () => {
  let h: Harness;
  let db: { url: string; drop: () => Promise<void> };
  beforeAll(async () => {
    db = await createDatabase();
    h = await startHarness({ concurrency: 1, engineIdleTimeoutMs: 30_000, databaseUrl: db.url });
  });
  afterAll(async () => {
    await h.stop();
    await db.drop();
  });

  it("the next job's generation runs while the previous one's result is saved, never beside its generation", async () => {
    h.fake.enqueue({ kind: 'ok', chunkDelayMs: 100 }, { kind: 'ok', chunkDelayMs: 0 });
    const a = await h.submit(hello('first'));
    const b = await h.submit(hello('second'));
    const state = async (id: string) => ((await h.api(`/jobs/${id}`)).body as { state: string }).state;
    await until('first working', async () => (await state(a)) === 'working');
    // The first job's row locked by another session: its save waits once its generation ends.
    const blocker = new pg.Client({ connectionString: db.url });
    await blocker.connect();
    try {
      await blocker.query('BEGIN');
      await blocker.query('SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE', [a]);
      // The second job is claimed, loaded and generated meanwhile, on the one slot.
      await h.fake.waitForRequests(1, (r) => r.kind === 'chat' && r.body?.messages?.at(-1)?.content === 'second', 10_000);
      expect(await state(a)).toBe('working');
      await blocker.query('ROLLBACK');
    } finally {
      await blocker.end();
    }
    await until('both done', async () => (await state(a)) === 'done' && (await state(b)) === 'done');
    // One request at a time on the host all along: the slot was the engine's, not the save's.
    expect(h.fake.stats.maxConcurrent).toBe(1);
  });
});

describe('SSE keep-alive and cancel', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ sseKeepaliveMs: 100, engineIdleTimeoutMs: 30_000 });
  });
  afterAll(async () => {
    await h.stop();
  });

  it('sends keep-alive comments while a job is stuck, then canceled and the end', async () => {
    h.fake.enqueue({ kind: 'hang' });
    const id = await h.submit(hello('stuck'));
    await h.waitForState(id, ['working']);
    const c = await SseClient.open(`${h.url}/jobs/${id}/events`);
    try {
      const opened = Date.now();
      const ka = await c.waitFor((f) => f.type === 'comment', 'a keep-alive comment', 500);
      expect(ka.comment).toBe('keep-alive');
      expect(ka.at - opened).toBeLessThan(500);
      // More than one arrives, roughly every 100 ms.
      await until('a second keep-alive', async () => c.frames.filter((f) => f.type === 'comment').length >= 2, 1_000);

      const r = await h.api(`/jobs/${id}/cancel`, { method: 'POST' });
      expect(r.status).toBe(200);
      expect(r.body).toEqual({ job_id: id, state: 'canceled' });
      await c.ends(2_000);
      const states = c.states();
      expect(states.map((f) => f.data.state)).toEqual(['queued', 'loading', 'working', 'canceled']);
      expectState(states[3], id, 4, 'canceled', 1);
      expect(c.deltas()).toEqual([]);
      // Nothing after the terminal state.
      expect(c.frames[c.frames.length - 1]!.type).toBe('state');
      await h.fake.waitForRequests(1, (q) => q.kind === 'chat' && q.aborted, 2_000);
    } finally {
      c.close();
    }
  });

  it('ends the stream at the terminal state even when Last-Event-ID is beyond the log', async () => {
    // A client may hold an id from another job or an older database: the stream must still end
    // when this job finishes, not stay open forever on keep-alives. (The 100 ms keep-alive gets
    // the headers out, so this does not depend on the header flush tested above.)
    h.fake.enqueue({ kind: 'hang' });
    const id = await h.submit(hello('id beyond the log'));
    await h.waitForState(id, ['working']);
    const c = await SseClient.open(`${h.url}/jobs/${id}/events`, { 'last-event-id': '9' }, 1_000);
    try {
      expect(c.status).toBe(200);
      await c.waitFor((f) => f.type === 'comment', 'a keep-alive', 1_000);
      expect((await h.api(`/jobs/${id}/cancel`, { method: 'POST' })).status).toBe(200);
      await c.ends(1_000);
      expect(c.events()).toEqual([]);
    } finally {
      c.close();
    }
  });
});

// ---------------------------------------------------------------------------

describe('Ollama-compatible /api/* with the official ollama client', () => {
  let h: Harness;
  let ollama: Ollama;
  beforeAll(async () => {
    h = await startHarness({ engineIdleTimeoutMs: 30_000 });
    ollama = new Ollama({ host: h.url });
  });
  afterAll(async () => {
    await h.stop();
  });

  it('chat stream:false answers as Ollama does', async () => {
    const res = await ollama.chat({ model: 'llama3.2', messages: [{ role: 'user', content: 'hello world' }], stream: false });
    expect(res.message.role).toBe('assistant');
    expect(res.message.content).toBe('echo: hello world');
    expect(res.message.thinking).toBe(THINKING);
    expect(res.done).toBe(true);
    expect(res.done_reason).toBe('stop');
    expect(res.model).toBe('llama3.2');
    expect(res.eval_count).toBe(defaultChunks('hello world').length);
    expect(res.prompt_eval_count).toBe(169);
    expect(res.total_duration).toBe(182242375);
    expect((res as unknown as Record<string, unknown>).foreman).toBeUndefined();
  });

  it('chat stream:true streams the parts, ending with done', async () => {
    const parts: any[] = [];
    const it = await ollama.chat({ model: 'llama3.2', messages: [{ role: 'user', content: 'hello world' }], stream: true });
    for await (const p of it) parts.push(p);
    expect(parts.length).toBe(defaultChunks('hello world').length + 1);
    expect(parts.map((p) => p.message.content).join('')).toBe('echo: hello world');
    expect(parts.map((p) => p.message.thinking ?? '').join('')).toBe(THINKING);
    for (const p of parts.slice(0, -1)) expect(p.done).toBe(false);
    const last = parts[parts.length - 1];
    expect(last.done).toBe(true);
    expect(last.done_reason).toBe('stop');
    expect(last.eval_count).toBe(defaultChunks('hello world').length);
    expect(last.message).toEqual({ role: 'assistant', content: '' });
  });

  it('made each call a job, listed under metadata.source=api/chat', async () => {
    const r = await h.api('/jobs?metadata.source=api/chat');
    expect(r.status).toBe(200);
    expect(r.body.jobs.length).toBe(2);
    for (const j of r.body.jobs) {
      expect(j.state).toBe('done');
      expect(j.model).toBe('llama3.2');
      expect(j.metadata).toEqual({ source: 'api/chat' });
    }
  });

  for (const stream of [false, true] as const) {
    it(`an unknown model throws ResponseError 404 (stream:${stream})`, async () => {
      let err: any;
      try {
        const r = await ollama.chat({ model: 'llama9', messages: [{ role: 'user', content: 'hi' }], stream: stream as any });
        if (stream) for await (const _ of r as AsyncIterable<unknown>) void _;
      } catch (e) {
        err = e;
      }
      expect(err, 'the client threw').toBeDefined();
      expect(err.name).toBe('ResponseError');
      expect(err.status_code).toBe(404);
      expect(String(err.message)).toContain("model 'llama9' not found");
    });
  }

  it('the llama9 calls are failed jobs with model_not_found', async () => {
    const r = await h.api('/jobs?metadata.source=api/chat&state=failed');
    expect(r.body.jobs.length).toBe(2);
    for (const j of r.body.jobs) expect(j.model).toBe('llama9');
  });

  it('list(), ps() and version() answer for the pool of engine hosts (ADR-0012)', async () => {
    const tags = await ollama.list();
    expect(tags.models.map((m) => m.name).sort()).toEqual(['llama3.2:latest', 'qwen3:latest']);
    const direct = await (await fetch(`${h.fake.url}/api/tags`)).json();
    expect(JSON.parse(JSON.stringify(tags))).toEqual(direct);
    await h.service.pool.probeAll(); // /api/ps is the pool's view, refreshed by its probes
    const ps = await ollama.ps();
    expect(ps.models.map((m) => [m.name, (m as unknown as { engine: string }).engine])).toEqual([['llama3.2:latest', new URL(h.fake.url).host]]);
    const v = await ollama.version();
    expect(v).toEqual({ version: VERSION, engines: [{ name: new URL(h.fake.url).host, version: '0.33.0', health: 'up' }] });
  });

  it('cancels the job when the streaming client disconnects', async () => {
    const text = 'disconnect me';
    h.fake.enqueue({ kind: 'ok', chunkDelayMs: 200 });
    const ac = new AbortController();
    const res = await request(`${h.url}/api/chat`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(hello(text, { stream: true })),
      signal: ac.signal,
    });
    expect(res.statusCode).toBe(200);
    expect(res.headers['content-type']).toBe('application/x-ndjson');
    const jobId = res.headers['x-foreman-job-id'] as string;
    expect(jobId).toMatch(/^[0-9a-f-]{36}$/);
    const lines = ndjsonLines(res.body);
    const first = await lines.next();
    expect(first.done).toBe(false);
    expect(first.value.done).toBe(false);
    expect(first.value.message.thinking).toBe('Let ');
    ac.abort();
    await lines.return(undefined).catch(() => undefined);

    const job = await h.waitForState(jobId, ['canceled', 'done', 'failed'], 5_000);
    expect(job.state).toBe('canceled');
    expect(job.metadata).toEqual({ source: 'api/chat' });
    await h.fake.waitForRequests(1, (q) => q.kind === 'chat' && q.body?.messages?.at(-1)?.content === text && q.aborted, 3_000);
    expect(chatRequestsFor(h, text).length).toBe(1);
  });
});

describe('/api/chat goes through the queue', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ concurrency: 1, engineIdleTimeoutMs: 30_000 });
  });
  afterAll(async () => {
    await h.stop();
  });

  it('a client that leaves while its job is queued cancels the job before it runs', async () => {
    h.fake.enqueue({ kind: 'hang' });
    const blocker = await h.submit(hello('hog again'));
    await h.waitForState(blocker, ['working']);
    const ac = new AbortController();
    const pending = request(`${h.url}/api/chat`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(hello('leave early', { stream: true })),
      signal: ac.signal,
    }).catch((e: unknown) => e);
    const queued = await until('the queued /api/chat job', async () => {
      const r = await h.api('/jobs?state=queued');
      return r.body.jobs.find((j: any) => j.metadata?.source === 'api/chat');
    });
    ac.abort();
    expect(await pending).toBeInstanceOf(Error);
    const job = await h.waitForState(queued.job_id, ['canceled', 'done', 'failed'], 3_000);
    expect(job.state).toBe('canceled');
    expect(job.started_at).toBeNull();
    expect((await h.api(`/jobs/${blocker}/cancel`, { method: 'POST' })).status).toBe(200);
    await h.waitForState(blocker, ['canceled']);
    await sleep(100);
    expect(chatRequestsFor(h, 'leave early').length).toBe(0);
  });

  it('a stream interrupted by an engine retry ends with an error line and the job is canceled', async () => {
    // Only the failing behaviour: the job is canceled before a second attempt would run.
    h.fake.enqueue({ kind: 'error_mid_stream', after: 2, error: 'boom' });
    const res = await request(`${h.url}/api/chat`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(hello('interrupted', { stream: true })),
    });
    expect(res.statusCode).toBe(200);
    const jobId = res.headers['x-foreman-job-id'] as string;
    const lines: any[] = [];
    for await (const l of ndjsonLines(res.body)) lines.push(l);
    expect(lines.length).toBe(3);
    expect(lines.slice(0, 2).map((l) => l.message.thinking)).toEqual(['Let ', 'me ']);
    expect(lines[2]).toEqual({ error: 'the generation was interrupted; try again' });
    const job = await h.waitForState(jobId, ['canceled', 'done', 'failed']);
    expect(job.state).toBe('canceled');
    expect(job.transitions.map((t: any) => t.state)).toEqual(['queued', 'loading', 'working', 'queued', 'canceled']);
    await sleep(100);
    expect(chatRequestsFor(h, 'interrupted').length).toBe(1);
  });

  it('a non-streaming call survives an engine retry and answers once', async () => {
    h.fake.enqueue({ kind: 'error_mid_stream', after: 2, error: 'boom' }, { kind: 'ok' });
    const r = await h.api('/api/chat', { method: 'POST', json: hello('retried', { stream: false }) });
    expect(r.status).toBe(200);
    expect(r.body.message.content).toBe('echo: retried');
    expect(r.body.message.thinking).toBe(THINKING);
    const job = (await h.api(`/jobs/${r.headers.get('x-foreman-job-id')}`)).body;
    expect(job.state).toBe('done');
    expect(job.attempt).toBe(2);
    expect(chatRequestsFor(h, 'retried').length).toBe(2);
  });

  it('waits for a free slot, then answers', async () => {
    h.fake.enqueue({ kind: 'hang' });
    const blocker = await h.submit(hello('hog the slot'));
    await h.waitForState(blocker, ['working']);

    let settled = false;
    const call = h
      .api('/api/chat', { method: 'POST', json: hello('queued chat', { stream: false }) })
      .finally(() => (settled = true));
    const queued = await until('the /api/chat job queued', async () => {
      const r = await h.api('/jobs?state=queued');
      return r.body.jobs.find((j: any) => j.metadata?.source === 'api/chat');
    });
    expect(queued.state).toBe('queued');
    await sleep(300);
    expect(settled).toBe(false);
    expect((await h.api(`/jobs/${queued.job_id}`)).body.state).toBe('queued');
    expect(chatRequestsFor(h, 'queued chat').length).toBe(0);

    expect((await h.api(`/jobs/${blocker}/cancel`, { method: 'POST' })).status).toBe(200);
    const r = await call;
    expect(r.status).toBe(200);
    expect(r.headers.get('content-type')).toMatch(/^application\/json/);
    expect(r.headers.get('x-foreman-job-id')).toBe(queued.job_id);
    expect(r.body.message.content).toBe('echo: queued chat');
    expect(r.body.done).toBe(true);
    expect(r.body.done_reason).toBe('stop');
    const job = await h.waitForState(queued.job_id, ['done']);
    expect(Date.parse(job.started_at)).toBeGreaterThanOrEqual(Date.parse((await h.api(`/jobs/${blocker}`)).body.finished_at));
  });
});

// ---------------------------------------------------------------------------

describe('OpenAPI document and docs page', () => {
  let h: Harness;
  let doc: any;
  beforeAll(async () => {
    h = await startHarness();
    const r = await h.api('/openapi.json');
    expect(r.status).toBe(200);
    doc = r.body;
  });
  afterAll(async () => {
    await h.stop();
  });

  it('is a valid OpenAPI 3.1 document', async () => {
    expect(doc.openapi).toBe('3.1.0');
    const v = new Validator();
    const res = await v.validate(doc);
    expect(res.errors ?? null).toBeNull();
    expect(res.valid).toBe(true);
    expect(v.version).toBe('3.1');
  });

  const EXPECTED: Record<string, string[]> = {
    '/jobs': ['get', 'post'],
    '/jobs/{id}': ['get'],
    '/jobs/{id}/artifacts/{name}': ['get'],
    '/jobs/{id}/cancel': ['post'],
    '/jobs/{id}/events': ['get'],
    '/jobs/{id}/webhooks/redeliver': ['post'],
    '/conversations': ['get'],
    '/conversations/{id}': ['get'],
    '/api/chat': ['post'],
    '/api/tags': ['get'],
    '/api/ps': ['get'],
    '/api/version': ['get'],
    '/healthz': ['get'],
    '/readyz': ['get'],
    '/metrics': ['get'],
    '/keys': ['get', 'post'],
    '/engines': ['get'],
    '/keys/{id}': ['delete', 'get', 'patch'],
    '/usage': ['get'],
    '/audit': ['get'],
    // The OpenAI-compatible surface (ADR-0015).
    '/v1/chat/completions': ['post'],
    '/v1/embeddings': ['post'],
    '/v1/models': ['get'],
    '/v1/models/{model}': ['get'],
    '/v1/files': ['get', 'post'],
    '/v1/files/{id}': ['delete', 'get'],
    '/v1/files/{id}/content': ['get'],
    '/v1/batches': ['get', 'post'],
    '/v1/batches/{id}': ['get'],
    '/v1/batches/{id}/cancel': ['post'],
  };
  const METHODS = ['get', 'put', 'post', 'delete', 'options', 'head', 'patch', 'trace'];
  const documented = () =>
    Object.fromEntries(
      Object.entries(doc.paths as Record<string, Record<string, unknown>>).map(([p, item]) => [
        p,
        Object.keys(item)
          .filter((m) => METHODS.includes(m))
          .sort(),
      ]),
    );

  it('documents every route', () => {
    expect(documented()).toEqual(EXPECTED);
  });

  it("documents exactly the app's real routes", () => {
    // printRoutes() draws a tree: each line is one segment below its parent (4 columns per level),
    // with the methods of the route ending there in parentheses.
    const printed = h.service.app.printRoutes({ commonPrefix: false });
    const real: Record<string, string[]> = {};
    const stack: string[] = [];
    for (const line of printed.split('\n')) {
      const m = /^([│ ]*)[├└]── (.+?)(?: \(([A-Z, ]+)\))?$/.exec(line);
      if (!m) continue;
      const depth = m[1]!.length / 4;
      stack.length = depth;
      stack.push(m[2]!);
      if (!m[3]) continue;
      const p = stack.join('').replace(/:([A-Za-z_]+)/g, '{$1}');
      if (p === '/openapi.json' || p === '/docs' || p.startsWith('/docs/')) continue; // the docs themselves
      if (p === '/ui' || p.startsWith('/ui/')) continue; // the dashboard (ADR-0014), not part of the API
      const methods = m[3]
        .split(',')
        .map((s) => s.trim().toLowerCase())
        .filter((s) => s !== 'head'); // HEAD is Fastify's automatic twin of GET
      real[p] = [...new Set([...(real[p] ?? []), ...methods])].sort();
    }
    expect(Object.keys(real).length).toBeGreaterThanOrEqual(12);
    expect(real).toEqual(documented());
  });

  it('inlines the full error-code enum in every documented error response', () => {
    let seen = 0;
    for (const [p, item] of Object.entries(doc.paths as Record<string, any>)) {
      for (const [method, op] of Object.entries(item as Record<string, any>)) {
        for (const [status, resp] of Object.entries((op.responses ?? {}) as Record<string, any>)) {
          if (!/^[45]/.test(status)) continue;
          const schema = resp.content?.['application/json']?.schema;
          expect(schema, `${method} ${p} ${status}`).toBeDefined();
          expect(schema.required).toEqual(['code', 'message']);
          expect(schema.properties.code.enum).toEqual(expect.arrayContaining(['validation_failed', 'job_not_found', 'idempotency_key_reused']));
          seen++;
        }
      }
    }
    expect(seen).toBeGreaterThan(0);
  });

  it('has the Error schema the description points to, with its code enum', () => {
    // info.description says "the codes are listed in the Error schema": a reader looks for it in
    // components.schemas.
    expect(doc.info.description).toContain('Error schema');
    const schemas = doc.components?.schemas ?? {};
    expect(Object.keys(schemas), 'components.schemas').toContain('Error');
    const codes: string[] = schemas.Error.properties.code.enum;
    for (const c of ['validation_failed', 'job_not_found', 'idempotency_key_reused']) expect(codes).toContain(c);
  });

  it('describes the webhook event body under webhooks.jobStateChanged', () => {
    const hook = doc.webhooks?.jobStateChanged?.post;
    expect(hook).toBeDefined();
    const body = hook.requestBody.content['application/json'].schema;
    for (const k of ['event_id', 'type', 'job_id', 'state', 'sequence', 'occurred_at', 'metadata']) expect(Object.keys(body.properties)).toContain(k);
    expect(body.properties.sequence.type).toBe('integer');
    expect(body.properties.event_id.type).toBe('string');
    expect(body.required).toEqual(expect.arrayContaining(['event_id', 'state', 'sequence']));
    expect(hook.responses['200']).toBeDefined();
  });

  it('serves the docs page', async () => {
    const res = await fetch(`${h.url}/docs`, { redirect: 'follow' });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/html/);
    const html = await res.text();
    expect(html).toMatch(/swagger/i);
  });
});
