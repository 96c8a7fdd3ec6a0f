/**
 * Regression tests for the "Hardening" review: one `describe` per finding, named after it.
 *
 * Everything stays on loopback. Addresses the SSRF guard must refuse (cloud metadata, special
 * ranges, NAT64 forms) are only ever used as IP-literal webhook URLs, which the guard refuses
 * before any socket is opened; each such test first asserts `refusal()` for the address, so a
 * regression fails the test before the service is given the URL.
 *
 * Timing-sensitive assertions use generous bounds (about 1 s where the findings say "promptly");
 * the file runs in about 30 s, 10 of them in finding 8 (a direct load waits 10 s for a turn).
 */
import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import Database from 'better-sqlite3';
import { afterEach, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig, type Config } from '../src/config.js';
import { StorageUnavailable } from '../src/errors.js';
import { SSE_BUFFER_MAX } from '../src/http/sse.js';
import { uuidv7 } from '../src/ids.js';
import type { NewJob } from '../src/queue/driver.js';
import { LIST_SCAN_BUDGET } from '../src/queue/shared.js';
import { GroupCommit } from '../src/queue/sqlite/group-commit.js';
import { blockListOf, refusal } from '../src/webhooks/ssrf.js';
import { MAIN } from './support/child.js';
import type { FakeOllamaOptions } from './support/fake-ollama.js';
import { hello, startHarness, tempDir, type Harness } from './support/harness.js';
import { startReceiver, type Receiver, type Responder } from './support/receiver.js';
import { jobCount, pollJob, settled, sleep, sqlite, storedJob, until } from './support/util.js';

// ---------------------------------------------------------------------------
// plumbing

const cleanups: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) {
    try {
      await c();
    } catch {
      /* best effort */
    }
  }
});

async function harness(over: Partial<Config> = {}, fakeOpts: FakeOllamaOptions = {}): Promise<Harness> {
  const h = await startHarness(over, fakeOpts);
  cleanups.push(() => h.stop());
  return h;
}

async function receiver(fn?: Responder): Promise<Receiver> {
  const r = await startReceiver(fn);
  cleanups.push(() => r.close());
  return r;
}

const portOf = (h: Harness) => Number(new URL(h.url).port);

/** One request over node:http to 127.0.0.1, with an explicit Host header. */
function rawHttp(
  h: Harness,
  p: string,
  host: string,
  init: { method?: string; body?: string | Buffer; headers?: Record<string, string> } = {},
): Promise<{ status: number; headers: http.IncomingHttpHeaders; text: string; body: any }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      { host: '127.0.0.1', port: portOf(h), path: p, method: init.method ?? 'GET', agent: false, headers: { host, ...init.headers } },
      (res) => {
        const parts: Buffer[] = [];
        res.on('data', (d: Buffer) => parts.push(d));
        res.on('end', () => {
          const text = Buffer.concat(parts).toString('utf8');
          let body: any = null;
          try {
            body = text ? JSON.parse(text) : null;
          } catch {
            body = text;
          }
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text, body });
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(init.body);
  });
}

function expectError(res: { status: number; body: any }, status: number, code: string, field?: string): void {
  expect(res.status, JSON.stringify(res.body)).toBe(status);
  expect(res.body?.code, JSON.stringify(res.body)).toBe(code);
  expect(typeof res.body?.message).toBe('string');
  if (field !== undefined) expect(res.body.field).toBe(field);
}

/** Submits a job whose chat the fake never answers, and waits until it is `working` (holds a slot). */
async function occupySlot(h: Harness, text = 'blocker'): Promise<string> {
  h.fake.enqueue({ kind: 'hang' });
  const id = await h.submit(hello(text));
  await h.waitForState(id, ['working']);
  return id;
}

/** The first delivery's last_error, once it has one. */
async function deliveryError(h: Harness, id: string, timeoutMs = 10_000): Promise<string> {
  const j = await pollJob(h, id, (j) => typeof j.webhook?.deliveries?.[0]?.last_error === 'string', 'a delivery error', timeoutMs);
  return j.webhook.deliveries[0].last_error as string;
}

const NEVER = /never allowed/;
const OWN = /own address/;

// ---------------------------------------------------------------------------

