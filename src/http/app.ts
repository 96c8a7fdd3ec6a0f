import { randomUUID } from 'node:crypto';
import type { Socket } from 'node:net';
import Fastify, { LogController, type FastifyInstance, type FastifyReply } from 'fastify';
import { registerOpenApi } from './openapi.js';
import { SECURITY_HEADERS } from './headers.js';
import type { TypeBoxTypeProvider } from '@fastify/type-provider-typebox';
import { isLoopbackHost } from '../config.js';
import { ApiError, errorHandler } from './errors.js';
import { jobRoutes } from './routes.js';
import { keyRoutes } from './key-routes.js';
import { registerAuth } from './auth.js';
import { sseRoutes } from './sse.js';
import { ollamaRoutes } from './ollama-api.js';
import { uiRoutes } from './ui.js';
import { openAiRoutes } from './openai-api.js';
import type { AppDeps } from './deps.js';

const MAX_PARAM_LENGTH = 256;

/** Security headers and the request id, on every response (the docs page needs scripts and styles). */
function standardHeaders(reply: FastifyReply, requestId: string): void {
  reply.headers(SECURITY_HEADERS);
  if (reply.request?.url.startsWith('/docs')) {
    reply.header('content-security-policy', "default-src 'self'; img-src 'self' data: https:; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'");
  }
  reply.header('x-request-id', requestId);
  if (!reply.hasHeader('cache-control')) reply.header('cache-control', 'no-store');
}

/**
 * Requests Node's HTTP parser rejects (bad methods, conflicting lengths, oversized headers, bad
 * chunk framing) never reach routing: answer them in our JSON format too, and close.
 */
function clientErrorHandler(err: NodeJS.ErrnoException, socket: Socket): void {
  if (!socket.writable || err.code === 'ECONNRESET') return void socket.destroy();
  const [status, reason, code, message] =
    err.code === 'HPE_HEADER_OVERFLOW'
      ? [431, 'Request Header Fields Too Large', 'headers_too_large', 'the request headers are too large']
      : err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
        ? [408, 'Request Timeout', 'request_timeout', 'the request took too long']
        : [400, 'Bad Request', 'bad_request', 'the request is not valid HTTP'];
  const body = JSON.stringify({ code, message });
  const headers = Object.entries({
    ...SECURITY_HEADERS,
    'cache-control': 'no-store',
    'content-type': 'application/json; charset=utf-8',
    'content-length': String(Buffer.byteLength(body)),
    connection: 'close',
  })
    .map(([k, v]) => `${k}: ${v}\r\n`)
    .join('');
  socket.end(`HTTP/1.1 ${status} ${reason}\r\n${headers}\r\n${body}`);
}

/** The host name of a Host header (`name:port`, `[v6]:port`), lowercased; null when malformed. */
function hostnameOf(header: string): string | null {
  const m = /^(\[[0-9a-fA-F:.]+\]|[^:\s\[\]]+)(?::\d{1,5})?$/.exec(header.trim());
  return m?.[1] ? m[1].toLowerCase().replace(/^\[|\]$/g, '') : null;
}

