import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { Type } from '@sinclair/typebox';
import { iso, isTerminal, type JobState } from '../domain.js';
import type { JobEvent } from '../events.js';
import type { TransitionEvent } from '../queue/driver.js';
import { runFields } from '../webhooks/payload.js';
import { NotFound, Unavailable } from '../errors.js';
import { SECURITY_HEADERS } from './headers.js';
import { JobParams } from './schemas.js';
import type { AppDeps } from './deps.js';

/** Unsent output a watcher may have before it is dropped. */
export const SSE_BUFFER_MAX = 1024 * 1024;

export const SSE_HEADERS = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-store',
  connection: 'keep-alive',
  'x-accel-buffering': 'no',
  ...SECURITY_HEADERS,
};

/**
 * GET /jobs/<id>/events: Server-Sent Events. `state` events carry `id: <n>` (the transition's
 * place in the job's log), so `Last-Event-ID` resumes without losing any; `delta` events carry
 * tokens while the job is working (no id: they are not replayed). The stream ends after a
 * terminal state. Watchers read the worker's single engine stream through JobEvents.
 */
export const sseRoutes: FastifyPluginAsyncTypebox<AppDeps> = async (app, deps) => {
  const { jobs, events, config } = deps;

  app.get(
    '/jobs/:id/events',
    {
      schema: {
        summary: 'Server-Sent Events for one job',
        params: JobParams,
        headers: Type.Object({ 'last-event-id': Type.Optional(Type.String({ pattern: '^[0-9]{1,9}$' })) }),
        response: { 200: Type.String({ description: 'text/event-stream: `state` events (with id) and `delta` events' }) },
      },
    },
    async (req, reply) => {
      const job = await jobs.find(req.params.id, req.principal);
      if (!job) throw new NotFound('job_not_found', `no job with id ${JSON.stringify(req.params.id.slice(0, 80))}`);
      if (events.watchers(job.id) >= config.maxWatchersPerJob) {
        throw new Unavailable('too_many_watchers', `this job already has FOREMAN_MAX_WATCHERS_PER_JOB (${config.maxWatchersPerJob}) watchers; try again later`, undefined, 5);
      }
      const lastId = Number(req.headers['last-event-id'] ?? 0);
      const raw = reply.raw;
      reply.hijack();
      raw.writeHead(200, { ...SSE_HEADERS, 'x-request-id': req.id });
      raw.flushHeaders(); // the client knows it is connected even when nothing is replayed

      let lastSent = lastId;
      let state: JobState = job.state;
      let closed = false;
      const pending: JobEvent[] = [];
      let replaying = true;

      const close = () => {
        if (closed) return;
        closed = true;
        unsubscribe();
        clearInterval(keepalive);
        raw.end();
      };
      // Backpressure (hardening finding 7): a watcher that does not read is dropped once its
      // unsent output passes the cap; it can come back with Last-Event-ID and lose nothing.
      const write = (chunk: string) => {
        if (closed) return;
        raw.write(chunk);
        if (raw.writableLength > SSE_BUFFER_MAX) {
          req.log.info({ job_id: job.id, buffered: raw.writableLength }, 'SSE watcher is not reading; closed');
          closed = true;
          unsubscribe();
          clearInterval(keepalive);
          raw.destroy();
        }
      };
      const sendState = (e: TransitionEvent) => {
        if (e.n <= lastSent) {
          if (isTerminal(e.state)) close(); // the client claimed to have seen past the end
          return;
        }
        lastSent = e.n;
        state = e.state;
        const data: Record<string, unknown> = { job_id: job.id, state: e.state, at: iso(e.at), attempt: e.attempt };
        if (e.state === 'failed') data.error = e.error ?? null;
        if (e.run) Object.assign(data, runFields(e.run));
        write(`id: ${e.n}\nevent: state\ndata: ${JSON.stringify(data)}\n\n`);
        if (isTerminal(e.state)) close();
      };
      const handle = (e: JobEvent) => {
        if (closed) return;
        if (e.type === 'state') return sendState(e.event);
        if (state !== 'working') return;
        const m = e.chunk.message;
        if (e.chunk.done || !m) return;
        const delta: Record<string, unknown> = {};
        if (m.content) delta.content = m.content;
        if (m.thinking) delta.thinking = m.thinking;
        if (m.tool_calls) delta.tool_calls = m.tool_calls;
        if (Object.keys(delta).length > 0) write(`event: delta\ndata: ${JSON.stringify(delta)}\n\n`);
      };
      // Subscribe first, then replay the log, then what arrived meanwhile: nothing falls in between.
      const unsubscribe = events.subscribe(job.id, (e) => (replaying ? pending.push(e) : handle(e)));
      const keepalive = setInterval(() => write(': keep-alive\n\n'), config.sseKeepaliveMs);
      keepalive.unref();
      req.raw.on('close', close);
      let replay: TransitionEvent[];
      try {
        replay = await jobs.transitionsSince(job.id, lastId);
      } catch (err) {
        req.log.error({ err, job_id: job.id }, 'SSE replay failed');
        close();
        return;
      }
      for (const t of replay) sendState(t);
      replaying = false;
      for (const e of pending.splice(0)) handle(e);
      if (isTerminal(state)) close(); // resumed after the end: nothing more will come
    },
  );
};
