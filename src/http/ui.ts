import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FastifyPluginAsync } from 'fastify';
import { VERSION } from '../version.js';
import type { AppDeps } from './deps.js';

/**
 * The dashboard at /ui (ADR-0014): the bundle `npm run build` writes to dist/ui, read once when
 * the app is built and served from memory. The page reads the public API like any client; the one
 * route of its own, /ui/api/info, tells what no API route does (the slots, for the engines panel).
 * Hidden from the OpenAPI document: it is not part of the API.
 */

/** Scripts, styles and requests from this origin only; no inline script or style element. */
export const UI_CSP =
  "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

const TYPES: Record<string, string> = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
};

interface Asset {
  body: Buffer;
  type: string;
}

/** dist/ui of the checkout this module is in (src/http in tests, dist/src/http when built). */
function uiDir(): string | null {
  const here = path.dirname(fileURLToPath(import.meta.url));
  for (const up of ['../..', '../../..']) {
    const root = path.resolve(here, up);
    try {
      const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as { name?: string };
      if (pkg.name === 'foreman') return path.join(root, 'dist', 'ui');
    } catch {
      /* not the package root */
    }
  }
  return null;
}

/** index.html and assets/*, or null when the dashboard was not built. */
export function loadUi(dir: string | null = uiDir()): { index: Asset; assets: Map<string, Asset> } | null {
  if (dir === null || !fs.existsSync(path.join(dir, 'index.html'))) return null;
  const assets = new Map<string, Asset>();
  const assetDir = path.join(dir, 'assets');
  for (const name of fs.existsSync(assetDir) ? fs.readdirSync(assetDir) : []) {
    const type = TYPES[path.extname(name)];
    if (type) assets.set(name, { body: fs.readFileSync(path.join(assetDir, name)), type });
  }
  return { index: { body: fs.readFileSync(path.join(dir, 'index.html')), type: TYPES['.html']! }, assets };
}

export const uiRoutes: FastifyPluginAsync<AppDeps> = async (app, deps) => {
  const ui = loadUi();
  if (!ui) deps.logger.warn('the dashboard is not built (dist/ui): /ui answers 404; run npm run build');

  // After the app's standard headers (this hook is the plugin's own, so it runs later).
  app.addHook('onSend', async (_req, reply, payload) => {
    reply.header('content-security-policy', UI_CSP);
    return payload;
  });

  const notBuilt = { code: 'not_found', message: 'the dashboard is not built: run npm run build' };
  for (const url of ['/ui', '/ui/']) {
    app.get(url, { schema: { hide: true } }, async (_req, reply) => {
      if (!ui) return reply.code(404).send(notBuilt);
      return reply.type(ui.index.type).send(ui.index.body);
    });
  }

  app.get<{ Params: { name: string } }>('/ui/assets/:name', { schema: { hide: true } }, async (req, reply) => {
    const a = ui?.assets.get(req.params.name);
    if (!a) return reply.code(404).send({ code: 'not_found', message: 'no such dashboard file' });
    // Content-hashed names (tools/build-ui.ts): a name never changes content.
    return reply.type(a.type).header('cache-control', 'public, max-age=31536000, immutable').send(a.body);
  });

  app.get('/ui/api/info', { schema: { hide: true } }, async () => {
    const engine = new URL(deps.config.ollamaUrl);
    return { version: VERSION, concurrency: deps.config.concurrency, engine: { host: engine.host } };
  });
};
