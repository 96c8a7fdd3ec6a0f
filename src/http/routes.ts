import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { iso, JOB_STATES, ARTIFACT_NAME_RE, type JobState } from '../domain.js';
import type { JobView, Store } from '../store/store.js';
import { artifactUrl } from '../webhooks/payload.js';
import { ApiError } from './errors.js';
import {
  ArtifactParams,
  CancelReply,
  ErrorBody,
  JobParams,
  JobReply,
  ListQuery,
  ListReply,
  RedeliverQuery,
  RedeliverReply,
  SubmitBody,
  SubmitHeaders,
  SubmitReply,
} from './schemas.js';
import { cancelJob, checkWebhookUrl, submitJob } from './submit.js';
import type { AppDeps } from './app.js';

const notFound = (id: string) => new ApiError(404, 'job_not_found', `no job with id ${JSON.stringify(id.slice(0, 80))}`);
const errorReplies = { 400: ErrorBody, 404: ErrorBody, 409: ErrorBody, 413: ErrorBody, 415: ErrorBody, 503: ErrorBody };

export const jobRoutes: FastifyPluginAsyncTypebox<AppDeps> = async (app, deps) => {
  const { store, config } = deps;
  const publicUrl = () => deps.publicUrl();

  function jobView(j: JobView) {
    const base = publicUrl();
    const q = j.state === 'queued' ? queueEstimate(store, j, deps.clock.now(), config.concurrency) : null;
    return {
      job_id: j.id,
      state: j.state,
      model: j.model,
      attempt: j.attempt,
      max_attempts: j.maxAttempts,
      priority: j.priority,
      deadline: iso(j.deadlineAt),
      queue_position: q?.position ?? null,
      estimated_start_at: q?.estimatedStartAt ?? null,
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
    {
      schema: {
        summary: 'Submit a chat job',
        body: SubmitBody,
        headers: SubmitHeaders,
        response: { 200: SubmitReply, 202: SubmitReply, ...errorReplies },
      },
    },
    async (req, reply) => {
      const body = req.body;
      const webhookUrl = body.state_webhook_url === undefined ? null : checkWebhookUrl(body.state_webhook_url);
      if (body.webhook_events !== undefined && webhookUrl === null) {
        throw new ApiError(400, 'validation_failed', 'webhook_events needs state_webhook_url', 'webhook_events');
      }
      const outcome = await submitJob(deps, {
        body,
        webhookUrl,
        webhookEvents: (body.webhook_events as JobState[] | undefined) ?? null,
        metadata: body.metadata ?? null,
        priority: body.priority ?? 0,
        deadline: body.deadline,
        idempotencyKey: req.headers['idempotency-key'],
      });
      const id = outcome.jobId;
      reply.header('location', `/jobs/${id}`);
      if (outcome.replayed) {
        const state = store.getJob(id)?.state ?? 'queued';
        req.log.info({ job_id: id }, 'idempotent replay');
        return reply.code(200).header('idempotent-replayed', 'true').send({ job_id: id, state, status_url: `${publicUrl()}/jobs/${id}` });
      }
      req.log.info({ job_id: id, state: 'queued', model: body.model }, 'job queued');
      return reply.code(202).send({ job_id: id, state: 'queued', status_url: `${publicUrl()}/jobs/${id}` });
    },
  );

  app.get(
    '/jobs',
    { schema: { summary: 'List jobs, newest first', querystring: ListQuery, response: { 200: ListReply, ...errorReplies } } },
    async (req) => {
      const q = req.query as Record<string, string | undefined>;
      const limit = q.limit === undefined ? 20 : Number(q.limit);
      if (!(limit >= 1 && limit <= 100)) throw new ApiError(400, 'validation_failed', 'limit must be 1 to 100', 'limit');
      const time = (field: string) => {
        const v = q[field];
        if (v === undefined) return undefined;
        const t = Date.parse(v);
        if (!/^\d{4}-\d{2}-\d{2}/.test(v) || Number.isNaN(t)) throw new ApiError(400, 'validation_failed', `${field} must be an ISO-8601 time`, field);
        return t;
      };
      const metadata = Object.entries(q)
        .filter(([k, v]) => k.startsWith('metadata.') && v !== undefined)
        .map(([k, v]) => [k.slice('metadata.'.length), v as string] as [string, string]);
      const createdAfter = time('created_after');
      const createdBefore = time('created_before');
      const beforeSeq = q.cursor === undefined ? undefined : decodeCursor(q.cursor);
      // One more than asked, to know whether another page exists.
      const rows = store.listJobs({
        limit: limit + 1,
        ...(q.state ? { state: q.state as JobState } : {}),
        ...(q.model ? { model: q.model } : {}),
        ...(createdAfter !== undefined ? { createdAfter } : {}),
        ...(createdBefore !== undefined ? { createdBefore } : {}),
        ...(metadata.length ? { metadata } : {}),
        ...(beforeSeq !== undefined ? { beforeSeq } : {}),
      });
      const base = publicUrl();
      const more = rows.length > limit;
      if (more) rows.pop();
      return {
        jobs: rows.map((r) => ({
          job_id: r.id,
          state: r.state,
          model: r.model,
          priority: r.priority,
          attempt: r.attempt,
          metadata: r.metadata ?? {},
          created_at: iso(r.createdAt) as string,
          finished_at: iso(r.finishedAt),
          status_url: `${base}/jobs/${r.id}`,
        })),
        next_cursor: more ? encodeCursor(rows[rows.length - 1]!.seq) : null,
      };
    },
  );

  app.post(
    '/jobs/:id/cancel',
    { schema: { summary: 'Cancel a job', params: JobParams, response: { 200: CancelReply, ...errorReplies } } },
    async (req) => {
      const r = cancelJob(deps, req.params.id);
      if (r === null) throw notFound(req.params.id);
      if (!r.canceled) throw new ApiError(409, 'job_finished', `the job is already ${r.state}`);
      req.log.info({ job_id: req.params.id, state: 'canceled', was_running: r.wasRunning }, 'job canceled');
      return { job_id: req.params.id, state: 'canceled' as const };
    },
  );

  app.get('/jobs/:id', { schema: { summary: 'A job', params: JobParams, response: { 200: JobReply, ...errorReplies } } }, async (req) => {
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

/** Opaque list cursors: the last seq of the previous page. */
export function encodeCursor(seq: number): string {
  return Buffer.from(`v1:${seq}`).toString('base64url');
}

export function decodeCursor(cursor: string): number {
  const m = /^v1:(\d{1,15})$/.exec(Buffer.from(cursor, 'base64url').toString('utf8'));
  if (!m) throw new ApiError(400, 'invalid_cursor', 'cursor is not one this service handed out', 'cursor');
  return Number(m[1]);
}

/**
 * Queue position and start estimate for a queued job (README "Queue position and ETA"):
 * position = queued jobs the claim takes first (effective priority, then FIFO);
 * estimate = now + (Σ ahead of each model's average run time + the remaining average time of
 * running jobs) / concurrency. Averages are per-model moving averages (α = 0.2) of recent runs;
 * a model with none uses the mean over models; with no history at all the estimate is null.
 */
export function queueEstimate(store: Store, j: JobView, now: number, concurrency: number) {
  const snap = store.queueSnapshot({ seq: j.seq });
  const position = snap.ahead.reduce((a, r) => a + r.n, 0);
  const all = [...snap.stats.values()];
  const fallback = all.length ? all.reduce((a, b) => a + b, 0) / all.length : null;
  const avg = (m: string) => snap.stats.get(m) ?? fallback;
  if (position === 0 && snap.running.length < concurrency) return { position, estimatedStartAt: iso(now) };
  let work = 0;
  for (const r of snap.ahead) {
    const a = avg(r.model);
    if (a === null) return { position, estimatedStartAt: null };
    work += a * r.n;
  }
  for (const r of snap.running) {
    const a = avg(r.model);
    if (a === null) return { position, estimatedStartAt: null };
    work += Math.max(0, a - (now - r.startedAt));
  }
  return { position, estimatedStartAt: iso(now + Math.round(work / concurrency)) };
}

/** RFC 9110 If-None-Match: weak comparison, a list, or `*`. */
export function etagMatches(header: string | undefined, etag: string): boolean {
  if (!header) return false;
  if (header.trim() === '*') return true;
  return header.split(',').some((t) => t.trim().replace(/^W\//, '') === etag);
}
