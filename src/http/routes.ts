import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { eventId, iso, JOB_STATES, type JobState } from '../domain.js';
import type { JobView } from '../queue/driver.js';
import type { QueueEstimate } from '../jobs/jobs.js';
import { checkWebhookUrl } from '../jobs/rules.js';
import { Forbidden } from '../errors.js';
import type { Principal } from '../jobs/principal.js';
import { usageView } from './key-routes.js';
import { ApiError } from './errors.js';
import {
  ArtifactParams,
  CancelReply,
  ConversationParams,
  ConversationReply,
  ConversationsQuery,
  ConversationsReply,
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
import type { AppDeps } from './deps.js';
const errorReplies = { 400: ErrorBody, 401: ErrorBody, 403: ErrorBody, 404: ErrorBody, 409: ErrorBody, 410: ErrorBody, 413: ErrorBody, 415: ErrorBody, 429: ErrorBody, 503: ErrorBody };

export const jobRoutes: FastifyPluginAsyncTypebox<AppDeps> = async (app, deps) => {
  const { jobs, keys } = deps;
  const publicUrl = () => deps.publicUrl();
  /** The caller's usage: carried by answers only when authentication is on (there are no limits otherwise). */
  const callerUsage = async (who: Principal) => (keys.enabled ? { usage: usageView(await keys.usage(who)) } : {});

  function jobView(j: JobView & { queue: QueueEstimate | null }) {
    const q = j.queue;
    return {
      job_id: j.id,
      kind: j.kind,
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
        url: deps.artifactUrls.url(j.id, a.name),
      })),
      webhook:
        j.webhookUrl === null
          ? null
          : {
              url: redactUrl(j.webhookUrl),
              events: j.webhookEvents ?? [...JOB_STATES],
              deliveries: j.deliveries.map((d) => ({
                event_id: eventId(j.id, d.state),
                state: d.state,
                status: d.status,
                attempts: d.attempts,
                last_status_code: d.lastStatusCode,
                last_error: d.lastError,
                next_attempt_at: iso(d.nextAttemptAt),
                delivered_at: iso(d.deliveredAt),
              })),
            },
      conversation_id: j.conversationId,
      continue_from: j.continueFrom,
      waiting_for_previous: j.waiting,
      load_ms: j.loadMs,
      usage: { prompt_tokens: j.usage.promptTokens, completion_tokens: j.usage.completionTokens },
      key_id: j.keyId,
      engine: j.engine,
      instance: j.instance,
      scheduled_for: iso(j.scheduledFor),
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
      const who = req.principal;
      const outcome = await jobs.submit({
        body,
        ...(body.kind !== undefined ? { kind: body.kind } : {}),
        ...(body.continue_from !== undefined ? { continueFrom: body.continue_from } : {}),
        ...(body.wait_for_previous !== undefined ? { waitForPrevious: body.wait_for_previous } : {}),
        webhookUrl: body.state_webhook_url === undefined ? null : checkWebhookUrl(body.state_webhook_url),
        webhookEvents: (body.webhook_events as JobState[] | undefined) ?? null,
        metadata: body.metadata ?? null,
        priority: body.priority ?? 0,
        deadline: body.deadline,
        idempotencyKey: req.headers['idempotency-key'],
      }, who);
      const id = outcome.jobId;
      reply.header('location', `/jobs/${id}`);
      const notes: string[] = [];
      if (outcome.scheduledFor !== null) notes.push(`this API key reached its daily_limit: the job is scheduled for ${iso(outcome.scheduledFor)} (the next UTC day)`);
      if (outcome.clampedFrom !== null) notes.push(`priority ${outcome.clampedFrom} is above this API key's priority_max: clamped to ${outcome.priority}`);
      const reply_ = {
        job_id: id,
        state: outcome.state,
        status_url: `${publicUrl()}/jobs/${id}`,
        ...(outcome.scheduledFor !== null ? { scheduled_for: iso(outcome.scheduledFor) as string } : {}),
        ...(outcome.clampedFrom !== null ? { priority: outcome.priority } : {}),
        ...(notes.length ? { message: notes.join('; ') } : {}),
        ...(await callerUsage(who)),
      };
      if (outcome.replayed) {
        req.log.info({ job_id: id }, 'idempotent replay');
        return reply.code(200).header('idempotent-replayed', 'true').send(reply_);
      }
      req.log.info({ job_id: id, state: outcome.state, model: body.model, continue_from: body.continue_from, key_id: who.kind === 'key' ? who.key.id : undefined }, `job ${outcome.state}`);
      return reply.code(202).send(reply_);
    },
  );

  app.get(
    '/jobs',
    { schema: { summary: 'List jobs, newest first', querystring: ListQuery, response: { 200: ListReply, ...errorReplies } } },
    async (req) => {
      const q = req.query as Record<string, string | undefined>;
      const time = (field: string) => {
        const v = q[field];
        if (v === undefined) return undefined;
        const t = Date.parse(v);
        if (!/^\d{4}-\d{2}-\d{2}/.test(v) || Number.isNaN(t)) throw new ApiError(400, 'validation_failed', `${field} must be an ISO-8601 time`, field);
        return t;
      };
      const createdAfter = time('created_after');
      const createdBefore = time('created_before');
      const page = await jobs.list({
        limit: q.limit === undefined ? 20 : Number(q.limit),
        ...(q.state ? { state: q.state as JobState } : {}),
        ...(q.key_id ? { keyId: q.key_id } : {}),
        ...(q.engine ? { engine: q.engine } : {}),
        ...(q.model ? { model: q.model } : {}),
        ...(q.conversation_id ? { conversationId: q.conversation_id } : {}),
        ...(createdAfter !== undefined ? { createdAfter } : {}),
        ...(createdBefore !== undefined ? { createdBefore } : {}),
        metadata: Object.entries(q)
          .filter(([k, v]) => k.startsWith('metadata.') && v !== undefined)
          .map(([k, v]) => [k.slice('metadata.'.length), v as string] as [string, string]),
        ...(q.cursor !== undefined ? { cursor: q.cursor } : {}),
      }, req.principal);
      const base = publicUrl();
      return {
        jobs: page.jobs.map((r) => ({
          job_id: r.id,
          key_id: r.keyId,
          engine: r.engine,
          instance: r.instance,
          state: r.state,
          model: r.model,
          priority: r.priority,
          attempt: r.attempt,
          metadata: r.metadata ?? {},
          created_at: iso(r.createdAt) as string,
          finished_at: iso(r.finishedAt),
          status_url: `${base}/jobs/${r.id}`,
        })),
        next_cursor: page.nextCursor,
      };
    },
  );

  app.post(
    '/jobs/:id/cancel',
    { schema: { summary: 'Cancel a job', params: JobParams, response: { 200: CancelReply, ...errorReplies } } },
    async (req) => {
      const r = await jobs.cancel(req.params.id, req.principal);
      req.log.info({ job_id: req.params.id, state: 'canceled', was_running: r.wasRunning }, 'job canceled');
      return { job_id: req.params.id, state: 'canceled' as const };
    },
  );

  app.get('/jobs/:id', { schema: { summary: 'A job', params: JobParams, response: { 200: JobReply, ...errorReplies } } }, async (req) => {
    const j = await jobs.get(req.params.id, req.principal);
    const u = await callerUsage(req.principal);
    return { ...jobView(j), ...('usage' in u ? { caller_usage: u.usage } : {}) };
  });

  app.get('/jobs/:id/artifacts/:name', { schema: { params: ArtifactParams } }, async (req, reply) => {
    // A signed URL (authentication on) is its own credential, for exactly this artifact.
    const q = req.query as { expires?: string; sig?: string };
    let who: Principal | null = req.principal;
    if (deps.artifactUrls.signed && q.sig !== undefined) {
      const v = deps.artifactUrls.verify(req.params.id, req.params.name, q.expires, q.sig);
      if (v === 'expired') throw new Forbidden('url_expired', 'this signed artifact URL has expired: fetch the job again for a fresh one');
      if (v === 'invalid') throw new Forbidden('invalid_signature', 'the signature of this artifact URL does not match');
      who = null;
    }
    const a = await jobs.artifact(req.params.id, req.params.name, who);
    const etag = `"${a.sha256}"`;
    reply.header('etag', etag).header('cache-control', 'private, max-age=31536000, immutable');
    if (etagMatches(req.headers['if-none-match'], etag)) return reply.code(304).send();
    return reply.type(a.contentType).header('content-length', a.size).send(a.body);
  });

  app.post(
    '/jobs/:id/webhooks/redeliver',
    { schema: { params: JobParams, querystring: RedeliverQuery, response: { 202: RedeliverReply, ...errorReplies } } },
    async (req, reply) => {
      const id = req.params.id;
      const states = await jobs.redeliver(id, (req.query.state as JobState | undefined) ?? null, req.principal);
      req.log.info({ job_id: id, requeued: states }, 'webhook redelivery requested');
      return reply.code(202).send({ job_id: id, requeued: states.map((s) => eventId(id, s)) });
    },
  );

  app.get(
    '/conversations/:id',
    { schema: { summary: 'A conversation: its turns in order, and its status', params: ConversationParams, response: { 200: ConversationReply, ...errorReplies } } },
    async (req) => {
      const c = await jobs.conversation(req.params.id, req.principal);
      return {
        conversation_id: c.id,
        status: c.status,
        created_at: iso(c.createdAt) as string,
        turns: c.turns.map((t) => ({
          job_id: t.jobId,
          state: t.state,
          messages: t.messages,
          reply: t.reply,
          error: t.error,
          created_at: iso(t.createdAt) as string,
          finished_at: iso(t.finishedAt),
        })),
      };
    },
  );

  app.get(
    '/conversations',
    { schema: { summary: 'Conversations, newest activity first', querystring: ConversationsQuery, response: { 200: ConversationsReply, ...errorReplies } } },
    async (req) => {
      const q = req.query;
      const page = await jobs.conversations({ limit: q.limit === undefined ? 20 : Number(q.limit), ...(q.cursor !== undefined ? { cursor: q.cursor } : {}) }, req.principal);
      return {
        conversations: page.conversations.map((c) => ({
          conversation_id: c.id,
          created_at: iso(c.createdAt) as string,
          turns: c.turns,
          last_job_id: c.lastJobId,
          last_state: c.lastState,
          url: `${publicUrl()}/conversations/${c.id}`,
        })),
        next_cursor: page.nextCursor,
      };
    },
  );
};

/**
 * A webhook URL as shown to callers: query values (tokens, often) replaced by `REDACTED`. The
 * stored URL, which the dispatcher uses, keeps them.
 */
export function redactUrl(url: string): string {
  const u = new URL(url);
  if (u.search === '') return url;
  for (const k of new Set(u.searchParams.keys())) u.searchParams.set(k, 'REDACTED');
  return u.href;
}

/** RFC 9110 If-None-Match: weak comparison, a list, or `*`. */
export function etagMatches(header: string | undefined, etag: string): boolean {
  if (!header) return false;
  if (header.trim() === '*') return true;
  return header.split(',').some((t) => t.trim().replace(/^W\//, '') === etag);
}
