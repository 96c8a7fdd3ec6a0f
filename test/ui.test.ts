/**
 * The dashboard at /ui (ADR-0014), driven in a real headless Chromium (Debian's, through
 * playwright-core) against a real server on loopback with the fake Ollama and real receivers.
 * Every check reads what the page shows and compares it with exact values; actions taken in the
 * page are checked through the API or at the receiver.
 */
import type { Browser, Locator, Page } from 'playwright-core';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { launchChromium } from './support/browser.js';
import { hello, startHarness, type Harness } from './support/harness.js';
import { startFakeOllama, type FakeOllamaOptions } from './support/fake-ollama.js';
import { startReceiver, type Receiver } from './support/receiver.js';
import { pollJob, sleep } from './support/util.js';

let browser: Browser;
beforeAll(async () => {
  browser = await launchChromium();
});
afterAll(async () => {
  await browser?.close();
});

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function harness(over: Parameters<typeof startHarness>[0] = {}, fake: FakeOllamaOptions = {}): Promise<Harness> {
  const h = await startHarness(over, fake);
  cleanups.push(() => h.stop());
  return h;
}

async function receiver(status = 200): Promise<Receiver> {
  const r = await startReceiver(() => status);
  cleanups.push(() => r.close());
  return r;
}

/** Opens the dashboard at `hash`; collects page errors and console errors (CSP violations among them). */
async function open(h: Harness, hash = ''): Promise<{ page: Page; problems: string[] }> {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  cleanups.push(() => context.close());
  const page = await context.newPage();
  const problems: string[] = [];
  page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
  page.on('console', (m) => {
    if (m.type() === 'error') problems.push(`console: ${m.text()}`);
  });
  const res = await page.goto(`${h.url}/ui${hash}`);
  expect(res?.status()).toBe(200);
  return { page, problems };
}

/** Waits until the locator's trimmed text equals `want` (the page refreshes every 2 s). */
async function text(l: Locator, want: string, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  let last: string | null = null;
  while (Date.now() < end) {
    last = (await l.count()) === 1 ? ((await l.textContent()) ?? '').trim() : `<${await l.count()} elements>`;
    if (last === want) return;
    await sleep(50);
  }
  throw new Error(`expected ${JSON.stringify(want)}, the page shows ${JSON.stringify(last)}`);
}

/** Waits until the locator's text satisfies `pred`; returns that text. */
async function textWhere(l: Locator, pred: (t: string) => boolean, what: string, timeoutMs = 10_000): Promise<string> {
  const end = Date.now() + timeoutMs;
  let last = '';
  while (Date.now() < end) {
    last = (await l.count()) === 1 ? ((await l.textContent()) ?? '') : '';
    if (pred(last)) return last;
    await sleep(25);
  }
  throw new Error(`${what}: the page shows ${JSON.stringify(last)}`);
}

async function rowCount(l: Locator, want: number, timeoutMs = 10_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while ((await l.count()) !== want) {
    if (Date.now() > end) throw new Error(`expected ${want} rows, the page shows ${await l.count()}`);
    await sleep(50);
  }
}

const count = (page: Page, model: string, state: string) => page.locator(`[data-testid="count"][data-model="${model}"][data-state="${state}"]`);
const total = (page: Page, state: string) => page.locator(`[data-testid="count-total"][data-state="${state}"]`);

async function expectCounts(page: Page, want: Record<string, Record<string, number>>): Promise<void> {
  const totals: Record<string, number> = { queued: 0, loading: 0, working: 0, done: 0, failed: 0, canceled: 0 };
  for (const [model, states] of Object.entries(want)) {
    for (const st of Object.keys(totals)) {
      await text(count(page, model, st), String(states[st] ?? 0));
      totals[st]! += states[st] ?? 0;
    }
  }
  for (const [st, n] of Object.entries(totals)) await text(total(page, st), String(n));
  expect(await page.locator('[data-testid="count"]').count()).toBe(Object.keys(want).length * 6);
}

/** Submits a job whose chat the fake never answers, and waits until it is working. */
async function occupySlot(h: Harness, body: Record<string, unknown>): Promise<string> {
  h.fake.enqueue({ kind: 'hang' });
  const id = await h.submit(body);
  await h.waitForState(id, ['working']);
  return id;
}

