import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startHarness, type Harness } from './support/harness.js';
import { fakeEmbedding } from './support/fake-ollama.js';
import { pollJob, sleep, until } from './support/util.js';

/**
 * The OpenAI-compatible surface (ADR-0015), driven by the official `openai` client against a real
 * server on port 0 and a protocol-faithful fake Ollama: every request is a job in the queue.
 */
let h: Harness;
let client: OpenAI;

beforeAll(async () => {
  h = await startHarness({ concurrency: 2 });
  client = new OpenAI({ baseURL: `${h.url}/v1`, apiKey: 'not-needed-auth-is-off', maxRetries: 0 });
});
afterAll(async () => {
  await h.stop();
});

const lastChat = () => h.fake.requests.filter((r) => r.kind === 'chat').at(-1)!;

describe('POST /v1/chat/completions', () => {
  it('answers in OpenAI\'s shape, maps every parameter to the Ollama request, and is a job', async () => {
    const r = await client.chat.completions
      .create({
        model: 'llama3.2',
        messages: [
          { role: 'developer', content: 'Be brief.' },
          { role: 'user', content: [{ type: 'text', text: 'hello there' }] },
        ],
        temperature: 0.5,
        top_p: 0.9,
        max_completion_tokens: 64,
        stop: ['\n\n'],
        seed: 7,
        reasoning_effort: 'low',
        metadata: { team: 'search' },
      })
      .withResponse();
    const c = r.data;
    const jobId = r.response.headers.get('x-foreman-job-id')!;
    expect(c).toEqual({
      id: `chatcmpl-${jobId}`,
      object: 'chat.completion',
      created: expect.any(Number),
      model: 'llama3.2',
      choices: [{ index: 0, message: { role: 'assistant', content: 'echo: hello there', refusal: null, annotations: [] }, logprobs: null, finish_reason: 'stop' }],
      // The fake streams 3 thinking and 3 content chunks; prompt_eval_count is fixed at 169.
      usage: { prompt_tokens: 169, completion_tokens: 6, total_tokens: 175 },
    });
    expect(lastChat().body).toEqual({
      model: 'llama3.2',
      messages: [
        { role: 'system', content: 'Be brief.' },
        { role: 'user', content: 'hello there' },
      ],
      options: { temperature: 0.5, top_p: 0.9, num_predict: 64, stop: ['\n\n'], seed: 7 },
      think: 'low',
      stream: true,
    });
    const job = await h.api(`/jobs/${jobId}`);
    expect(job.body).toMatchObject({ state: 'done', kind: 'chat', model: 'llama3.2', metadata: { team: 'search', source: 'v1/chat/completions' } });
  });

  it('streams SSE chunks, then usage (include_usage), then [DONE]', async () => {
    const stream = await client.chat.completions.create({
      model: 'llama3.2',
      messages: [{ role: 'user', content: 'stream me please' }],
      stream: true,
      stream_options: { include_usage: true },
    });
    const chunks: OpenAI.Chat.Completions.ChatCompletionChunk[] = [];
    for await (const c of stream) chunks.push(c);
    expect(new Set(chunks.map((c) => c.id)).size).toBe(1);
    expect(chunks.every((c) => c.object === 'chat.completion.chunk' && c.model === 'llama3.2')).toBe(true);
    expect(chunks[0]!.choices[0]!.delta).toEqual({ role: 'assistant', content: '' });
    const content = chunks.flatMap((c) => c.choices.map((ch) => ch.delta.content ?? '')).join('');
    expect(content).toBe('echo: stream me please');
    // 1 role chunk, 4 content chunks ("echo: ", "stream ", "me ", "please"), the finish chunk, the usage chunk.
    expect(chunks).toHaveLength(7);
    expect(chunks[5]!.choices).toEqual([{ index: 0, delta: {}, logprobs: null, finish_reason: 'stop' }]);
    expect(chunks.slice(0, 6).every((c) => c.usage === null)).toBe(true);
    expect(chunks[6]!.choices).toEqual([]);
    expect(chunks[6]!.usage).toEqual({ prompt_tokens: 169, completion_tokens: 7, total_tokens: 176 });
    // The raw stream ends with data: [DONE].
    const raw = await fetch(`${h.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: 'x' }], stream: true }),
    });
    expect(raw.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const text = await raw.text();
    expect(text.endsWith('data: [DONE]\n\n')).toBe(true);
    expect(text.split('\n\n').filter(Boolean).every((f) => f.startsWith('data: '))).toBe(true);
  });

  it('tools: the call comes back as tool_calls (non-stream and stream), and the tool result goes back with its name', async () => {
    const tools: OpenAI.Chat.Completions.ChatCompletionTool[] = [
      { type: 'function', function: { name: 'get_weather', description: 'Weather of a city', parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } } },
    ];
    h.fake.enqueue({ kind: 'ok', chunks: [{ tool_calls: [{ function: { name: 'get_weather', arguments: { city: 'Paris' } } }] }] });
    const c = await client.chat.completions.create({ model: 'llama3.2', messages: [{ role: 'user', content: 'Weather in Paris?' }], tools });
    const choice = c.choices[0]!;
    expect(choice.finish_reason).toBe('tool_calls');
    expect(choice.message.content).toBeNull();
    expect(choice.message.tool_calls).toEqual([{ id: expect.stringMatching(/^call_/), type: 'function', function: { name: 'get_weather', arguments: '{"city":"Paris"}' } }]);
    expect(lastChat().body.tools).toEqual([
      { type: 'function', function: { name: 'get_weather', description: 'Weather of a city', parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } } },
    ]);

    const call = choice.message.tool_calls![0]! as OpenAI.Chat.Completions.ChatCompletionMessageFunctionToolCall;
    await client.chat.completions.create({
      model: 'llama3.2',
      tools,
      messages: [
        { role: 'user', content: 'Weather in Paris?' },
        { role: 'assistant', content: null, tool_calls: [call] },
        { role: 'tool', tool_call_id: call.id, content: '18 °C, sunny' },
      ],
    });
    expect(lastChat().body.messages).toEqual([
      { role: 'user', content: 'Weather in Paris?' },
      { role: 'assistant', content: '', tool_calls: [{ function: { name: 'get_weather', arguments: { city: 'Paris' } } }] },
      { role: 'tool', content: '18 °C, sunny', tool_name: 'get_weather' },
    ]);

    h.fake.enqueue({ kind: 'ok', chunks: [{ tool_calls: [{ function: { name: 'get_weather', arguments: { city: 'Oslo' } } }] }] });
    const stream = await client.chat.completions.create({ model: 'llama3.2', messages: [{ role: 'user', content: 'Oslo?' }], tools, stream: true });
    const chunks: OpenAI.Chat.Completions.ChatCompletionChunk[] = [];
    for await (const ch of stream) chunks.push(ch);
    const calls = chunks.flatMap((ch) => ch.choices.flatMap((x) => x.delta.tool_calls ?? []));
    expect(calls).toEqual([{ index: 0, id: expect.stringMatching(/^call_/), type: 'function', function: { name: 'get_weather', arguments: '{"city":"Oslo"}' } }]);
    expect(chunks.at(-1)!.choices[0]!.finish_reason).toBe('tool_calls');
  });

  it('response_format json_schema becomes Ollama format; json_object becomes "json"; images go as base64', async () => {
    const schema = { type: 'object', properties: { answer: { type: 'integer' } }, required: ['answer'], additionalProperties: false };
    h.fake.enqueue({ kind: 'ok', chunks: [{ content: '{"answer":' }, { content: '42}' }] });
    const c = await client.chat.completions.create({
      model: 'llama3.2',
      messages: [{ role: 'user', content: 'The answer?' }],
      response_format: { type: 'json_schema', json_schema: { name: 'answer', schema, strict: true } },
    });
    expect(JSON.parse(c.choices[0]!.message.content!)).toEqual({ answer: 42 });
    expect(lastChat().body.format).toEqual(schema);

    await client.chat.completions.create({
      model: 'llama3.2',
      messages: [{ role: 'user', content: [{ type: 'text', text: 'What is this?' }, { type: 'image_url', image_url: { url: 'data:image/png;base64,iVBORw0KGgo=' } }] }],
      response_format: { type: 'json_object' },
    });
    expect(lastChat().body).toMatchObject({ format: 'json', messages: [{ role: 'user', content: 'What is this?', images: ['iVBORw0KGgo='] }] });
  });

  it('a parameter that cannot be mapped is a 400 naming it, in OpenAI\'s error shape; nothing is queued', async () => {
    const before = (await h.api('/jobs?limit=100')).body.jobs.length;
    const cases: [Record<string, unknown>, string, string][] = [
      [{ n: 2 }, 'n', 'unsupported_value'],
      [{ logit_bias: { '50256': -100 } }, 'logit_bias', 'unsupported_parameter'],
      [{ tool_choice: 'required' }, 'tool_choice', 'unsupported_value'],
      [{ audio: { voice: 'alloy', format: 'mp3' } }, 'audio', 'unsupported_parameter'],
      [{ temperature: 3 }, 'temperature', 'invalid_value'],
      [{ messages: [{ role: 'user', content: [{ type: 'image_url', image_url: { url: 'https://example.com/cat.png' } }] }] }, 'messages[0].content[0].image_url.url', 'unsupported_value'],
    ];
    for (const [extra, param, code] of cases) {
      const err = await client.chat.completions
        .create({ model: 'llama3.2', messages: [{ role: 'user', content: 'hi' }], ...extra } as never)
        .then(() => null, (e: unknown) => e);
      expect(err, param).toBeInstanceOf(OpenAI.BadRequestError);
      const e = err as InstanceType<typeof OpenAI.BadRequestError>;
      expect(e.status).toBe(400);
      expect(e.error).toEqual({ message: expect.stringContaining(param), type: 'invalid_request_error', param, code });
    }
    expect((await h.api('/jobs?limit=100')).body.jobs.length).toBe(before);
    const raw = await h.api('/v1/nowhere', { method: 'POST', json: {} });
    expect(raw.status).toBe(404);
    expect(raw.body).toEqual({ error: { message: 'Invalid URL (POST /v1/nowhere)', type: 'not_found_error', param: null, code: 'route_not_found' } });
  });

  it('an unknown model is a 404 NotFoundError (the job failed model_not_found)', async () => {
    const err = await client.chat.completions.create({ model: 'llama9', messages: [{ role: 'user', content: 'hi' }] }).then(
      () => null,
      (e: unknown) => e,
    );
    expect(err).toBeInstanceOf(OpenAI.NotFoundError);
    expect((err as InstanceType<typeof OpenAI.NotFoundError>).error).toMatchObject({ code: 'model_not_found', type: 'not_found_error', message: "model 'llama9' not found" });
  });

  it('a client that disconnects cancels its job (stream and not)', async () => {
    for (const stream of [true, false]) {
      h.fake.enqueue({ kind: 'ok', chunks: Array.from({ length: 200 }, (_, i) => ({ content: `t${i} ` })), chunkDelayMs: 20 });
      const ctl = new AbortController();
      const res = client.chat.completions
        .create({ model: 'llama3.2', messages: [{ role: 'user', content: `slow ${stream}` }], stream }, { signal: ctl.signal })
        .withResponse();
      const n = h.fake.requests.length;
      await h.fake.waitForRequests(1, (r) => r.kind === 'chat' && r.body.messages?.[0]?.content === `slow ${stream}` && h.fake.requests.indexOf(r) >= n);
      const id = await until('the job', async () => {
        const l = await h.api('/jobs?limit=5&state=working');
        return l.body.jobs[0]?.job_id as string | undefined;
      });
      if (stream) {
        const { data } = await res;
        for await (const _ of data as AsyncIterable<unknown>) break; // read one chunk, then go away
      }
      ctl.abort();
      await res.catch(() => undefined);
      const job = await pollJob(h, id, (j) => j.state === 'canceled', 'canceled');
      expect(job.state).toBe('canceled');
      await until('the engine request closed', async () => h.fake.requests.find((r) => r.body?.messages?.[0]?.content === `slow ${stream}`)?.aborted);
    }
  });
});

describe('POST /v1/embeddings', () => {
  it('string or array input; float (and the client\'s default base64, decoded) vectors; usage', async () => {
    // The client asks for base64 by default and decodes it: the floats must survive exactly.
    const r = await client.embeddings.create({ model: 'llama3.2', input: ['the first text', 'second'] }).withResponse();
    expect(r.data).toEqual({
      object: 'list',
      data: [
        { object: 'embedding', index: 0, embedding: fakeEmbedding('the first text') },
        { object: 'embedding', index: 1, embedding: fakeEmbedding('second') },
      ],
      model: 'llama3.2',
      usage: { prompt_tokens: 4, total_tokens: 4 },
    });
    const embedReq = h.fake.requests.filter((q) => q.kind === 'embed').at(-1)!;
    expect(embedReq.body).toEqual({ model: 'llama3.2', input: ['the first text', 'second'] });
    const jobId = r.response.headers.get('x-foreman-job-id')!;
    expect((await h.api(`/jobs/${jobId}`)).body).toMatchObject({ kind: 'embed', state: 'done', metadata: { source: 'v1/embeddings' } });

    const f = await client.embeddings.create({ model: 'llama3.2', input: 'one', encoding_format: 'float', dimensions: 4 });
    expect(f.data).toEqual([{ object: 'embedding', index: 0, embedding: fakeEmbedding('one', 4) }]);
    const raw = await h.api('/v1/embeddings', { method: 'POST', json: { model: 'llama3.2', input: 'one', encoding_format: 'base64' } });
    const b = Buffer.from(raw.body.data[0].embedding, 'base64');
    expect(Array.from({ length: b.length / 4 }, (_, i) => b.readFloatLE(i * 4))).toEqual(fakeEmbedding('one'));
  });

  it('token arrays and unknown parameters are refused naming them', async () => {
    const err = await client.embeddings.create({ model: 'llama3.2', input: [[1, 2, 3]] }).then(() => null, (e: unknown) => e);
    expect((err as InstanceType<typeof OpenAI.BadRequestError>).error).toMatchObject({ param: 'input', code: 'unsupported_value' });
  });
});

describe('GET /v1/models', () => {
  it('lists the installed models and retrieves one', async () => {
    const page = await client.models.list();
    expect(page.data).toEqual([
      { id: 'llama3.2:latest', object: 'model', created: Date.parse('2026-07-01T12:00:00.000Z') / 1000, owned_by: 'library' },
      { id: 'qwen3:latest', object: 'model', created: Date.parse('2026-07-01T12:00:00.000Z') / 1000, owned_by: 'library' },
    ]);
    expect(await client.models.retrieve('llama3.2')).toMatchObject({ id: 'llama3.2:latest', object: 'model' });
    await expect(client.models.retrieve('nope')).rejects.toBeInstanceOf(OpenAI.NotFoundError);
  });
});

describe('POST /jobs with kind embed', () => {
  it('runs /api/embed (loading the model with an empty input first); the completion artifact holds the vectors', async () => {
    const id = await h.submit({ kind: 'embed', model: 'qwen3', input: ['alpha beta', 'gamma'] });
    const job = await pollJob(h, id, (j) => j.state === 'done', 'done');
    expect(job.kind).toBe('embed');
    expect(job.result).toMatchObject({ model: 'qwen3', embeddings: [fakeEmbedding('alpha beta'), fakeEmbedding('gamma')], prompt_eval_count: 3 });
    const art = await h.api(`/jobs/${id}/artifacts/completion`);
    expect(art.body.embeddings).toEqual([fakeEmbedding('alpha beta'), fakeEmbedding('gamma')]);
    expect(job.usage).toEqual({ prompt_tokens: 3, completion_tokens: null });
    const reqs = h.fake.requests.filter((r) => r.path === '/api/embed' && r.body.model === 'qwen3');
    expect(reqs.map((r) => r.body.input)).toEqual([[], ['alpha beta', 'gamma']]);
    expect(h.fake.requests.some((r) => r.path === '/api/chat' && r.body.model === 'qwen3' && r.body.input !== undefined)).toBe(false);

    const bad = await h.api('/jobs', { method: 'POST', json: { kind: 'embed', model: 'qwen3', input: 'x', messages: [{ role: 'user', content: 'x' }] } });
    expect(bad.status).toBe(400);
    expect(bad.body).toMatchObject({ code: 'validation_failed', field: 'messages' });
    const noMessages = await h.api('/jobs', { method: 'POST', json: { model: 'qwen3' } });
    expect(noMessages.body).toMatchObject({ code: 'validation_failed', field: 'messages' });
    await sleep(0);
  });
});
