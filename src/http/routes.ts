import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { iso, JOB_STATES, ARTIFACT_NAME_RE, type JobState } from '../domain.js';
import { uuidv7 } from '../ids.js';
import type { JobView } from '../store/store.js';
import { artifactUrl } from '../webhooks/payload.js';
import { ApiError } from './errors.js';
import {
  ArtifactParams,
  ErrorBody,
  JobParams,
  JobReply,
  RedeliverQuery,
  RedeliverReply,
  SubmitBody,
  SubmitReply,
} from './schemas.js';
import type { AppDeps } from './app.js';

/** Fields passed through to the engine unchanged. `stream` is accepted but a job always streams. */
const ENGINE_FIELDS = ['model', 'messages', 'format', 'options', 'tools', 'keep_alive', 'think'] as const;

/** Checks a webhook URL: absolute http(s), no credentials. Returns the normalised URL. */
export function checkWebhookUrl(raw: string): string {
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw new ApiError(400, 'validation_failed', 'state_webhook_url is not an absolute URL', 'state_webhook_url');
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new ApiError(400, 'validation_failed', 'state_webhook_url must be an http or https URL', 'state_webhook_url');
  }
  if (u.username !== '' || u.password !== '') {
    throw new ApiError(400, 'validation_failed', 'state_webhook_url must not carry credentials', 'state_webhook_url');
  }
  if (u.hostname === '') {
    throw new ApiError(400, 'validation_failed', 'state_webhook_url has no host', 'state_webhook_url');
  }
  return u.href;
}

const notFound = (id: string) => new ApiError(404, 'job_not_found', `no job with id ${JSON.stringify(id.slice(0, 80))}`);
const errorReplies = { 400: ErrorBody, 404: ErrorBody, 409: ErrorBody, 413: ErrorBody, 415: ErrorBody, 503: ErrorBody };

