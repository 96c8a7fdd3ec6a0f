import type { FastifyInstance } from 'fastify';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import { VERSION } from '../version.js';
import { ErrorBody, WebhookEventSchema } from './schemas.js';

/**
 * The self-describing API: OpenAPI 3.1 generated from the routes' TypeBox schemas, served at
 * /openapi.json, with a docs page at /docs. Webhook event bodies are in `webhooks`.
 * Register before the routes so every route is collected.
 */
export function registerOpenApi(app: FastifyInstance, auth: boolean): void {
  void app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'Foreman',
        version: VERSION,
        description:
          'Async job service for Ollama chat work. Errors are JSON {code, message, field?}; the codes are listed in the Error schema.',
      },
      components: {
        schemas: { Error: ErrorBody as unknown as Record<string, never> },
        securitySchemes: {
          bearer: {
            type: 'http',
            scheme: 'bearer',
            description: 'An API key (fm_…) or the admin token. Required when FOREMAN_ADMIN_TOKEN is set (ADR-0013); /healthz, /readyz, /openapi.json and /docs are open.',
          },
        },
      },
      ...(auth ? { security: [{ bearer: [] }] } : {}),
      webhooks: {
        jobStateChanged: {
          post: {
            summary: "Sent to a job's state_webhook_url on each state change it wants (signed; see README)",
            requestBody: { required: true, content: { 'application/json': { schema: WebhookEventSchema as unknown as Record<string, never> } } },
            responses: { '200': { description: 'any 2xx acknowledges; 410 stops further events for the job' } },
          },
        },
      },
    },
  });
  void app.register(swaggerUi, { routePrefix: '/docs' });
  app.get('/openapi.json', { schema: { hide: true } }, async () => app.swagger());
}
