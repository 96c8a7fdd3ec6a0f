/**
 * Service-level regressions for the queue-driver issue: a short TTL is honoured without waiting
 * for the sweep interval, a receiver's Retry-After is not cut to the backoff maximum, and a data
 * directory belongs to one process.
 */
import fs from 'node:fs';
import { describe, expect, it } from 'vitest';
import { hello, tempDir } from './support/harness.js';
import { scoped } from './support/scoped.js';
import { runChild, startChild, type Child } from './support/child.js';
import { startFakeOllama } from './support/fake-ollama.js';
import { sleep } from './support/util.js';

const { cleanups, harness, receiver } = scoped();

describe('TTL shorter than the sweep interval', () => {
  it('a finished job answers 404, artifacts included, within a couple of seconds of its expiry', async () => {
    const h = await harness({ jobTtlMs: 1_000, sweepIntervalMs: 60_000 });
    const id = await h.submit(hello('short-lived'));
    const done = await h.waitForState(id, ['done']);
    const finishedAt = Date.parse(done.finished_at);
    expect((await h.api(`/jobs/${id}/artifacts/completion`)).status).toBe(200);
    let goneAt = 0;
    while (Date.now() < finishedAt + 10_000) {
      const r = await h.api(`/jobs/${id}`);
      if (r.status === 404) {
        expect(r.body.code).toBe('job_not_found');
        goneAt = Date.now();
        break;
      }
      expect(r.status).toBe(200);
      await sleep(50);
    }
    expect(goneAt).toBeGreaterThan(0);
    // Expired at finished + 1 s; gone within about a second of that, not at the next minute.
    expect(goneAt - (finishedAt + 1_000)).toBeLessThan(2_000);
    expect(goneAt).toBeGreaterThanOrEqual(finishedAt + 1_000);
    const art = await h.api(`/jobs/${id}/artifacts/completion`);
    expect(art.status).toBe(404);
    expect(art.body.code).toBe('job_not_found');
  });

  it('a job whose delivery is still pending is kept until the delivery ends', async () => {
    const rcv = await receiver();
    let failing = true;
    rcv.respond(() => (failing ? 500 : 200));
    const h = await harness({ jobTtlMs: 500, sweepIntervalMs: 60_000, webhookBackoffBaseMs: 200, webhookBackoffMaxMs: 200 });
    const id = await h.submit(hello('kept', { state_webhook_url: rcv.url, webhook_events: ['done'] }));
    const done = await h.waitForState(id, ['done']);
    await sleep(Math.max(0, Date.parse(done.finished_at) + 2_000 - Date.now()));
    expect((await h.api(`/jobs/${id}`)).status).toBe(200); // expired, but its done event is owed
    failing = false;
    await rcv.waitFor((rs) => rs.some((r) => r.event?.job_id === id && r.answered === 200), 5_000);
    const end = Date.now() + 5_000;
    let status = 200;
    while (Date.now() < end && status === 200) {
      status = (await h.api(`/jobs/${id}`)).status;
      await sleep(50);
    }
    expect(status).toBe(404);
  });
});

describe('Retry-After beyond the backoff maximum', () => {
  it('waits as long as the receiver asked (2 s), not FOREMAN_WEBHOOK_BACKOFF_MAX (100 ms)', async () => {
    const rcv = await receiver();
    let first = true;
    rcv.respond((_r, res) => {
      if (!first) return 200;
      first = false;
      res.writeHead(503, { 'retry-after': '2', 'content-length': '0' }).end();
      return 'handled';
    });
    const h = await harness({ webhookBackoffBaseMs: 10, webhookBackoffMaxMs: 100 });
    const id = await h.submit(hello('wait for me', { state_webhook_url: rcv.url, webhook_events: ['queued'] }));
    const got = await rcv.waitFor((rs) => rs.filter((r) => r.event?.job_id === id).length >= 2, 10_000);
    const mine = got.filter((r) => r.event?.job_id === id);
    expect(mine.map((r) => r.event.event_id)).toEqual([`${id}:queued`, `${id}:queued`]);
    const gap = mine[1]!.at - mine[0]!.at;
    expect(gap).toBeGreaterThanOrEqual(1_900);
    expect(gap).toBeLessThan(4_000);
  });

  it('a Retry-After beyond FOREMAN_WEBHOOK_RETRY_AFTER_MAX is cut to it', async () => {
    const rcv = await receiver();
    let first = true;
    rcv.respond((_r, res) => {
      if (!first) return 200;
      first = false;
      res.writeHead(429, { 'retry-after': '3600', 'content-length': '0' }).end();
      return 'handled';
    });
    const h = await harness({ webhookBackoffBaseMs: 10, webhookBackoffMaxMs: 100, webhookRetryAfterMaxMs: 300 });
    const id = await h.submit(hello('capped', { state_webhook_url: rcv.url, webhook_events: ['queued'] }));
    const got = await rcv.waitFor((rs) => rs.filter((r) => r.event?.job_id === id).length >= 2, 5_000);
    const mine = got.filter((r) => r.event?.job_id === id);
    const gap = mine[1]!.at - mine[0]!.at;
    expect(gap).toBeGreaterThanOrEqual(250);
    expect(gap).toBeLessThan(2_000);
  });
});

describe('one process per data directory', () => {
  it('a second process on the same FOREMAN_DATA_DIR is refused at start-up; a restart after SIGKILL is not', async () => {
    const fake = await startFakeOllama();
    const dir = tempDir();
    cleanups.push(() => fake.close(), () => fs.rmSync(dir, { recursive: true, force: true }));
    const env = { FOREMAN_DATA_DIR: dir, FOREMAN_OLLAMA_URL: fake.url };
    let first: Child = await startChild(env);
    cleanups.push(() => void first.proc.kill('SIGKILL'));

    const second = await runChild({ ...env, FOREMAN_PORT: '0' });
    expect(second.code).toBe(1);
    expect(second.stderr).toContain('in use by another running Foreman process');
    expect(second.stderr).toContain(dir);

    // The first is unharmed.
    expect((await fetch(`${first.url}/healthz`)).status).toBe(200);

    // SIGKILL releases the lock with the process: a restart starts at once.
    first.proc.kill('SIGKILL');
    await first.exited;
    first = await startChild(env);
    expect((await fetch(`${first.url}/healthz`)).status).toBe(200);
  });
});
