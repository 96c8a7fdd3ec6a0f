import { Readable } from 'node:stream';
import multipart from '@fastify/multipart';
import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from '@sinclair/typebox';
import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { isTerminal } from '../domain.js';
import type { ChatResponse } from '../engine/engine.js';
import { NotFound, QuotaExceeded, Validation } from '../errors.js';
import { uuidv7 } from '../ids.js';
import type { ChatPlan, EmbedPlan, EmbedResult } from '../jobs/openai.js';
import {
  batchObject,
  chatCompletion,
  chatUsage,
  chunkBase,
  embeddingsResponse,
  errorType,
  fileObject,
  finishReason,
  mapChat,
  mapEmbed,
  openAiToolCall,
  statusOfJobError,
} from '../jobs/openai.js';
import { installedModels } from '../jobs/models.js';
import type { Principal } from '../jobs/principal.js';
import type { AppDeps } from './deps.js';
import { ApiError, toApiError } from './errors.js';
import { watchJob } from './job-watch.js';
import { SSE_BUFFER_MAX, SSE_HEADERS } from './sse.js';

/** OpenAI's error body: `{"error": {message, type, param, code}}`. */
function openAiError(api: ApiError) {
  return { error: { message: api.message, type: errorType(api.statusCode), param: api.field ?? null, code: api.code } };
}

const Body = Type.Unknown({ description: "OpenAI's request body (see ADR-0015 for what maps to Ollama)" });
const IdParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 128 }) });
const ListQuery = Type.Object(
  {
    after: Type.Optional(Type.String({ minLength: 1, maxLength: 128 })),
    limit: Type.Optional(Type.String({ pattern: '^[0-9]{1,5}$' })),
    purpose: Type.Optional(Type.String({ maxLength: 32 })),
    order: Type.Optional(Type.Literal('desc')),
  },
  { additionalProperties: false },
);

/**
 * The OpenAI-compatible surface under /v1 (ADR-0015): chat completions, embeddings, models,
 * files and batches. Every request is a Foreman job in the same queue (priority, fair share,
 * quotas, records). Errors are OpenAI-shaped, mapped here from the one domain-error mapping
 * (`toApiError`). Register with `prefix: '/v1'`.
 */
