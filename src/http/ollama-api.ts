import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from '@sinclair/typebox';
import type { FastifyReply } from 'fastify';
import { isTerminal } from '../domain.js';
import { EngineError, type ChatResponse } from '../engine/engine.js';
import type { JobEvent } from '../events.js';
import { uuidv7 } from '../ids.js';
import { VERSION } from '../version.js';
import { ApiError } from './errors.js';
import { SECURITY_HEADERS } from './headers.js';
import { SSE_BUFFER_MAX } from './sse.js';
import { EngineFields, Message } from './schemas.js';
import type { AppDeps } from './deps.js';

/**
 * Ollama's request shape, as its clients send it. Unknown fields are ignored, as Ollama does;
 * Foreman's webhook fields are not honoured here (ADR-0008). `priority` is the one extra.
 */
const ChatBody = Type.Object(
  {
    ...EngineFields,
    messages: Type.Array(Message, { maxItems: 10_000 }),
    stream: Type.Optional(Type.Boolean()),
    priority: Type.Optional(Type.Integer({ minimum: -1000, maximum: 1000 })),
  },
  { additionalProperties: true },
);

/** Direct model loads (`/api/chat` with no messages) at once, and how long one may wait for a turn. */
const LOADS_AT_ONCE = 2;
const LOAD_WAIT_MS = 10_000;

/** A counting semaphore whose waiters give up after a timeout. */
class Semaphore {
  private waiters: (() => void)[] = [];
  constructor(private free: number) {}

  acquire(timeoutMs: number): Promise<boolean> {
    if (this.free > 0) {
      this.free--;
      return Promise.resolve(true);
    }
    return new Promise((resolve) => {
      const grant = () => {
        clearTimeout(timer);
        resolve(true);
      };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== grant);
        resolve(false);
      }, timeoutMs);
      this.waiters.push(grant);
    });
  }

  release(): void {
    const next = this.waiters.shift();
    if (next) next();
    else this.free++;
  }
}

/** Maps a failed job's error code to the HTTP status Ollama would have answered. */
function statusFor(code: string): number {
  if (code === 'model_not_found') return 404;
  if (code === 'engine_bad_request' || code === 'validation_failed') return 400;
  if (code === 'engine_busy') return 503;
  return 500;
}

/** Ollama's final chunk, from the stored result (so `done` is only sent once it is durable). */
function finalChunk(result: ChatResponse): Record<string, unknown> {
  const { foreman: _f, message, ...rest } = result as ChatResponse & { foreman?: unknown };
  return { ...rest, message: { role: message.role, content: '' } };
}

function nonStreamResult(result: ChatResponse): Record<string, unknown> {
  const { foreman: _f, ...rest } = result as ChatResponse & { foreman?: unknown };
  return rest;
}

/**
 * The Ollama-compatible synchronous surface. `POST /api/chat` becomes a job in the same queue
 * (priority, concurrency, record) and answers exactly as Ollama does, streaming NDJSON or one
 * JSON object. A client that disconnects cancels its job. Reads pass through to the engine.
 */