describe('the /ui page', () => {
  it('is served with a strict same-origin CSP, immutable assets, and stays out of the API document', async () => {
    const h = await harness();
    const page = await fetch(`${h.url}/ui`);
    expect(page.status).toBe(200);
    expect(page.headers.get('content-type')).toBe('text/html; charset=utf-8');
    const csp = page.headers.get('content-security-policy') ?? '';
    expect(csp).toContain("script-src 'self'");
    expect(csp).toContain("connect-src 'self'");
    expect(csp).not.toContain('unsafe-inline');
    const html = await page.text();
    const assets = [...html.matchAll(/(?:src|href)="(\/ui\/assets\/[^"]+)"/g)].map((m) => m[1]!);
    expect(assets).toHaveLength(2);
    for (const a of assets) {
      const r = await fetch(`${h.url}${a}`);
      expect(r.status, a).toBe(200);
      expect(r.headers.get('cache-control')).toBe('public, max-age=31536000, immutable');
      expect(r.headers.get('content-type')).toMatch(a.endsWith('.js') ? /^text\/javascript/ : /^text\/css/);
    }
    expect((await fetch(`${h.url}/ui/assets/nope.js`)).status).toBe(404);
    const info = await h.api('/ui/api/info');
    expect(info.body).toEqual({ version: expect.any(String), concurrency: h.config.concurrency, engine: { host: new URL(h.fake.url).host } });
    const doc = await h.api('/openapi.json');
    expect(Object.keys(doc.body.paths).filter((p) => p.startsWith('/ui'))).toEqual([]);
  });
});

describe('overview', () => {
  it('shows the counts by model and state, and follows them live', async () => {
    const h = await harness({ concurrency: 1, engineIdleTimeoutMs: 60_000 });
    for (let i = 0; i < 3; i++) await h.waitForState(await h.submit(hello(`finish ${i}`)), ['done']);
    const held = await occupySlot(h, hello('hold the slot', { model: 'qwen3' }));
    await h.submit(hello('wait 1', { model: 'qwen3' }));
    await h.submit(hello('wait 2', { model: 'qwen3' }));

    const { page, problems } = await open(h);
    await expectCounts(page, { 'llama3.2': { done: 3 }, qwen3: { working: 1, queued: 2 } });
    await text(page.locator('[data-testid="stat-queued"] .stat-value'), '2');
    await text(page.locator('[data-testid="stat-running"] .stat-value'), '1');
    await text(page.locator('[data-testid="stat-done"] .stat-value'), '3');

    // Free the slot: the held job is canceled, the two queued ones run; the page follows.
    expect((await h.api(`/jobs/${held}/cancel`, { method: 'POST' })).status).toBe(200);
    await expectCounts(page, { 'llama3.2': { done: 3 }, qwen3: { done: 2, canceled: 1 } });
    expect(problems).toEqual([]);
  });
});

describe('jobs table', () => {
  it('filters by state and model and pages with the cursor', async () => {
    const h = await harness();
    const ids: string[] = [];
    for (let i = 0; i < 22; i++) ids.push(await h.submit(hello(`job ${i}`, { model: i % 2 ? 'qwen3' : 'llama3.2' })));
    for (const id of ids) await h.waitForState(id, ['done']);
    const { page, problems } = await open(h, '#/jobs');
    const rows = page.locator('[data-testid="job-row"]');
    // Newest first, 20 a page.
    await textWhere(rows.first(), (t) => t.includes(ids[21]!), 'the newest job first');
    expect(await rows.count()).toBe(20);
    // Where each ran: the engine host and the instance, as GET /jobs says.
    const newest = (await h.api(`/jobs/${ids[21]}`)).body;
    expect(newest.engine).toEqual(expect.any(String));
    await text(rows.first().locator('[data-testid="job-ran-on"]'), `${newest.engine} · ${newest.instance}`);
    await page.click('[data-testid="page-older"]');
    await textWhere(rows.first(), (t) => t.includes(ids[1]!), 'page 2 starts with the 21st newest');
    expect(await rows.count()).toBe(2);
    await page.click('[data-testid="page-newer"]');
    await textWhere(rows.first(), (t) => t.includes(ids[21]!), 'back to page 1');

    await page.fill('[data-testid="filter-model"]', 'qwen3');
    await page.press('[data-testid="filter-model"]', 'Enter');
    await rowCount(rows, 11);
    await textWhere(rows.first(), (t) => t.includes(ids[21]!), 'the newest qwen3 job');
    expect(new URL(page.url()).hash).toBe('#/jobs?model=qwen3');

    await page.selectOption('[data-testid="filter-state"]', 'queued');
    await rowCount(rows, 0);
    expect(new URL(page.url()).hash).toBe('#/jobs?state=queued&model=qwen3');
    expect(problems).toEqual([]);
  });
});