describe('finding 1: SSRF defaults', () => {
  const METADATA = ['100.100.100.200', '192.0.0.192', '198.18.0.1', '169.254.169.254', '64:ff9b::a9fe:a9fe', '64:ff9b::100.100.100.200'];

  it('refusal(): metadata and special-purpose addresses are never allowed, in every form, whatever blockPrivate says', () => {
    const forms = [
      ...METADATA,
      '198.19.255.254', // the rest of 198.18.0.0/15
      '192.0.0.8', // the rest of 192.0.0.0/24
      '64:ff9b::6464:64c8', // 100.100.100.200 over NAT64, hex form (what the URL parser produces)
      '::ffff:169.254.169.254', // IPv4-mapped
      '::ffff:a9fe:a9fe', // IPv4-mapped, hex form
      '::ffff:6464:64c8',
      'fd00:ec2::254',
      '169.254.0.1',
      'fe80::1',
      '64:ff9b:1::a9fe:a9fe', // local-use NAT64 prefix
      '2002:a9fe:a9fe::1', // 6to4 carrying 169.254.169.254
      '2002:6464:64c8::', // 6to4 carrying 100.100.100.200
    ];
    for (const a of forms) {
      for (const blockPrivate of [false, true]) {
        expect(refusal(a, blockPrivate), `${a} blockPrivate=${blockPrivate}`).toMatch(NEVER);
        // An allow-list never reopens them.
        expect(refusal(a, blockPrivate, 80, { allow: blockListOf(['0.0.0.0/0', '::/0']) }), `${a} with allow-all`).toMatch(NEVER);
      }
    }
    // What the URL parser hands the guard for the bracketed NAT64 literals.
    expect(new URL('http://[64:ff9b::100.100.100.200]/').hostname).toBe('[64:ff9b::6464:64c8]');
  });

  it("refusal(): Foreman's own address and port is never allowed, also behind a wildcard listener; other ports are", () => {
    const self = () => ({ address: '127.0.0.1', port: 8080 });
    for (const a of ['127.0.0.1', '127.0.0.2', '::1', '::ffff:127.0.0.1', '::ffff:7f00:1']) {
      expect(refusal(a, false, 8080, { self }), a).toMatch(OWN);
      expect(refusal(a, false, 8080, { self, allow: blockListOf(['127.0.0.0/8', '::1/128']) }), `${a} allow-listed`).toMatch(OWN);
    }
    expect(refusal('127.0.0.1', false, 8081, { self })).toBeNull();
    expect(refusal('127.0.0.1', false, 8080, { self: () => null })).toBeNull();

    const wildcard = () => ({ address: '0.0.0.0', port: 9000 });
    expect(refusal('127.0.0.1', false, 9000, { self: wildcard })).toMatch(OWN);
    const own = Object.values(os.networkInterfaces())
      .flatMap((ifs) => ifs ?? [])
      .filter((i) => i.family === 'IPv4' && !i.internal)
      .map((i) => i.address);
    for (const a of own) {
      expect(refusal(a, false, 9000, { self: wildcard }), `interface address ${a}`).toMatch(OWN);
      expect(refusal(a, false, 9001, { self: wildcard }) ?? '', `interface address ${a}, another port`).not.toMatch(OWN);
    }
  });

  it('refusal(): loopback and private ranges are refused only with blockPrivate, except the FOREMAN_WEBHOOK_ALLOW_NETS ranges', () => {
    for (const a of ['127.0.0.1', '10.1.2.3', '192.168.1.1', '172.16.0.1', '::1', 'fd12::1']) {
      expect(refusal(a, false), a).toBeNull();
      expect(refusal(a, true), a).toMatch(/FOREMAN_WEBHOOK_BLOCK_PRIVATE/);
    }
    const allow = blockListOf(['127.0.0.0/8', '10.1.0.0/16']);
    expect(refusal('127.0.0.1', true, 80, { allow })).toBeNull();
    expect(refusal('10.1.2.3', true, 80, { allow })).toBeNull();
    expect(refusal('10.2.0.1', true, 80, { allow })).toMatch(/FOREMAN_WEBHOOK_BLOCK_PRIVATE/);
    expect(() => blockListOf(['10.0.0.0/33'])).toThrow();
    expect(() => blockListOf(['not-a-net'])).toThrow();
    let err: unknown;
    try {
      loadConfig({ FOREMAN_WEBHOOK_ALLOW_NETS: '10.0.0.0/8,bogus' });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as ConfigError).variable).toBe('FOREMAN_WEBHOOK_ALLOW_NETS');
    expect(loadConfig({}).webhookBlockPrivate).toBeUndefined();
  });

  it("a webhook pointing at Foreman's own API (cancel another job) is refused, and the victim keeps running", async () => {
    const h = await harness({ concurrency: 1, engineIdleTimeoutMs: 60_000 });
    const victim = await occupySlot(h, 'victim');
    const port = portOf(h);
    const urls = [
      `${h.url}/jobs/${victim}/cancel`,
      `http://localhost:${port}/jobs/${victim}/cancel`,
      `http://[::1]:${port}/jobs/${victim}/cancel`,
      `http://[::ffff:127.0.0.1]:${port}/jobs/${victim}/cancel`,
      `http://127.0.0.2:${port}/jobs/${victim}/cancel`,
    ];
    const ids: string[] = [];
    for (const url of urls) ids.push(await h.submit(hello('attacker', { state_webhook_url: url, webhook_events: ['queued'] })));
    for (const [i, id] of ids.entries()) expect(await deliveryError(h, id), urls[i]).toMatch(OWN);
    await sleep(100);
    const v = await h.api(`/jobs/${victim}`);
    expect(v.body.state).toBe('working');
    expect(h.fake.requests.filter((r) => r.kind === 'chat' && r.aborted)).toHaveLength(0);
  });

  it('webhooks to metadata and special-purpose addresses are refused by the running service (never allowed)', async () => {
    const h = await harness({ concurrency: 1, engineIdleTimeoutMs: 60_000, webhookMaxAttempts: 2 });
    await occupySlot(h);
    for (const a of METADATA) {
      // Precondition: the guard refuses it, so no socket is ever opened for it below.
      expect(refusal(a, false), a).toMatch(NEVER);
      const host = a.includes(':') ? `[${a}]` : a;
      const id = await h.submit(hello('meta', { state_webhook_url: `http://${host}/latest/meta-data/`, webhook_events: ['queued'] }));
      expect(await deliveryError(h, id), a).toMatch(NEVER);
    }
  });

  it('listening off loopback (FOREMAN_HOST=0.0.0.0), private receivers are refused by default (FOREMAN_WEBHOOK_BLOCK_PRIVATE)', async () => {
    const h = await harness({ host: '0.0.0.0', auth: 'off' });
    expect(h.config.webhookBlockPrivate).toBeUndefined();
    const rcv = await receiver();
    const id = await h.submit(hello('private', { state_webhook_url: `${rcv.url}/hook`, webhook_events: ['queued'] }));
    expect(await deliveryError(h, id)).toMatch(/FOREMAN_WEBHOOK_BLOCK_PRIVATE/);
    await sleep(50);
    expect(rcv.received).toHaveLength(0);
  });

  it('off loopback, FOREMAN_WEBHOOK_ALLOW_NETS=127.0.0.0/8 lets the loopback receiver through (but never Foreman itself)', async () => {
    const h = await harness({ host: '0.0.0.0', auth: 'off', webhookAllowNets: ['127.0.0.0/8'] });
    const rcv = await receiver();
    const id = await h.submit(hello('allowed', { state_webhook_url: `${rcv.url}/hook`, webhook_events: ['queued'] }));
    await rcv.waitFor((rs) => rs.some((r) => r.event?.job_id === id));
    await pollJob(h, id, (j) => j.webhook.deliveries[0]?.status === 'delivered', 'delivered');
    const self = await h.submit(hello('self', { state_webhook_url: `${h.url}/healthz`, webhook_events: ['queued'] }));
    expect(await deliveryError(h, self)).toMatch(OWN);
  });

  it('off loopback, an explicit FOREMAN_WEBHOOK_BLOCK_PRIVATE=false delivers to the loopback receiver', async () => {
    const h = await harness({ host: '0.0.0.0', auth: 'off', webhookBlockPrivate: false });
    const rcv = await receiver();
    const id = await h.submit(hello('explicit', { state_webhook_url: `${rcv.url}/hook`, webhook_events: ['queued'] }));
    await rcv.waitFor((rs) => rs.some((r) => r.event?.job_id === id));
    await pollJob(h, id, (j) => j.webhook.deliveries[0]?.status === 'delivered', 'delivered');
  });

  it('a loopback Foreman (the default) keeps delivering to loopback receivers', async () => {
    const h = await harness();
    expect(h.config.webhookBlockPrivate).toBeUndefined();
    const rcv = await receiver();
    const id = await h.submit(hello('loopback', { state_webhook_url: `${rcv.url}/hook` }));
    const j = await settled(h, id);
    expect(j.webhook.deliveries.map((d: any) => d.status)).toEqual(['delivered', 'delivered', 'delivered', 'delivered']);
    expect(rcv.received.map((r) => r.event.state)).toEqual(['queued', 'loading', 'working', 'done']);
  });
});

// ---------------------------------------------------------------------------