export const jobRoutes: FastifyPluginAsyncTypebox<AppDeps> = async (app, deps) => {
  const { store, submitter, config } = deps;
  const publicUrl = () => deps.publicUrl();

  function jobView(j: JobView) {
    const base = publicUrl();
    return {
      job_id: j.id,
      state: j.state,
      model: j.model,
      attempt: j.attempt,
      max_attempts: j.maxAttempts,
      metadata: j.metadata ?? {},
      created_at: iso(j.createdAt) as string,
      started_at: iso(j.startedAt),
      finished_at: iso(j.finishedAt),
      updated_at: iso(j.updatedAt) as string,
      transitions: j.transitions.map((t) => ({ state: t.state, at: iso(t.at) as string, attempt: t.attempt })),
      result: j.result,
      error: j.error,
      artifacts: j.artifacts.map((a) => ({
        name: a.name,
        content_type: a.contentType,
        size: a.size,
        sha256: a.sha256,
        url: artifactUrl(base, j.id, a.name),
      })),
      webhook:
        j.webhookUrl === null
          ? null
          : {
              url: j.webhookUrl,
              events: j.webhookEvents ?? [...JOB_STATES],
              deliveries: j.deliveries.map((d) => ({
                event_id: `${j.id}:${d.state}`,
                state: d.state,
                status: d.status,
                attempts: d.attempts,
                last_status_code: d.lastStatusCode,
                last_error: d.lastError,
                next_attempt_at: iso(d.nextAttemptAt),
                delivered_at: iso(d.deliveredAt),
              })),
            },
    };
  }

  app.post(
    '/jobs',
    { schema: { body: SubmitBody, response: { 202: SubmitReply, ...errorReplies } } },
    async (req, reply) => {
      const body = req.body;
      const webhookUrl = body.state_webhook_url === undefined ? null : checkWebhookUrl(body.state_webhook_url);
      if (body.webhook_events !== undefined && webhookUrl === null) {
        throw new ApiError(400, 'validation_failed', 'webhook_events needs state_webhook_url', 'webhook_events');
      }
      const request: Record<string, unknown> = {};
      for (const k of ENGINE_FIELDS) if (body[k] !== undefined) request[k] = body[k];
      const deep = tooDeep(request, MAX_JSON_DEPTH);
      if (deep !== null) {
        throw new ApiError(400, 'validation_failed', `${deep} is nested deeper than ${MAX_JSON_DEPTH} levels`, deep);
      }
      const id = uuidv7();
      const outcome = await submitter.submit({
        id,
        model: body.model,
        request,
        metadata: body.metadata ?? null,
        webhookUrl,
        webhookEvents: (body.webhook_events as JobState[] | undefined) ?? null,
        maxAttempts: config.jobMaxAttempts,
      });
      if (!outcome.ok) {
        throw new ApiError(503, 'queue_full', `the queue holds FOREMAN_MAX_QUEUED (${config.maxQueued}) jobs; try again later`, undefined, {
          'retry-after': '5',
        });
      }
      req.log.info({ job_id: id, state: 'queued', model: body.model }, 'job queued');
      return reply
        .code(202)
        .header('location', `/jobs/${id}`)
        .send({ job_id: id, state: 'queued', status_url: `${publicUrl()}/jobs/${id}` });
    },
  );

  app.get('/jobs/:id', { schema: { params: JobParams, response: { 200: JobReply, ...errorReplies } } }, async (req) => {
    const j = store.getJob(req.params.id);
    if (!j) throw notFound(req.params.id);
    return jobView(j);
  });

  app.get('/jobs/:id/artifacts/:name', { schema: { params: ArtifactParams } }, async (req, reply) => {
    const { id, name } = req.params;
    // The name is a lookup key, never a path; anything outside the allowed alphabet cannot exist.
    const a = ARTIFACT_NAME_RE.test(name) ? store.getArtifact(id, name) : null;
    if (!a) {
      if (store.seqOf(id) === null) throw notFound(id);
      throw new ApiError(404, 'artifact_not_found', `job ${id} has no artifact named ${JSON.stringify(name.slice(0, 80))}`);
    }
    const etag = `"${a.sha256}"`;
    reply.header('etag', etag).header('cache-control', 'private, max-age=31536000, immutable');
    if (etagMatches(req.headers['if-none-match'], etag)) return reply.code(304).send();
    return reply.type(a.contentType).header('content-length', a.size).send(a.body);
  });

  app.post(
    '/jobs/:id/webhooks/redeliver',
    { schema: { params: JobParams, querystring: RedeliverQuery, response: { 202: RedeliverReply, ...errorReplies } } },
    async (req, reply) => {
      const j = store.getJob(req.params.id);
      if (!j) throw notFound(req.params.id);
      if (j.webhookUrl === null) throw new ApiError(409, 'no_webhook', 'this job has no state_webhook_url');
      const state = (req.query.state as JobState | undefined) ?? null;
      if (state !== null && !j.deliveries.some((d) => d.state === state)) {
        throw new ApiError(409, 'no_such_event', `this job has no ${state} event to redeliver`, 'state');
      }
      const states = store.redeliver(j.seq, deps.clock.now(), state);
      req.log.info({ job_id: j.id, requeued: states }, 'webhook redelivery requested');
      return reply.code(202).send({ job_id: j.id, requeued: states.map((s) => `${j.id}:${s}`) });
    },
  );
};

/** How deeply a request's JSON may nest (Ollama's own payloads need a handful of levels). */
export const MAX_JSON_DEPTH = 64;

/** Returns the top-level field holding JSON nested deeper than `limit`, or null. Iterative: no recursion. */
export function tooDeep(value: Record<string, unknown>, limit: number): string | null {
  for (const [field, v] of Object.entries(value)) {
    const stack: [unknown, number][] = [[v, 1]];
    while (stack.length > 0) {
      const [x, d] = stack.pop()!;
      if (x === null || typeof x !== 'object') continue;
      if (d > limit) return field;
      for (const child of Object.values(x)) if (child !== null && typeof child === 'object') stack.push([child, d + 1]);
    }
  }
  return null;
}

/** RFC 9110 If-None-Match: weak comparison, a list, or `*`. */
export function etagMatches(header: string | undefined, etag: string): boolean {
  if (!header) return false;
  if (header.trim() === '*') return true;
  return header.split(',').some((t) => t.trim().replace(/^W\//, '') === etag);
}