/** Builds the Fastify instance without listening, so tests can `inject` or listen on port 0. */
export function buildApp(deps: AppDeps) {
  const app = Fastify({
    loggerInstance: deps.logger,
    bodyLimit: deps.config.maxBodyBytes,
    requestIdHeader: 'x-request-id',
    genReqId: () => randomUUID(),
    return503OnClosing: true,
    // A request (headers and body) must arrive in this time; responses (SSE) are not limited by it.
    // An upload (POST /v1/files) may take up to FOREMAN_UPLOAD_TIMEOUT.
    requestTimeout: Math.max(deps.config.bodyTimeoutMs, deps.config.uploadTimeoutMs) + 5_000,
    // One line per request, when it completes (onResponse below), instead of two.
    logController: new LogController({ disableRequestLogging: true }),
    // Strict validation: no type coercion, nothing silently removed.
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false, allErrors: false } },
    onProtoPoisoning: 'error',
    onConstructorPoisoning: 'error',
    routerOptions: { maxParamLength: MAX_PARAM_LENGTH },
    clientErrorHandler,
    // Errors raised by the router before any route or hook runs: answer them in our own format.
    frameworkErrors: (err, req, reply) => {
      standardHeaders(reply, req.id);
      const body =
        err.code === 'FST_ERR_MAX_PARAM_LENGTH'
          ? { code: 'not_found', message: `no such resource (a path segment is longer than ${MAX_PARAM_LENGTH} characters)` }
          : err.code === 'FST_ERR_BAD_URL'
            ? { code: 'invalid_url', message: 'the request path is not validly percent-encoded' }
            : { code: 'bad_request', message: 'the request could not be routed' };
      void (reply as FastifyReply).code(body.code === 'not_found' ? 404 : 400).send(body);
    },
  }).withTypeProvider<TypeBoxTypeProvider>();

  // JSON only: anything else is 415 (Fastify would otherwise accept text/plain).
  app.removeContentTypeParser(['text/plain']);

  // Connections beyond FOREMAN_MAX_CONNECTIONS get a 503 and are closed (hardening finding 7).
  let open = 0;
  app.server.on('connection', (socket: Socket) => {
    open++;
    socket.once('close', () => open--);
    if (open <= deps.config.maxConnections) return;
    const body = JSON.stringify({ code: 'too_many_connections', message: 'the server has FOREMAN_MAX_CONNECTIONS open connections; try again shortly' });
    socket.end(
      `HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json; charset=utf-8\r\ncontent-length: ${Buffer.byteLength(body)}\r\n` +
        `retry-after: 1\r\ncache-control: no-store\r\nconnection: close\r\n\r\n${body}`,
    );
  });

  // DNS rebinding (hardening finding 2): with no authentication, only requests addressed to a
  // loopback name, the public URL's host or FOREMAN_ALLOWED_HOSTS are served. Health probes are exempt.
  const allowedHosts = new Set([...deps.config.allowedHosts, ...(deps.config.publicUrl ? [new URL(deps.config.publicUrl).hostname] : [])].map((h) => h.toLowerCase().replace(/^\[|\]$/g, '')));
  app.addHook('onRequest', (req, _reply, done) => {
    if (req.url === '/healthz' || req.url === '/readyz') return done();
    const host = hostnameOf(req.headers.host ?? '');
    if (host !== null && (isLoopbackHost(host) || allowedHosts.has(host) || allowedHosts.has('*'))) return done();
    done(new ApiError(421, 'host_not_allowed', 'this server answers only to its own names: add the Host to FOREMAN_ALLOWED_HOSTS (or FOREMAN_PUBLIC_URL)', 'Host'));
  });

  // Bodies are uncompressed UTF-8 JSON: anything else is 415, never misread (hardening finding 17).
  app.addHook('onRequest', (req, _reply, done) => {
    const enc = req.headers['content-encoding'];
    if (enc !== undefined && enc.trim().toLowerCase() !== 'identity') {
      return done(new ApiError(415, 'unsupported_media_type', `Content-Encoding ${JSON.stringify(enc.slice(0, 40))} is not supported: send the body uncompressed`, 'Content-Encoding'));
    }
    const charset = /;\s*charset\s*=\s*"?([^";\s]+)/i.exec(req.headers['content-type'] ?? '')?.[1]?.toLowerCase();
    if (charset !== undefined && charset !== 'utf-8' && charset !== 'utf8') {
      return done(new ApiError(415, 'unsupported_media_type', `charset ${JSON.stringify(charset.slice(0, 40))} is not supported: bodies are UTF-8`, 'Content-Type'));
    }
    done();
  });

  // A request body must arrive within FOREMAN_BODY_TIMEOUT (a chunked body that never ends would
  // otherwise hold the connection forever): answer 408 in our format and close the connection.
  app.addHook('onRequest', (req, reply, done) => {
    const raw = req.raw;
    if (raw.method === 'GET' || raw.method === 'HEAD' || raw.complete) return done();
    const limitMs = req.url === '/v1/files' || req.url.startsWith('/v1/files?') ? deps.config.uploadTimeoutMs : deps.config.bodyTimeoutMs;
    const timer = setTimeout(() => {
      if (raw.complete || reply.raw.headersSent) return;
      req.log.info({ code: 'body_timeout' }, 'request body did not arrive in time');
      const body = JSON.stringify({ code: 'body_timeout', message: 'the request body did not arrive within FOREMAN_BODY_TIMEOUT' });
      reply.raw.writeHead(408, {
        ...SECURITY_HEADERS,
        'x-request-id': req.id,
        'cache-control': 'no-store',
        'content-type': 'application/json; charset=utf-8',
        'content-length': Buffer.byteLength(body),
        connection: 'close',
      });
      reply.raw.end(body, () => raw.socket?.destroy());
    }, limitMs);
    const clear = () => clearTimeout(timer);
    raw.once('end', clear);
    raw.once('close', clear);
    done();
  });

  // Who is asking: after the Host and body checks, before any route (ADR-0013).
  registerAuth(app as unknown as FastifyInstance, deps.keys, { metricsOpen: deps.config.metricsOpen });

  // First, so its onRoute hook sees every route.
  registerOpenApi(app as unknown as FastifyInstance, deps.keys.enabled);
  app.setErrorHandler(errorHandler);
  app.setNotFoundHandler((req, reply) => {
    void reply.code(404).send({ code: 'route_not_found', message: `no route for ${req.method} ${req.url.split('?')[0]?.slice(0, 200)}` });
  });
  app.addHook('onResponse', (req, reply, done) => {
    // The route pattern (never the URL: ids would make the label set unbounded).
    deps.metrics?.request(req.method, req.routeOptions.url ?? 'unmatched', reply.statusCode, reply.elapsedTime / 1000);
    req.log.info(
      { req: { method: req.method, url: req.url.split('?')[0]?.slice(0, 200) }, res: { statusCode: reply.statusCode }, responseTime: Math.round(reply.elapsedTime * 1000) / 1000 },
      'request completed',
    );
    done();
  });
  app.addHook('onSend', async (req, reply, payload) => {
    standardHeaders(reply, req.id);
    return payload;
  });

  // Inside a plugin, so they are registered after the OpenAPI plugin and documented.
  void app.register(async (a) => {
    a.get('/healthz', { schema: { summary: 'The process is up' } }, async () => ({ status: 'ok' }));

    a.get('/metrics', { schema: { summary: 'Prometheus metrics (text exposition format); the admin token, unless FOREMAN_METRICS_OPEN' } }, async (req, reply) => {
      if (!deps.config.metricsOpen) deps.keys.requireAdmin(req.principal);
      if (!deps.metrics) return reply.code(404).send({ code: 'route_not_found', message: 'metrics are off' });
      const m = await deps.metrics.text();
      return reply.type(m.contentType).send(m.body);
    });

    // Ready while the database answers and at least one engine host is healthy (ADR-0012); the
    // host states are the pool's, refreshed by its health probes, not probed per request.
    a.get('/readyz', { schema: { summary: 'The database answers and at least one engine host is healthy; every host listed' } }, async (_req, reply) => {
      let dbOk = false;
      try {
        dbOk = await deps.storageReady();
      } catch (err) {
        deps.logger.error({ err }, 'readiness: database ping failed');
      }
      await deps.pool.refreshIfOlder(1000);
      const hosts = deps.pool.describe();
      const up = deps.pool.hosts.find((h) => h.usable);
      const ready = dbOk && up !== undefined;
      return reply.code(ready ? 200 : 503).send({
        status: ready ? 'ready' : 'unavailable',
        database: dbOk ? 'ok' : 'error',
        engine: up ? { status: 'up', version: up.version } : { status: 'down', error: hosts.map((h) => `${h.name}: ${h.last_error ?? h.health}`).join('; ') },
        engines: hosts.map((h) => ({ name: h.name, url: h.url, health: h.health, circuit: h.circuit, version: h.version })),
      });
    });

    a.get('/engines', { schema: { summary: 'The engine hosts: health, circuit, slots, installed and resident models, load times, jobs run and loads' } }, async () => ({
      engines: deps.pool.describe(),
    }));
  });

  void app.register(jobRoutes, deps);
  void app.register(keyRoutes, deps);
  void app.register(sseRoutes, deps);
  void app.register(ollamaRoutes, deps);
  void app.register(uiRoutes, deps); // the dashboard at /ui (ADR-0014)
  void app.register(openAiRoutes, { ...deps, prefix: '/v1' });
  return app;
}

export type App = ReturnType<typeof buildApp>;
