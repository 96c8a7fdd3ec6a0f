/**
 * Regenerates docs/screenshots/*.png (README "Dashboard"): a real Foreman on loopback with the
 * fake Ollama and two real receivers (one healthy, one answering 503), a couple of minutes of
 * varied work so the charts have a history, then headless Chromium photographs each view.
 *
 *   npm run screenshots                               (about 2 minutes)
 *   FOREMAN_SCREENSHOT_SECONDS=30 npm run screenshots (shorter charts)
 */
import fs from 'node:fs';
import path from 'node:path';
import type { Page } from 'playwright-core';
import { launchChromium } from '../test/support/browser.js';
import { hello, startHarness } from '../test/support/harness.js';
import { startFakeOllama } from '../test/support/fake-ollama.js';
import { startReceiver } from '../test/support/receiver.js';

const OUT = path.resolve('docs/screenshots');
const SECONDS = Number(process.env.FOREMAN_SCREENSHOT_SECONDS ?? 120);
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

const good = await startReceiver(() => 200);
const bad = await startReceiver(() => 503);
// Two engine hosts (ADR-0012): gpu1 has every model, gpu2 two of them and one resident at a time.
const gpu1 = await startFakeOllama({ models: ['llama3.2', 'qwen3', 'mistral'], defaultChunkDelayMs: 25, loadDelayMs: 300 });
const gpu2 = await startFakeOllama({ models: ['llama3.2', 'mistral'], defaultChunkDelayMs: 25, maxResident: 1, swapMs: 400 });
const h = await startHarness(
  {
    engines: [`${gpu1.url}?name=gpu1&slots=2`, `${gpu2.url}?name=gpu2&slots=1`],
    webhookMaxAttempts: 3,
    webhookBackoffBaseMs: 500,
    webhookBackoffMaxMs: 5_000,
    engineIdleTimeoutMs: 60_000,
  },
  {},
  gpu1,
);
const browser = await launchChromium();

async function shoot(page: Page, hash: string, name: string, ready: string): Promise<void> {
  await page.goto(`${h.url}/ui${hash}`);
  await page.locator(ready).first().waitFor();
  await sleep(2_500); // a refresh or two, so every panel has its data
  await page.screenshot({ path: path.join(OUT, `${name}.png`), fullPage: true });
  console.log(`docs/screenshots/${name}.png`);
}

try {
  fs.mkdirSync(OUT, { recursive: true });
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 }, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error('page error:', e.message));
  // The page collects its chart history from the moment it opens.
  await page.goto(`${h.url}/ui#/`);

  const models = ['llama3.2', 'qwen3', 'mistral'];
  const start = Date.now();
  let n = 0;
  console.log(`running work for ${SECONDS} s…`);
  while (Date.now() - start < SECONDS * 1000) {
    const phase = (Date.now() - start) / 1000;
    const burst = Math.max(1, Math.round(2 + 2 * Math.sin(phase / 12)));
    for (let i = 0; i < burst; i++, n++) {
      const roll = (n * 37) % 100;
      const body = hello(`request ${n} about the weather in city number ${n % 17}`, {
        model: roll < 6 ? 'llama9' : models[n % models.length],
        metadata: { tenant: ['acme', 'globex', 'initech'][n % 3]! },
        ...(roll >= 6 && roll < 22 ? { state_webhook_url: `${bad.url}/hooks/foreman` } : {}),
        ...(roll >= 22 && roll < 70 ? { state_webhook_url: `${good.url}/webhooks/jobs` } : {}),
      });
      const id = await h.submit(body);
      if (n % 29 === 5) await h.api(`/jobs/${id}/cancel`, { method: 'POST' });
    }
    h.fake.setLoadDelay(150 + ((n * 53) % 700));
    await sleep(2_000);
  }
  // Leave some work queued and running for the overview.
  for (let i = 0; i < 6; i++) await h.submit(hello(`late request ${i}`, { model: models[i % 3] }));

  await shoot(page, '#/', 'overview', '[data-testid="count"]');
  await shoot(page, '#/jobs', 'jobs', '[data-testid="job-row"]');
  await shoot(page, '#/engines', 'engines', '[data-testid="engine-host"]');
  await shoot(page, '#/receivers', 'receivers', '[data-testid="failing-receiver"]');

  // A job caught mid-stream, with its webhook deliveries so far.
  for (;;) {
    const r = await h.api('/jobs?state=queued&limit=1');
    const w = await h.api('/jobs?state=working&limit=1');
    if (r.body.jobs.length === 0 && w.body.jobs.length === 0) break;
    await sleep(200);
  }
  h.fake.enqueue({ kind: 'ok', chunkDelayMs: 90 });
  const text =
    'Write a short note on why durable webhooks matter for long-running LLM jobs, and how a receiver should deduplicate events by their id, ' +
    'retry safely, and verify the signature before trusting the payload it was sent.';
  const id = await h.submit(hello(text, { model: 'qwen3', priority: 10, state_webhook_url: `${good.url}/webhooks/jobs`, metadata: { tenant: 'acme', ticket: 'OPS-1432' } }));
  await page.goto(`${h.url}/ui#/jobs/${id}`);
  await page.locator('[data-testid="live-output"] .content').filter({ hasText: 'deduplicate' }).waitFor({ timeout: 30_000 });
  await page.screenshot({ path: path.join(OUT, 'job-detail.png'), fullPage: true });
  console.log('docs/screenshots/job-detail.png');
} finally {
  await browser.close();
  await h.stop();
  await gpu1.close();
  await gpu2.close();
  await good.close();
  await bad.close();
}