describe('job detail', () => {
  it("shows a running job's tokens as they stream, then the result", async () => {
    const words = 'alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon';
    const h = await harness({ concurrency: 1, engineIdleTimeoutMs: 60_000 }, { defaultChunkDelayMs: 150 });
    // Held in the queue until the page is watching, so it sees every token (deltas are not replayed).
    const blocker = await occupySlot(h, hello('blocker'));
    const id = await h.submit(hello(words));
    const { page, problems } = await open(h, `#/jobs/${id}`);
    await text(page.locator('[data-testid="job-state"]'), 'queued');
    await rowCount(page.locator('[data-testid="output"] .live-dot'), 1);
    expect((await h.api(`/jobs/${blocker}/cancel`, { method: 'POST' })).status).toBe(200);

    const live = page.locator('[data-testid="live-output"]');
    const partial = await textWhere(live, (t) => t.includes('echo: alpha beta'), 'the first tokens');
    // Seen while the job is still generating, and not all of it yet.
    expect((await h.api(`/jobs/${id}`)).body.state).toBe('working');
    expect(partial).toMatch(/^Let me think\.echo: alpha beta/);
    expect(partial).not.toContain('upsilon');

    // Done: the stored result replaces the live text.
    await text(page.locator('[data-testid="job-state"]'), 'done', 15_000);
    const ran = (await h.api(`/jobs/${id}`)).body;
    await text(page.locator('[data-testid="job-engine"]'), ran.engine);
    await text(page.locator('[data-testid="job-instance"]'), ran.instance);
    await text(page.locator('[data-testid="result-output"] .content'), `echo: ${words}`);
    await text(page.locator('[data-testid="result-output"] .thinking'), 'Let me think.');
    await text(page.locator('[data-testid="transition"]').nth(3).locator('.badge'), 'done');
    expect(await page.locator('[data-testid="transition"]').count()).toBe(4);
    expect(problems).toEqual([]);
  });

  it('cancels the job from the page', async () => {
    const h = await harness({ concurrency: 1, engineIdleTimeoutMs: 60_000 });
    const id = await occupySlot(h, hello('never finishes'));
    const { page, problems } = await open(h, `#/jobs/${id}`);
    await text(page.locator('[data-testid="job-state"]'), 'working');
    await page.click('[data-testid="cancel"]');
    await page.click('[data-testid="cancel-yes"]');
    const j = await h.waitForState(id, ['canceled', 'done', 'failed'], 5_000);
    expect(j.state).toBe('canceled');
    await text(page.locator('[data-testid="job-state"]'), 'canceled');
    await text(page.locator('[data-testid="notice"]'), 'Cancel: done');
    // The engine request was closed too.
    await h.fake.waitForRequests(1, (r) => r.kind === 'chat' && r.aborted, 5_000);
    expect(problems).toEqual([]);
  });

  it('redelivers a webhook event from the page', async () => {
    const rcv = await receiver();
    const h = await harness();
    const id = await h.submit(hello('deliver me', { state_webhook_url: `${rcv.url}/hook`, webhook_events: ['done'] }));
    const event = `${id}:done`;
    await rcv.waitFor((r) => r.some((x) => x.event?.event_id === event));
    await pollJob(h, id, (j) => j.webhook.deliveries[0]?.status === 'delivered', 'delivered');

    const { page, problems } = await open(h, `#/jobs/${id}`);
    const row = page.locator('[data-testid="delivery"][data-state="done"]');
    await text(row.locator('[data-testid="delivery-status"]'), 'delivered');
    await text(row.locator('[data-testid="delivery-attempts"]'), '1');
    expect(rcv.received.filter((x) => x.event?.event_id === event)).toHaveLength(1);

    await row.locator('[data-testid="redeliver"]').click();
    await rcv.waitFor((r) => r.filter((x) => x.event?.event_id === event).length === 2);
    await text(page.locator('[data-testid="notice"]'), `Redeliver done: 1 event queued again (${event})`);
    await text(row.locator('[data-testid="delivery-status"]'), 'delivered');
    expect(problems).toEqual([]);
  });
});