describe('finding 2: DNS rebinding (Host check)', () => {
  it('a foreign Host gets 421 host_not_allowed on the API, and nothing is done', async () => {
    const h = await harness({ concurrency: 1, engineIdleTimeoutMs: 60_000 });
    const victim = await occupySlot(h);
    const port = portOf(h);
    const before = (await jobCount(h));
    for (const host of [`evil.example:${port}`, 'evil.example', `127.0.0.1.evil.example:${port}`, `localhost.evil.example:${port}`, `10.0.0.1:${port}`]) {
      const list = await rawHttp(h, '/jobs', host);
      expectError(list, 421, 'host_not_allowed');
      expect(list.headers['content-type']).toMatch(/^application\/json/);
      expectError(await rawHttp(h, `/jobs/${victim}`, host), 421, 'host_not_allowed');
      const body = JSON.stringify(hello('rebound'));
      expectError(await rawHttp(h, '/jobs', host, { method: 'POST', body, headers: { 'content-type': 'application/json' } }), 421, 'host_not_allowed');
      expectError(await rawHttp(h, `/jobs/${victim}/cancel`, host, { method: 'POST' }), 421, 'host_not_allowed');
    }
    expect((await jobCount(h))).toBe(before);
    expect((await h.api(`/jobs/${victim}`)).body.state).toBe('working');
  });

  it('/healthz and /readyz answer whatever the Host', async () => {
    const h = await harness();
    const health = await rawHttp(h, '/healthz', 'evil.example');
    expect(health.status).toBe(200);
    expect(health.body).toEqual({ status: 'ok' });
    const ready = await rawHttp(h, '/readyz', 'evil.example:1234');
    expect(ready.status).not.toBe(421);
    expect(ready.body?.code).not.toBe('host_not_allowed');
  });

  it('loopback names are served: localhost:PORT, 127.0.0.1:PORT, [::1]:PORT', async () => {
    const h = await harness();
    const port = portOf(h);
    for (const host of [`localhost:${port}`, `127.0.0.1:${port}`, `[::1]:${port}`, 'localhost', `LOCALHOST:${port}`]) {
      const r = await rawHttp(h, '/jobs', host);
      expect(r.status, host).toBe(200);
      expect(Array.isArray(r.body.jobs)).toBe(true);
    }
  });

  it('hosts in FOREMAN_ALLOWED_HOSTS and the FOREMAN_PUBLIC_URL host are served; others are not', async () => {
    const h = await harness({ allowedHosts: ['foreman.lan'], publicUrl: 'http://jobs.example.test:9999' });
    expect((await rawHttp(h, '/jobs', 'foreman.lan:8080')).status).toBe(200);
    expect((await rawHttp(h, '/jobs', 'FOREMAN.LAN')).status).toBe(200);
    expect((await rawHttp(h, '/jobs', 'jobs.example.test:9999')).status).toBe(200);
    expectError(await rawHttp(h, '/jobs', 'other.lan'), 421, 'host_not_allowed');
    expectError(await rawHttp(h, '/jobs', 'foreman.lan.evil.example'), 421, 'host_not_allowed');
  });
});

// ---------------------------------------------------------------------------

describe('finding 3: disk full / storage failure must not cause a duplicate storm', () => {
  it('while the delivery cannot be recorded the receiver gets no further copies; once storage is back it is recorded', async () => {
    const h = await harness({ concurrency: 1, engineIdleTimeoutMs: 60_000 });
    await occupySlot(h); // so the worker writes nothing meanwhile
    const db = sqlite(h);
    cleanups.push(() => void db.pragma('query_only = 0')); // before the harness stops
    let readOnly = false;
    const rcv = await receiver(() => {
      if (!readOnly) {
        readOnly = true;
        db.pragma('query_only = 1'); // storage refuses writes from the moment the receiver has the event
      }
      return 200;
    });
    const id = await h.submit(hello('storage', { state_webhook_url: `${rcv.url}/hook`, webhook_events: ['queued'] }));
    await rcv.waitFor((rs) => rs.length >= 1);
    await sleep(1_000);
    expect(rcv.received.filter((r) => r.event?.job_id === id)).toHaveLength(1);
    expect(storedJob(h, id)!.deliveries.map((d) => d.status)).toEqual(['pending']);
    db.pragma('query_only = 0');
    await until('the delivery to be recorded', async () => storedJob(h, id)?.deliveries[0]?.status === 'delivered', 10_000);
    await sleep(200);
    const copies = rcv.received.filter((r) => r.event?.job_id === id).length;
    expect(copies).toBeGreaterThanOrEqual(1);
    expect(copies).toBeLessThanOrEqual(2);
    const j = await h.api(`/jobs/${id}`);
    expect(j.body.webhook.deliveries[0].status).toBe('delivered');
  });
});

// ---------------------------------------------------------------------------

describe('finding 4: group commit after a failed operation', () => {
  function freshDb(): { db: Database.Database; file: string } {
    const dir = tempDir('foreman-gc-');
    const file = path.join(dir, 'gc.db');
    const db = new Database(file);
    db.pragma('journal_mode = WAL');
    db.exec('CREATE TABLE t (name TEXT, body BLOB)');
    cleanups.push(() => {
      db.close();
      fs.rmSync(dir, { recursive: true, force: true });
    });
    return { db, file };
  }

  /** Every op that resolved is in the table; every op that rejected is not. */
  function expectConsistent(db: Database.Database, names: string[], settledOps: PromiseSettledResult<unknown>[]) {
    const rows = new Set((db.prepare('SELECT name FROM t').all() as { name: string }[]).map((r) => r.name));
    names.forEach((n, i) => expect(rows.has(n), `op ${n}: ${settledOps[i]!.status}`).toBe(settledOps[i]!.status === 'fulfilled'));
  }

  it('an op that ends the whole transaction (ROLLBACK + throw): the ops after it reject with StorageUnavailable and do not persist', async () => {
    const { db } = freshDb();
    const gc = new GroupCommit(db, () => {});
    const ins = db.prepare('INSERT INTO t (name) VALUES (?)');
    const a = gc.run(() => ins.run('A'));
    const b = gc.run(() => {
      db.exec('ROLLBACK'); // what SQLite does on SQLITE_FULL and friends
      throw new Error('SQLITE_FULL (simulated)');
    });
    const c = gc.run(() => ins.run('C'));
    const out = await Promise.allSettled([a, b, c]);
    expect(out[2]!.status).toBe('rejected');
    expect((out[2] as PromiseRejectedResult).reason).toBeInstanceOf(StorageUnavailable);
    expect(out[1]!.status).toBe('rejected');
    const rows = (db.prepare('SELECT name FROM t').all() as { name: string }[]).map((r) => r.name);
    expect(rows).not.toContain('C');
    expectConsistent(db, ['A', 'B', 'C'], out);
    expect(db.inTransaction).toBe(false);
    // The next group commits normally.
    await gc.run(() => ins.run('D'));
    expect((db.prepare('SELECT name FROM t').all() as { name: string }[]).map((r) => r.name)).toContain('D');
  });

  it('a real SQLITE_FULL (PRAGMA max_page_count) in the middle of a group: nothing after it runs outside the transaction', async () => {
    const { db } = freshDb();
    const gc = new GroupCommit(db, () => {});
    const ins = db.prepare('INSERT INTO t (name, body) VALUES (?, ?)');
    const pages = db.pragma('page_count', { simple: true }) as number;
    db.pragma(`max_page_count = ${pages + 1}`);
    const a = gc.run(() => ins.run('A', null));
    const b = gc.run(() => ins.run('B', Buffer.alloc(200_000))); // overflow pages: SQLITE_FULL ends the transaction
    const c = gc.run(() => ins.run('C', null));
    const out = await Promise.allSettled([a, b, c]);
    expect(out[1]!.status).toBe('rejected');
    expect((out[1] as PromiseRejectedResult).reason).toBeInstanceOf(StorageUnavailable);
    expect(out[2]!.status).toBe('rejected');
    expect((out[2] as PromiseRejectedResult).reason).toBeInstanceOf(StorageUnavailable);
    expectConsistent(db, ['A', 'B', 'C'], out);
    expect(db.inTransaction).toBe(false);
  });
});

// ---------------------------------------------------------------------------

