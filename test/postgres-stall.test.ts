/**
 * A database connection that goes silent (a failover, a firewall that dropped its state: packets
 * vanish, nothing is refused) must not hang a request. A statement that gets no answer within the
 * driver's query timeout, or a new connection that gets none within the connect timeout, fails as
 * `StorageUnavailable` (503); the silent connection is thrown away, and the next request uses a
 * new one (ADR-0011, "Bad conditions"). The silence is a TCP relay on loopback, between the driver
 * and this run's private server, that stops relaying.
 */
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { StorageUnavailable } from '../src/errors.js';
import { PostgresDriver } from '../src/queue/postgres/driver.js';
import { newJob } from './driver/conformance.js';
import { createDatabase } from './support/postgres.js';

const cleanups: (() => Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
});

/**
 * A loopback TCP relay to `port`. `stall()`: from now on nothing is relayed, on open connections or
 * new ones (bytes are swallowed, nothing is refused); `heal()`: the connections open so far are
 * cut, and new ones relay again.
 */
async function relay(port: number) {
  const open = new Set<{ a: net.Socket; b: net.Socket }>();
  let stalled = false;
  const server = net.createServer((a) => {
    const b = net.connect(port, '127.0.0.1');
    const pair = { a, b };
    open.add(pair);
    a.on('data', (d) => stalled || b.write(d));
    b.on('data', (d) => stalled || a.write(d));
    const close = () => {
      open.delete(pair);
      a.destroy();
      b.destroy();
    };
    a.on('error', close).on('close', close);
    b.on('error', close).on('close', close);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    stall: () => (stalled = true),
    heal: () => {
      open.forEach((p) => (p.a.destroy(), p.b.destroy()));
      stalled = false;
    },
    close: () =>
      new Promise<void>((resolve) => {
        open.forEach((p) => (p.a.destroy(), p.b.destroy()));
        server.close(() => resolve());
      }),
  };
}

describe('a silent database connection', () => {
  it('a read and a write fail as StorageUnavailable within the query timeout; the next request gets a new connection', async () => {
    const db = await createDatabase('foreman_stall');
    cleanups.push(db.drop);
    const u = new URL(db.url);
    const r = await relay(Number(u.port));
    cleanups.push(r.close);
    u.port = String(r.port);
    const d = new PostgresDriver({ url: u.toString(), instanceId: 'inst-a', crossInstance: false, queryTimeoutMs: 1_000, connectTimeoutMs: 1_000 });
    await d.ready;
    cleanups.unshift(() => d.close());
    const job = newJob();
    await d.jobsInsert({ jobs: [job], now: Date.now(), maxQueued: 10 });
    expect((await d.jobGet({ id: job.id }))?.state).toBe('queued');

    r.stall();
    for (const call of [() => d.jobGet({ id: job.id }), () => d.jobsInsert({ jobs: [newJob()], now: Date.now(), maxQueued: 10 })]) {
      const t0 = performance.now();
      await expect(call()).rejects.toBeInstanceOf(StorageUnavailable);
      const ms = performance.now() - t0;
      expect(ms).toBeGreaterThanOrEqual(900);
      expect(ms).toBeLessThan(3_500);
    }

    r.heal();
    expect((await d.jobGet({ id: job.id }))?.state).toBe('queued');
    const other = newJob();
    expect((await d.jobsInsert({ jobs: [other], now: Date.now(), maxQueued: 10 }))[0]).toMatchObject({ ok: true });
    expect((await d.jobGet({ id: other.id }))?.state).toBe('queued');
  });
});