describe('engines and receivers', () => {
  it('shows the engine: up, slots, resident and installed models', async () => {
    const h = await harness({ concurrency: 3 });
    await h.waitForState(await h.submit(hello('load me')), ['done']);
    const { page, problems } = await open(h, '#/engines');
    const host = page.locator('[data-testid="engine-host"]');
    await text(host.locator('.panel-head .badge'), 'up');
    await text(host.locator('[data-testid="engine-slots"]'), '0 / 3');
    await text(host.locator('[data-testid="resident-model"] td').first(), 'llama3.2:latest');
    expect(problems).toEqual([]);
  });

  it('lists a receiver whose deliveries fail, with its counts and last error', async () => {
    const bad = await receiver(500);
    const good = await receiver(200);
    const h = await harness({ webhookMaxAttempts: 2 });
    const failing = [
      await h.submit(hello('a', { state_webhook_url: `${bad.url}/hook`, webhook_events: ['done'] })),
      await h.submit(hello('b', { state_webhook_url: `${bad.url}/hook`, webhook_events: ['done'] })),
    ];
    const fine = await h.submit(hello('c', { state_webhook_url: `${good.url}/ok`, webhook_events: ['done'] }));
    for (const id of failing) await pollJob(h, id, (j) => j.webhook.deliveries[0]?.status === 'failed', 'delivery failed');
    await pollJob(h, fine, (j) => j.webhook.deliveries[0]?.status === 'delivered', 'delivered');

    const { page, problems } = await open(h, '#/receivers');
    const rows = page.locator('[data-testid="failing-receiver"]');
    await text(rows.locator('td').first(), `${bad.url}/hook`);
    expect(await rows.count()).toBe(1);
    const cells = (await rows.locator('td').allTextContents()).map((t) => t.trim());
    // receiver, jobs, failed, retrying, delivered, last status
    expect(cells.slice(0, 6)).toEqual([`${bad.url}/hook`, '2', '2', '0', '0', '500']);
    expect(cells[6]).toMatch(/500/);
    expect(problems).toEqual([]);
  });
});

describe('engine pool and API keys', () => {
  it('shows every engine host of the pool, each with its slots and models (GET /engines)', async () => {
    const f1 = await startFakeOllama();
    const f2 = await startFakeOllama({ models: ['mistral'] });
    cleanups.push(() => f1.close(), () => f2.close());
    const h2 = await startHarness({ engines: [`${f1.url}?name=gpu1&slots=2`, `${f2.url}?name=gpu2&slots=1`] }, {}, f1);
    cleanups.push(() => h2.stop());
    await h2.waitForState(await h2.submit(hello('warm')), ['done']);
    await h2.waitForState(await h2.submit({ ...hello('other'), model: 'mistral' }), ['done']);
    const { page, problems } = await open(h2, '#/engines');
    const hosts = page.locator('[data-testid="engine-host"]');
    await textWhere(hosts.first(), (t) => t.includes('gpu1'), 'first host card');
    expect(await hosts.count()).toBe(2);
    await text(hosts.nth(0).locator('[data-testid="engine-slots"]'), '0 / 2');
    await text(hosts.nth(1).locator('[data-testid="engine-slots"]'), '0 / 1');
    await text(hosts.nth(1).locator('[data-testid="resident-model"] td').first(), 'mistral:latest');
    expect(problems).toEqual([]);
  });

  it('with authentication on, asks for a key once and shows only that key\'s jobs', async () => {
    const admin = 'ui-admin-token-0123456789';
    const h = await harness({ adminToken: admin });
    const mk = async (name: string) =>
      (await h.api('/keys', { method: 'POST', headers: { authorization: `Bearer ${admin}` }, json: { name } })).body.key as string;
    const [ka, kb] = [await mk('a'), await mk('b')];
    const submitAs = async (key: string, text: string) =>
      (await h.api('/jobs', { method: 'POST', headers: { authorization: `Bearer ${key}` }, json: hello(text) })).body.job_id as string;
    const mine = [await submitAs(ka, 'a1'), await submitAs(ka, 'a2')];
    const theirs = [await submitAs(kb, 'b1'), await submitAs(kb, 'b2'), await submitAs(kb, 'b3')];
    for (const id of mine) {
      const until = Date.now() + 10_000;
      while ((await h.api(`/jobs/${id}`, { headers: { authorization: `Bearer ${ka}` } })).body.state !== 'done' && Date.now() < until) await sleep(20);
    }

    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    cleanups.push(() => context.close());
    const page = await context.newPage();
    const unauthorized: string[] = [];
    page.on('response', (r) => r.status() === 401 && unauthorized.push(new URL(r.url()).pathname));
    expect((await page.goto(`${h.url}/ui#/jobs`))?.status()).toBe(200);
    const prompt = page.locator('[data-testid="key-prompt"]');
    await prompt.waitFor({ state: 'visible', timeout: 10_000 });
    await page.locator('[data-testid="key-input"]').fill(ka);
    await prompt.locator('button[type="submit"]').click();
    const rows = page.locator('[data-testid="job-row"]');
    const end = Date.now() + 10_000;
    while (Date.now() < end && (await rows.count()) !== 2) await sleep(50);
    const shown = await rows.evaluateAll((els) => els.map((e) => e.getAttribute('data-job')));
    expect(shown.sort()).toEqual([...mine].sort());
    for (const id of theirs) expect(shown).not.toContain(id);
    expect(await prompt.count()).toBe(0);
    // The key is kept for the tab: a reload asks for nothing.
    await page.reload();
    while (Date.now() < end + 5_000 && (await rows.count()) !== 2) await sleep(50);
    expect(await rows.count()).toBe(2);
    expect(await prompt.count()).toBe(0);
  });
});
