import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox';
import { iso } from '../domain.js';
import type { Usage } from '../jobs/keys.js';
import type { ApiKeyLimits, ApiKeyRecord } from '../queue/driver.js';
import type { AppDeps } from './deps.js';
import { AuditQuery, AuditReply, ErrorBody, KeyCreateBody, KeyCreatedReply, KeyParams, KeyPatchBody, KeyReply, KeysReply, UsageSchema } from './schemas.js';

const errorReplies = { 400: ErrorBody, 401: ErrorBody, 403: ErrorBody, 404: ErrorBody, 503: ErrorBody };

export function usageView(u: Usage) {
  return {
    jobs_today: u.jobsToday,
    daily_limit: u.dailyLimit,
    running: u.running,
    concurrency: u.concurrency,
    queued: u.queued,
    max_queued: u.maxQueued,
    tokens_today: u.tokensToday,
  };
}

function keyView(k: ApiKeyRecord) {
  return {
    id: k.id,
    name: k.name,
    concurrency: k.concurrency,
    max_queued: k.maxQueued,
    daily_limit: k.dailyLimit,
    priority_max: k.priorityMax,
    created_at: iso(k.createdAt) as string,
    revoked_at: iso(k.revokedAt),
  };
}

/** The limits of a create or PATCH body, as the application layer names them (absent stays absent). */
function limitsOf(b: { concurrency?: number | null; max_queued?: number | null; daily_limit?: number | null; priority_max?: number | null }) {
  const out: Partial<ApiKeyLimits> = {};
  if (b.concurrency !== undefined) out.concurrency = b.concurrency;
  if (b.max_queued !== undefined) out.maxQueued = b.max_queued;
  if (b.daily_limit !== undefined) out.dailyLimit = b.daily_limit;
  if (b.priority_max !== undefined) out.priorityMax = b.priority_max;
  return out;
}

/** API keys (admin only), the caller's usage, and the audit log (ADR-0013). */
export const keyRoutes: FastifyPluginAsyncTypebox<AppDeps> = async (app, deps) => {
  const { keys } = deps;

  app.post(
    '/keys',
    { schema: { summary: 'Create an API key (admin); the key is shown once', body: KeyCreateBody, response: { 201: KeyCreatedReply, ...errorReplies } } },
    async (req, reply) => {
      const { record, key } = await keys.create(req.principal, { name: req.body.name, ...limitsOf(req.body) });
      req.log.info({ key_id: record.id, name: record.name }, 'API key created');
      return reply.code(201).send({ ...keyView(record), key });
    },
  );

  app.get('/keys', { schema: { summary: 'API keys, without their secrets, with usage (admin)', response: { 200: KeysReply, ...errorReplies } } }, async (req) => {
    const list = await keys.list(req.principal);
    return { keys: list.map((k) => ({ ...keyView(k), usage: usageView(k.usage) })) };
  });

  app.get(
    '/keys/:id',
    { schema: { summary: 'An API key, with usage (admin)', params: KeyParams, response: { 200: KeyReply, ...errorReplies } } },
    async (req) => {
      const k = await keys.get(req.principal, req.params.id);
      return { ...keyView(k), usage: usageView(k.usage) };
    },
  );

  app.patch(
    '/keys/:id',
    { schema: { summary: "Change an API key's name or limits; null removes a limit (admin)", params: KeyParams, body: KeyPatchBody, response: { 200: KeyReply, ...errorReplies } } },
    async (req) => {
      const k = await keys.update(req.principal, req.params.id, { ...(req.body.name !== undefined ? { name: req.body.name } : {}), ...limitsOf(req.body) });
      req.log.info({ key_id: k.id }, 'API key changed');
      return keyView(k);
    },
  );

  app.delete(
    '/keys/:id',
    { schema: { summary: 'Revoke an API key: its next request gets 401; its queued jobs stay (admin)', params: KeyParams, response: { 200: KeyReply, ...errorReplies } } },
    async (req) => {
      const k = await keys.revoke(req.principal, req.params.id);
      req.log.info({ key_id: k.id }, 'API key revoked');
      return keyView(k);
    },
  );

  app.get('/usage', { schema: { summary: "The caller's usage and limits", response: { 200: UsageSchema, ...errorReplies } } }, async (req) => {
    return usageView(await keys.usage(req.principal));
  });

  app.get(
    '/audit',
    { schema: { summary: 'The audit log, newest first (admin)', querystring: AuditQuery, response: { 200: AuditReply, ...errorReplies } } },
    async (req) => {
      const page = await keys.audit(req.principal, { limit: req.query.limit === undefined ? 50 : Number(req.query.limit), ...(req.query.cursor !== undefined ? { cursor: req.query.cursor } : {}) });
      return {
        entries: page.entries.map((e) => ({ id: e.id, at: iso(e.at) as string, actor: e.actor, action: e.action, target: e.target, detail: e.detail })),
        next_cursor: page.nextCursor,
      };
    },
  );
};
