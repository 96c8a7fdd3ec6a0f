import type { FastifyInstance } from 'fastify';
import { Unauthorized } from '../errors.js';
import type { Keys } from '../jobs/keys.js';
import { OPEN, type Principal } from '../jobs/principal.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** Who is asking (ADR-0013); set by the authentication hook before any route runs. */
    principal: Principal;
  }
}

const ANONYMOUS: Principal = { kind: 'anonymous' };
/** Routes anyone may call: health, the API description and the dashboard's static page (its data needs a key). */
const OPEN_PATHS = /^\/(healthz|readyz|openapi\.json)$|^\/docs(\/|$)|^\/ui\/?$|^\/ui\/assets\//;
/** An artifact URL that carries a signature authenticates by it (webhook receivers hold no key). */
const SIGNED_ARTIFACT = /^\/jobs\/[^/]+\/artifacts\/[^/]+$/;

/**
 * Authentication (ADR-0013): every request gets a `principal`. With FOREMAN_ADMIN_TOKEN unset
 * everyone is `open`. Otherwise a request needs `Authorization: Bearer <key or admin token>`
 * (401 with `WWW-Authenticate: Bearer` if missing, unknown or revoked), except on the open
 * routes, signed artifact URLs, and /metrics with FOREMAN_METRICS_OPEN.
 */
export function registerAuth(app: FastifyInstance, keys: Keys, opts: { metricsOpen: boolean }): void {
  app.decorateRequest('principal', null as never);
  if (!keys.enabled) {
    app.addHook('onRequest', (req, _reply, done) => {
      req.principal = OPEN;
      done();
    });
    return;
  }
  app.addHook('onRequest', async (req) => {
    const q = req.url.indexOf('?');
    const path = q < 0 ? req.url : req.url.slice(0, q);
    if (OPEN_PATHS.test(path)) {
      req.principal = ANONYMOUS;
      return;
    }
    const who = await keys.authenticate(req.headers.authorization);
    if (who.kind === 'anonymous') {
      const signed = q >= 0 && SIGNED_ARTIFACT.test(path) && /(^|&)sig=/.test(req.url.slice(q + 1));
      if (!signed && !(path === '/metrics' && opts.metricsOpen)) throw new Unauthorized();
    }
    req.principal = who;
  });
}