describe('finding 5: a saturated receiver backlog does not slow other receivers', () => {
  it('1,500 events owed to a hanging receiver: every event for a healthy receiver arrives within ~1 s', async () => {
    const h = await harness({ concurrency: 1, engineIdleTimeoutMs: 60_000, webhookTimeoutMs: 30_000 });
    const hang = await receiver(() => 'hang');
    const ok = await receiver();
    await occupySlot(h); // the worker stays put: only deliveries move
    const now = Date.now();
    const backlog: NewJob[] = Array.from({ length: 1_500 }, (_, i) => ({
      id: uuidv7(now),
      model: 'llama3.2',
      request: { model: 'llama3.2', messages: [{ role: 'user', content: `backlog ${i}` }] },
      metadata: null,
      webhookUrl: `${hang.url}/hook`,
      webhookEvents: ['queued'],
      maxAttempts: 3,
      priority: 0,
      deadlineAt: null,
      idempotency: null,
    }));
    const out = await h.service.driver.jobsInsert({ jobs: backlog, now, maxQueued: 1_000_000 });
    expect(out.filter((o) => o.ok)).toHaveLength(1_500);
    await hang.waitFor((rs) => rs.length >= 1, 5_000);

    const ids: string[] = [];
    for (let i = 0; i < 10; i++) {
      ids.push(await h.submit(hello(`healthy ${i}`, { state_webhook_url: `${ok.url}/hook`, webhook_events: ['queued'] })));
      await sleep(30);
    }
    await ok.waitFor((rs) => ids.every((id) => rs.some((r) => r.event?.job_id === id)), 10_000);
    const latencies: number[] = [];
    for (const id of ids) {
      const j = (await h.api(`/jobs/${id}`)).body;
      const queuedAt = Date.parse(j.transitions.find((t: any) => t.state === 'queued').at);
      const arrived = ok.received.find((r) => r.event?.job_id === id)!.at;
      latencies.push(arrived - queuedAt);
    }
    expect(Math.max(...latencies), `latencies ${latencies.join(',')}`).toBeLessThan(1_000);
    // The backlog is real: its receiver holds at most the per-origin cap of attempts.
    expect(hang.received.length).toBeGreaterThanOrEqual(1);
    expect(hang.received.length).toBeLessThanOrEqual(h.config.webhookPerUrlConcurrency);
  });
});

// ---------------------------------------------------------------------------

describe('finding 6: listing statement cache / metadata filter cap', () => {
  it('9 metadata.* filters → 400 validation_failed naming the 9th; 8 → 200', async () => {
    const h = await harness();
    const q = (n: number) => Array.from({ length: n }, (_, i) => `metadata.k${i + 1}=v${i + 1}`).join('&');
    expectError(await h.api(`/jobs?${q(9)}`), 400, 'validation_failed', 'metadata.k9');
    const eight = await h.api(`/jobs?${q(8)}`);
    expect(eight.status, JSON.stringify(eight.body)).toBe(200);
    expect(eight.body.jobs).toEqual([]);
  });

  it('many distinct listing shapes are all answered (the statement cache stays bounded)', async () => {
    const h = await harness();
    const id = await h.submit(hello('listed', { metadata: { k1: 'v1', k2: 'v2' } }));
    await h.waitForState(id, ['done']);
    let shapes = 0;
    for (let m = 0; m <= 8; m++)
      for (const state of ['', '&state=done'])
        for (const model of ['', '&model=llama3.2'])
          for (const after of ['', '&created_after=2000-01-01T00:00:00Z']) {
            const meta = Array.from({ length: m }, (_, i) => `&metadata.k${i + 1}=v${i + 1}`).join('');
            const r = await h.api(`/jobs?limit=5${meta}${state}${model}${after}`);
            expect(r.status, JSON.stringify(r.body)).toBe(200);
            expect(r.body.jobs.map((j: any) => j.job_id)).toEqual(m <= 2 ? [id] : []);
            shapes++;
          }
    expect(shapes).toBeGreaterThan(64);
  });
});

// ---------------------------------------------------------------------------