export const openAiRoutes: FastifyPluginAsyncTypebox<AppDeps> = async (app, deps) => {
  const { jobs, events, files, batches } = deps;

  app.setErrorHandler((err: FastifyError, req: FastifyRequest, reply: FastifyReply) => {
    const api = toApiError(err);
    if (api.statusCode >= 500) req.log.error({ err }, 'request failed');
    else req.log.info({ code: api.code, field: api.field }, api.message);
    void reply.code(api.statusCode).headers(api.headers).send(openAiError(api));
  });
  app.setNotFoundHandler((req, reply) => {
    void reply.code(404).send(openAiError(new ApiError(404, 'route_not_found', `Invalid URL (${req.method} ${req.url.split('?')[0]?.slice(0, 200)})`)));
  });
  // Multipart only here (POST /v1/files): the upload streams, never buffered whole.
  await app.register(multipart, {
    limits: { fileSize: deps.config.batchMaxBytes, files: 1, fields: 8, fieldSize: 1024, parts: 16, headerPairs: 100 },
  });

  /**
   * Submits a job and yields its events; a client that goes away cancels it (as on /api/chat).
   * Past the key's daily_limit the synchronous surface refuses (429) rather than schedule.
   */
  async function submitWatched(
    req: FastifyRequest,
    reply: FastifyReply,
    kind: 'chat' | 'embed',
    plan: ChatPlan | EmbedPlan,
    source: string,
  ): Promise<{ id: string; watch: ReturnType<typeof watchJob>; done: () => void }> {
    const id = uuidv7();
    const watch = watchJob(events, id);
    let finished = false;
    reply.raw.on('close', () => {
      if (finished) return;
      jobs.cancelQuietly(id).then(
        (canceled) => canceled && req.log.info({ job_id: id, state: 'canceled' }, 'client went away; job canceled'),
        (err: unknown) => req.log.error({ err, job_id: id }, 'could not cancel the job of a client that went away'),
      );
    });
    const done = () => {
      finished = true;
      watch.close();
    };
    try {
      const metadata = { ...('metadata' in plan ? (plan.metadata ?? {}) : {}), source };
      const submitted = await jobs.submit(
        {
          id,
          kind,
          body: plan.request,
          webhookUrl: null,
          webhookEvents: null,
          metadata,
          priority: plan.priority ?? 0,
          deadline: undefined,
          idempotencyKey: undefined,
        },
        req.principal,
      );
      if (submitted.state === 'scheduled') {
        await jobs.cancelQuietly(id);
        const wait = Math.max(1, Math.ceil(((submitted.scheduledFor ?? 0) - deps.clock.now()) / 1000));
        throw new QuotaExceeded('quota_exceeded', "this API key reached its daily_limit; this endpoint can't wait for the next UTC day (POST /v1/batches or POST /jobs schedule it instead)", undefined, wait);
      }
    } catch (err) {
      done();
      throw err;
    }
    reply.header('x-foreman-job-id', id);
    return { id, watch, done };
  }

  /** Waits for the job's end; throws the job's error as the HTTP error the request would have had. */
  async function outcome(id: string, who: Principal, watch: ReturnType<typeof watchJob>) {
    for (;;) {
      const e = await watch.next();
      if (e.type !== 'state' || !isTerminal(e.event.state)) continue;
      const job = (await jobs.find(id, who))!;
      if (e.event.state === 'done') return job;
      const err = job.error ?? { code: 'canceled', message: 'the job was canceled' };
      throw new ApiError(statusOfJobError(err.code), err.code, err.message);
    }
  }

  app.post('/chat/completions', { schema: { summary: 'OpenAI chat completions, queued through Foreman', body: Body } }, async (req, reply) => {
    const plan = mapChat(req.body);
    const { id, watch, done } = await submitWatched(req, reply, 'chat', plan, 'v1/chat/completions');
    try {
      if (!plan.stream) {
        const job = await outcome(id, req.principal, watch);
        done();
        return chatCompletion(id, job.createdAt, plan.model, job.result as ChatResponse);
      }
      return await streamChat(req, reply, id, plan, watch, done);
    } finally {
      done();
    }
  });

  /** SSE `data:` chunks as OpenAI streams them, then `data: [DONE]`; headers go with the first chunk. */
  async function streamChat(req: FastifyRequest, reply: FastifyReply, id: string, plan: ChatPlan, watch: ReturnType<typeof watchJob>, done: () => void) {
    let created = deps.clock.now();
    const base = () => chunkBase(id, created, plan.model);
    const usageNull = plan.includeUsage ? { usage: null } : {};
    const raw = reply.raw;
    const write = (data: unknown) => {
      if (!reply.sent) {
        reply.hijack();
        raw.writeHead(200, { ...SSE_HEADERS, 'x-foreman-job-id': id, 'x-request-id': req.id });
      }
      raw.write(`data: ${typeof data === 'string' ? data : JSON.stringify(data)}\n\n`);
      // A client that does not read is cut off (its job is then canceled).
      if (raw.writableLength > SSE_BUFFER_MAX) raw.destroy();
    };
    const delta = (d: Record<string, unknown>, finish: string | null = null) =>
      write({ ...base(), choices: [{ index: 0, delta: d, logprobs: null, finish_reason: finish }], ...usageNull });
    let roleSent = false;
    let toolIndex = 0;
    let sawWorking = false;
    const sendRole = () => {
      if (roleSent) return;
      roleSent = true;
      delta({ role: 'assistant', content: '' });
    };
    for (;;) {
      const e = await watch.next();
      if (e.type === 'delta') {
        const m = e.chunk.message;
        if (e.chunk.done || !m) continue;
        if (m.content) {
          sendRole();
          delta({ content: m.content });
        }
        if (m.tool_calls && m.tool_calls.length > 0) {
          sendRole();
          delta({ tool_calls: m.tool_calls.map((c) => ({ index: toolIndex, ...openAiToolCall(id, toolIndex++, c) })) });
        }
        continue;
      }
      const s = e.event.state;
      if (s === 'queued' && e.event.n === 1) created = e.event.at;
      if (s === 'working') sawWorking = true;
      if (s === 'queued' && sawWorking && roleSent) {
        // The generation was interrupted and will start over: a stream cannot take back what it
        // sent, so it ends with an error and the job is stopped (as /api/chat does).
        done();
        await jobs.cancelQuietly(id);
        write({ error: { message: 'the generation was interrupted; try again', type: 'server_error', param: null, code: 'interrupted' } });
        raw.end();
        return reply;
      }
      if (!isTerminal(s)) continue;
      done();
      const job = (await jobs.find(id, req.principal))!;
      if (s === 'done') {
        const result = job.result as ChatResponse;
        sendRole();
        delta({}, finishReason(result));
        if (plan.includeUsage) write({ ...base(), choices: [], usage: chatUsage(result) });
        write('[DONE]');
        raw.end();
        return reply;
      }
      const err = job.error ?? { code: 'canceled', message: 'the job was canceled' };
      const api = new ApiError(statusOfJobError(err.code), err.code, err.message);
      if (!reply.sent) throw api;
      write(openAiError(api));
      raw.end();
      return reply;
    }
  }

  app.post('/embeddings', { schema: { summary: 'OpenAI embeddings, queued through Foreman', body: Body } }, async (req, reply) => {
    const plan = mapEmbed(req.body);
    const { id, watch, done } = await submitWatched(req, reply, 'embed', plan, 'v1/embeddings');
    try {
      const job = await outcome(id, req.principal, watch);
      done();
      return embeddingsResponse(plan.model, job.result as EmbedResult, plan.encoding);
    } finally {
      done();
    }
  });

  app.get('/models', { schema: { summary: 'Models installed on the engine' } }, async () => ({
    object: 'list' as const,
    data: installedModels(deps.cluster).map((m) => ({ id: m.id, object: 'model' as const, created: m.created, owned_by: m.ownedBy })),
  }));

  app.get('/models/:model', { schema: { summary: 'One installed model (a name with "/" is sent percent-encoded)', params: Type.Object({ model: Type.String({ minLength: 1, maxLength: 256 }) }) } }, async (req) => {
    const name = req.params.model;
    const wanted = name.includes(':') ? [name] : [name, `${name}:latest`];
    const m = installedModels(deps.cluster).find((x) => wanted.includes(x.id));
    if (!m) throw new NotFound('model_not_found', `The model '${name.slice(0, 200)}' does not exist`, 'model');
    return { id: m.id, object: 'model' as const, created: m.created, owned_by: m.ownedBy };
  });

  // --- files ---

  /** The file part's bytes; past FOREMAN_BATCH_MAX_BYTES the plugin truncates it: that is a 413, before the cut line is read. */
  async function* capped(file: AsyncIterable<Buffer> & { truncated?: boolean }): AsyncGenerator<Buffer> {
    for await (const chunk of file) yield chunk;
    if (file.truncated) {
      throw new ApiError(413, 'file_too_large', `the file is larger than FOREMAN_BATCH_MAX_BYTES (${deps.config.batchMaxBytes} bytes); nothing was stored`, 'file');
    }
  }

  app.post('/files', { schema: { summary: 'Upload a JSONL batch input file (multipart: file, purpose=batch)' } }, async (req) => {
    if (!req.isMultipart()) throw new ApiError(415, 'unsupported_media_type', 'send multipart/form-data with a file part and purpose=batch');
    let purpose: string | undefined;
    let uploaded: Awaited<ReturnType<typeof files.upload>> | null = null;
    try {
      for await (const part of req.parts()) {
        if (part.type === 'field') {
          if (part.fieldname === 'purpose') purpose = String(part.value);
          continue;
        }
        if (part.fieldname !== 'file') throw new Validation(`unexpected file part ${JSON.stringify(part.fieldname.slice(0, 40))}: send it as "file"`, part.fieldname.slice(0, 40));
        if (purpose !== undefined && purpose !== 'batch') throw new Validation('purpose must be "batch"', 'purpose', 'invalid_value');
        if (uploaded) throw new Validation('send one file per upload', 'file');
        uploaded = await files.upload(capped(part.file), part.filename || 'upload.jsonl', req.principal);
      }
    } catch (err) {
      if (uploaded) await files.remove(uploaded.seq);
      const code = (err as { code?: string }).code;
      if (code === 'FST_REQ_FILE_TOO_LARGE') throw new ApiError(413, 'file_too_large', `the file is larger than FOREMAN_BATCH_MAX_BYTES (${deps.config.batchMaxBytes} bytes); nothing was stored`, 'file');
      if (code === 'FST_PARTS_LIMIT' || code === 'FST_FILES_LIMIT' || code === 'FST_FIELDS_LIMIT') throw new ApiError(400, 'invalid_request', (err as Error).message, 'file');
      throw err;
    }
    if (!uploaded) throw new Validation('the upload has no file part', 'file', 'missing_required_parameter');
    if (purpose !== 'batch') {
      await files.remove(uploaded.seq);
      throw new Validation(purpose === undefined ? 'purpose is required ("batch")' : 'purpose must be "batch"', 'purpose', purpose === undefined ? 'missing_required_parameter' : 'invalid_value');
    }
    req.log.info({ file_id: uploaded.id, lines: uploaded.lines, bytes: uploaded.bytes }, 'file uploaded');
    return fileObject(uploaded);
  });

  app.get('/files', { schema: { summary: 'Files, newest first', querystring: ListQuery } }, async (req) => {
    const q = req.query;
    const page = await files.list({ limit: q.limit === undefined ? 10_000 : Number(q.limit), ...(q.after ? { after: q.after } : {}), ...(q.purpose ? { purpose: q.purpose } : {}) }, req.principal);
    const data = page.files.map(fileObject);
    return { object: 'list' as const, data, first_id: data[0]?.id ?? null, last_id: data[data.length - 1]?.id ?? null, has_more: page.hasMore };
  });

  app.get('/files/:id', { schema: { summary: "A file's metadata", params: IdParams } }, async (req) => fileObject(await files.get(req.params.id, req.principal)));

  app.get('/files/:id/content', { schema: { summary: "A file's content (JSONL; a batch's output while it runs: what has finished)", params: IdParams } }, async (req, reply) => {
    const lines = await files.content(req.params.id, req.principal);
    return reply.type('application/jsonl; charset=utf-8').send(Readable.from(lines));
  });

  app.delete('/files/:id', { schema: { summary: 'Delete a file', params: IdParams } }, async (req) => {
    await files.delete(req.params.id, req.principal);
    return { id: req.params.id, object: 'file' as const, deleted: true };
  });

  // --- batches ---

  app.post('/batches', { schema: { summary: 'Create a batch: every line of the input file becomes a job', body: Body } }, async (req) => {
    const b = req.body;
    if (b === null || typeof b !== 'object' || Array.isArray(b)) throw new Validation('the body must be a JSON object', 'body', 'invalid_type');
    const body = b as Record<string, unknown>;
    for (const k of Object.keys(body)) {
      if (!['input_file_id', 'endpoint', 'completion_window', 'metadata', 'webhook_url', 'priority', 'output_expires_after'].includes(k)) {
        throw new Validation(`${k} is not a parameter this server supports`, k, 'unsupported_parameter');
      }
    }
    if (body.output_expires_after !== undefined) throw new Validation('output_expires_after is not supported: outputs are kept for FOREMAN_BATCH_TTL', 'output_expires_after', 'unsupported_parameter');
    for (const k of ['input_file_id', 'endpoint', 'completion_window'] as const) {
      if (typeof body[k] !== 'string') throw new Validation(body[k] === undefined ? `you must provide ${k}` : `${k} must be a string`, k, body[k] === undefined ? 'missing_required_parameter' : 'invalid_type');
    }
    if (body.webhook_url !== undefined && typeof body.webhook_url !== 'string') throw new Validation('webhook_url must be a string', 'webhook_url', 'invalid_type');
    const priority = body.priority;
    if (priority !== undefined && !(Number.isInteger(priority) && (priority as number) >= -1000 && (priority as number) <= 1000)) {
      throw new Validation('priority must be an integer from -1000 to 1000', 'priority', 'invalid_value');
    }
    const batch = await batches.create(
      {
        inputFileId: body.input_file_id as string,
        endpoint: body.endpoint as string,
        completionWindow: body.completion_window as string,
        metadata: body.metadata,
        webhookUrl: body.webhook_url as string | undefined,
        priority: priority as number | undefined,
      },
      req.principal,
    );
    return batchObject(batch);
  });

  app.get('/batches/:id', { schema: { summary: 'A batch', params: IdParams } }, async (req) => batchObject(await batches.get(req.params.id, req.principal)));

  app.get('/batches', { schema: { summary: 'Batches, newest first', querystring: ListQuery } }, async (req) => {
    const q = req.query;
    const page = await batches.list({ limit: q.limit === undefined ? 20 : Number(q.limit), ...(q.after ? { after: q.after } : {}) }, req.principal);
    const data = page.batches.map(batchObject);
    return { object: 'list' as const, data, first_id: data[0]?.id ?? null, last_id: data[data.length - 1]?.id ?? null, has_more: page.hasMore };
  });

  app.post('/batches/:id/cancel', { schema: { summary: 'Cancel a batch: queued requests are cancelled, running ones finish', params: IdParams } }, async (req) =>
    batchObject(await batches.cancel(req.params.id, req.principal)),
  );
};