export const ollamaRoutes: FastifyPluginAsyncTypebox<AppDeps> = async (app, deps) => {
  const { jobs, events } = deps;
  // Loads asked for directly (empty messages) bypass the queue: at most LOADS_AT_ONCE run at a
  // time, on the pass-through engine client, so they can never take the worker's connections
  // (hardening finding 8). More wait briefly, then get 503.
  const loads = new Semaphore(LOADS_AT_ONCE);

  app.post(
    '/api/chat',
    {
      schema: {
        summary: 'Ollama-compatible chat, queued through Foreman',
        body: ChatBody,
        response: { 200: Type.Unknown({ description: 'Ollama chat response (NDJSON stream or one object)' }) },
      },
    },
    async (req, reply) => {
      const body = req.body as typeof req.body & { stream?: boolean; priority?: number };
      const stream = body.stream !== false; // Ollama's default
      if (body.messages.length === 0) {
        // A load request: answered by the engine directly, as Ollama does.
        if (!(await loads.acquire(LOAD_WAIT_MS))) {
          throw new ApiError(503, 'engine_busy', `${LOADS_AT_ONCE} model loads are already running; try again shortly`, undefined, { 'retry-after': '5' });
        }
        try {
          await deps.pool.load(body.model, { keepAlive: body.keep_alive, signal: AbortSignal.timeout(deps.config.engineIdleTimeoutMs) });
        } catch (err) {
          if (err instanceof EngineError) return (reply as FastifyReply).code(statusFor(err.code)).send({ error: err.message, code: err.code, message: err.message });
          throw err;
        } finally {
          loads.release();
        }
        return { model: body.model, created_at: new Date().toISOString(), message: { role: 'assistant', content: '' }, done: true, done_reason: 'load' };
      }
      const id = uuidv7();
      // Subscribe before the job exists, so no event can be missed.
      const queue: JobEvent[] = [];
      let wake: (() => void) | null = null;
      const unsubscribe = events.subscribe(id, (e) => {
        queue.push(e);
        wake?.();
      });
      let finished = false;
      const cancelIfGone = () => {
        if (finished) return;
        jobs.cancelQuietly(id).then(
          (canceled) => canceled && req.log.info({ job_id: id, state: 'canceled' }, 'client went away; job canceled'),
          (err: unknown) => req.log.error({ err, job_id: id }, 'could not cancel the job of a client that went away'),
        );
      };
      reply.raw.on('close', cancelIfGone);
      try {
        const continueFrom = req.headers['x-foreman-continue-from'];
        await jobs.submit({
          id,
          refuseOverDaily: true,
          body,
          // Conversations through the queue (ADR-0016): the header names the job this continues.
          ...(typeof continueFrom === 'string' && continueFrom !== '' ? { continueFrom } : {}),
          webhookUrl: null,
          webhookEvents: null,
          metadata: { source: 'api/chat' },
          priority: body.priority ?? 0,
          deadline: undefined,
          idempotencyKey: undefined,
        }, req.principal);
      } catch (err) {
        finished = true;
        unsubscribe();
        throw err;
      }
      reply.header('x-foreman-job-id', id);
      const next = async (): Promise<JobEvent> => {
        while (queue.length === 0) await new Promise<void>((r) => (wake = r));
        wake = null;
        return queue.shift()!;
      };
      let sentDelta = false;
      // Stream headers go out with the first chunk, so a job that fails before generating
      // (unknown model, bad request) gets Ollama's status code and {"error"} body.
      const write = (line: unknown) => {
        if (!reply.sent) {
          reply.hijack();
          reply.raw.writeHead(200, {
            ...SECURITY_HEADERS,
            'cache-control': 'no-store',
            'content-type': 'application/x-ndjson',
            'x-foreman-job-id': id,
            'x-request-id': req.id,
          });
        }
        reply.raw.write(`${JSON.stringify(line)}\n`);
        // A client that does not read is cut off once its unsent output passes the cap (its job is then canceled).
        if (reply.raw.writableLength > SSE_BUFFER_MAX) reply.raw.destroy();
      };
      try {
        let sawWorking = false;
        for (;;) {
          const e = await next();
          if (e.type === 'delta') {
            if (!stream || e.chunk.done) continue;
            write(e.chunk);
            sentDelta = true;
            continue;
          }
          const s = e.event.state;
          if (s === 'working') sawWorking = true;
          if (s === 'queued' && sawWorking && sentDelta) {
            // The generation was interrupted and will start over: an Ollama stream cannot take
            // that back, so end it with an error, as Ollama does mid-stream, and stop the job.
            finished = true;
            await jobs.cancelQuietly(id);
            write({ error: 'the generation was interrupted; try again' });
            reply.raw.end();
            return reply;
          }
          if (!isTerminal(s)) continue;
          finished = true;
          const job = (await jobs.find(id, req.principal))!;
          if (s === 'done') {
            const result = job.result as ChatResponse;
            if (stream) {
              write(finalChunk(result));
              reply.raw.end();
              return reply;
            }
            return reply.code(200).header('content-type', 'application/json; charset=utf-8').send(nonStreamResult(result));
          }
          const err = job.error ?? { code: 'canceled', message: 'the job was canceled' };
          if (stream && reply.sent) {
            write({ error: err.message });
            reply.raw.end();
            return reply;
          }
          return (reply as FastifyReply).code(statusFor(err.code)).send({ error: err.message, code: err.code, message: err.message });
        }
      } finally {
        unsubscribe();
      }
    },
  );

  // The pool's view (ADR-0012): every healthy host's models, merged.
  const noHost = () => new ApiError(502, 'engine_unavailable', 'no engine host answers right now');
  app.get('/api/tags', { schema: { summary: 'Installed models of every answering engine host (of every instance), deduplicated by name' } }, async () => {
    const { answering, models } = deps.cluster.installed();
    if (!answering) throw noHost();
    return { models };
  });
  app.get('/api/ps', { schema: { summary: 'Resident models of every healthy engine host, each with its host (`engine`)' } }, async () => {
    if (!deps.pool.hosts.some((h) => h.usable)) throw noHost();
    return deps.pool.ps();
  });
  app.get('/api/version', { schema: { summary: "Foreman's version, and each engine host's" } }, async () => ({
    version: VERSION,
    engines: deps.pool.hosts.map((h) => ({ name: h.name, version: h.version, health: h.usable ? 'up' : 'down' })),
  }));
};