describe('finding 7: SSE and connections', () => {
  it('maxWatchersPerJob: 2 → a third watcher of one job gets 503 too_many_watchers; a freed slot can be taken again', async () => {
    const h = await harness({ maxWatchersPerJob: 2, concurrency: 1, engineIdleTimeoutMs: 60_000 });
    const id = await occupySlot(h);
    const ctls: AbortController[] = [];
    cleanups.push(() => ctls.forEach((c) => c.abort()));
    const watch = async (jobId: string) => {
      const ctl = new AbortController();
      ctls.push(ctl);
      const res = await fetch(`${h.url}/jobs/${jobId}/events`, { signal: ctl.signal });
      return { res, ctl };
    };
    const w1 = await watch(id);
    const w2 = await watch(id);
    expect(w1.res.status).toBe(200);
    expect(w2.res.status).toBe(200);
    expect(w1.res.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const third = await fetch(`${h.url}/jobs/${id}/events`);
    expect(third.status).toBe(503);
    expect(((await third.json()) as any).code).toBe('too_many_watchers');
    expect(third.headers.get('retry-after')).not.toBeNull();
    // Another job has watchers of its own.
    const other = await h.submit(hello('other job'));
    const wo = await watch(other);
    expect(wo.res.status).toBe(200);
    w1.ctl.abort();
    const again = await until(
      'a watcher slot to free up',
      async () => {
        const ctl = new AbortController();
        ctls.push(ctl);
        const r = await fetch(`${h.url}/jobs/${id}/events`, { signal: ctl.signal });
        if (r.status === 200) return r;
        ctl.abort();
        return null;
      },
      3_000,
    );
    expect(again.status).toBe(200);
  });

  it('maxConnections: 5 → with 5 idle sockets open, a 6th connection gets HTTP 503 too_many_connections', async () => {
    const h = await harness({ maxConnections: 5 });
    const port = portOf(h);
    const idle: net.Socket[] = [];
    cleanups.push(() => idle.forEach((s) => s.destroy()));
    for (let i = 0; i < 5; i++) {
      const s = net.connect(port, '127.0.0.1');
      s.on('error', () => {});
      idle.push(s);
      await new Promise<void>((r) => s.once('connect', () => r()));
    }
    await sleep(50);
    const sixth = net.connect(port, '127.0.0.1');
    sixth.on('error', () => {});
    cleanups.push(() => void sixth.destroy());
    const text = await new Promise<string>((resolve) => {
      const parts: Buffer[] = [];
      sixth.on('data', (d: Buffer) => parts.push(d));
      sixth.on('close', () => resolve(Buffer.concat(parts).toString('utf8')));
      setTimeout(() => sixth.destroy(), 3_000);
    });
    expect(text).toMatch(/^HTTP\/1\.1 503 /);
    const body = JSON.parse(text.slice(text.indexOf('\r\n\r\n') + 4));
    expect(body.code).toBe('too_many_connections');
    // Once the idle ones go, connections are served again.
    idle.forEach((s) => s.destroy());
    const r = await until(
      'a connection to be served',
      async () => {
        const res = await rawHttp(h, '/healthz', `127.0.0.1:${port}`).catch(() => null);
        return res?.status === 200 ? res : null;
      },
      3_000,
    );
    expect(r.status).toBe(200);
  });

  const HUGE = 16 * 1024 * 1024;

  /** A raw client that sends `request` and then reads nothing until told to. */
  function stuckClient(port: number, request: string) {
    const sock = net.connect(port, '127.0.0.1');
    sock.pause();
    sock.on('error', () => {});
    cleanups.push(() => void sock.destroy());
    let bytes = 0;
    let tail = '';
    sock.on('data', (d: Buffer) => {
      bytes += d.length;
      tail = (tail + d.toString('latin1')).slice(-4096);
    });
    sock.write(request);
    return {
      /** Reads everything left (what the kernel still holds) until the connection ends. */
      async drain(timeoutMs = 10_000): Promise<{ bytes: number; tail: string; ended: boolean }> {
        const ended = await new Promise<boolean>((resolve) => {
          if (sock.destroyed) return resolve(true);
          const t = setTimeout(() => resolve(false), timeoutMs);
          sock.once('close', () => {
            clearTimeout(t);
            resolve(true);
          });
          sock.resume();
        });
        return { bytes, tail, ended };
      },
    };
  }

  it(`an SSE watcher that never reads is dropped once its unsent output passes SSE_BUFFER_MAX (${SSE_BUFFER_MAX} bytes)`, async () => {
    expect(SSE_BUFFER_MAX).toBe(1024 * 1024);
    const h = await harness({ concurrency: 1, engineIdleTimeoutMs: 60_000 });
    const blocker = await occupySlot(h);
    const id = await h.submit(hello('big'));
    h.fake.enqueue({ kind: 'huge', bytes: HUGE });
    const port = portOf(h);
    const c = stuckClient(port, `GET /jobs/${id}/events HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\n\r\n`);
    await until('the watcher to subscribe', async () => h.service.events.watchers(id) === 1);
    expect((await h.api(`/jobs/${blocker}/cancel`, { method: 'POST' })).status).toBe(200);
    const done = await h.waitForState(id, ['done', 'failed'], 20_000);
    expect(done.state).toBe('done'); // dropping the watcher does not hurt the job
    const got = await c.drain();
    expect(got.ended).toBe(true);
    expect(got.bytes).toBeLessThan(HUGE / 2);
    expect(got.tail).not.toContain('"state":"done"');
  });

  it('an /api/chat NDJSON client that never reads is cut off past the cap, and its job is canceled', async () => {
    const h = await harness({ concurrency: 1, engineIdleTimeoutMs: 60_000 });
    const blocker = await occupySlot(h);
    h.fake.enqueue({ kind: 'huge', bytes: HUGE });
    const port = portOf(h);
    const before = (await jobCount(h));
    const body = JSON.stringify({ model: 'llama3.2', messages: [{ role: 'user', content: 'big ndjson' }] });
    const c = stuckClient(
      port,
      `POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
    );
    await until('the /api/chat job to exist', async () => (await jobCount(h)) === before + 1);
    const id = (sqlite(h).prepare('SELECT id FROM jobs ORDER BY seq DESC LIMIT 1').pluck().get() as string);
    expect((await h.api(`/jobs/${blocker}/cancel`, { method: 'POST' })).status).toBe(200);
    const end = await h.waitForState(id, ['done', 'failed', 'canceled'], 20_000);
    expect(end.state).toBe('canceled');
    const got = await c.drain();
    expect(got.ended).toBe(true);
    expect(got.bytes).toBeLessThan(HUGE / 2);
  });
});

// ---------------------------------------------------------------------------

describe('finding 8: direct loads bypass the queue', () => {
  it('8 concurrent direct loads: at most 2 reach the engine, the rest get 503 engine_busy after ~10 s, and ordinary jobs run meanwhile', async () => {
    const h = await harness({ engineIdleTimeoutMs: 30_000 });
    const directLoads = () => h.fake.requests.filter((r) => r.kind === 'load' && r.body?.model === 'qwen3');
    h.fake.setLoadBehaviour({ kind: 'hang' });
    const t0 = Date.now();
    const answered: { status: number; body: any; headers: Headers; ms: number }[] = [];
    const loads = Array.from({ length: 8 }, () =>
      h.api('/api/chat', { method: 'POST', json: { model: 'qwen3', messages: [] } }).then((r) => {
        answered.push({ ...r, ms: Date.now() - t0 });
      }),
    );
    // The two loads hanging at the engine must be answered before the server closes, or their
    // keep-alive connections hold its shutdown: stopping the fake ends them.
    cleanups.push(async () => {
      await h.fake.stop();
      await Promise.race([Promise.allSettled(loads), sleep(5_000)]);
    });
    await until('two direct loads at the engine', async () => directLoads().length >= 2);
    await sleep(300);
    expect(directLoads()).toHaveLength(2);
    // Loads the worker asks for (on its own engine client) are answered normally from here on.
    h.fake.setLoadBehaviour(null);
    const s = Date.now();
    const id = await h.submit(hello('ordinary'));
    const j = await h.waitForState(id, ['done', 'failed'], 15_000);
    expect(j.state).toBe('done');
    expect(Date.now() - s).toBeLessThan(1_500);
    // Two hang at the engine; the six that waited for a turn give up with 503 engine_busy.
    await until('six loads to be answered', async () => answered.length >= 6, 14_000);
    expect(answered).toHaveLength(6);
    for (const r of answered) {
      expect(r.status, JSON.stringify(r.body)).toBe(503);
      expect(r.body.code).toBe('engine_busy');
      expect(typeof r.body.error).toBe('string');
      expect(r.headers.get('retry-after')).toBe('5');
      expect(r.ms).toBeGreaterThanOrEqual(9_500);
    }
    expect(directLoads()).toHaveLength(2);
  }, 30_000);
});

// ---------------------------------------------------------------------------

describe('finding 9: per-URL cap keyed by origin', () => {
  it('20 hanging URLs that differ only by query hold at most webhookPerUrlConcurrency connections; other receivers are served promptly', async () => {
    const h = await harness({ webhookPerUrlConcurrency: 4, webhookTimeoutMs: 30_000 });
    const hang = await receiver(() => 'hang');
    const ok = await receiver();
    let open = 0;
    let maxOpen = 0;
    // Count connections at the hanging receiver's socket level.
    const countServer = net.createServer((client) => {
      open++;
      maxOpen = Math.max(maxOpen, open);
      const upstream = net.connect(Number(new URL(hang.url).port), '127.0.0.1');
      client.pipe(upstream).pipe(client);
      const done = () => {
        open--;
        client.destroy();
        upstream.destroy();
      };
      client.once('close', done);
      client.on('error', () => {});
      upstream.on('error', () => {});
    });
    await new Promise<void>((r) => countServer.listen(0, '127.0.0.1', r));
    const proxied: net.Socket[] = [];
    countServer.on('connection', (s) => proxied.push(s));
    cleanups.push(() => {
      proxied.forEach((s) => s.destroy());
      return new Promise<void>((r) => countServer.close(() => r()));
    });
    const hangUrl = `http://127.0.0.1:${(countServer.address() as net.AddressInfo).port}`;
    for (let i = 0; i < 20; i++) {
      await h.submit(hello(`slow ${i}`, { state_webhook_url: `${hangUrl}/hook?i=${i}`, webhook_events: ['queued'] }));
    }
    await hang.waitFor((rs) => rs.length >= 4, 5_000);
    const ids: string[] = [];
    for (let i = 0; i < 5; i++) {
      ids.push(await h.submit(hello(`fast ${i}`, { state_webhook_url: `${ok.url}/hook`, webhook_events: ['queued'] })));
      await sleep(20);
    }
    await ok.waitFor((rs) => ids.every((id) => rs.some((r) => r.event?.job_id === id)), 5_000);
    for (const id of ids) {
      const j = (await h.api(`/jobs/${id}`)).body;
      const queuedAt = Date.parse(j.transitions.find((t: any) => t.state === 'queued').at);
      expect(ok.received.find((r) => r.event?.job_id === id)!.at - queuedAt).toBeLessThan(1_000);
    }
    await sleep(300);
    expect(maxOpen).toBeLessThanOrEqual(4);
    expect(hang.received).toHaveLength(4);
  });
});

// ---------------------------------------------------------------------------

describe('finding 10: listings are bounded', () => {
  it(`a broad filter over more than LIST_SCAN_BUDGET (${LIST_SCAN_BUDGET}) jobs is refused quickly with filter_too_broad; a plain one pages`, async () => {
    const h = await harness();
    const db = sqlite(h);
    const n = LIST_SCAN_BUDGET + 500;
    const insJob = db.prepare(`INSERT INTO jobs (id, state, model, request, metadata, max_attempts, run_at, created_at,
        started_at, finished_at, updated_at, result, attempt)
      VALUES (?, 'done', 'llama3.2', '{}', '{"batch":"b0"}', 3, ?, ?, ?, ?, ?, '{"message":{"role":"assistant","content":"ok"}}', 1) RETURNING seq`);
    const insMeta = db.prepare(`INSERT INTO job_metadata (key, value, job_seq) VALUES ('batch', 'b0', ?)`);
    const start = Date.now() - n * 10;
    db.transaction(() => {
      for (let i = 0; i < n; i++) {
        const at = start + i * 10;
        const seq = (insJob.get(uuidv7(at), at, at, at, at + 5, at + 5) as { seq: number }).seq;
        insMeta.run(seq);
      }
    })();

    let t = Date.now();
    const broad = await h.api('/jobs?metadata.batch=b0&state=failed');
    const broadMs = Date.now() - t;
    expectError(broad, 400, 'filter_too_broad', 'metadata.batch');
    expect(broadMs).toBeLessThan(1_000);
    expectError(await h.api('/jobs?metadata.batch=b0&metadata.other=x'), 400, 'filter_too_broad', 'metadata.batch');

    t = Date.now();
    const page = await h.api('/jobs?metadata.batch=b0&limit=5');
    expect(Date.now() - t).toBeLessThan(1_000);
    expect(page.status, JSON.stringify(page.body)).toBe(200);
    expect(page.body.jobs).toHaveLength(5);
    expect(page.body.jobs.every((j: any) => j.metadata.batch === 'b0')).toBe(true);
    expect(typeof page.body.next_cursor).toBe('string');
    const next = await h.api(`/jobs?metadata.batch=b0&limit=5&cursor=${encodeURIComponent(page.body.next_cursor)}`);
    expect(next.status).toBe(200);
    expect(next.body.jobs).toHaveLength(5);
    const done = await h.api('/jobs?metadata.batch=b0&state=done&limit=5');
    expect(done.status).toBe(200);
    expect(done.body.jobs).toHaveLength(5);
  });
});

// ---------------------------------------------------------------------------

describe('finding 11: redelivery floods', () => {
  it('redeliverPerMinute: 2 → the 3rd redeliver within a minute is 429 redeliver_rate_limited with Retry-After', async () => {
    const h = await harness({ redeliverPerMinute: 2 });
    const rcv = await receiver();
    const id = await h.submit(hello('redeliver', { state_webhook_url: `${rcv.url}/hook`, webhook_events: ['done'] }));
    await settled(h, id);
    const copies = () => rcv.received.filter((r) => r.event?.job_id === id).length;
    for (let i = 1; i <= 2; i++) {
      const r = await h.api(`/jobs/${id}/webhooks/redeliver?state=done`, { method: 'POST' });
      expect(r.status, JSON.stringify(r.body)).toBe(202);
      expect(r.body.requeued).toEqual([`${id}:done`]);
      await rcv.waitFor(() => copies() === i + 1);
      await settled(h, id);
    }
    const third = await h.api(`/jobs/${id}/webhooks/redeliver?state=done`, { method: 'POST' });
    expectError(third, 429, 'redeliver_rate_limited');
    const wait = Number(third.headers.get('retry-after'));
    expect(Number.isInteger(wait)).toBe(true);
    expect(wait).toBeGreaterThanOrEqual(1);
    expect(wait).toBeLessThanOrEqual(60);
    await sleep(200);
    expect(copies()).toBe(3);
  });

  it('a redeliver while the job still has a pending delivery is 429 redeliver_rate_limited', async () => {
    const h = await harness({ redeliverPerMinute: 5 });
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    cleanups.push(() => release());
    const rcv = await receiver();
    const id = await h.submit(hello('pending', { state_webhook_url: `${rcv.url}/hook`, webhook_events: ['done'] }));
    await settled(h, id);
    rcv.respond(() => gate.then(() => 200));
    expect((await h.api(`/jobs/${id}/webhooks/redeliver?state=done`, { method: 'POST' })).status).toBe(202);
    await rcv.waitFor((rs) => rs.filter((r) => r.event?.job_id === id).length === 2);
    const r = await h.api(`/jobs/${id}/webhooks/redeliver?state=done`, { method: 'POST' });
    expectError(r, 429, 'redeliver_rate_limited');
    expect(r.headers.get('retry-after')).not.toBeNull();
    release();
    await settled(h, id);
    await sleep(100);
    expect(rcv.received.filter((x) => x.event?.job_id === id)).toHaveLength(2);
  });
});

// ---------------------------------------------------------------------------

describe('finding 12: byte quotas', () => {
  it('the completion is stored once: jobs.result is a small reference, the completion artifact holds it, GET shows it', async () => {
    const h = await harness();
    const id = await h.submit(hello('héllo wörld ✓ 你好'));
    const j = await h.waitForState(id, ['done']);
    const db = sqlite(h);
    const row = db.prepare('SELECT seq, result FROM jobs WHERE id = ?').get(id) as { seq: number; result: string };
    const art = db.prepare(`SELECT body FROM artifacts WHERE job_seq = ? AND name = 'completion'`).pluck().get(row.seq) as Buffer;
    expect(art).toBeInstanceOf(Buffer);
    const completion = art.toString('utf8');
    expect(completion).toContain('你好');
    expect(row.result).not.toBe(completion);
    expect(row.result.length).toBeLessThan(100);
    expect(row.result).not.toContain('echo');
    expect(j.result).toEqual(JSON.parse(completion));
    expect(JSON.stringify(j.result)).toBe(completion);
    const served = await h.api(`/jobs/${id}/artifacts/completion`);
    expect(served.status).toBe(200);
    expect(served.raw.equals(art)).toBe(true);
  });

  it('maxQueuedBytes: submits beyond it → 503 queue_full naming FOREMAN_MAX_QUEUED_BYTES, nothing written', async () => {
    const h = await harness({ maxQueuedBytes: 3_000, concurrency: 1, engineIdleTimeoutMs: 60_000 });
    await occupySlot(h);
    const big = (tag: string) => hello(`${tag} ${'x'.repeat(1_000)}`);
    const x = await h.submit(big('X'));
    await h.submit(big('Y'));
    const before = (await jobCount(h));
    const z = await h.api('/jobs', { method: 'POST', json: big('Z') });
    expectError(z, 503, 'queue_full');
    expect(z.body.message).toContain('FOREMAN_MAX_QUEUED_BYTES');
    expect(z.headers.get('retry-after')).not.toBeNull();
    expect((await jobCount(h))).toBe(before);
    // A small one still fits; once X leaves the queue, Z fits too.
    expect((await h.api('/jobs', { method: 'POST', json: hello('small') })).status).toBe(202);
    expect((await h.api(`/jobs/${x}/cancel`, { method: 'POST' })).status).toBe(200);
    expect((await h.api('/jobs', { method: 'POST', json: big('Z') })).status).toBe(202);
  });

  it('maxQueuedBytes counts bytes, not characters (non-ASCII requests)', async () => {
    const h = await harness({ maxQueuedBytes: 3_000, concurrency: 1, engineIdleTimeoutMs: 60_000 });
    await occupySlot(h);
    const db = sqlite(h);
    const queuedBytes = () => db.prepare(`SELECT coalesce(sum(length(CAST(request AS BLOB))), 0) FROM jobs WHERE state = 'queued'`).pluck().get() as number;
    let accepted = 0;
    for (let i = 0; i < 10; i++) {
      const r = await h.api('/jobs', { method: 'POST', json: hello(`${i} ${'é'.repeat(500)}`) }); // ~1,000 bytes, ~500 characters
      if (r.status === 202) accepted++;
      else expectError(r, 503, 'queue_full');
    }
    expect(queuedBytes(), `${accepted} accepted`).toBeLessThanOrEqual(3_000);
  });

  it('failedJobTtlMs longer than jobTtlMs: a sweep past the job TTL removes the done job and keeps the failed one', async () => {
    const h = await harness({ jobTtlMs: 1_000, failedJobTtlMs: 60_000 });
    const ok = await h.submit(hello('will be swept'));
    expect((await h.waitForState(ok, ['done', 'failed'])).state).toBe('done');
    h.fake.enqueue({ kind: 'http_error', status: 400, error: 'bad request' });
    const bad = await h.submit(hello('will fail'));
    expect((await h.waitForState(bad, ['done', 'failed'])).state).toBe('failed');
    await sleep(1_100);
    await h.service.sweepNow();
    expect((await h.api(`/jobs/${ok}`)).status).toBe(404);
    const kept = await h.api(`/jobs/${bad}`);
    expect(kept.status).toBe(200);
    expect(kept.body.state).toBe('failed');
    expect(loadConfig({ FOREMAN_FAILED_JOB_TTL: '30d' }).failedJobTtlMs).toBe(30 * 86_400_000);
    expect(loadConfig({}).failedJobTtlMs).toBeUndefined();
  });
});

// ---------------------------------------------------------------------------

describe('finding 13: a huge deadline', () => {
  it("'100000000d' → 400 validation_failed on deadline; a year and a day ahead → 400; '30d' → 202", async () => {
    const h = await harness();
    const before = (await jobCount(h));
    expectError(await h.api('/jobs', { method: 'POST', json: hello('d', { deadline: '100000000d' }) }), 400, 'validation_failed', 'deadline');
    const yearAndADay = new Date(Date.now() + 366 * 86_400_000 + 3_600_000).toISOString();
    expectError(await h.api('/jobs', { method: 'POST', json: hello('d', { deadline: yearAndADay }) }), 400, 'validation_failed', 'deadline');
    expectError(await h.api('/jobs', { method: 'POST', json: hello('d', { deadline: '367d' }) }), 400, 'validation_failed', 'deadline');
    expectError(await h.api('/jobs', { method: 'POST', json: hello('d', { deadline: '9999-12-31T23:59:59Z' }) }), 400, 'validation_failed', 'deadline');
    expect((await jobCount(h))).toBe(before);
    const ok = await h.api('/jobs', { method: 'POST', json: hello('d', { deadline: '30d' }) });
    expect(ok.status, JSON.stringify(ok.body)).toBe(202);
    const j = await h.api(`/jobs/${ok.body.job_id}`);
    expect(Math.abs(Date.parse(j.body.deadline) - (Date.now() + 30 * 86_400_000))).toBeLessThan(60_000);
  });
});

// ---------------------------------------------------------------------------

describe('finding 14: bad webhook secrets', () => {
  const configError = (env: Record<string, string>): ConfigError => {
    try {
      loadConfig(env);
    } catch (e) {
      expect(e).toBeInstanceOf(ConfigError);
      return e as ConfigError;
    }
    throw new Error(`loadConfig accepted ${JSON.stringify(env)}`);
  };
  const escape = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

  it("'whsec_%%%%', 'whsec_a', 'short' (and a too-short whsec_) throw ConfigError naming FOREMAN_WEBHOOK_SECRET, without the secret", () => {
    const short24 = `whsec_${randomBytes(23).toString('base64')}`;
    for (const secret of ['whsec_%%%%', 'whsec_a', 'short', short24, 'Tr0ub4dor&3']) {
      const e = configError({ FOREMAN_WEBHOOK_SECRET: secret });
      expect(e.variable, secret).toBe('FOREMAN_WEBHOOK_SECRET');
      // The secret as a word of its own ('short' may appear inside "shorter").
      expect(e.message, secret).not.toMatch(new RegExp(`(^|[^A-Za-z0-9_])${escape(secret)}(?![A-Za-z0-9_%])`));
      expect(e.message.includes(secret) && secret !== 'short', `${secret} in "${e.message}"`).toBe(false);
    }
    // In a list, the bad one is named by position, not shown.
    const e = configError({ FOREMAN_WEBHOOK_SECRET: `${'k'.repeat(32)},whsec_a` });
    expect(e.variable).toBe('FOREMAN_WEBHOOK_SECRET');
    expect(e.message).not.toContain('k'.repeat(32));
    expect(e.message).not.toContain('whsec_a');
  });

  it('a 16-byte secret and a whsec_ secret of 24+ bytes of base64 are accepted', () => {
    const plain = 'p'.repeat(16);
    const whsec = `whsec_${randomBytes(24).toString('base64')}`;
    const whsec32 = `whsec_${randomBytes(32).toString('base64')}`;
    expect(loadConfig({ FOREMAN_WEBHOOK_SECRET: plain }).webhookSecrets).toEqual([plain]);
    expect(loadConfig({ FOREMAN_WEBHOOK_SECRET: whsec }).webhookSecrets).toEqual([whsec]);
    expect(loadConfig({ FOREMAN_WEBHOOK_SECRET: `${whsec32},${plain}` }).webhookSecrets).toEqual([whsec32, plain]);
    expect(configError({ FOREMAN_WEBHOOK_SECRET: 'p'.repeat(15) }).variable).toBe('FOREMAN_WEBHOOK_SECRET');
  });
});

// ---------------------------------------------------------------------------

describe('finding 15: an idempotency conflict leaks no job id', () => {
  it('409 idempotency_key_reused does not carry the first job id anywhere', async () => {
    const h = await harness();
    const first = await h.api('/jobs', { method: 'POST', json: hello('first'), headers: { 'idempotency-key': 'idem-leak' } });
    expect(first.status).toBe(202);
    const id = first.body.job_id as string;
    const second = await h.api('/jobs', { method: 'POST', json: hello('second'), headers: { 'idempotency-key': 'idem-leak' } });
    expectError(second, 409, 'idempotency_key_reused');
    expect(second.raw.toString('utf8')).not.toContain(id);
    expect(second.body.message).not.toContain(id);
    for (const [k, v] of second.headers) expect(v, k).not.toContain(id);
  });
});

// ---------------------------------------------------------------------------

describe('finding 16: job retry backoff has a cap', () => {
  it('jobRetryBaseMs 60 s with jobRetryMaxMs 100 ms: a job that fails transiently once is done within a couple of seconds', async () => {
    const h = await harness({ jobRetryBaseMs: 60_000, jobRetryMaxMs: 100 });
    h.fake.enqueue({ kind: 'http_error', status: 503, error: 'busy' });
    const t0 = Date.now();
    const id = await h.submit(hello('retry me'));
    const j = await h.waitForState(id, ['done', 'failed'], 5_000);
    expect(j.state).toBe('done');
    expect(j.attempt).toBe(2);
    expect(Date.now() - t0).toBeLessThan(2_000);
    const chats = h.fake.requests.filter((r) => r.kind === 'chat');
    expect(chats).toHaveLength(2);
    // (Not asserted tighter: the worker can oversleep a retry's run_at by up to pollIntervalMs, 1 s here.)
    expect(chats[1]!.receivedAt - chats[0]!.receivedAt).toBeLessThan(1_900);
  });

  it('the default FOREMAN_JOB_RETRY_MAX is 10 minutes', () => {
    expect(loadConfig({}).jobRetryMaxMs).toBe(600_000);
  });
});

// ---------------------------------------------------------------------------

describe('finding 17: encodings', () => {
  it('Content-Encoding gzip (and others) → 415 unsupported_media_type; charset=utf-16 → 415; charset=utf-8 → 202', async () => {
    const h = await harness();
    const json = JSON.stringify(hello('encoded'));
    const before = (await jobCount(h));
    const post = (body: Buffer | string, headers: Record<string, string>) => h.api('/jobs', { method: 'POST', body, headers });
    expectError(await post(zlib.gzipSync(json), { 'content-type': 'application/json', 'content-encoding': 'gzip' }), 415, 'unsupported_media_type');
    expectError(await post(zlib.deflateSync(json), { 'content-type': 'application/json', 'content-encoding': 'deflate' }), 415, 'unsupported_media_type');
    expectError(await post(zlib.brotliCompressSync(json), { 'content-type': 'application/json', 'content-encoding': 'br' }), 415, 'unsupported_media_type');
    expectError(await post(Buffer.from(json, 'utf16le'), { 'content-type': 'application/json; charset=utf-16' }), 415, 'unsupported_media_type');
    expectError(await post(json, { 'content-type': 'application/json; charset=utf-16' }), 415, 'unsupported_media_type');
    expect((await jobCount(h))).toBe(before);
    const ok = await post(json, { 'content-type': 'application/json; charset=utf-8' });
    expect(ok.status, JSON.stringify(ok.body)).toBe(202);
    const identity = await post(json, { 'content-type': 'application/json', 'content-encoding': 'identity' });
    expect(identity.status, JSON.stringify(identity.body)).toBe(202);
    expect((await jobCount(h))).toBe(before + 2);
  });
});

// ---------------------------------------------------------------------------

describe('finding 18: a lease per attempt', () => {
  // The driver-level guarantees (claim → release/rescue → claim again gives a new lease, and the
  // old lease can no longer move the job) are in test/driver/conformance.ts ("gives every attempt
  // a lease of its own"). Here: the running service gives a retried job's second attempt a new lease.
  it('a job retried after a transient failure runs its second attempt under a different lease', async () => {
    const h = await harness({ engineIdleTimeoutMs: 300, jobRetryBaseMs: 5, jobRetryMaxMs: 5 });
    h.fake.enqueue({ kind: 'stall', after: 1 }, { kind: 'ok', chunkDelayMs: 60 });
    const id = await h.submit(hello('lease one two three four five'));
    const db = sqlite(h);
    const leases = new Map<number, Set<string>>();
    const read = db.prepare('SELECT state, attempt, lease_owner FROM jobs WHERE id = ?');
    await until(
      'the job to finish',
      async () => {
        const r = read.get(id) as { state: string; attempt: number; lease_owner: string | null };
        if (r.lease_owner !== null) {
          const s = leases.get(r.attempt) ?? new Set<string>();
          s.add(r.lease_owner);
          leases.set(r.attempt, s);
        }
        return r.state === 'done' || r.state === 'failed';
      },
      10_000,
    );
    expect((await h.api(`/jobs/${id}`)).body.state).toBe('done');
    expect([...leases.keys()].sort()).toEqual([1, 2]);
    expect(leases.get(1)!.size).toBe(1);
    expect(leases.get(2)!.size).toBe(1);
    expect([...leases.get(1)!][0]).not.toBe([...leases.get(2)!][0]);
  });
});

// ---------------------------------------------------------------------------

describe('also (a): webhook URL tokens are redacted in responses', () => {
  it('GET /jobs/<id> shows token=REDACTED&x=REDACTED and no secret; the receiver gets the real URL', async () => {
    const h = await harness();
    const rcv = await receiver();
    const submitted = await h.api('/jobs', {
      method: 'POST',
      json: hello('redact', { state_webhook_url: `${rcv.url}/hook?token=s3cret&x=1`, webhook_events: ['done'] }),
    });
    expect(submitted.status).toBe(202);
    expect(submitted.raw.toString('utf8')).not.toContain('s3cret');
    const id = submitted.body.job_id as string;
    await settled(h, id);
    const r = await h.api(`/jobs/${id}`);
    expect(r.body.webhook.url).toBe(`${rcv.url}/hook?token=REDACTED&x=REDACTED`);
    expect(r.raw.toString('utf8')).not.toContain('s3cret');
    const list = await h.api('/jobs');
    expect(list.raw.toString('utf8')).not.toContain('s3cret');
    expect(rcv.received).toHaveLength(1);
    expect(rcv.received[0]!.path).toBe('/hook?token=s3cret&x=1');
  });
});

// ---------------------------------------------------------------------------

describe('also (b): bind address', () => {
  it('FOREMAN_HOST=0.0.0.0 (or any non-loopback address) is refused without FOREMAN_AUTH=off', () => {
    for (const host of ['0.0.0.0', '::', '192.168.1.10']) {
      let err: unknown;
      try {
        loadConfig({ FOREMAN_HOST: host });
      } catch (e) {
        err = e;
      }
      expect(err, host).toBeInstanceOf(ConfigError);
      expect((err as ConfigError).variable).toBe('FOREMAN_HOST');
    }
    expect(loadConfig({ FOREMAN_HOST: '0.0.0.0', FOREMAN_AUTH: 'off' }).host).toBe('0.0.0.0');
    for (const host of ['127.0.0.1', '127.0.0.2', 'localhost', '::1']) expect(loadConfig({ FOREMAN_HOST: host }).host).toBe(host);
  });

  it('the process started with FOREMAN_HOST=0.0.0.0 exits with code 2 and names FOREMAN_HOST', async () => {
    const dir = tempDir();
    cleanups.push(() => fs.rmSync(dir, { recursive: true, force: true }));
    const proc = spawn(process.execPath, [MAIN], {
      env: { PATH: process.env.PATH ?? '', FOREMAN_HOST: '0.0.0.0', FOREMAN_PORT: '0', FOREMAN_DATA_DIR: dir, FOREMAN_OLLAMA_URL: 'http://127.0.0.1:9' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    cleanups.push(() => void proc.kill('SIGKILL'));
    let stderr = '';
    proc.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
    proc.stdout.on('data', () => {});
    const code = await Promise.race([
      new Promise<number | null>((r) => proc.on('exit', (c) => r(c))),
      sleep(10_000).then(() => 'still running' as const),
    ]);
    expect(code).toBe(2);
    expect(stderr).toContain('FOREMAN_HOST');
  });
});
