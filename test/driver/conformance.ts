/**
 * The queue driver conformance suite (ADR-0010): every method of `QueueDriver`, driven directly
 * with explicit times (time is a parameter everywhere; nothing here sleeps). Any driver runs it
 * through `driverConformance(name, factory)`; nothing in this file knows which database is behind.
 */
import { createHash } from 'node:crypto';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { JobState } from '../../src/domain.js';
import { uuidv7 } from '../../src/ids.js';
import type {
  ClaimedDelivery,
  ClaimedJob,
  DeliveryView,
  InsertOutcome,
  JobView,
  ListedJob,
  NewJob,
  QueueDriver,
  TransitionEvent,
  ApiKeyRecord,
  ClaimHost,
} from '../../src/queue/driver.js';

export type DriverFactory = () => Promise<{ driver: QueueDriver; cleanup: () => Promise<void> }>;

/** All times are offsets from here (ms). */
const T0 = 1_700_000_000_000;
const at = (ms: number): number => T0 + ms;

/** Loopback only: nothing is sent, but no other address appears in a webhook URL. */
const HOOK = 'http://127.0.0.1:9/hook';
const ORIGIN = 'http://127.0.0.1:9';
const BIG_QUEUE = 1_000_000;

const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');
const sorted = <T>(xs: T[]): T[] => [...xs].sort();

/** The run summary a terminal event carries, for a job of model m1 with no usage recorded. */
function runOf(o: { id: string; createdAt: number; startedAt: number | null; finishedAt: number; attempt: number; model?: string }) {
  return {
    createdAt: o.createdAt,
    startedAt: o.startedAt,
    finishedAt: o.finishedAt,
    attempt: o.attempt,
    model: o.model ?? 'm1',
    loadMs: null,
    promptTokens: null,
    completionTokens: null,
    conversationId: o.id,
  };
}

/** A new job with sensible defaults, for driver tests. */
export function newJob(over: Partial<NewJob> = {}): NewJob {
  return {
    id: uuidv7(),
    model: 'm1',
    request: { messages: [{ role: 'user', content: 'hello' }] },
    metadata: null,
    webhookUrl: null,
    webhookEvents: null,
    maxAttempts: 3,
    priority: 0,
    deadlineAt: null,
    idempotency: null,
    ...over,
  };
}

/** Runs the whole suite against a driver: every test, on every driver. */
export function driverConformance(name: string, factory: DriverFactory): void {
  describe(name, () => {
    let d: QueueDriver;
    let cleanup: () => Promise<void>;

    beforeEach(async () => {
      const made = await factory();
      d = made.driver;
      cleanup = made.cleanup;
    });

    afterEach(async () => {
      await cleanup();
    });

    // --- helpers (use the driver of the running test) ---

    /** Inserts jobs that must all be accepted; returns their ids. */
    async function insert(now: number, ...jobs: NewJob[]): Promise<string[]> {
      const out = await d.jobsInsert({ jobs, now, maxQueued: BIG_QUEUE });
      expect(out).toEqual(jobs.map((j) => ({ ok: true, jobId: j.id, replayed: false, state: 'queued', scheduledFor: null })));
      return jobs.map((j) => j.id);
    }

    async function insertOne(now: number, over: Partial<NewJob> = {}): Promise<string> {
      const [id] = await insert(now, newJob(over));
      return id!;
    }

    /** Claims exactly one job. */
    async function claimOne(now: number, owner = 'w1', leaseMs = 1_000): Promise<ClaimedJob> {
      const c = await d.jobsClaim({ owner, limit: 1, now, leaseMs });
      expect(c).toHaveLength(1);
      return c[0]!;
    }

    async function view(id: string): Promise<JobView> {
      const v = await d.jobGet({ id });
      expect(v).not.toBeNull();
      return v!;
    }

    const stateOf = async (id: string): Promise<JobState> => (await view(id)).state;

    /** Claim, working, done. */
    async function runToDone(now: number, owner = 'w1'): Promise<ClaimedJob> {
      const c = await claimOne(now, owner);
      expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: now + 1, leaseMs: 1_000 })).toBe(true);
      expect(await d.jobComplete({ seq: c.seq, lease: c.lease, now: now + 2, result: { ok: true }, artifacts: [], runMs: 1 })).toBe(true);
      return c;
    }

    const claimDeliveries = async (now: number, o: { limit?: number; perOriginLimit?: number; inlineMax?: number } = {}): Promise<ClaimedDelivery[]> =>
      (await d.deliveriesClaim({ now, limit: o.limit ?? 10, perOriginLimit: o.perOriginLimit ?? 10, inlineMax: o.inlineMax ?? 1024 })).deliveries;

    const deliveriesOf = async (id: string): Promise<DeliveryView[]> => (await view(id)).deliveries;
    const statusesOf = async (id: string): Promise<[JobState, string][]> =>
      (await deliveriesOf(id)).map((x) => [x.state, x.status] as [JobState, string]);

    // =========================================================================================
    describe('connection', () => {
      it('ping answers true', async () => {
        expect(await d.ping()).toBe(true);
      });

      it('close resolves and may be called again', async () => {
        await insertOne(at(0));
        await d.close();
        await d.close();
      });

      it('recover only ever re-queues running jobs, and returns exactly the ones it re-queued', async () => {
        const queued = await insertOne(at(0));
        const running = await insertOne(at(1));
        const done = await insertOne(at(2));
        // Claim order is FIFO: `queued` first; give it back so that `running` is the one left running.
        const first = await claimOne(at(10));
        expect(first.id).toBe(queued);
        const r = await claimOne(at(11));
        expect(r.id).toBe(running);
        const c = await claimOne(at(12));
        expect(c.id).toBe(done);
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(13), leaseMs: 1_000 })).toBe(true);
        expect(await d.jobComplete({ seq: c.seq, lease: c.lease, now: at(14), result: 1, artifacts: [], runMs: 1 })).toBe(true);
        expect(await d.jobRelease({ seq: first.seq, lease: first.lease, now: at(15) })).toBe(true);

        const { requeued } = await d.recover({ now: at(20) });
        // Exclusive drivers re-queue `running`; shared ones leave it to the rescuer. Nothing else moves.
        expect(requeued.every((id) => id === running)).toBe(true);
        expect(await stateOf(queued)).toBe('queued');
        expect(await stateOf(done)).toBe('done');
        expect(await stateOf(running)).toBe(requeued.includes(running) ? 'queued' : 'loading');
      });
    });

    // =========================================================================================
    describe('jobsInsert', () => {
      it('inserts jobs as queued, with their fields and metadata', async () => {
        const a = newJob({ model: 'm1', priority: 7, metadata: { batch: 'b1', user: 'u' }, maxAttempts: 5, deadlineAt: at(60_000) });
        const b = newJob({ model: 'm2', webhookUrl: HOOK, webhookEvents: ['done', 'failed'], request: { messages: [], options: { seed: 1 } } });
        const out = await d.jobsInsert({ jobs: [a, b], now: at(1000), maxQueued: 10 });
        expect(out).toEqual([
          { ok: true, jobId: a.id, replayed: false, state: 'queued', scheduledFor: null },
          { ok: true, jobId: b.id, replayed: false, state: 'queued', scheduledFor: null },
        ]);
        const va = await view(a.id);
        expect(va).toEqual({
          seq: expect.any(Number),
          id: a.id,
          state: 'queued',
          model: 'm1',
          attempt: 0,
          maxAttempts: 5,
          priority: 7,
          deadlineAt: at(60_000),
          metadata: { batch: 'b1', user: 'u' },
          createdAt: at(1000),
          startedAt: null,
          finishedAt: null,
          updatedAt: at(1000),
          result: null,
          error: null,
          webhookUrl: null,
          webhookEvents: null,
          transitions: [{ state: 'queued', at: at(1000), attempt: 0 }],
          artifacts: [],
          deliveries: [],
          conversationId: a.id,
          continueFrom: null,
          waiting: false,
          loadMs: null,
          usage: { promptTokens: null, completionTokens: null },
          keyId: null,
          scheduledFor: null,
          engine: null,
          instance: null, // set by a claim
          kind: 'chat',
        });
        const vb = await view(b.id);
        expect(vb.seq).toBeGreaterThan(va.seq);
        expect(vb.metadata).toBeNull();
        expect(vb.webhookUrl).toBe(HOOK);
        expect(vb.webhookEvents).toEqual(['done', 'failed']);
        expect(vb.deliveries).toEqual([]); // 'queued' is not among its events
        // The request travels to the claimer unchanged.
        const c1 = await claimOne(at(2000));
        const c2 = await claimOne(at(2000));
        expect(c1.request).toEqual(a.request);
        expect(c2.request).toEqual({ messages: [], options: { seed: 1 } });
      });

      it('replays an idempotency key with the same body hash: same job, replayed, current state', async () => {
        const idem = { key: 'k1', bodyHash: 'h1', expiresAt: at(10_000) };
        const first = newJob({ idempotency: idem });
        await insert(at(1000), first);
        const again = await d.jobsInsert({ jobs: [newJob({ idempotency: idem })], now: at(2000), maxQueued: 10 });
        expect(again).toEqual([{ ok: true, jobId: first.id, replayed: true, state: 'queued', scheduledFor: null }]);
        expect(await d.jobCancel({ id: first.id, now: at(3000) })).toEqual({ canceled: true, wasRunning: false, state: 'canceled' });
        const third = await d.jobsInsert({ jobs: [newJob({ idempotency: idem })], now: at(9_999), maxQueued: 10 });
        expect(third).toEqual([{ ok: true, jobId: first.id, replayed: true, state: 'canceled', scheduledFor: null }]);
        expect((await d.jobsList({ limit: 10 })).map((j) => j.id)).toEqual([first.id]);
      });

      it('replays a key used earlier in the same batch', async () => {
        const idem = { key: 'k-batch', bodyHash: 'h', expiresAt: at(10_000) };
        const a = newJob({ idempotency: idem });
        const out = await d.jobsInsert({ jobs: [a, newJob({ idempotency: idem }), newJob({ idempotency: { ...idem, bodyHash: 'other' } })], now: at(0), maxQueued: 10 });
        expect(out).toEqual([
          { ok: true, jobId: a.id, replayed: false, state: 'queued', scheduledFor: null },
          { ok: true, jobId: a.id, replayed: true, state: 'queued', scheduledFor: null },
          { ok: false, code: 'idempotency_key_reused' },
        ]);
        expect(await d.jobsList({ limit: 10 })).toHaveLength(1);
      });

      it('refuses a live key reused with a different body hash, and creates nothing', async () => {
        const first = newJob({ idempotency: { key: 'k', bodyHash: 'h1', expiresAt: at(10_000) } });
        await insert(at(1000), first);
        const out = await d.jobsInsert({ jobs: [newJob({ idempotency: { key: 'k', bodyHash: 'h2', expiresAt: at(20_000) } })], now: at(2000), maxQueued: 10 });
        expect(out).toEqual([{ ok: false, code: 'idempotency_key_reused' }]);
        expect((await d.jobsList({ limit: 10 })).map((j) => j.id)).toEqual([first.id]);
      });

      it('treats an expired key (expiresAt <= now) as new: a new job, and the key then points at it', async () => {
        const first = newJob({ idempotency: { key: 'k', bodyHash: 'h1', expiresAt: at(5000) } });
        await insert(at(1000), first);
        // One ms before expiry it still replays.
        expect(await d.jobsInsert({ jobs: [newJob({ idempotency: { key: 'k', bodyHash: 'h1', expiresAt: at(9000) } })], now: at(4999), maxQueued: 10 })).toEqual([
          { ok: true, jobId: first.id, replayed: true, state: 'queued', scheduledFor: null },
        ]);
        // At expiry, even a different body makes a new job.
        const second = newJob({ idempotency: { key: 'k', bodyHash: 'h2', expiresAt: at(9000) } });
        expect(await d.jobsInsert({ jobs: [second], now: at(5000), maxQueued: 10 })).toEqual([{ ok: true, jobId: second.id, replayed: false, state: 'queued', scheduledFor: null }]);
        expect(await d.jobsInsert({ jobs: [newJob({ idempotency: { key: 'k', bodyHash: 'h2', expiresAt: at(9000) } })], now: at(6000), maxQueued: 10 })).toEqual([
          { ok: true, jobId: second.id, replayed: true, state: 'queued', scheduledFor: null },
        ]);
        expect(await d.jobsInsert({ jobs: [newJob({ idempotency: { key: 'k', bodyHash: 'h1', expiresAt: at(9000) } })], now: at(6000), maxQueued: 10 })).toEqual([
          { ok: false, code: 'idempotency_key_reused' },
        ]);
        expect((await d.jobsList({ limit: 10 })).map((j) => j.id)).toEqual([second.id, first.id]);
      });

      it('answers queue_full once maxQueued jobs are queued, counting queued jobs only', async () => {
        const [a, b, c] = [newJob(), newJob(), newJob()];
        expect(await d.jobsInsert({ jobs: [a, b, c], now: at(0), maxQueued: 2 })).toEqual([
          { ok: true, jobId: a.id, replayed: false, state: 'queued', scheduledFor: null },
          { ok: true, jobId: b.id, replayed: false, state: 'queued', scheduledFor: null },
          { ok: false, code: 'queue_full' },
        ]);
        expect(await d.jobGet({ id: c.id })).toBeNull();
        expect(await d.jobsInsert({ jobs: [newJob()], now: at(1), maxQueued: 2 })).toEqual([{ ok: false, code: 'queue_full' }]);
        // A running job does not count...
        await claimOne(at(2));
        const e = newJob();
        expect(await d.jobsInsert({ jobs: [e], now: at(3), maxQueued: 2 })).toEqual([{ ok: true, jobId: e.id, replayed: false, state: 'queued', scheduledFor: null }]);
        expect(await d.jobsInsert({ jobs: [newJob()], now: at(4), maxQueued: 2 })).toEqual([{ ok: false, code: 'queue_full' }]);
        // ...nor does a finished one.
        expect(await d.jobCancel({ id: e.id, now: at(5) })).toEqual({ canceled: true, wasRunning: false, state: 'canceled' });
        const f = newJob();
        expect(await d.jobsInsert({ jobs: [f], now: at(6), maxQueued: 2 })).toEqual([{ ok: true, jobId: f.id, replayed: false, state: 'queued', scheduledFor: null }]);
        expect(await d.jobsList({ limit: 10 })).toHaveLength(4);
      });

      it('replays an idempotency key even when the queue is full', async () => {
        const idem = { key: 'k', bodyHash: 'h', expiresAt: at(10_000) };
        const a = newJob({ idempotency: idem });
        await insert(at(0), a);
        expect(await d.jobsInsert({ jobs: [newJob({ idempotency: idem })], now: at(1), maxQueued: 1 })).toEqual([
          { ok: true, jobId: a.id, replayed: true, state: 'queued', scheduledFor: null },
        ]);
      });

      it('announces stateChanged (queued, n=1) and jobReady only after the commit', async () => {
        const changes: TransitionEvent[] = [];
        const readsAtChange: Promise<JobView | null>[] = [];
        let ready = 0;
        let deliveryReady = 0;
        const j = newJob({ webhookUrl: HOOK });
        d.notifier.on('stateChanged', (e) => {
          changes.push(e);
          // What a listener reads when told must already be committed.
          readsAtChange.push(d.jobGet({ id: e.jobId }));
        });
        d.notifier.on('jobReady', () => ready++);
        d.notifier.on('deliveryReady', () => deliveryReady++);
        const p = d.jobsInsert({ jobs: [j], now: at(1000), maxQueued: 10 });
        expect(changes).toEqual([]);
        expect(ready).toBe(0);
        expect(deliveryReady).toBe(0);
        expect(await p).toEqual([{ ok: true, jobId: j.id, replayed: false, state: 'queued', scheduledFor: null }]);
        expect(changes).toEqual([{ jobId: j.id, state: 'queued', model: 'm1', n: 1, at: at(1000), attempt: 0 }]);
        expect(ready).toBe(1);
        expect(deliveryReady).toBe(1);
        expect(readsAtChange).toHaveLength(1);
        const seen = await readsAtChange[0];
        expect(seen?.state).toBe('queued');
        expect(seen?.deliveries.map((x) => x.state)).toEqual(['queued']);
      });

      it('announces nothing for refused inserts', async () => {
        const events: string[] = [];
        d.notifier.on('stateChanged', (e) => events.push(`state:${e.state}`));
        d.notifier.on('jobReady', () => events.push('ready'));
        const idem = { key: 'k', bodyHash: 'h', expiresAt: at(10_000) };
        await insert(at(0), newJob({ idempotency: idem }));
        events.length = 0;
        await d.jobsInsert({ jobs: [newJob({ idempotency: idem })], now: at(1), maxQueued: 10 });
        await d.jobsInsert({ jobs: [newJob()], now: at(1), maxQueued: 1 });
        expect(events).toEqual([]);
      });
    });

    // =========================================================================================
    describe('jobsClaim', () => {
      it('claims by priority (highest first), then FIFO, each into loading with its own lease', async () => {
        const low1 = await insertOne(at(0), { priority: 0 });
        const high1 = await insertOne(at(1), { priority: 5, model: 'm2', maxAttempts: 4 });
        const low2 = await insertOne(at(2), { priority: 0 });
        const high2 = await insertOne(at(3), { priority: 5 });
        const neg = await insertOne(at(4), { priority: -3 });
        const order: ClaimedJob[] = [];
        for (let i = 0; i < 5; i++) order.push(await claimOne(at(100 + i), `w${i}`));
        expect(order.map((c) => c.id)).toEqual([high1, high2, low1, low2, neg]);
        expect(await d.jobsClaim({ owner: 'w', limit: 5, now: at(200), leaseMs: 1_000 })).toEqual([]);

        const first = order[0]!;
        const v = await view(high1);
        expect(first).toEqual({
          seq: v.seq,
          id: high1,
          model: 'm2',
          request: { messages: [{ role: 'user', content: 'hello' }] },
          attempt: 1,
          maxAttempts: 4,
          lease: expect.any(String),
          history: [],
          kind: 'chat',
        });
        expect(v.state).toBe('loading');
        expect(v.attempt).toBe(1);
        expect(v.startedAt).toBe(at(100));
        expect(v.transitions).toEqual([
          { state: 'queued', at: at(1), attempt: 0 },
          { state: 'loading', at: at(100), attempt: 1 },
        ]);
        expect(new Set(order.map((c) => c.lease)).size).toBe(5);
      });

      it('takes at most `limit` jobs per call and announces each claim', async () => {
        const ids = await insert(at(0), newJob(), newJob(), newJob());
        const changes: TransitionEvent[] = [];
        d.notifier.on('stateChanged', (e) => changes.push(e));
        const got = await d.jobsClaim({ owner: 'w', limit: 2, now: at(10), leaseMs: 1_000 });
        expect(sorted(got.map((c) => c.id))).toEqual(sorted(ids.slice(0, 2)));
        expect(new Set(got.map((c) => c.lease)).size).toBe(2);
        expect(sorted(changes.map((e) => `${e.jobId}:${e.state}:${e.n}:${e.at}:${e.attempt}`))).toEqual(
          sorted(ids.slice(0, 2).map((id) => `${id}:loading:2:${at(10)}:1`)),
        );
        expect((await d.jobsClaim({ owner: 'w', limit: 0, now: at(11), leaseMs: 1_000 })).length).toBe(0);
        expect((await d.jobsClaim({ owner: 'w', limit: 5, now: at(12), leaseMs: 1_000 })).map((c) => c.id)).toEqual([ids[2]]);
      });

      it('returns the claimed jobs in claim order', async () => {
        const low = await insertOne(at(0), { priority: 0 });
        const high = await insertOne(at(1), { priority: 9 });
        const mid = await insertOne(at(2), { priority: 4 });
        const got = await d.jobsClaim({ owner: 'w', limit: 3, now: at(10), leaseMs: 1_000 });
        expect(got.map((c) => c.id)).toEqual([high, mid, low]);
      });

      it('does not claim a job before its run_at (jobRetry), and jobsNextRunAt reports it', async () => {
        expect(await d.jobsNextRunAt({ now: at(0) })).toBeNull();
        const id = await insertOne(at(0));
        const c = await claimOne(at(100));
        expect(await d.jobRetry({ seq: c.seq, lease: c.lease, now: at(200), runAt: at(5000) })).toBe(true);
        const v = await view(id);
        expect(v.state).toBe('queued');
        expect(v.attempt).toBe(1); // a retry counts
        expect(await d.jobsNextRunAt({ now: at(200) })).toBe(at(5000));
        expect(await d.jobsNextRunAt({ now: at(5000) })).toBeNull(); // only what is still ahead
        expect(await d.jobsClaim({ owner: 'w', limit: 10, now: at(4999), leaseMs: 1_000 })).toEqual([]);
        const again = await claimOne(at(5000));
        expect(again.id).toBe(id);
        expect(again.attempt).toBe(2);
        expect(again.lease).not.toBe(c.lease);
        expect(await d.jobsNextRunAt({ now: at(0) })).toBeNull();
        expect((await view(id)).transitions).toEqual([
          { state: 'queued', at: at(0), attempt: 0 },
          { state: 'loading', at: at(100), attempt: 1 },
          { state: 'queued', at: at(200), attempt: 1 },
          { state: 'loading', at: at(5000), attempt: 2 },
        ]);
      });

      it('a delayed job does not hold back ready jobs behind it', async () => {
        const delayed = await insertOne(at(0), { priority: 10 });
        const c = await claimOne(at(1));
        expect(await d.jobRetry({ seq: c.seq, lease: c.lease, now: at(2), runAt: at(10_000) })).toBe(true);
        const ready = await insertOne(at(3), { priority: 0 });
        expect((await d.jobsClaim({ owner: 'w', limit: 10, now: at(4), leaseMs: 1_000 })).map((x) => x.id)).toEqual([ready]);
        expect(await d.jobsNextRunAt({ now: at(4) })).toBe(at(10_000));
        expect(await stateOf(delayed)).toBe('queued');
      });

      it('does not claim a job whose deadline has passed (deadline <= now)', async () => {
        const soon = await insertOne(at(0), { deadlineAt: at(1500), priority: 5 });
        const later = await insertOne(at(1), { deadlineAt: at(1501) });
        const none = await insertOne(at(2));
        const got = await d.jobsClaim({ owner: 'w', limit: 10, now: at(1500), leaseMs: 1_000 });
        expect(sorted(got.map((c) => c.id))).toEqual(sorted([later, none]));
        expect(await stateOf(soon)).toBe('queued');
      });

      it('gives every attempt a lease of its own: claim, release, claim again (same owner) → a new lease', async () => {
        await insertOne(at(0));
        const first = await claimOne(at(10), 'w');
        expect(await d.jobRelease({ seq: first.seq, lease: first.lease, now: at(20) })).toBe(true);
        const second = await claimOne(at(30), 'w');
        expect(second.seq).toBe(first.seq);
        expect(second.attempt).toBe(1); // the released attempt did not count
        expect(second.lease).not.toBe(first.lease);
        // The earlier attempt's lease is dead: it cannot move the new attempt.
        expect(await d.jobSetWorking({ seq: first.seq, lease: first.lease, now: at(40), leaseMs: 1_000 })).toBe(false);
        expect(await d.jobLeaseRenew({ seq: first.seq, lease: first.lease, until: at(99_999) })).toBe(false);
      });

      it('gives every attempt a lease of its own: claim, lease expires, rescue, claim again (same owner) → a new lease', async () => {
        const id = await insertOne(at(0));
        const first = await claimOne(at(10), 'w', 100);
        expect(await d.jobsRescue({ now: at(200) })).toEqual([id]);
        const second = await claimOne(at(300), 'w');
        expect(second.lease).not.toBe(first.lease);
        expect(await d.jobSetWorking({ seq: first.seq, lease: first.lease, now: at(310), leaseMs: 1_000 })).toBe(false);
        expect(await stateOf(id)).toBe('loading');
      });

      it('counts attempts: each claim after a retry increments attempt', async () => {
        const id = await insertOne(at(0), { maxAttempts: 3 });
        const attempts: number[] = [];
        for (let i = 0; i < 3; i++) {
          const c = await claimOne(at(i * 100 + 10));
          attempts.push(c.attempt);
          expect(c.maxAttempts).toBe(3);
          expect(await d.jobRetry({ seq: c.seq, lease: c.lease, now: at(i * 100 + 20), runAt: at(i * 100 + 50) })).toBe(true);
        }
        expect(attempts).toEqual([1, 2, 3]);
        expect((await view(id)).attempt).toBe(3);
      });
    });

    // =========================================================================================
    describe('attempt transitions (guarded by state and lease)', () => {
      it('jobSetWorking: false with a wrong lease or in the wrong state, true otherwise', async () => {
        const id = await insertOne(at(0));
        const c = await claimOne(at(10));
        expect(await d.jobSetWorking({ seq: c.seq, lease: `${c.lease}x`, now: at(20), leaseMs: 1_000 })).toBe(false);
        expect(await stateOf(id)).toBe('loading');
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(30), leaseMs: 1_000 })).toBe(true);
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(40), leaseMs: 1_000 })).toBe(false); // already working
        const v = await view(id);
        expect(v.state).toBe('working');
        expect(v.updatedAt).toBe(at(30));
        expect(v.transitions.map((t) => t.state)).toEqual(['queued', 'loading', 'working']);
      });

      it('jobSetWorking extends the lease by leaseMs from now', async () => {
        const id = await insertOne(at(0));
        const c = await claimOne(at(10), 'w', 100); // lease until 110
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(100), leaseMs: 500 })).toBe(true); // until 600
        expect(await d.jobsRescue({ now: at(599) })).toEqual([]);
        expect(await d.jobsRescue({ now: at(601) })).toEqual([id]);
      });

      it('jobComplete: only from working with the lease; stores the result and the artifacts', async () => {
        const id = await insertOne(at(0));
        const c = await claimOne(at(10));
        const body = Buffer.from('hello artifact', 'utf8');
        const bin = Buffer.from([0, 1, 2, 255, 254]);
        const artifacts = [
          { name: 'out.txt', contentType: 'text/plain; charset=utf-8', body },
          { name: 'data.bin', contentType: 'application/octet-stream', body: bin },
        ];
        const result = { message: { role: 'assistant', content: 'hi' }, done: true, n: 3 };
        expect(await d.jobComplete({ seq: c.seq, lease: c.lease, now: at(20), result, artifacts, runMs: 10 })).toBe(false); // still loading
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(30), leaseMs: 1_000 })).toBe(true);
        expect(await d.jobComplete({ seq: c.seq, lease: 'nope', now: at(40), result, artifacts, runMs: 10 })).toBe(false);
        expect(await view(id)).toMatchObject({ state: 'working', result: null, artifacts: [] });
        expect(await d.jobComplete({ seq: c.seq, lease: c.lease, now: at(50), result, artifacts, runMs: 10 })).toBe(true);
        expect(await d.jobComplete({ seq: c.seq, lease: c.lease, now: at(60), result: 'again', artifacts: [], runMs: 10 })).toBe(false);

        const v = await view(id);
        expect(v.state).toBe('done');
        expect(v.result).toEqual(result);
        expect(v.finishedAt).toBe(at(50));
        expect(v.error).toBeNull();
        expect(v.artifacts).toEqual([
          { name: 'data.bin', contentType: 'application/octet-stream', size: 5, sha256: sha256(bin) },
          { name: 'out.txt', contentType: 'text/plain; charset=utf-8', size: body.length, sha256: sha256(body) },
        ]);
        const a = await d.artifactGet({ jobId: id, name: 'out.txt' });
        expect(a).toEqual({ name: 'out.txt', contentType: 'text/plain; charset=utf-8', size: body.length, sha256: sha256(body), body });
        expect(a!.sha256).toMatch(/^[0-9a-f]{64}$/);
        expect(Buffer.compare(a!.body, body)).toBe(0);
        const b = await d.artifactGet({ jobId: id, name: 'data.bin' });
        expect(Buffer.compare(b!.body, bin)).toBe(0);
        expect(await d.artifactGet({ jobId: id, name: 'missing.txt' })).toBeNull();
        expect(await d.artifactGet({ jobId: uuidv7(), name: 'out.txt' })).toBeNull();
      });

      it('after done, no other transition of the attempt succeeds', async () => {
        const id = await insertOne(at(0));
        const c = await runToDone(at(10));
        const { seq, lease } = c;
        expect(await d.jobFail({ seq, lease, now: at(20), error: { code: 'x', message: 'y' } })).toBe(false);
        expect(await d.jobRetry({ seq, lease, now: at(20), runAt: at(30) })).toBe(false);
        expect(await d.jobRelease({ seq, lease, now: at(20) })).toBe(false);
        expect(await d.jobSetWorking({ seq, lease, now: at(20), leaseMs: 1_000 })).toBe(false);
        expect(await d.jobLeaseRenew({ seq, lease, until: at(10_000) })).toBe(false);
        const v = await view(id);
        expect(v.state).toBe('done');
        expect(v.transitions.map((t) => t.state)).toEqual(['queued', 'loading', 'working', 'done']);
      });

      it('jobRetry: from loading or working with the lease only', async () => {
        const id = await insertOne(at(0));
        const c = await claimOne(at(10));
        expect(await d.jobRetry({ seq: c.seq, lease: 'other', now: at(20), runAt: at(100) })).toBe(false);
        expect(await d.jobRetry({ seq: c.seq, lease: c.lease, now: at(20), runAt: at(100) })).toBe(true); // from loading
        expect(await d.jobRetry({ seq: c.seq, lease: c.lease, now: at(21), runAt: at(100) })).toBe(false); // now queued
        const c2 = await claimOne(at(100));
        expect(await d.jobSetWorking({ seq: c2.seq, lease: c2.lease, now: at(110), leaseMs: 1_000 })).toBe(true);
        expect(await d.jobRetry({ seq: c2.seq, lease: c.lease, now: at(120), runAt: at(200) })).toBe(false); // old lease
        expect(await d.jobRetry({ seq: c2.seq, lease: c2.lease, now: at(120), runAt: at(200) })).toBe(true); // from working
        const v = await view(id);
        expect(v.state).toBe('queued');
        expect(v.attempt).toBe(2);
        expect(v.finishedAt).toBeNull();
        expect(await d.jobsNextRunAt({ now: at(120) })).toBe(at(200));
      });

      it('jobFail: from loading or working with the lease; stores the error', async () => {
        const a = await insertOne(at(0));
        const b = await insertOne(at(1));
        const ca = await claimOne(at(10));
        const cb = await claimOne(at(11));
        const err = { code: 'engine_error', message: 'the engine said no' };
        expect(await d.jobFail({ seq: ca.seq, lease: cb.lease, now: at(20), error: err })).toBe(false); // someone else's lease
        expect(await d.jobFail({ seq: ca.seq, lease: ca.lease, now: at(20), error: err })).toBe(true); // from loading
        expect(await d.jobSetWorking({ seq: cb.seq, lease: cb.lease, now: at(21), leaseMs: 1_000 })).toBe(true);
        expect(await d.jobFail({ seq: cb.seq, lease: cb.lease, now: at(22), error: { code: 'c2', message: 'm2' } })).toBe(true); // from working
        expect(await d.jobFail({ seq: cb.seq, lease: cb.lease, now: at(23), error: err })).toBe(false); // already failed
        const va = await view(a);
        expect(va).toMatchObject({ state: 'failed', error: err, result: null, finishedAt: at(20), updatedAt: at(20) });
        expect(await view(b)).toMatchObject({ state: 'failed', error: { code: 'c2', message: 'm2' }, finishedAt: at(22) });
      });

      it('jobRelease gives the attempt back (attempt decremented) and the job is claimable at once', async () => {
        const id = await insertOne(at(0));
        const c = await claimOne(at(10));
        expect(c.attempt).toBe(1);
        expect(await d.jobRelease({ seq: c.seq, lease: 'wrong', now: at(20) })).toBe(false);
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(20), leaseMs: 1_000 })).toBe(true);
        const ready: number[] = [];
        d.notifier.on('jobReady', () => ready.push(1));
        expect(await d.jobRelease({ seq: c.seq, lease: c.lease, now: at(30) })).toBe(true); // from working
        expect(ready).toEqual([1]);
        expect(await d.jobRelease({ seq: c.seq, lease: c.lease, now: at(31) })).toBe(false); // now queued
        const v = await view(id);
        expect(v.state).toBe('queued');
        expect(v.attempt).toBe(0);
        expect(v.transitions.at(-1)).toEqual({ state: 'queued', at: at(30), attempt: 0 });
        const again = await claimOne(at(30));
        expect(again.attempt).toBe(1);
        expect(await d.jobRelease({ seq: again.seq, lease: again.lease, now: at(40) })).toBe(true); // from loading
        expect((await view(id)).attempt).toBe(0);
      });

      it('jobLeaseRenew: extends the lease of the holder only, while running', async () => {
        const a = await insertOne(at(0));
        const b = await insertOne(at(0));
        const ca = await claimOne(at(0), 'w', 100); // until 100
        const cb = await claimOne(at(0), 'w', 100); // until 100
        expect(await d.jobLeaseRenew({ seq: ca.seq, lease: ca.lease, until: at(1000) })).toBe(true);
        expect(await d.jobLeaseRenew({ seq: cb.seq, lease: ca.lease, until: at(1000) })).toBe(false); // not b's lease
        expect(await d.jobsRescue({ now: at(101) })).toEqual([b]);
        expect(await d.jobsRescue({ now: at(1000) })).toEqual([]);
        expect(await d.jobsRescue({ now: at(1001) })).toEqual([a]);
        // Rescued: the lease is gone, and renewing it does not bring the job back.
        expect(await d.jobLeaseRenew({ seq: ca.seq, lease: ca.lease, until: at(5000) })).toBe(false);
        expect(await stateOf(a)).toBe('queued');
      });
    });

    // =========================================================================================
    describe('jobCancel', () => {
      it('cancels a queued job: not running, announced as a state change only', async () => {
        const id = await insertOne(at(0));
        const cancels: string[] = [];
        const changes: TransitionEvent[] = [];
        d.notifier.on('cancelRequested', (x) => cancels.push(x));
        d.notifier.on('stateChanged', (e) => changes.push(e));
        expect(await d.jobCancel({ id, now: at(10) })).toEqual({ canceled: true, wasRunning: false, state: 'canceled' });
        expect(cancels).toEqual([]);
        expect(changes).toEqual([
          { jobId: id, state: 'canceled', model: 'm1', n: 2, at: at(10), attempt: 0, run: runOf({ id, createdAt: at(0), startedAt: null, finishedAt: at(10), attempt: 0 }) },
        ]);
        expect(await view(id)).toMatchObject({ state: 'canceled', finishedAt: at(10), updatedAt: at(10), error: null, result: null });
        expect(await d.jobsClaim({ owner: 'w', limit: 10, now: at(20), leaseMs: 1_000 })).toEqual([]);
      });

      it('cancels a running job: wasRunning, cancelRequested with its id after the commit, and its lease is dead', async () => {
        const loadingId = await insertOne(at(0));
        const workingId = await insertOne(at(1));
        const cl = await claimOne(at(10));
        const cw = await claimOne(at(11));
        expect(await d.jobSetWorking({ seq: cw.seq, lease: cw.lease, now: at(12), leaseMs: 1_000 })).toBe(true);
        const cancels: string[] = [];
        const readsAtCancel: Promise<JobView | null>[] = [];
        d.notifier.on('cancelRequested', (x) => {
          cancels.push(x);
          readsAtCancel.push(d.jobGet({ id: x }));
        });
        const p = d.jobCancel({ id: workingId, now: at(20) });
        expect(cancels).toEqual([]);
        expect(await p).toEqual({ canceled: true, wasRunning: true, state: 'canceled' });
        expect(cancels).toEqual([workingId]);
        expect((await readsAtCancel[0])?.state).toBe('canceled');
        expect(await d.jobComplete({ seq: cw.seq, lease: cw.lease, now: at(30), result: 1, artifacts: [], runMs: 1 })).toBe(false);
        expect(await d.jobLeaseRenew({ seq: cw.seq, lease: cw.lease, until: at(5000) })).toBe(false);
        expect(await d.jobRelease({ seq: cw.seq, lease: cw.lease, now: at(30) })).toBe(false);
        const v = await view(workingId);
        expect(v).toMatchObject({ state: 'canceled', finishedAt: at(20), result: null });
        expect(v.transitions.at(-1)).toEqual({ state: 'canceled', at: at(20), attempt: 1 });

        expect(await d.jobCancel({ id: loadingId, now: at(40) })).toEqual({ canceled: true, wasRunning: true, state: 'canceled' });
        expect(cancels).toEqual([workingId, loadingId]);
        expect(await d.jobSetWorking({ seq: cl.seq, lease: cl.lease, now: at(50), leaseMs: 1_000 })).toBe(false);
        expect(await d.jobsRescue({ now: at(100_000) })).toEqual([]);
      });

      it('does not cancel a finished job: canceled false, the state it has', async () => {
        const done = await insertOne(at(0));
        await runToDone(at(10));
        const failed = await insertOne(at(20));
        const c = await claimOne(at(21));
        expect(await d.jobFail({ seq: c.seq, lease: c.lease, now: at(22), error: { code: 'e', message: 'm' } })).toBe(true);
        const canceled = await insertOne(at(30));
        expect(await d.jobCancel({ id: canceled, now: at(31) })).toEqual({ canceled: true, wasRunning: false, state: 'canceled' });
        const events: string[] = [];
        d.notifier.on('stateChanged', (e) => events.push(e.state));
        d.notifier.on('cancelRequested', (x) => events.push(`cancel:${x}`));
        expect(await d.jobCancel({ id: done, now: at(40) })).toEqual({ canceled: false, wasRunning: false, state: 'done' });
        expect(await d.jobCancel({ id: failed, now: at(40) })).toEqual({ canceled: false, wasRunning: false, state: 'failed' });
        expect(await d.jobCancel({ id: canceled, now: at(40) })).toEqual({ canceled: false, wasRunning: false, state: 'canceled' });
        expect(events).toEqual([]);
        expect(await view(done)).toMatchObject({ state: 'done', finishedAt: at(12) });
        expect((await view(canceled)).finishedAt).toBe(at(31));
      });

      it('answers null for an unknown job', async () => {
        expect(await d.jobCancel({ id: uuidv7(), now: at(0) })).toBeNull();
      });
    });

    // =========================================================================================
    describe('maintenance', () => {
      it('jobsRescue re-queues only running jobs whose lease expired (lease_expires_at < now)', async () => {
        const a = await insertOne(at(0));
        const b = await insertOne(at(1));
        const c = await insertOne(at(2));
        const q = await insertOne(at(3));
        await claimOne(at(10), 'w', 100); // a: until 110
        await claimOne(at(10), 'w', 200); // b: until 210
        const cc = await claimOne(at(10), 'w', 100); // c: until 110, then working until 150
        expect(await d.jobSetWorking({ seq: cc.seq, lease: cc.lease, now: at(50), leaseMs: 100 })).toBe(true);
        const changes: TransitionEvent[] = [];
        let ready = 0;
        d.notifier.on('stateChanged', (e) => changes.push(e));
        d.notifier.on('jobReady', () => ready++);
        expect(await d.jobsRescue({ now: at(110) })).toEqual([]); // a's lease ends at 110: not yet expired
        expect(await d.jobsRescue({ now: at(111) })).toEqual([a]);
        expect(changes).toEqual([{ jobId: a, state: 'queued', model: 'm1', n: 3, at: at(111), attempt: 0 }]);
        expect(ready).toBe(1);
        expect(await d.jobsRescue({ now: at(151) })).toEqual([c]);
        expect(await stateOf(b)).toBe('loading');
        expect(await stateOf(q)).toBe('queued');
        expect(await view(a)).toMatchObject({ state: 'queued', attempt: 0 }); // the lost attempt does not count
        expect(await view(c)).toMatchObject({ state: 'queued', attempt: 0 });
        expect((await view(c)).transitions.map((t) => t.state)).toEqual(['queued', 'loading', 'working', 'queued']);
        expect(sorted(await d.jobsRescue({ now: at(10_000) }))).toEqual([b]);
        // Rescued jobs are claimable at once, in their original FIFO place.
        const again = await d.jobsClaim({ owner: 'w2', limit: 10, now: at(10_001), leaseMs: 1_000 });
        expect(sorted(again.map((x) => x.id))).toEqual(sorted([a, b, c, q]));
        expect(again.every((x) => x.attempt === 1)).toBe(true);
      });

      it('jobsFailPastDeadline fails queued jobs at or past their deadline; jobsNextDeadlineAt tracks queued ones', async () => {
        expect(await d.jobsNextDeadlineAt()).toBeNull();
        const running = await insertOne(at(0), { deadlineAt: at(500), priority: 1 });
        const a = await insertOne(at(1), { deadlineAt: at(1000) });
        const b = await insertOne(at(2), { deadlineAt: at(2000) });
        const none = await insertOne(at(3));
        expect(await d.jobsNextDeadlineAt()).toBe(at(500));
        expect((await claimOne(at(10))).id).toBe(running);
        expect(await d.jobsNextDeadlineAt()).toBe(at(1000)); // a running job's deadline no longer matters
        expect(await d.jobsFailPastDeadline({ now: at(999), limit: 100 })).toEqual([]);
        const changes: TransitionEvent[] = [];
        d.notifier.on('stateChanged', (e) => changes.push(e));
        expect(await d.jobsFailPastDeadline({ now: at(1000), limit: 100 })).toEqual([a]);
        expect(changes).toEqual([
          {
            jobId: a,
            state: 'failed',
            model: 'm1',
            n: 2,
            at: at(1000),
            attempt: 0,
            error: { code: 'deadline_exceeded', message: expect.any(String) },
            run: runOf({ id: a, createdAt: at(1), startedAt: null, finishedAt: at(1000), attempt: 0 }),
          },
        ]);
        const va = await view(a);
        expect(va).toMatchObject({ state: 'failed', finishedAt: at(1000), error: { code: 'deadline_exceeded' } });
        expect(va.error!.message.length).toBeGreaterThan(0);
        expect(await d.jobsNextDeadlineAt()).toBe(at(2000));
        expect(await d.jobsFailPastDeadline({ now: at(100_000), limit: 100 })).toEqual([b]);
        expect(await d.jobsNextDeadlineAt()).toBeNull();
        expect(await stateOf(running)).toBe('loading');
        expect(await stateOf(none)).toBe('queued');
      });

      it('jobsFailStale fails queued jobs created before the cutoff, with the given error', async () => {
        const running = await insertOne(at(0), { priority: 5 });
        expect((await claimOne(at(10))).id).toBe(running);
        const a = await insertOne(at(50));
        const b = await insertOne(at(100));
        const c = await insertOne(at(200));
        const error = { code: 'engine_unavailable', message: 'the engine has been down too long' };
        expect(await d.jobsFailStale({ createdBefore: at(100), now: at(300), error, limit: 100 })).toEqual([a]);
        expect(await view(a)).toMatchObject({ state: 'failed', error, finishedAt: at(300) });
        expect(await d.jobTransitionsSince({ id: a, after: 1 })).toEqual([
          { jobId: a, state: 'failed', model: 'm1', n: 2, at: at(300), attempt: 0, error, run: runOf({ id: a, createdAt: at(50), startedAt: null, finishedAt: at(300), attempt: 0 }) },
        ]);
        expect(await stateOf(running)).toBe('loading');
        expect(await stateOf(b)).toBe('queued');
        expect(sorted(await d.jobsFailStale({ createdBefore: at(201), now: at(400), error, limit: 100 }))).toEqual(sorted([b, c]));
        expect(await d.jobsFailStale({ createdBefore: at(10_000), now: at(500), error, limit: 100 })).toEqual([]);
        expect(await stateOf(running)).toBe('loading');
      });

      it('the failing sweeps take at most `limit` jobs a call: the earliest deadline, the oldest job first', async () => {
        const error = { code: 'engine_unavailable', message: 'down too long' };
        // Deadlines: b's is the earliest though it was submitted last.
        const a = await insertOne(at(1), { deadlineAt: at(30) });
        const b = await insertOne(at(2), { deadlineAt: at(10) });
        const c = await insertOne(at(3), { deadlineAt: at(20) });
        expect(sorted(await d.jobsFailPastDeadline({ now: at(100), limit: 2 }))).toEqual(sorted([b, c]));
        expect(await stateOf(a)).toBe('queued');
        expect(await d.jobsFailPastDeadline({ now: at(100), limit: 2 })).toEqual([a]);
        expect(await d.jobsFailPastDeadline({ now: at(100), limit: 2 })).toEqual([]);
        // Stale jobs, oldest first.
        const old = [await insertOne(at(200)), await insertOne(at(201)), await insertOne(at(202))];
        expect(sorted(await d.jobsFailStale({ createdBefore: at(300), now: at(400), error, limit: 2 }))).toEqual(sorted(old.slice(0, 2)));
        expect(await stateOf(old[2]!)).toBe('queued');
        expect(await d.jobsFailStale({ createdBefore: at(300), now: at(400), error, limit: 2 })).toEqual([old[2]]);
        // A model no host has, oldest first.
        const gone = await insert(at(500), newJob({ model: 'gone' }), newJob({ model: 'gone' }), newJob({ model: 'gone' }));
        const notFound = { code: 'model_not_found', message: "model 'gone' not found" };
        expect(sorted(await d.jobsFailQueuedModel({ model: 'gone', now: at(600), error: notFound, limit: 2 }))).toEqual(sorted(gone.slice(0, 2)));
        expect(await stateOf(gone[2]!)).toBe('queued');
        expect(await d.jobsFailQueuedModel({ model: 'gone', now: at(600), error: notFound, limit: 2 })).toEqual([gone[2]]);
        expect(await d.jobsFailQueuedModel({ model: 'gone', now: at(600), error: notFound, limit: 2 })).toEqual([]);
      });

      it('jobsAge: the stored boost changes the claim order (an old low-priority job overtakes a newer higher one)', async () => {
        const old = await insertOne(at(0), { priority: 0 });
        const newer = await insertOne(at(3500), { priority: 2 });
        const oldSeq = (await view(old)).seq;
        const newerSeq = (await view(newer)).seq;
        expect((await d.jobQueueSnapshot({ seq: oldSeq })).ahead).toEqual([{ model: 'm1', n: 1 }]);
        expect(await d.jobsAge({ now: at(3500), agingMs: 5000 })).toBe(0); // no whole interval waited yet
        expect(await d.jobsAge({ now: at(3500), agingMs: 2000 })).toBe(1); // old: +1 → 1 < 2
        expect((await d.jobQueueSnapshot({ seq: oldSeq })).ahead).toEqual([{ model: 'm1', n: 1 }]);
        expect((await d.jobQueueSnapshot({ seq: newerSeq })).ahead).toEqual([]);
        expect(await d.jobsAge({ now: at(3500), agingMs: 1000 })).toBe(1); // old: +3 → 3 > 2
        expect(await d.jobsAge({ now: at(3999), agingMs: 1000 })).toBe(0); // nothing changed
        expect((await d.jobQueueSnapshot({ seq: oldSeq })).ahead).toEqual([]);
        expect((await d.jobQueueSnapshot({ seq: newerSeq })).ahead).toEqual([{ model: 'm1', n: 1 }]);
        expect((await claimOne(at(4000))).id).toBe(old);
        expect((await claimOne(at(4000))).id).toBe(newer);
        expect(await d.jobsAge({ now: at(100_000), agingMs: 1000 })).toBe(0); // only queued jobs age
      });

      it('jobsOldestFinishedAt and jobsDeleteExpired: finished before the cutoff and no delivery owed', async () => {
        expect(await d.jobsOldestFinishedAt()).toBeNull();
        const plain = await insertOne(at(0), { idempotency: { key: 'k-plain', bodyHash: 'h', expiresAt: at(1_000_000) } });
        const c = await claimOne(at(1000));
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(1000), leaseMs: 1_000 })).toBe(true);
        const art = Buffer.from('bytes');
        expect(await d.jobComplete({ seq: c.seq, lease: c.lease, now: at(1000), result: 1, artifacts: [{ name: 'a.txt', contentType: 'text/plain', body: art }], runMs: 1 })).toBe(true);
        const hooked = await insertOne(at(1050), { webhookUrl: HOOK, webhookEvents: ['done'] });
        const ch = await runToDone(at(1100)); // finished at 1102, its done delivery pending
        expect(ch.id).toBe(hooked);
        const failedHook = await insertOne(at(1150), { webhookUrl: 'http://127.0.0.1:10/x', webhookEvents: ['done'] });
        await runToDone(at(1200)); // finished at 1202
        const ds = await claimDeliveries(at(1203));
        expect(sorted(ds.map((x) => x.jobId))).toEqual(sorted([hooked, failedHook]));
        const fd = ds.find((x) => x.jobId === failedHook)!;
        await d.deliveryRecord({ id: fd.id, now: at(1204), outcome: { kind: 'failed', status: 500, error: 'HTTP 500' } });
        await d.deliveryRelease({ id: ds.find((x) => x.jobId === hooked)!.id });
        const canceled = await insertOne(at(1250));
        expect((await d.jobCancel({ id: canceled, now: at(1300) }))?.canceled).toBe(true);
        const late = await insertOne(at(4000));
        await runToDone(at(5000)); // finished at 5002
        const queued = await insertOne(at(0));

        expect(await d.jobsOldestFinishedAt()).toBe(at(1000));
        expect(await d.jobsDeleteExpired({ finishedBefore: at(1000), limit: 100, now: at(6000) })).toBe(0); // strictly before
        expect(await d.jobsDeleteExpired({ finishedBefore: at(3000), limit: 1, now: at(6000) })).toBe(1);
        expect(await d.jobsDeleteExpired({ finishedBefore: at(3000), limit: 100, now: at(6000) })).toBe(2);
        // plain, failedHook (its delivery failed: nothing owed) and canceled are gone.
        expect(await d.jobGet({ id: plain })).toBeNull();
        expect(await d.artifactGet({ jobId: plain, name: 'a.txt' })).toBeNull();
        expect(await d.jobTransitionsSince({ id: plain, after: 0 })).toEqual([]);
        expect(await d.jobsOldestFinishedAt()).toBe(at(1102)); // `hooked` still counts as finished
        expect(await d.jobGet({ id: failedHook })).toBeNull();
        expect(await d.jobGet({ id: canceled })).toBeNull();
        expect(await stateOf(hooked)).toBe('done'); // a delivery is still owed
        expect(await d.jobsDeleteExpired({ finishedBefore: at(3000), limit: 100, now: at(6000) })).toBe(0);

        const [hd] = await claimDeliveries(at(6000));
        expect(hd).toMatchObject({ jobId: hooked, state: 'done' });
        // Claimed but not yet recorded: still owed.
        expect(await d.jobsDeleteExpired({ finishedBefore: at(3000), limit: 100, now: at(6001) })).toBe(0);
        await d.deliveryRecord({ id: hd!.id, now: at(6002), outcome: { kind: 'delivered', status: 200 } });
        expect(await d.jobsDeleteExpired({ finishedBefore: at(3000), limit: 100, now: at(6003) })).toBe(1);
        expect(await d.jobGet({ id: hooked })).toBeNull();
        expect(await d.jobsOldestFinishedAt()).toBe(at(5002));
        expect((await d.jobsList({ limit: 10 })).map((j) => j.id)).toEqual([queued, late]);
        // The deleted job's idempotency key went with it.
        const fresh = newJob({ idempotency: { key: 'k-plain', bodyHash: 'other', expiresAt: at(2_000_000) } });
        expect(await d.jobsInsert({ jobs: [fresh], now: at(7000), maxQueued: 10 })).toEqual([{ ok: true, jobId: fresh.id, replayed: false, state: 'queued', scheduledFor: null }]);
      });
    });

    // =========================================================================================
    describe('conversations', () => {
      it('a continuation of a done job: same conversation, and its claim carries the whole history', async () => {
        const first = await insertOne(at(0), { request: { messages: [{ role: 'user', content: 'one' }] } });
        const c1 = await claimOne(at(1));
        expect(c1.history).toEqual([]);
        expect(await d.jobSetWorking({ seq: c1.seq, lease: c1.lease, now: at(2), leaseMs: 1_000 })).toBe(true);
        const reply = { role: 'assistant', content: 'uno', tool_calls: [{ function: { name: 'f', arguments: {} } }] };
        expect(await d.jobComplete({ seq: c1.seq, lease: c1.lease, now: at(3), result: { message: reply }, artifacts: [], runMs: 1 })).toBe(true);
        const second = newJob({ request: { messages: [{ role: 'user', content: 'two' }] }, conversationId: first, previous: { seq: c1.seq, wait: false } });
        await insert(at(4), second);
        const c2 = await claimOne(at(5));
        expect(c2.id).toBe(second.id);
        expect(c2.history).toEqual([{ role: 'user', content: 'one' }, reply]);
        expect(c2.request).toEqual({ messages: [{ role: 'user', content: 'two' }] }); // stored short
        expect(await view(second.id)).toMatchObject({ conversationId: first, continueFrom: first, waiting: false });
        const conv = await d.conversationGet({ id: first });
        expect(conv!.turns.map((t) => [t.jobId, t.state, t.messages, t.reply])).toEqual([
          [first, 'done', [{ role: 'user', content: 'one' }], reply],
          [second.id, 'loading', [{ role: 'user', content: 'two' }], null],
        ]);
        const listed = await d.conversationsList({ limit: 10 });
        expect(listed.map((x) => [x.id, x.turns, x.lastJobId, x.lastState])).toEqual([[first, 2, second.id, 'loading']]);
        expect(await d.conversationGet({ id: 'nope' })).toBeNull();
      });

      it('a continuation of an unfinished job: refused without wait; with wait it is not claimable until that job is done', async () => {
        const first = await insertOne(at(0));
        const c1 = await claimOne(at(1));
        const refused = await d.jobsInsert({ now: at(2), maxQueued: BIG_QUEUE, jobs: [newJob({ conversationId: first, previous: { seq: c1.seq, wait: false } })] });
        expect(refused).toEqual([{ ok: false, code: 'previous_not_ready', state: 'loading' }]);
        const waiting = newJob({ conversationId: first, previous: { seq: c1.seq, wait: true } });
        await insert(at(3), waiting);
        expect(await view(waiting.id)).toMatchObject({ state: 'queued', waiting: true });
        expect(await d.jobsClaim({ owner: 'w', limit: 10, now: at(4), leaseMs: 1_000 })).toEqual([]);
        const ready: number[] = [];
        d.notifier.on('jobReady', () => ready.push(1));
        expect(await d.jobSetWorking({ seq: c1.seq, lease: c1.lease, now: at(5), leaseMs: 1_000 })).toBe(true);
        expect(await d.jobComplete({ seq: c1.seq, lease: c1.lease, now: at(6), result: { message: { role: 'assistant', content: 'x' } }, artifacts: [], runMs: 1 })).toBe(true);
        expect(ready.length).toBeGreaterThanOrEqual(1);
        expect(await view(waiting.id)).toMatchObject({ state: 'queued', waiting: false });
        expect((await claimOne(at(7))).id).toBe(waiting.id);
      });

      it('when the continued job fails or is canceled, the turns waiting on it fail previous_failed, in a chain', async () => {
        const first = await insertOne(at(0));
        const c1 = await claimOne(at(1));
        const w2 = newJob({ conversationId: first, previous: { seq: c1.seq, wait: true } });
        await insert(at(2), w2);
        const seq2 = (await view(w2.id)).seq;
        const w3 = newJob({ conversationId: first, previous: { seq: seq2, wait: true } });
        await insert(at(3), w3);
        const changes: TransitionEvent[] = [];
        d.notifier.on('stateChanged', (e) => changes.push(e));
        expect(await d.jobCancel({ id: first, now: at(4) })).toMatchObject({ canceled: true });
        expect(changes.map((e) => [e.jobId, e.state, e.error?.code])).toEqual([
          [first, 'canceled', undefined],
          [w2.id, 'failed', 'previous_failed'],
          [w3.id, 'failed', 'previous_failed'],
        ]);
        const failedPrev = await d.jobsInsert({ now: at(5), maxQueued: BIG_QUEUE, jobs: [newJob({ conversationId: first, previous: { seq: c1.seq, wait: true } })] });
        expect(failedPrev).toEqual([{ ok: false, code: 'previous_not_ready', state: 'canceled' }]);
      });

      it('expiry removes later turns first, never leaving a hole, and remembers the removed ids', async () => {
        const first = await insertOne(at(0));
        const c1 = await runToDone(at(1));
        const second = newJob({ conversationId: first, previous: { seq: c1.seq, wait: false } });
        await insert(at(10), second);
        await runToDone(at(11));
        expect(await d.jobExpired({ id: first })).toBe(false);
        // Both expired by the cutoff: the later turn goes first, then the earlier one.
        expect(await d.jobsDeleteExpired({ finishedBefore: at(100), limit: 10, now: at(100) })).toBe(1);
        expect(await d.jobGet({ id: second.id })).toBeNull();
        expect(await d.jobGet({ id: first })).not.toBeNull();
        expect(await d.jobsDeleteExpired({ finishedBefore: at(100), limit: 10, now: at(100) })).toBe(1);
        expect(await d.jobGet({ id: first })).toBeNull();
        expect(await d.jobExpired({ id: first })).toBe(true);
        expect(await d.jobExpired({ id: second.id })).toBe(true);
        expect(await d.conversationGet({ id: first })).toBeNull();
      });
    });

    describe('reads', () => {
      it('jobGet: the full view, transitions in order, artifacts and deliveries', async () => {
        const j = newJob({ priority: 3, metadata: { a: '1' }, webhookUrl: HOOK, webhookEvents: ['queued', 'done'], maxAttempts: 2 });
        await insert(at(1000), j);
        const c = await claimOne(at(1100));
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(1200), leaseMs: 1_000 })).toBe(true);
        const body = Buffer.from('abc');
        expect(
          await d.jobComplete({ seq: c.seq, lease: c.lease, now: at(1300), result: { x: 1 }, artifacts: [{ name: 'out.txt', contentType: 'text/plain', body }], runMs: 200 }),
        ).toBe(true);
        const [q] = await claimDeliveries(at(1400));
        expect(q).toMatchObject({ jobId: j.id, state: 'queued' });
        await d.deliveryRecord({ id: q!.id, now: at(1500), outcome: { kind: 'delivered', status: 204 } });
        expect(await view(j.id)).toEqual({
          seq: c.seq,
          id: j.id,
          state: 'done',
          model: 'm1',
          attempt: 1,
          maxAttempts: 2,
          priority: 3,
          deadlineAt: null,
          metadata: { a: '1' },
          createdAt: at(1000),
          startedAt: at(1100),
          finishedAt: at(1300),
          updatedAt: at(1300),
          result: { x: 1 },
          error: null,
          webhookUrl: HOOK,
          webhookEvents: ['queued', 'done'],
          transitions: [
            { state: 'queued', at: at(1000), attempt: 0 },
            { state: 'loading', at: at(1100), attempt: 1 },
            { state: 'working', at: at(1200), attempt: 1 },
            { state: 'done', at: at(1300), attempt: 1 },
          ],
          artifacts: [{ name: 'out.txt', contentType: 'text/plain', size: 3, sha256: sha256(body) }],
          deliveries: [
            { id: q!.id, state: 'queued', sequence: 1, status: 'delivered', attempts: 1, lastStatusCode: 204, lastError: null, nextAttemptAt: null, deliveredAt: at(1500), occurredAt: at(1000) },
            { id: expect.any(Number), state: 'done', sequence: 4, status: 'pending', attempts: 0, lastStatusCode: null, lastError: null, nextAttemptAt: at(1300), deliveredAt: null, occurredAt: at(1300) },
          ],
          conversationId: j.id,
          continueFrom: null,
          waiting: false,
          loadMs: null,
          usage: { promptTokens: null, completionTokens: null },
          keyId: null,
          scheduledFor: null,
          engine: null,
          instance: expect.any(String), // the claiming driver's instance id (exact values: test/api.test.ts)
          kind: 'chat',
        });
        expect(await d.jobGet({ id: uuidv7() })).toBeNull();
      });

      it('jobsList: newest first, filters, cursor', async () => {
        const a = await insertOne(at(1000), { model: 'm1', metadata: { batch: 'b1', user: 'u1' } });
        const b = await insertOne(at(2000), { model: 'm2', metadata: { batch: 'b1', user: 'u2' }, priority: 4 });
        const c = await insertOne(at(3000), { model: 'm1', metadata: { batch: 'b2', user: 'u1' } });
        const e = await insertOne(at(4000), { model: 'm2' });
        const f = await insertOne(at(5000), { model: 'm1', metadata: { batch: 'b1', user: 'u1' } });
        expect((await claimOne(at(6000))).id).toBe(b); // priority 4
        const ca = await claimOne(at(6000));
        expect(ca.id).toBe(a);
        expect(await d.jobSetWorking({ seq: ca.seq, lease: ca.lease, now: at(6001), leaseMs: 1_000 })).toBe(true);
        expect(await d.jobComplete({ seq: ca.seq, lease: ca.lease, now: at(6002), result: 1, artifacts: [], runMs: 1 })).toBe(true);
        const ids = (l: ListedJob[]) => l.map((j) => j.id);
        const seqOf = async (id: string) => (await view(id)).seq;

        const all = await d.jobsList({ limit: 10 });
        expect(ids(all)).toEqual([f, e, c, b, a]);
        expect(all[4]).toEqual({ seq: await seqOf(a), id: a, state: 'done', model: 'm1', priority: 0, attempt: 1, metadata: { batch: 'b1', user: 'u1' }, createdAt: at(1000), finishedAt: at(6002), keyId: null, engine: null, instance: (await view(a)).instance });
        expect(all[3]).toEqual({ seq: await seqOf(b), id: b, state: 'loading', model: 'm2', priority: 4, attempt: 1, metadata: { batch: 'b1', user: 'u2' }, createdAt: at(2000), finishedAt: null, keyId: null, engine: null, instance: (await view(b)).instance });
        expect((await view(a)).instance).toEqual(expect.stringMatching(/./)); // the claiming driver's id
        expect(all[0]!.instance).toBeNull(); // never claimed
        expect(all[1]!.metadata).toBeNull();

        expect(ids(await d.jobsList({ state: 'queued', limit: 10 }))).toEqual([f, e, c]);
        expect(ids(await d.jobsList({ state: 'done', limit: 10 }))).toEqual([a]);
        expect(ids(await d.jobsList({ state: 'failed', limit: 10 }))).toEqual([]);
        expect(ids(await d.jobsList({ model: 'm1', limit: 10 }))).toEqual([f, c, a]);
        expect(ids(await d.jobsList({ model: 'm2', limit: 10 }))).toEqual([e, b]);
        expect(ids(await d.jobsList({ model: 'm1', state: 'queued', limit: 10 }))).toEqual([f, c]);
        expect(ids(await d.jobsList({ metadata: [['batch', 'b1']], limit: 10 }))).toEqual([f, b, a]);
        expect(ids(await d.jobsList({ metadata: [['batch', 'b1'], ['user', 'u1']], limit: 10 }))).toEqual([f, a]);
        expect(ids(await d.jobsList({ metadata: [['batch', 'b1'], ['user', 'u1']], state: 'queued', model: 'm1', limit: 10 }))).toEqual([f]);
        expect(ids(await d.jobsList({ metadata: [['batch', 'zzz']], limit: 10 }))).toEqual([]);
        expect(ids(await d.jobsList({ metadata: [['user', 'u1'], ['batch', 'b2']], limit: 10 }))).toEqual([c]);

        // Cursor pages: limit 2, then below the last seq seen.
        const p1 = await d.jobsList({ limit: 2 });
        expect(ids(p1)).toEqual([f, e]);
        const p2 = await d.jobsList({ limit: 2, beforeSeq: p1[1]!.seq });
        expect(ids(p2)).toEqual([c, b]);
        const p3 = await d.jobsList({ limit: 2, beforeSeq: p2[1]!.seq });
        expect(ids(p3)).toEqual([a]);
        expect(await d.jobsList({ limit: 2, beforeSeq: p3[0]!.seq })).toEqual([]);
        const m1 = await d.jobsList({ metadata: [['batch', 'b1']], limit: 2 });
        expect(ids(m1)).toEqual([f, b]);
        expect(ids(await d.jobsList({ metadata: [['batch', 'b1']], limit: 2, beforeSeq: m1[1]!.seq }))).toEqual([a]);
        expect(ids(await d.jobsList({ state: 'queued', limit: 1, beforeSeq: await seqOf(f) }))).toEqual([e]);

        // created bounds: after is inclusive, before exclusive.
        expect(ids(await d.jobsList({ createdAfter: at(3000), limit: 10 }))).toEqual([f, e, c]);
        expect(ids(await d.jobsList({ createdBefore: at(3000), limit: 10 }))).toEqual([b, a]);
        expect(ids(await d.jobsList({ createdAfter: at(2000), createdBefore: at(4000), limit: 10 }))).toEqual([c, b]);
        expect(ids(await d.jobsList({ createdAfter: at(2500), createdBefore: at(2600), limit: 10 }))).toEqual([]);
        expect(ids(await d.jobsList({ createdAfter: at(5001), limit: 10 }))).toEqual([]);
        expect(ids(await d.jobsList({ createdBefore: at(1000), limit: 10 }))).toEqual([]);
        expect(ids(await d.jobsList({ createdAfter: at(2000), model: 'm1', limit: 10 }))).toEqual([f, c]);
        expect(ids(await d.jobsList({ createdBefore: at(5000), metadata: [['batch', 'b1']], limit: 10 }))).toEqual([b, a]);
        expect(ids(await d.jobsList({ createdBefore: at(5000), limit: 1, beforeSeq: await seqOf(c) }))).toEqual([b]);
      });

      // created_after / created_before are resolved in submission order (seq): exact as long as
      // the clock does not step back between submissions (ADR-0009). Not asserted beyond that.

      it('jobTransitionsSince: the log after n, a failed transition with its error', async () => {
        const id = await insertOne(at(0));
        const c = await claimOne(at(10));
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(20), leaseMs: 1_000 })).toBe(true);
        const changes: TransitionEvent[] = [];
        d.notifier.on('stateChanged', (e) => changes.push(e));
        const error = { code: 'boom', message: 'it broke' };
        expect(await d.jobFail({ seq: c.seq, lease: c.lease, now: at(30), error })).toBe(true);
        const failedEvent: TransitionEvent = { jobId: id, state: 'failed', model: 'm1', n: 4, at: at(30), attempt: 1, error };
        const failedWithRun = { ...failedEvent, run: runOf({ id, createdAt: at(0), startedAt: at(10), finishedAt: at(30), attempt: 1 }) };
        expect(changes).toEqual([failedWithRun]);
        const all = await d.jobTransitionsSince({ id, after: 0 });
        expect(all).toEqual([
          { jobId: id, state: 'queued', model: 'm1', n: 1, at: at(0), attempt: 0 },
          { jobId: id, state: 'loading', model: 'm1', n: 2, at: at(10), attempt: 1 },
          { jobId: id, state: 'working', model: 'm1', n: 3, at: at(20), attempt: 1 },
          failedWithRun,
        ]);
        expect(all.slice(0, 3).every((e) => e.error === undefined)).toBe(true);
        expect(await d.jobTransitionsSince({ id, after: 2 })).toEqual([{ jobId: id, state: 'working', model: 'm1', n: 3, at: at(20), attempt: 1 }, failedWithRun]);
        expect(await d.jobTransitionsSince({ id, after: 4 })).toEqual([]);
        expect(await d.jobTransitionsSince({ id: uuidv7(), after: 0 })).toEqual([]);
      });

      it('jobQueueSnapshot: queued jobs ahead per model, running jobs, run-time stats', async () => {
        const r = await insertOne(at(0), { model: 'm3', priority: 9 });
        const a = await insertOne(at(1), { model: 'm1' });
        const b = await insertOne(at(2), { model: 'm2' });
        const c = await insertOne(at(3), { model: 'm1', priority: 5 });
        const e = await insertOne(at(4), { model: 'm2' });
        const f = await insertOne(at(5), { model: 'm1' });
        const seq = async (id: string) => (await view(id)).seq;
        const byModel = (xs: { model: string; n: number }[]) => [...xs].sort((x, y) => x.model.localeCompare(y.model));

        const s0 = await d.jobQueueSnapshot({ seq: await seq(f) });
        expect(byModel(s0.ahead)).toEqual([{ model: 'm1', n: 2 }, { model: 'm2', n: 2 }, { model: 'm3', n: 1 }]);
        expect(s0.running).toEqual([]);
        expect(s0.stats.size).toBe(0);

        const cr = await claimOne(at(100));
        expect(cr.id).toBe(r);
        expect(byModel((await d.jobQueueSnapshot({ seq: await seq(f) })).ahead)).toEqual([{ model: 'm1', n: 2 }, { model: 'm2', n: 2 }]);
        expect((await d.jobQueueSnapshot({ seq: await seq(c) })).ahead).toEqual([]);
        expect(byModel((await d.jobQueueSnapshot({ seq: await seq(b) })).ahead)).toEqual([{ model: 'm1', n: 2 }]);
        expect(byModel((await d.jobQueueSnapshot({ seq: await seq(e) })).ahead)).toEqual([{ model: 'm1', n: 2 }, { model: 'm2', n: 1 }]);
        expect(byModel((await d.jobQueueSnapshot({ seq: await seq(a) })).ahead)).toEqual([{ model: 'm1', n: 1 }]);
        const s1 = await d.jobQueueSnapshot({ seq: await seq(f) });
        expect(s1.running).toEqual([{ model: 'm3', startedAt: at(100) }]);

        expect(await d.jobSetWorking({ seq: cr.seq, lease: cr.lease, now: at(110), leaseMs: 1_000 })).toBe(true);
        expect(await d.jobComplete({ seq: cr.seq, lease: cr.lease, now: at(1334), result: 1, artifacts: [], runMs: 1234 })).toBe(true);
        const s2 = await d.jobQueueSnapshot({ seq: await seq(f) });
        expect(s2.running).toEqual([]);
        expect([...s2.stats.entries()]).toEqual([['m3', 1234]]);
      });
    });

    // =========================================================================================
    describe('webhook outbox', () => {
      it('writes one delivery per state, and only the head of a job line is claimable', async () => {
        const id = await insertOne(at(1000), { webhookUrl: HOOK, metadata: { k: 'v' } });
        expect(await statusesOf(id)).toEqual([['queued', 'pending']]);
        const c = await claimOne(at(1100));
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(1200), leaseMs: 1_000 })).toBe(true);
        expect(await statusesOf(id)).toEqual([
          ['queued', 'pending'],
          ['loading', 'pending'],
          ['working', 'pending'],
        ]);
        const first = await claimDeliveries(at(1300));
        expect(first).toEqual([
          { id: expect.any(Number), jobId: id, state: 'queued', sequence: 1, url: HOOK, origin: ORIGIN, occurredAt: at(1000), attempts: 0, metadata: { k: 'v' }, error: null, artifacts: [], run: null },
        ]);
        // Already claimed, and the others wait behind it.
        expect(await claimDeliveries(at(1301))).toEqual([]);
        const ready: number[] = [];
        d.notifier.on('deliveryReady', () => ready.push(1));
        await d.deliveryRecord({ id: first[0]!.id, now: at(1400), outcome: { kind: 'delivered', status: 200 } });
        expect(ready.length).toBeGreaterThanOrEqual(1);
        const second = await claimDeliveries(at(1401));
        expect(second.map((x) => [x.state, x.sequence, x.occurredAt])).toEqual([['loading', 2, at(1100)]]);
        expect(await claimDeliveries(at(1402))).toEqual([]);
        await d.deliveryRecord({ id: second[0]!.id, now: at(1500), outcome: { kind: 'delivered', status: 204 } });
        expect(await d.jobComplete({ seq: c.seq, lease: c.lease, now: at(1600), result: 1, artifacts: [], runMs: 1 })).toBe(true);
        const third = await claimDeliveries(at(1601));
        expect(third.map((x) => x.state)).toEqual(['working']);
        await d.deliveryRecord({ id: third[0]!.id, now: at(1700), outcome: { kind: 'delivered', status: 200 } });
        const fourth = await claimDeliveries(at(1701));
        expect(fourth.map((x) => [x.state, x.sequence, x.occurredAt])).toEqual([['done', 4, at(1600)]]);
        await d.deliveryRecord({ id: fourth[0]!.id, now: at(1800), outcome: { kind: 'delivered', status: 200 } });
        expect(await claimDeliveries(at(1801))).toEqual([]);
        expect(await d.deliveriesNextDueAt({ now: at(1801), perOriginLimit: 10 })).toBeNull();
        const ds = await deliveriesOf(id);
        expect(ds.map((x) => [x.state, x.status, x.attempts, x.deliveredAt])).toEqual([
          ['queued', 'delivered', 1, at(1400)],
          ['loading', 'delivered', 1, at(1500)],
          ['working', 'delivered', 1, at(1700)],
          ['done', 'delivered', 1, at(1800)],
        ]);
      });

      it('deliveryClaimNext: after an acknowledged event, the job\'s next due event is claimed before the record commits', async () => {
        const id = await insertOne(at(1000), { webhookUrl: HOOK });
        const c = await claimOne(at(1100));
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(1200), leaseMs: 1_000 })).toBe(true);
        const [queued] = await claimDeliveries(at(1300), { perOriginLimit: 1 });
        expect(queued!.state).toBe('queued');
        // The receiver acknowledged `queued`: its record and the next claim go together.
        const record = d.deliveryRecord({ id: queued!.id, now: at(1400), outcome: { kind: 'delivered', status: 200 } });
        const loading = await d.deliveryClaimNext({ afterId: queued!.id, now: at(1400), inlineMax: 1024 });
        expect(loading).toMatchObject({ jobId: id, state: 'loading', sequence: 2, attempts: 0, origin: ORIGIN });
        await record;
        // Held: the ordinary claim does not hand it out again, even though it now heads the line.
        expect(await claimDeliveries(at(1401))).toEqual([]);
        // Chained again: `working` is next; nothing after it.
        const working = await d.deliveryClaimNext({ afterId: loading!.id, now: at(1500), inlineMax: 1024 });
        expect(working).toMatchObject({ state: 'working', sequence: 3 });
        expect(await d.deliveryClaimNext({ afterId: working!.id, now: at(1500), inlineMax: 1024 })).toBeNull();
        await d.deliveryRecord({ id: loading!.id, now: at(1500), outcome: { kind: 'delivered', status: 200 } });
        await d.deliveryRecord({ id: working!.id, now: at(1600), outcome: { kind: 'delivered', status: 200 } });
        expect((await deliveriesOf(id)).map((x) => [x.state, x.status, x.attempts])).toEqual([
          ['queued', 'delivered', 1],
          ['loading', 'delivered', 1],
          ['working', 'delivered', 1],
        ]);
        expect(await claimDeliveries(at(1700))).toEqual([]);
      });

      it('deliveryRecordClaimNext (where offered): the record and the next event\'s claim in one step; a chained failure is retried in turn', async (ctx) => {
        if (!d.deliveryRecordClaimNext) return ctx.skip();
        const id = await insertOne(at(1000), { webhookUrl: HOOK, metadata: { a: '1' } });
        const c = await claimOne(at(1100));
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(1200), leaseMs: 1_000 })).toBe(true);
        const [queued] = await claimDeliveries(at(1300), { perOriginLimit: 1 });
        const one = await d.deliveryRecordClaimNext({ id: queued!.id, now: at(1400), status: 200, inlineMax: 1024 });
        expect(one.recorded).toBe(true);
        expect(one.next).toMatchObject({ jobId: id, state: 'loading', sequence: 2, attempts: 0, origin: ORIGIN, metadata: { a: '1' }, run: null });
        // Held: the ordinary claim does not hand it out again, though it heads the line now.
        expect(await claimDeliveries(at(1401))).toEqual([]);
        // Recorded already: a second record changes nothing and claims nothing.
        expect(await d.deliveryRecordClaimNext({ id: queued!.id, now: at(1402), status: 200, inlineMax: 1024 })).toEqual({ recorded: false, next: null });
        const two = await d.deliveryRecordClaimNext({ id: one.next!.id, now: at(1500), status: 200, inlineMax: 1024 });
        expect(two.next).toMatchObject({ state: 'working', sequence: 3 });
        // The chained `working` fails: retried at its backoff, by the ordinary claim.
        await d.deliveryRecord({ id: two.next!.id, now: at(1600), outcome: { kind: 'retry', at: at(5000), status: 500, error: 'HTTP 500' } });
        expect(await claimDeliveries(at(4999))).toEqual([]);
        const again = await claimDeliveries(at(5000));
        expect(again.map((x) => [x.jobId, x.state, x.attempts])).toEqual([[id, 'working', 1]]);
        const three = await d.deliveryRecordClaimNext({ id: again[0]!.id, now: at(5100), status: 200, inlineMax: 1024 });
        expect(three).toEqual({ recorded: true, next: null });
        expect((await deliveriesOf(id)).map((x) => [x.state, x.status, x.attempts, x.deliveredAt])).toEqual([
          ['queued', 'delivered', 1, at(1400)],
          ['loading', 'delivered', 1, at(1500)],
          ['working', 'delivered', 2, at(5100)],
        ]);
        expect(await claimDeliveries(at(6000))).toEqual([]);
      });

      it('deliveriesClaimOnWrite (where offered): a due event is written claimed and announced, within the origin cap and while wanted', async (ctx) => {
        if (!d.deliveriesClaimOnWrite || !d.deliveriesClaimed) return ctx.skip();
        let want = true;
        const claimed: number[][] = [];
        let ready = 0;
        d.notifier.on('deliveriesClaimed', (ids) => claimed.push([...ids]));
        d.notifier.on('deliveryReady', () => ready++);
        const detach = d.deliveriesClaimOnWrite({ perOriginLimit: 2, want: () => want });
        const a = await insertOne(at(1000), { webhookUrl: HOOK, metadata: { k: 'a' } });
        expect(claimed).toEqual([[expect.any(Number)]]);
        expect(ready).toBe(0);
        const idA = claimed[0]![0]!;
        // Claimed already: the ordinary claim passes it over.
        expect(await claimDeliveries(at(1001))).toEqual([]);
        expect(await d.deliveriesClaimed({ ids: [idA], now: at(1002), inlineMax: 1024 })).toEqual([
          { id: idA, jobId: a, state: 'queued', sequence: 1, url: HOOK, origin: ORIGIN, occurredAt: at(1000), attempts: 0, metadata: { k: 'a' }, error: null, artifacts: [], run: null },
        ]);
        const b = await insertOne(at(1010), { webhookUrl: HOOK });
        expect(claimed).toHaveLength(2);
        const idB = claimed[1]![0]!;
        // The origin's cap (two claimed): the third is written due, unclaimed, and announced as due.
        const c = await insertOne(at(1020), { webhookUrl: HOOK });
        expect(claimed).toHaveLength(2);
        expect(ready).toBe(1);
        expect((await claimDeliveries(at(1021), { perOriginLimit: 3 })).map((x) => x.jobId)).toEqual([c]);
        // A job's later event, behind its pending `queued`: written waiting, neither claimed nor due.
        const ca = await claimOne(at(1030));
        expect(ca.id).toBe(a);
        expect(claimed).toHaveLength(2);
        expect(ready).toBe(1);
        // Not wanted, or detached: written due, as without it.
        want = false;
        await insertOne(at(1040), { webhookUrl: 'http://127.0.0.1:9/other' });
        want = true;
        detach();
        await insertOne(at(1050), { webhookUrl: 'http://127.0.0.1:9/other' });
        expect(claimed).toHaveLength(2);
        expect(ready).toBe(3);
        // At send time: a row recorded meanwhile is not handed out; one whose lease is (nearly) over neither.
        await d.deliveryRecord({ id: idA, now: at(1100), outcome: { kind: 'delivered', status: 200 } });
        expect((await d.deliveriesClaimed({ ids: [idA, idB], now: at(1101), inlineMax: 1024 })).map((x) => [x.id, x.jobId])).toEqual([[idB, b]]);
        const late = at(1010) + 3_600_000;
        expect(await d.deliveriesClaimed({ ids: [idB], now: late, inlineMax: 1024 })).toEqual([]);
        // Its lease over, the ordinary claim takes it.
        expect((await claimDeliveries(late)).map((x) => x.id)).toContain(idB);
      });

      it('deliveriesClaimOnWrite (where offered): a transition of many jobs at once (a deadline sweep) claims none of their events; they are announced due', async (ctx) => {
        if (!d.deliveriesClaimOnWrite || !d.deliveriesClaimed) return ctx.skip();
        const claimed: number[][] = [];
        let ready = 0;
        d.notifier.on('deliveriesClaimed', (ids) => claimed.push([...ids]));
        d.notifier.on('deliveryReady', () => ready++);
        const a = await insertOne(at(0), { webhookUrl: HOOK, webhookEvents: ['failed'], deadlineAt: at(100) });
        const b = await insertOne(at(1), { webhookUrl: HOOK, webhookEvents: ['failed'], deadlineAt: at(100) });
        const detach = d.deliveriesClaimOnWrite({ perOriginLimit: 100, want: () => true });
        expect((await d.jobsFailPastDeadline({ now: at(200), limit: 100 })).sort()).toEqual([a, b].sort());
        detach();
        expect(claimed).toEqual([]);
        expect(ready).toBe(1);
        expect((await claimDeliveries(at(201))).map((x) => [x.jobId, x.state]).sort()).toEqual([[a, 'failed'], [b, 'failed']].sort());
      });

      it('deliveriesClaim says whether an origin it left rows of was at its cap (where the driver can tell)', async (ctx) => {
        const claim = (now: number, perOriginLimit: number) => d.deliveriesClaim({ now, limit: 10, perOriginLimit, inlineMax: 0 });
        const none = await claim(at(0), 1);
        if (none.capped === undefined) return ctx.skip();
        expect(none).toEqual({ deliveries: [], nextDueAt: null, capped: false });
        await insertOne(at(10), { webhookUrl: HOOK, webhookEvents: ['queued'] });
        await insertOne(at(11), { webhookUrl: HOOK, webhookEvents: ['queued'] });
        // One of two claimed at a cap of one: the other waits for room.
        const one = await claim(at(20), 1);
        expect(one.deliveries).toHaveLength(1);
        expect(one.capped).toBe(true);
        await d.deliveryRecord({ id: one.deliveries[0]!.id, now: at(30), outcome: { kind: 'delivered', status: 200 } });
        // The last one, below a cap of two: nothing waits for room.
        const two = await claim(at(40), 2);
        expect(two.deliveries).toHaveLength(1);
        expect(two.capped).toBe(false);
      });

      it('the next event is never claimed past an earlier one that is not due yet (events stamped by another clock)', async () => {
        const id = await insertOne(at(1000), { webhookUrl: HOOK });
        // loading stamped at 3000 by one clock, working at 2000 by another.
        const c = await claimOne(at(3000));
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(2000), leaseMs: 10_000 })).toBe(true);
        const [queued] = await claimDeliveries(at(1100));
        expect(queued!.state).toBe('queued');
        // Acknowledged at 2500: loading (due 3000) is next in line; working must wait behind it.
        expect(await d.deliveryClaimNext({ afterId: queued!.id, now: at(2500), inlineMax: 1024 })).toBeNull();
        if (d.deliveryRecordClaimNext) {
          let ready = 0;
          d.notifier.on('deliveryReady', () => ready++);
          expect(await d.deliveryRecordClaimNext({ id: queued!.id, now: at(2500), status: 200, inlineMax: 1024 })).toEqual({ recorded: true, next: null });
          // The head it left unclaimed is announced as due (a dispatcher learns when to claim it).
          expect(ready).toBe(1);
        } else {
          await d.deliveryRecord({ id: queued!.id, now: at(2500), outcome: { kind: 'delivered', status: 200 } });
        }
        expect(await claimDeliveries(at(2999))).toEqual([]);
        const next = await claimDeliveries(at(3000));
        expect(next.map((x) => [x.jobId, x.state])).toEqual([[id, 'loading']]);
      });

      it('deliveryClaimNext: a chained event that fails is retried at its backoff, in turn', async () => {
        const id = await insertOne(at(0), { webhookUrl: HOOK });
        await claimOne(at(10));
        const [queued] = await claimDeliveries(at(20));
        const record = d.deliveryRecord({ id: queued!.id, now: at(30), outcome: { kind: 'delivered', status: 200 } });
        const loading = await d.deliveryClaimNext({ afterId: queued!.id, now: at(30), inlineMax: 1024 });
        await record;
        await d.deliveryRecord({ id: loading!.id, now: at(40), outcome: { kind: 'retry', at: at(5000), status: 500, error: 'HTTP 500' } });
        expect(await claimDeliveries(at(4999))).toEqual([]);
        expect(await d.deliveriesNextDueAt({ now: at(4999), perOriginLimit: 10 })).toBe(at(5000));
        const again = await claimDeliveries(at(5000));
        expect(again.map((x) => [x.jobId, x.state, x.attempts])).toEqual([[id, 'loading', 1]]);
      });

      it('claims at most perOriginLimit per origin (scheme://host:port), up to limit in all', async () => {
        const a = await insertOne(at(0), { webhookUrl: 'http://127.0.0.1:9/a', webhookEvents: ['queued'] });
        const b = await insertOne(at(1), { webhookUrl: 'http://127.0.0.1:9/b', webhookEvents: ['queued'] });
        const c = await insertOne(at(2), { webhookUrl: 'http://127.0.0.1:10/a', webhookEvents: ['queued'] });
        const e = await insertOne(at(3), { webhookUrl: 'http://127.0.0.1:9/a', webhookEvents: ['queued'] });
        const got = await claimDeliveries(at(10), { perOriginLimit: 1 });
        expect(sorted(got.map((x) => x.jobId))).toEqual(sorted([a, c]));
        expect(sorted(got.map((x) => `${x.origin} ${x.url}`))).toEqual(['http://127.0.0.1:10 http://127.0.0.1:10/a', 'http://127.0.0.1:9 http://127.0.0.1:9/a']);
        expect(await claimDeliveries(at(11), { perOriginLimit: 1 })).toEqual([]);
        expect(await d.deliveriesNextDueAt({ now: at(11), perOriginLimit: 1 })).toBeNull(); // every origin with work is at its cap
        expect(await d.deliveriesNextDueAt({ now: at(11), perOriginLimit: 2 })).toBe(at(1)); // b, the next unclaimed of :9
        // With a higher cap, the same origin gives more; `limit` caps the total.
        const more = await claimDeliveries(at(12), { perOriginLimit: 3, limit: 1 });
        expect(more.map((x) => x.jobId)).toEqual([b]);
        const more2 = await claimDeliveries(at(12), { perOriginLimit: 3 });
        expect(more2.map((x) => x.jobId)).toEqual([e]);
        expect(await claimDeliveries(at(13), { perOriginLimit: 3 })).toEqual([]);
        // Finishing one frees a slot of its origin.
        const ga = got.find((x) => x.jobId === a)!;
        await d.deliveryRecord({ id: ga.id, now: at(20), outcome: { kind: 'delivered', status: 200 } });
        await d.deliveryRecord({ id: more[0]!.id, now: at(20), outcome: { kind: 'delivered', status: 200 } });
        const gc = got.find((x) => x.jobId === c)!;
        await d.deliveryRecord({ id: gc.id, now: at(20), outcome: { kind: 'delivered', status: 200 } });
        await d.deliveryRecord({ id: more2[0]!.id, now: at(20), outcome: { kind: 'delivered', status: 200 } });
        expect(await claimDeliveries(at(21), { perOriginLimit: 1 })).toEqual([]);
        expect(await d.deliveriesNextDueAt({ now: at(21), perOriginLimit: 1 })).toBeNull();
        expect(await statusesOf(e)).toEqual([['queued', 'delivered']]);
      });

      it('deliveriesClaim says, in the same step, when the first head it did not claim falls due', async () => {
        const raw = async (now: number, limit = 10) => {
          const { deliveries, nextDueAt } = await d.deliveriesClaim({ now, limit, perOriginLimit: 10, inlineMax: 0 });
          return { deliveries, nextDueAt };
        };
        expect(await raw(at(0))).toEqual({ deliveries: [], nextDueAt: null }); // nothing owed
        const a = await insertOne(at(0), { webhookUrl: 'http://127.0.0.1:9/a', webhookEvents: ['queued'] });
        const [qa] = (await raw(at(10))).deliveries;
        await d.deliveryRecord({ id: qa!.id, now: at(20), outcome: { kind: 'retry', at: at(5000), status: 503, error: 'HTTP 503' } });
        const b = await insertOne(at(30), { webhookUrl: 'http://127.0.0.1:10/b', webhookEvents: ['queued'] });
        const c = await insertOne(at(31), { webhookUrl: 'http://127.0.0.1:11/c', webhookEvents: ['queued'] });
        // Two claimed now, one origin's head later: the claim says when.
        const first = await raw(at(40));
        expect(first.deliveries.map((x) => x.jobId)).toEqual([b, c]);
        expect(first.nextDueAt).toBe(at(5000));
        // As many claimed as asked for: no answer (the dispatcher asks again at once).
        expect(await raw(at(4999), 1)).toEqual({ deliveries: [], nextDueAt: at(5000) });
        const due = await raw(at(5000), 1);
        expect(due.deliveries.map((x) => [x.jobId, x.attempts])).toEqual([[a, 1]]);
        expect(due.nextDueAt).toBeNull();
        expect(await raw(at(5001))).toEqual({ deliveries: [], nextDueAt: null });
      });

      it('the per-origin cap frees up as attempts end', async () => {
        const a = await insertOne(at(0), { webhookUrl: 'http://127.0.0.1:9/a', webhookEvents: ['queued'] });
        const b = await insertOne(at(1), { webhookUrl: 'http://127.0.0.1:9/b', webhookEvents: ['queued'] });
        const [da] = await claimDeliveries(at(10), { perOriginLimit: 1 });
        expect(da!.jobId).toBe(a);
        expect(await claimDeliveries(at(10), { perOriginLimit: 1 })).toEqual([]);
        await d.deliveryRecord({ id: da!.id, now: at(20), outcome: { kind: 'delivered', status: 200 } });
        expect((await claimDeliveries(at(21), { perOriginLimit: 1 })).map((x) => x.jobId)).toEqual([b]);
      });

      it('retry: not claimable before `at`, deliveriesNextDueAt says when, and the job line waits', async () => {
        const id = await insertOne(at(1000), { webhookUrl: HOOK, webhookEvents: ['queued', 'done'] });
        const [q] = await claimDeliveries(at(1001));
        await d.deliveryRecord({ id: q!.id, now: at(1100), outcome: { kind: 'retry', at: at(5000), status: 503, error: 'HTTP 503' } });
        expect((await deliveriesOf(id))[0]).toEqual({
          id: q!.id, state: 'queued', sequence: 1, status: 'pending', attempts: 1, lastStatusCode: 503, lastError: 'HTTP 503', nextAttemptAt: at(5000), deliveredAt: null, occurredAt: at(1000),
        });
        expect(await claimDeliveries(at(4999))).toEqual([]);
        expect(await d.deliveriesNextDueAt({ now: at(4999), perOriginLimit: 10 })).toBe(at(5000));
        await runToDone(at(2000)); // a done event now waits behind the retrying one
        expect(await claimDeliveries(at(4999))).toEqual([]);
        expect(await d.deliveriesNextDueAt({ now: at(4999), perOriginLimit: 10 })).toBe(at(5000));
        const again = await claimDeliveries(at(5000));
        expect(again.map((x) => [x.id, x.state, x.attempts])).toEqual([[q!.id, 'queued', 1]]);
        await d.deliveryRecord({ id: q!.id, now: at(5100), outcome: { kind: 'retry', at: at(6000), status: null, error: 'connection refused' } });
        expect((await deliveriesOf(id))[0]).toMatchObject({ attempts: 2, lastStatusCode: null, lastError: 'connection refused', nextAttemptAt: at(6000) });
        const third = await claimDeliveries(at(6000));
        await d.deliveryRecord({ id: third[0]!.id, now: at(6100), outcome: { kind: 'delivered', status: 200 } });
        expect((await deliveriesOf(id))[0]).toMatchObject({ status: 'delivered', attempts: 3, lastStatusCode: 200, lastError: null, nextAttemptAt: null });
        expect((await claimDeliveries(at(6101))).map((x) => x.state)).toEqual(['done']);
      });

      it('failed: the delivery is given up, and the job line moves on', async () => {
        const id = await insertOne(at(0), { webhookUrl: HOOK, webhookEvents: ['queued', 'loading'] });
        await claimOne(at(10));
        const [q] = await claimDeliveries(at(20));
        await d.deliveryRecord({ id: q!.id, now: at(30), outcome: { kind: 'failed', status: 500, error: 'HTTP 500' } });
        expect((await deliveriesOf(id))[0]).toEqual({
          id: q!.id, state: 'queued', sequence: 1, status: 'failed', attempts: 1, lastStatusCode: 500, lastError: 'HTTP 500', nextAttemptAt: null, deliveredAt: null, occurredAt: at(0),
        });
        expect((await claimDeliveries(at(31))).map((x) => x.state)).toEqual(['loading']);
      });

      it('gone (410): this and every later pending delivery fail, and later states make none', async () => {
        const id = await insertOne(at(1000), { webhookUrl: HOOK });
        const [q] = await claimDeliveries(at(1001));
        const c = await claimOne(at(1100));
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(1200), leaseMs: 1_000 })).toBe(true);
        await d.deliveryRecord({ id: q!.id, now: at(1300), outcome: { kind: 'gone', status: 410, error: 'receiver answered 410 Gone' } });
        const ds = await deliveriesOf(id);
        expect(ds.map((x) => [x.state, x.status, x.nextAttemptAt])).toEqual([
          ['queued', 'failed', null],
          ['loading', 'failed', null],
          ['working', 'failed', null],
        ]);
        expect(ds[0]).toMatchObject({ attempts: 1, lastStatusCode: 410, lastError: 'receiver answered 410 Gone' });
        expect(ds[1]).toMatchObject({ attempts: 0, lastStatusCode: null });
        expect(ds[2]).toMatchObject({ attempts: 0, lastStatusCode: null });
        expect(typeof ds[1]!.lastError).toBe('string');
        expect(await claimDeliveries(at(1301))).toEqual([]);
        expect(await d.jobComplete({ seq: c.seq, lease: c.lease, now: at(1400), result: 1, artifacts: [], runMs: 1 })).toBe(true);
        expect((await deliveriesOf(id)).map((x) => x.state)).toEqual(['queued', 'loading', 'working']);
        expect(await claimDeliveries(at(1401))).toEqual([]);
        expect(await d.deliveriesNextDueAt({ now: at(1401), perOriginLimit: 10 })).toBeNull();
      });

      it('deliveryRelease: claimable again, attempts unchanged', async () => {
        const id = await insertOne(at(0), { webhookUrl: HOOK, webhookEvents: ['queued'] });
        const [q] = await claimDeliveries(at(10), { perOriginLimit: 1 });
        expect(await claimDeliveries(at(11), { perOriginLimit: 1 })).toEqual([]);
        await d.deliveryRelease({ id: q!.id });
        const again = await claimDeliveries(at(12), { perOriginLimit: 1 });
        expect(again).toEqual([{ ...q!, attempts: 0 }]);
        expect((await deliveriesOf(id))[0]).toMatchObject({ status: 'pending', attempts: 0, lastStatusCode: null, lastError: null });
      });

      it('deliveriesRedeliver: failed deliveries (or the one for a state) become pending again', async () => {
        const id = await insertOne(at(0), { webhookUrl: HOOK, webhookEvents: ['queued', 'done'] });
        expect(await d.deliveriesRedeliver({ jobId: id, now: at(1), state: null })).toEqual([]); // nothing failed
        const [q] = await claimDeliveries(at(10));
        await d.deliveryRecord({ id: q!.id, now: at(20), outcome: { kind: 'failed', status: 500, error: 'HTTP 500' } });
        await runToDone(at(30)); // done event: head now
        const [dn] = await claimDeliveries(at(40));
        expect(dn!.state).toBe('done');
        await d.deliveryRecord({ id: dn!.id, now: at(50), outcome: { kind: 'delivered', status: 200 } });
        expect(await statusesOf(id)).toEqual([
          ['queued', 'failed'],
          ['done', 'delivered'],
        ]);

        expect(await d.deliveriesRedeliver({ jobId: id, now: at(3000), state: null })).toEqual(['queued']);
        expect((await deliveriesOf(id))[0]).toMatchObject({ state: 'queued', status: 'pending', attempts: 0, nextAttemptAt: at(3000) });
        expect((await deliveriesOf(id))[1]).toMatchObject({ state: 'done', status: 'delivered' });
        const again = await claimDeliveries(at(3000));
        expect(again.map((x) => [x.id, x.state, x.attempts])).toEqual([[q!.id, 'queued', 0]]);
        await d.deliveryRecord({ id: q!.id, now: at(3010), outcome: { kind: 'delivered', status: 200 } });
        expect(await claimDeliveries(at(3011))).toEqual([]);
        // A named state is sent again even if it was delivered.
        expect(await d.deliveriesRedeliver({ jobId: id, now: at(4000), state: 'done' })).toEqual(['done']);
        expect((await claimDeliveries(at(4000))).map((x) => [x.id, x.state])).toEqual([[dn!.id, 'done']]);
        expect(await d.deliveriesRedeliver({ jobId: id, now: at(4001), state: 'done' })).toEqual([]); // pending already
        expect(await d.deliveriesRedeliver({ jobId: uuidv7(), now: at(4002), state: null })).toEqual([]);
      });

      it('deliveriesRedeliver after a 410 gives the job its webhook back', async () => {
        const id = await insertOne(at(0), { webhookUrl: HOOK });
        const [q] = await claimDeliveries(at(1));
        const c = await claimOne(at(2));
        await d.deliveryRecord({ id: q!.id, now: at(3), outcome: { kind: 'gone', status: 410, error: 'gone' } });
        expect(sorted(await d.deliveriesRedeliver({ jobId: id, now: at(10), state: null }))).toEqual(['loading', 'queued']);
        expect((await claimDeliveries(at(10))).map((x) => x.state)).toEqual(['queued']);
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(11), leaseMs: 1_000 })).toBe(true);
        expect((await deliveriesOf(id)).map((x) => [x.state, x.status])).toEqual([
          ['queued', 'pending'],
          ['loading', 'pending'],
          ['working', 'pending'],
        ]);
      });

      it('webhookEvents: only the listed states get deliveries; failed ones carry the error', async () => {
        const id = await insertOne(at(0), { webhookUrl: HOOK, webhookEvents: ['working', 'failed'], metadata: { m: '1' } });
        expect(await deliveriesOf(id)).toEqual([]);
        expect(await claimDeliveries(at(1))).toEqual([]);
        expect(await d.deliveriesNextDueAt({ now: at(1), perOriginLimit: 10 })).toBeNull();
        const c = await claimOne(at(10));
        expect(await deliveriesOf(id)).toEqual([]);
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(20), leaseMs: 1_000 })).toBe(true);
        const error = { code: 'engine_error', message: 'model crashed' };
        expect(await d.jobFail({ seq: c.seq, lease: c.lease, now: at(30), error })).toBe(true);
        expect(await statusesOf(id)).toEqual([
          ['working', 'pending'],
          ['failed', 'pending'],
        ]);
        const [w] = await claimDeliveries(at(40));
        expect(w).toMatchObject({ state: 'working', sequence: 3, error: null, artifacts: [], metadata: { m: '1' } });
        await d.deliveryRecord({ id: w!.id, now: at(50), outcome: { kind: 'delivered', status: 200 } });
        expect(await claimDeliveries(at(51))).toEqual([
          {
            id: expect.any(Number),
            jobId: id,
            state: 'failed',
            sequence: 4,
            url: HOOK,
            origin: ORIGIN,
            occurredAt: at(30),
            attempts: 0,
            metadata: { m: '1' },
            error,
            artifacts: [],
            run: runOf({ id, createdAt: at(0), startedAt: at(10), finishedAt: at(30), attempt: 1 }),
          },
        ]);
      });

      it('done deliveries carry the artifacts, bodies inline only up to inlineMax', async () => {
        const id = await insertOne(at(0), { webhookUrl: HOOK, webhookEvents: ['done'] });
        const c = await claimOne(at(10));
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(20), leaseMs: 1_000 })).toBe(true);
        const small = Buffer.from('0123456789'); // 10 bytes: inline
        const big = Buffer.from('0123456789A'); // 11 bytes: not inline
        expect(
          await d.jobComplete({
            seq: c.seq,
            lease: c.lease,
            now: at(30),
            result: { ok: 1 },
            artifacts: [
              { name: 'b.bin', contentType: 'application/octet-stream', body: big },
              { name: 'a.txt', contentType: 'text/plain', body: small },
            ],
            runMs: 5,
          }),
        ).toBe(true);
        const got = await claimDeliveries(at(40), { inlineMax: 10 });
        expect(got).toEqual([
          {
            id: expect.any(Number),
            jobId: id,
            state: 'done',
            sequence: 4,
            url: HOOK,
            origin: ORIGIN,
            occurredAt: at(30),
            attempts: 0,
            metadata: null,
            error: null,
            artifacts: [
              { name: 'a.txt', contentType: 'text/plain', size: 10, sha256: sha256(small), body: small },
              { name: 'b.bin', contentType: 'application/octet-stream', size: 11, sha256: sha256(big), body: null },
            ],
            run: runOf({ id, createdAt: at(0), startedAt: at(10), finishedAt: at(30), attempt: 1 }),
          },
        ]);
        expect(Buffer.compare(got[0]!.artifacts[0]!.body!, small)).toBe(0);
        // inlineMax applies per claim.
        await d.deliveryRelease({ id: got[0]!.id });
        const again = await claimDeliveries(at(41), { inlineMax: 0 });
        expect(again[0]!.artifacts.map((x) => x.body)).toEqual([null, null]);
      });

      it('cost independence: a saturated origin with a 2,000-delivery backlog hides nobody and never busy-loops', async () => {
        const jobs = Array.from({ length: 2000 }, (_, i) => newJob({ webhookUrl: `http://127.0.0.1:9/hook/${i % 7}`, webhookEvents: ['queued'] }));
        const out: InsertOutcome[] = await d.jobsInsert({ jobs, now: at(0), maxQueued: BIG_QUEUE });
        expect(out.filter((o) => o.ok)).toHaveLength(2000);
        const first = await claimDeliveries(at(10), { limit: 10, perOriginLimit: 2 });
        expect(first).toHaveLength(2);
        expect(first.every((x) => x.origin === ORIGIN)).toBe(true);
        expect(await claimDeliveries(at(11), { limit: 10, perOriginLimit: 2 })).toEqual([]);
        // The only origin with due work is at its cap: nothing to wake for (its attempts ending wake the dispatcher).
        // Any driver: never a time <= now while nothing is claimable (the dispatcher would spin).
        // What the interface promises, exactly: no origin below its cap has an unclaimed delivery → null.
        const idle = await d.deliveriesNextDueAt({ now: at(11), perOriginLimit: 2 });
        expect(idle === null || idle > at(11)).toBe(true);
        expect(idle).toBeNull();

        const other = await insertOne(at(20), { webhookUrl: 'http://127.0.0.1:10/hook', webhookEvents: ['queued'] });
        const got = await claimDeliveries(at(21), { limit: 1, perOriginLimit: 2 });
        expect(got.map((x) => [x.jobId, x.origin])).toEqual([[other, 'http://127.0.0.1:10']]);
        expect(await claimDeliveries(at(22), { limit: 10, perOriginLimit: 2 })).toEqual([]);
        expect(await d.deliveriesNextDueAt({ now: at(22), perOriginLimit: 2 })).toBeNull();

        // A retry elsewhere: the next wake-up is that retry, not the saturated backlog's (past) due time.
        await d.deliveryRecord({ id: got[0]!.id, now: at(30), outcome: { kind: 'retry', at: at(5000), status: 503, error: 'HTTP 503' } });
        expect(await d.deliveriesNextDueAt({ now: at(30), perOriginLimit: 2 })).toBe(at(5000));
        expect(await claimDeliveries(at(4999), { limit: 10, perOriginLimit: 2 })).toEqual([]);
        const retried = await claimDeliveries(at(5000), { limit: 10, perOriginLimit: 2 });
        expect(retried.map((x) => [x.jobId, x.attempts])).toEqual([[other, 1]]);

        // One attempt of the saturated origin ends: exactly one more of its backlog is claimable.
        await d.deliveryRecord({ id: first[0]!.id, now: at(5001), outcome: { kind: 'delivered', status: 200 } });
        const due = await d.deliveriesNextDueAt({ now: at(5001), perOriginLimit: 2 });
        expect(due).not.toBeNull();
        expect(due!).toBeLessThanOrEqual(at(5002)); // claimable now
        const next = await claimDeliveries(at(5002), { limit: 10, perOriginLimit: 2 });
        expect(next).toHaveLength(1);
        expect(next[0]!.origin).toBe(ORIGIN);
        expect(first.map((x) => x.jobId)).not.toContain(next[0]!.jobId);
        expect(await d.deliveriesNextDueAt({ now: at(5002), perOriginLimit: 2 })).toBeNull();
      });

      it('deliveriesNextDueAt is null when nothing is owed', async () => {
        expect(await d.deliveriesNextDueAt({ now: at(0), perOriginLimit: 1 })).toBeNull();
        await insertOne(at(0));
        expect(await d.deliveriesNextDueAt({ now: at(0), perOriginLimit: 1 })).toBeNull();
        expect(await claimDeliveries(at(1))).toEqual([]);
      });
    });
    // =========================================================================================
    describe('API keys, fair share, quotas and usage (ADR-0013)', () => {
      const DAY = 86_400_000;
      const key = (over: Partial<ApiKeyRecord> = {}): ApiKeyRecord => ({
        id: uuidv7(),
        name: 'tenant',
        concurrency: null,
        maxQueued: null,
        dailyLimit: null,
        priorityMax: null,
        createdAt: at(0),
        updatedAt: at(0),
        revokedAt: null,
        ...over,
      });
      const hashOf = (s: string) => createHash('sha256').update(s).digest('hex');
      const quota = (o: { maxQueued?: number | null; dailyLimit?: number | null; now: number }) => ({
        maxQueued: o.maxQueued ?? null,
        dailyLimit: o.dailyLimit ?? null,
        day: Math.floor(o.now / DAY),
        nextDayAt: (Math.floor(o.now / DAY) + 1) * DAY,
      });

      it('stores keys by hash only; looks them up, lists, updates limits (null removes one) and revokes', async () => {
        const k = key({ name: 'app', concurrency: 2, dailyLimit: 100 });
        await d.keyInsert({ key: k, hash: hashOf('fm_secret'), actor: 'admin' });
        expect(await d.keyByHash({ hash: hashOf('fm_secret') })).toEqual(k);
        expect(await d.keyByHash({ hash: hashOf('fm_other') })).toBeNull();
        expect(await d.keyGet({ id: k.id })).toEqual(k);
        expect(await d.keysList()).toEqual([k]);
        const changed = await d.keyUpdate({ id: k.id, changes: { concurrency: null, maxQueued: 5, name: 'app2' }, now: at(10), actor: 'admin' });
        expect(changed).toEqual({ ...k, name: 'app2', concurrency: null, maxQueued: 5, updatedAt: at(10) });
        expect(await d.keyUpdate({ id: uuidv7(), changes: { maxQueued: 1 }, now: at(11), actor: 'admin' })).toBeNull();
        const revoked = await d.keyRevoke({ id: k.id, now: at(20), actor: 'admin' });
        expect(revoked).toEqual({ ...changed, revokedAt: at(20), updatedAt: at(20) });
        expect((await d.keyByHash({ hash: hashOf('fm_secret') }))!.revokedAt).toBe(at(20));
        expect(await d.keyRevoke({ id: uuidv7(), now: at(21), actor: 'admin' })).toBeNull();
      });

      it('the audit log records key changes, cancels, redeliveries and clamps, newest first, paginated', async () => {
        const k = key();
        await d.keyInsert({ key: k, hash: hashOf('a'), actor: 'admin' });
        await d.keyUpdate({ id: k.id, changes: { dailyLimit: 3 }, now: at(1), actor: 'admin' });
        const [id] = await insert(at(2), newJob({ keyId: k.id, priority: 5, clampedFrom: { priority: 9, actor: k.id } }));
        expect(await d.jobCancel({ id: id!, now: at(3), actor: k.id })).toMatchObject({ canceled: true });
        await d.keyRevoke({ id: k.id, now: at(4), actor: 'admin' });
        const all = await d.auditList({ limit: 10 });
        expect(all.map((e) => [e.action, e.actor, e.target, e.at])).toEqual([
          ['key.revoked', 'admin', k.id, at(4)],
          ['job.canceled', k.id, id, at(3)],
          ['job.priority_clamped', k.id, id, at(2)],
          ['key.updated', 'admin', k.id, at(1)],
          ['key.created', 'admin', k.id, at(0)],
        ]);
        expect(all[2]!.detail).toEqual({ asked: 9, given: 5 });
        expect(all[1]!.detail).toEqual({ was: 'queued' });
        const page1 = await d.auditList({ limit: 2 });
        const page2 = await d.auditList({ limit: 2, beforeId: page1[1]!.id });
        expect([...page1, ...page2].map((e) => e.id)).toEqual(all.slice(0, 4).map((e) => e.id));
      });

      it("jobs carry their key; lists filter by it; jobCancel with another key's id finds nothing", async () => {
        const a = uuidv7();
        const b = uuidv7();
        const [ja] = await insert(at(1), newJob({ keyId: a }));
        const [jb] = await insert(at(2), newJob({ keyId: b }));
        const [jn] = await insert(at(3), newJob());
        expect((await view(ja!)).keyId).toBe(a);
        expect((await view(jn!)).keyId).toBeNull();
        expect((await d.jobsList({ keyId: a, limit: 10 })).map((j) => [j.id, j.keyId])).toEqual([[ja, a]]);
        expect((await d.jobsList({ keyId: '', limit: 10 })).map((j) => j.id)).toEqual([jn]);
        expect((await d.jobsList({ limit: 10 })).map((j) => j.id)).toEqual([jn, jb, ja]);
        expect(await d.jobCancel({ id: ja!, now: at(4), keyId: b })).toBeNull();
        expect(await stateOf(ja!)).toBe('queued');
        expect(await d.jobCancel({ id: ja!, now: at(5), keyId: a })).toMatchObject({ canceled: true });
      });

      it('fair share: among equal priorities keys take turns, FIFO within a key; priority still wins', async () => {
        const a = uuidv7();
        const b = uuidv7();
        const as = await insert(at(1), ...Array.from({ length: 5 }, () => newJob({ keyId: a })));
        const bs = await insert(at(2), ...Array.from({ length: 2 }, () => newJob({ keyId: b })));
        const [urgent] = await insert(at(3), newJob({ keyId: a, priority: 10 }));
        const order = (await d.jobsClaim({ owner: 'w', limit: 10, now: at(10), leaseMs: 1000 })).map((c) => c.id);
        expect(order).toEqual([urgent, bs[0], as[0], bs[1], as[1], as[2], as[3], as[4]]);
      });

      it('fair share is not undone by one claim at a time', async () => {
        const a = uuidv7();
        const b = uuidv7();
        const as = await insert(at(1), ...Array.from({ length: 3 }, () => newJob({ keyId: a })));
        const bs = await insert(at(2), ...Array.from({ length: 3 }, () => newJob({ keyId: b })));
        const got: string[] = [];
        for (let i = 0; i < 6; i++) got.push((await claimOne(at(10 + i))).id);
        expect(got).toEqual([as[0], bs[0], as[1], bs[1], as[2], bs[2]]);
      });

      it("a key at its concurrency is skipped until one of its jobs ends; others' jobs run meanwhile", async () => {
        const k = key({ concurrency: 1 });
        await d.keyInsert({ key: k, hash: hashOf('c'), actor: 'admin' });
        const ks = await insert(at(1), newJob({ keyId: k.id }), newJob({ keyId: k.id }));
        const [other] = await insert(at(2), newJob());
        const first = await d.jobsClaim({ owner: 'w', limit: 10, now: at(3), leaseMs: 1000 });
        expect(first.map((c) => c.id)).toEqual([ks[0], other]);
        expect(await d.jobsClaim({ owner: 'w', limit: 10, now: at(4), leaseMs: 1000 })).toEqual([]);
        const c = first[0]!;
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(5), leaseMs: 1000 })).toBe(true);
        expect(await d.jobComplete({ seq: c.seq, lease: c.lease, now: at(6), result: 1, artifacts: [], runMs: 1 })).toBe(true);
        expect((await d.jobsClaim({ owner: 'w', limit: 10, now: at(7), leaseMs: 1000 })).map((x) => x.id)).toEqual([ks[1]]);
        // Raising the limit makes the key claimable again, and announces it.
        await d.keyUpdate({ id: k.id, changes: { concurrency: 5 }, now: at(8), actor: 'admin' });
      });

      it('maxQueued refuses (key_queue_full) counting queued and scheduled jobs; nothing is written', async () => {
        const k = uuidv7();
        await insert(at(1), newJob({ keyId: k, quota: quota({ maxQueued: 2, now: at(1) }) }), newJob({ keyId: k, quota: quota({ maxQueued: 2, now: at(1) }) }));
        const refused = newJob({ keyId: k, quota: quota({ maxQueued: 2, now: at(2) }) });
        expect(await d.jobsInsert({ jobs: [refused], now: at(2), maxQueued: BIG_QUEUE })).toEqual([{ ok: false, code: 'key_queue_full' }]);
        expect(await d.jobGet({ id: refused.id })).toBeNull();
        // Another key is not affected.
        await insert(at(3), newJob({ keyId: uuidv7(), quota: quota({ maxQueued: 2, now: at(3) }) }));
        // Once one starts, there is room again.
        await claimOne(at(4));
        await insert(at(5), newJob({ keyId: k, quota: quota({ maxQueued: 2, now: at(5) }) }));
      });

      it('past dailyLimit a job is inserted scheduled for the next UTC day, then promoted, aged from then', async () => {
        const k = uuidv7();
        const now = Math.floor(at(0) / DAY) * DAY + DAY - 10_000; // 10 s before a UTC midnight
        const midnight = Math.floor(now / DAY) * DAY + DAY;
        const q = () => quota({ dailyLimit: 2, now });
        const out = await d.jobsInsert({ jobs: [newJob({ keyId: k, quota: q() }), newJob({ keyId: k, quota: q() }), newJob({ keyId: k, quota: q() })], now, maxQueued: BIG_QUEUE });
        expect(out.map((o) => (o.ok ? [o.state, o.scheduledFor] : o.code))).toEqual([
          ['queued', null],
          ['queued', null],
          ['scheduled', midnight],
        ]);
        const late = (out[2] as { jobId: string }).jobId;
        expect(await view(late)).toMatchObject({ state: 'scheduled', scheduledFor: midnight, transitions: [{ state: 'scheduled', at: now, attempt: 0 }] });
        expect(await d.keyUsage({ keyId: k, day: Math.floor(now / DAY) })).toEqual({ jobsToday: 3, tokensToday: 0, running: 0, queued: 2, scheduled: 1 });
        // Not claimable, and not promoted, before its time.
        await d.jobsClaim({ owner: 'w', limit: 10, now: now + 1, leaseMs: 100_000 });
        expect(await d.jobsClaim({ owner: 'w', limit: 10, now: now + 2, leaseMs: 100_000 })).toEqual([]);
        expect(await d.jobsNextScheduledAt()).toBe(midnight);
        expect(await d.jobsPromoteScheduled({ now: midnight - 1 })).toEqual([]);
        const changes: TransitionEvent[] = [];
        const off = d.notifier.on('stateChanged', (e) => changes.push(e));
        expect(await d.jobsPromoteScheduled({ now: midnight })).toEqual([late]);
        off();
        expect(changes.map((e) => [e.jobId, e.state, e.n])).toEqual([[late, 'queued', 2]]);
        expect(await d.jobsNextScheduledAt()).toBeNull();
        // Aging counts from the scheduled time, not from submission: 5 intervals, not 105, so a
        // later job of the key at priority 50 still goes first.
        await d.jobsAge({ now: midnight + 500, agingMs: 100 });
        const [fresh] = await insert(midnight + 600, newJob({ keyId: k, priority: 50 }));
        expect((await claimOne(midnight + 700)).id).toBe(fresh);
        expect((await claimOne(midnight + 800)).id).toBe(late);
        // The new day has its own count.
        expect((await d.keyUsage({ keyId: k, day: Math.floor(midnight / DAY) })).jobsToday).toBe(0);
      });

      it('a scheduled job can be canceled', async () => {
        const k = uuidv7();
        await insert(at(1), newJob({ keyId: k, quota: quota({ dailyLimit: 1, now: at(1) }) }));
        const [o] = await d.jobsInsert({ jobs: [newJob({ keyId: k, quota: quota({ dailyLimit: 1, now: at(2) }) })], now: at(2), maxQueued: BIG_QUEUE });
        expect(o).toMatchObject({ ok: true, state: 'scheduled' });
        const id = (o as { jobId: string }).jobId;
        expect(await d.jobCancel({ id, now: at(3) })).toEqual({ canceled: true, wasRunning: false, state: 'canceled' });
        expect(await d.jobsNextScheduledAt()).toBeNull();
        expect((await d.keyUsage({ keyId: k, day: Math.floor(at(3) / DAY) })).scheduled).toBe(0);
      });

      it('usage: running and queued counts follow transitions; tokens of finished jobs add to their finish day', async () => {
        const k = uuidv7();
        const day = Math.floor(at(0) / DAY);
        await insert(at(1), newJob({ keyId: k, quota: quota({ now: at(1) }) }), newJob({ keyId: k, quota: quota({ now: at(1) }) }));
        const c = await claimOne(at(2));
        expect(await d.keyUsage({ keyId: k, day })).toEqual({ jobsToday: 2, tokensToday: 0, running: 1, queued: 1, scheduled: 0 });
        expect(await d.jobSetWorking({ seq: c.seq, lease: c.lease, now: at(3), leaseMs: 1000 })).toBe(true);
        expect(await d.jobComplete({ seq: c.seq, lease: c.lease, now: at(4), result: 1, artifacts: [], runMs: 1, usage: { promptTokens: 7, completionTokens: 5 } })).toBe(true);
        expect(await d.keyUsage({ keyId: k, day })).toEqual({ jobsToday: 2, tokensToday: 12, running: 0, queued: 1, scheduled: 0 });
        expect(await d.keyUsage({ keyId: uuidv7(), day })).toEqual({ jobsToday: 0, tokensToday: 0, running: 0, queued: 0, scheduled: 0 });
      });

      it('idempotency keys are whatever the caller scopes them to: equal keys under different prefixes are two jobs', async () => {
        const idem = (k: string) => ({ key: k, bodyHash: 'h', expiresAt: at(10_000) });
        const a = newJob({ keyId: 'ka', idempotency: idem('ka\nsame') });
        const b = newJob({ keyId: 'kb', idempotency: idem('kb\nsame') });
        await insert(at(1), a, b);
        const again = await d.jobsInsert({ jobs: [newJob({ keyId: 'ka', idempotency: idem('ka\nsame') })], now: at(2), maxQueued: BIG_QUEUE });
        expect(again).toEqual([{ ok: true, jobId: a.id, replayed: true, state: 'queued', scheduledFor: null }]);
      });

      it('queue position follows the fair-share order', async () => {
        const a = uuidv7();
        const b = uuidv7();
        const as = await insert(at(1), ...Array.from({ length: 4 }, () => newJob({ keyId: a })));
        const [b0] = await insert(at(2), newJob({ keyId: b }));
        const posOf = async (id: string) => (await d.jobQueueSnapshot({ seq: (await view(id)).seq })).ahead.reduce((n, r) => n + r.n, 0);
        // Claim order would be a0 b0 a1 a2 a3 (neither key served yet: a's earlier job first).
        expect(await posOf(b0!)).toBe(1);
        expect(await posOf(as[3]!)).toBe(4);
        expect(await posOf(as[1]!)).toBe(2);
        await claimOne(at(3)); // a0: b is now due first
        expect(await posOf(b0!)).toBe(0);
        expect(await posOf(as[1]!)).toBe(1);
      });

      it('secretEnsure keeps the first value it was given', async () => {
        expect(await d.secretEnsure({ name: 's', value: 'one' })).toBe('one');
        expect(await d.secretEnsure({ name: 's', value: 'two' })).toBe('one');
        expect(await d.secretEnsure({ name: 't', value: 'three' })).toBe('three');
      });
    });
    // =========================================================================================
    describe('model-aware claims for one engine host (ADR-0012)', () => {
      const host = (over: Partial<ClaimHost> = {}): ClaimHost => ({
        name: 'gpu1',
        models: ['m1', 'm2', 'm3'],
        resident: [],
        loadMs: {},
        affinityMaxWaitMs: 60_000,
        ...over,
      });
      const claimFor = async (now: number, h: ClaimHost, limit = 1) =>
        (await d.jobsClaim({ owner: 'w', limit, now, leaseMs: 1000, engine: h })).map((c) => c.id);

      it('claims only models the host has, and records the host on the job', async () => {
        const [a, b] = await insert(at(1), newJob({ model: 'other' }), newJob({ model: 'm2' }));
        expect(await claimFor(at(2), host(), 5)).toEqual([b]);
        expect((await view(b!)).engine).toBe('gpu1');
        expect((await view(a!)).engine).toBeNull();
        expect(await d.jobsClaim({ owner: 'w', limit: 5, now: at(3), leaseMs: 1000, engine: host({ models: ['other'] }) })).toHaveLength(1);
      });

      it('prefers a resident model within a priority; priority still wins; an overdue job goes first', async () => {
        const [m1a, m2a, m1b] = await insert(at(1), newJob({ model: 'm1' }), newJob({ model: 'm2' }), newJob({ model: 'm1' }));
        // m2 is resident: its job jumps the m1 ones.
        expect(await claimFor(at(2), host({ resident: ['m2'] }))).toEqual([m2a]);
        const [urgent] = await insert(at(3), newJob({ model: 'm3', priority: 5 }));
        expect(await claimFor(at(4), host({ resident: ['m1'] }))).toEqual([urgent]);
        // With m3 resident, m1a has waited longer than the max wait: it goes before nothing else matters.
        expect(await claimFor(at(61_000), host({ resident: ['m3'] }))).toEqual([m1a]);
        expect(await claimFor(at(61_001), host({ resident: ['m3'], affinityMaxWaitMs: 0 }))).toEqual([m1b]);
      });

      it('when a load is needed: the model with the most queued work per second of load time', async () => {
        await insert(at(1), newJob({ model: 'm1' }), newJob({ model: 'm2' }), newJob({ model: 'm2' }), newJob({ model: 'm2' }));
        const h = host({ loadMs: { m1: 1000, m2: 1000 } });
        const [first] = await d.jobsClaim({ owner: 'w', limit: 1, now: at(2), leaseMs: 1000, engine: h });
        expect(first!.model).toBe('m2'); // three queued against one, same load time
        const slowM2 = host({ loadMs: { m1: 100, m2: 100_000 } });
        const [next] = await d.jobsClaim({ owner: 'w', limit: 1, now: at(3), leaseMs: 1000, engine: slowM2 });
        expect(next!.model).toBe('m1'); // m2's load costs far more than its work pays for
      });

      it('a claim of several for one host counts the first as resident for the rest', async () => {
        const ids = await insert(at(1), newJob({ model: 'm1' }), newJob({ model: 'm2' }), newJob({ model: 'm1' }), newJob({ model: 'm2' }));
        const got = await d.jobsClaim({ owner: 'w', limit: 4, now: at(2), leaseMs: 1000, engine: host() });
        expect(got.map((c) => c.id)).toEqual([ids[0], ids[2], ids[1], ids[3]]);
      });

      it('jobsQueuedModels and jobsFailQueuedModel: only queued jobs, waiting turns left alone', async () => {
        const [a, b] = await insert(at(1), newJob({ model: 'gone' }), newJob({ model: 'gone' }));
        const [c] = await insert(at(2), newJob({ model: 'm1' }));
        expect(sorted(await d.jobsQueuedModels())).toEqual(['gone', 'm1']);
        const changes: TransitionEvent[] = [];
        const off = d.notifier.on('stateChanged', (e) => changes.push(e));
        expect(sorted(await d.jobsFailQueuedModel({ model: 'gone', now: at(3), error: { code: 'model_not_found', message: "model 'gone' not found" }, limit: 100 }))).toEqual(sorted([a!, b!]));
        off();
        expect(changes.map((e) => [e.state, e.error?.code])).toEqual([
          ['failed', 'model_not_found'],
          ['failed', 'model_not_found'],
        ]);
        expect(await d.jobsQueuedModels()).toEqual(['m1']);
        expect(await stateOf(c!)).toBe('queued');
      });
    });

    // =========================================================================================
    describe('files and batches (ADR-0015)', () => {
      const line = (n: number, customId = `c${n}`) => ({ n, customId, body: `{"custom_id":"${customId}"}` });

      /** A processed input file of `n` lines (numbered 1..n). */
      async function inputFile(n: number, id = `file-${uuidv7()}`) {
        const seq = await d.fileInsert({
          file: { id, keyId: '', filename: 'in.jsonl', endpoint: '/v1/chat/completions', createdAt: at(0), expiresAt: at(1_000_000) },
          lines: Array.from({ length: n }, (_, i) => line(i + 1)),
        });
        expect(await d.fileFinish({ fileSeq: seq, bytes: 10 * n, lines: n })).toBe(true);
        return { seq, id };
      }

      /** A new batch's fields for an input file (the driver's batchInsert input). */
      const batchOf = (f: { seq: number; id: string }, total: number) => ({
        id: `batch_${uuidv7()}`,
        keyId: '',
        inputFileSeq: f.seq,
        inputFileId: f.id,
        endpoint: '/v1/chat/completions' as const,
        completionWindow: '24h' as const,
        metadata: null,
        webhookUrl: null,
        priority: 0,
        total,
        outputFileId: `file-${uuidv7()}`,
        errorFileId: `file-${uuidv7()}`,
        expiresAt: at(86_400_000),
        fileExpiresAt: null,
      });

      async function newBatch(total: number, over: { webhookUrl?: string | null } = {}) {
        const b = await d.batchInsert({ now: at(10), batch: { ...batchOf(await inputFile(total), total), metadata: { a: 'b' }, webhookUrl: over.webhookUrl ?? null } });
        expect(b).not.toBeNull();
        return b!;
      }

      const batchJobs = (n: number, from = 1) =>
        Array.from({ length: n }, (_, i) => ({ ...newJob({ metadata: { custom_id: `c${from + i}` } }), line: from + i }));

      it('an upload is invisible until finished; lines come back in order; a repeated custom_id is refused by the store', async () => {
        const seq = await d.fileInsert({
          file: { id: 'file-x', keyId: 'k1', filename: 'x.jsonl', endpoint: '/v1/embeddings', createdAt: at(0), expiresAt: null },
          lines: [line(1), line(3)],
        });
        expect((await d.fileGet({ id: 'file-x' }))!.status).toBe('uploading');
        expect(await d.filesList({ limit: 10 })).toEqual([]);
        await d.fileLinesAppend({ fileSeq: seq, lines: [line(4)] });
        await expect(d.fileLinesAppend({ fileSeq: seq, lines: [line(5, 'c1')] })).rejects.toThrow();
        expect(await d.fileFinish({ fileSeq: seq, bytes: 99, lines: 3 })).toBe(true);
        expect(await d.fileGet({ id: 'file-x' })).toEqual({
          seq, id: 'file-x', keyId: 'k1', purpose: 'batch', filename: 'x.jsonl', bytes: 99, lines: 3, endpoint: '/v1/embeddings',
          status: 'processed', batchSeq: null, role: null, createdAt: at(0), expiresAt: null,
        });
        expect((await d.fileLinesPage({ fileSeq: seq, afterN: 1, limit: 10 })).map((l) => l.n)).toEqual([3, 4]);
        expect((await d.filesList({ limit: 10, keyId: 'k2' }))).toEqual([]);
        expect(await d.fileLinesDelete({ fileSeq: seq, limit: 2 })).toBe(2);
        expect(await d.fileLinesDelete({ fileSeq: seq, limit: 2 })).toBe(1);
        expect(await d.fileDelete({ fileSeq: seq })).toBe(true);
        expect(await d.fileGet({ id: 'file-x' })).toBeNull();
      });

      it('a file whose removal has begun (some lines deleted) makes no batch: batchInsert answers null', async () => {
        const f = await inputFile(5);
        expect(await d.fileLinesDelete({ fileSeq: f.seq, limit: 2 })).toBe(2);
        expect(await d.batchInsert({ now: at(10), batch: batchOf(f, 5) })).toBeNull();
        expect(await d.batchesList({ limit: 10 })).toEqual([]);
        const whole = await inputFile(3);
        expect(await d.batchInsert({ now: at(10), batch: batchOf(whole, 3) })).toMatchObject({ status: 'validating', total: 3 });
      });

      it('batchFail only while lines are left to submit: a runner reading an old state cannot fail a submitted batch', async () => {
        const b = await newBatch(2);
        expect(await d.batchJobsInsert({ batchSeq: b.seq, jobs: batchJobs(2), now: at(20), maxQueued: BIG_QUEUE })).toEqual({ inserted: 2, stopped: null });
        const error = { code: 'input_file_incomplete', message: 'fewer lines' };
        expect(await d.batchFail({ seq: b.seq, now: at(30), error })).toBe(false);
        expect(await d.batchGet({ id: b.id })).toMatchObject({ status: 'in_progress', ending: null, failed: 0, submitted: 2 });
        const c = await newBatch(2);
        expect(await d.batchJobsInsert({ batchSeq: c.seq, jobs: batchJobs(1), now: at(20), maxQueued: BIG_QUEUE })).toEqual({ inserted: 1, stopped: null });
        expect(await d.batchFail({ seq: c.seq, now: at(30), error })).toBe(true);
        expect(await d.batchGet({ id: c.id })).toMatchObject({ ending: 'fail', failed: 1 });
      });

      it('batchesActive pages through the active batches in seq order after afterSeq', async () => {
        const bs = [await newBatch(1), await newBatch(1), await newBatch(1)];
        expect((await d.batchesActive({ limit: 2 })).map((b) => b.id)).toEqual([bs[0]!.id, bs[1]!.id]);
        expect((await d.batchesActive({ limit: 2, afterSeq: bs[1]!.seq })).map((b) => b.id)).toEqual([bs[2]!.id]);
        expect(await d.batchesActive({ limit: 2, afterSeq: bs[2]!.seq })).toEqual([]);
      });

      it('lines become jobs chunk by chunk; counters follow the jobs; the last job ends the batch, in order through finalizing', async () => {
        const b = await newBatch(3);
        expect(b).toMatchObject({ status: 'validating', total: 3, submitted: 0, lastLine: 0, completed: 0, failed: 0, canceled: 0, metadata: { a: 'b' } });
        expect((await d.fileGet({ id: b.outputFileId }))).toMatchObject({ purpose: 'batch_output', role: 'output', batchSeq: b.seq, bytes: null });
        expect(await d.batchJobsInsert({ batchSeq: b.seq, jobs: batchJobs(2), now: at(20), maxQueued: BIG_QUEUE })).toEqual({ inserted: 2, stopped: null });
        expect(await d.batchGet({ id: b.id })).toMatchObject({ status: 'in_progress', submitted: 2, lastLine: 2, inProgressAt: at(20) });
        // The file feeds the batch until every line is submitted.
        await expect(d.fileDelete({ fileSeq: b.inputFileSeq! })).rejects.toMatchObject({ code: 'file_in_use' });
        // A full queue stops the chunk at the first refused job; nothing of the rest is written.
        expect(await d.batchJobsInsert({ batchSeq: b.seq, jobs: batchJobs(1, 3), now: at(21), maxQueued: 2 })).toEqual({
          inserted: 0,
          stopped: { ok: false, code: 'queue_full' },
        });
        expect(await d.batchJobsInsert({ batchSeq: b.seq, jobs: batchJobs(1, 3), now: at(22), maxQueued: BIG_QUEUE })).toEqual({ inserted: 1, stopped: null });
        await runToDone(at(30));
        const c2 = await claimOne(at(40));
        await d.jobFail({ seq: c2.seq, lease: c2.lease, now: at(41), error: { code: 'model_not_found', message: 'no' } });
        expect(await d.batchGet({ seq: b.seq })).toMatchObject({ status: 'in_progress', completed: 1, failed: 1 });
        await runToDone(at(50));
        const end = (await d.batchGet({ id: b.id }))!;
        expect(end).toMatchObject({ status: 'completed', completed: 2, failed: 1, canceled: 0, finalizingAt: at(52), completedAt: at(52) });
        const out = await d.batchResultsPage({ batchSeq: b.seq, role: 'output', afterSeq: 0, limit: 10 });
        expect(out.map((r) => [r.metadata!.custom_id, r.state, r.result])).toEqual([
          ['c1', 'done', { ok: true }],
          ['c3', 'done', { ok: true }],
        ]);
        const err = await d.batchResultsPage({ batchSeq: b.seq, role: 'error', afterSeq: 0, limit: 10 });
        expect(err.map((r) => [r.metadata!.custom_id, r.error])).toEqual([['c2', { code: 'model_not_found', message: 'no' }]]);
        expect(await d.batchJobsInsert({ batchSeq: b.seq, jobs: batchJobs(1, 4), now: at(60), maxQueued: BIG_QUEUE })).toEqual({ inserted: 0, stopped: null });
        expect(await d.fileDelete({ fileSeq: b.inputFileSeq! })).toBe(true);
      });

      it('cancel: unsubmitted lines count as canceled, waiting jobs end in chunks, a running one finishes; then cancelled, with its webhook event', async () => {
        const b = await newBatch(5, { webhookUrl: HOOK });
        await d.batchJobsInsert({ batchSeq: b.seq, jobs: batchJobs(3), now: at(20), maxQueued: BIG_QUEUE });
        const running = await claimOne(at(30));
        const r = await d.batchCancel({ id: b.id, now: at(40) });
        expect(r).toMatchObject({ changed: true, batch: { status: 'cancelling', ending: 'cancel', canceled: 2, cancellingAt: at(40) } });
        expect(await d.batchCancel({ id: b.id, now: at(41), keyId: 'someone-else' })).toBeNull();
        expect(await d.batchesActive({ limit: 10 })).toMatchObject([{ id: b.id }]);
        expect(await d.batchJobsEnd({ batchSeq: b.seq, now: at(50), limit: 1 })).toBe(1);
        expect(await d.batchJobsEnd({ batchSeq: b.seq, now: at(51), limit: 1 })).toBe(1);
        expect(await d.batchJobsEnd({ batchSeq: b.seq, now: at(52), limit: 1 })).toBe(0);
        expect(await d.batchGet({ id: b.id })).toMatchObject({ status: 'cancelling', canceled: 4 });
        await d.jobSetWorking({ seq: running.seq, lease: running.lease, now: at(60), leaseMs: 1000 });
        await d.jobComplete({ seq: running.seq, lease: running.lease, now: at(61), result: { ok: 1 }, artifacts: [], runMs: 1 });
        expect(await d.batchGet({ id: b.id })).toMatchObject({ status: 'cancelled', completed: 1, canceled: 4, cancelledAt: at(61) });
        const [ev] = (await d.deliveriesClaim({ now: at(62), limit: 10, perOriginLimit: 8, inlineMax: 0 })).deliveries;
        expect(ev).toMatchObject({ jobId: b.id, state: 'batch.cancelled', url: HOOK, origin: ORIGIN, occurredAt: at(61), batch: { id: b.id, status: 'cancelled' } });
        await d.deliveryRecord({ id: ev!.id, now: at(63), outcome: { kind: 'delivered', status: 200 } });
        expect(await d.deliveriesClaim({ now: at(64), limit: 10, perOriginLimit: 8, inlineMax: 0 })).toMatchObject({ deliveries: [], nextDueAt: null });
        expect((await d.batchCancel({ id: b.id, now: at(70) }))!.changed).toBe(false);
      });

      it('expiry fails the waiting jobs batch_expired and ends the batch expired; expired batches go with their jobs, which the job TTL leaves alone', async () => {
        const b = await newBatch(4);
        await d.batchJobsInsert({ batchSeq: b.seq, jobs: batchJobs(2), now: at(20), maxQueued: BIG_QUEUE });
        expect(await d.batchesNextExpiry()).toEqual({ seq: b.seq, expiresAt: at(86_400_000) });
        await runToDone(at(30));
        expect(await d.batchExpire({ seq: b.seq, now: at(86_400_001) })).toBe(true);
        expect(await d.batchesNextExpiry()).toBeNull();
        expect(await d.batchJobsEnd({ batchSeq: b.seq, now: at(86_400_002), limit: 10 })).toBe(1);
        const end = (await d.batchGet({ id: b.id }))!;
        expect(end).toMatchObject({ status: 'expired', completed: 1, failed: 3, expiredAt: at(86_400_002) });
        const err = await d.batchResultsPage({ batchSeq: b.seq, role: 'error', afterSeq: 0, limit: 10 });
        expect(err.map((r) => r.error?.code)).toEqual(['batch_expired']);
        // The job TTL does not take batch jobs; the batch's own retention does, then the batch.
        expect(await d.jobsDeleteExpired({ finishedBefore: at(200_000_000), limit: 100, now: at(200_000_000) })).toBe(0);
        expect(await d.batchesDeleteExpired({ endedBefore: at(86_400_002), limit: 100, now: at(200_000_000) })).toBe(0);
        expect(await d.batchesDeleteExpired({ endedBefore: at(86_400_003), limit: 100, now: at(200_000_000) })).toBe(3);
        expect(await d.batchGet({ id: b.id })).toBeNull();
        expect(await d.fileGet({ id: b.outputFileId })).toBeNull();
      });

      it('a job keeps its kind through the claim', async () => {
        await insertOne(at(1), { kind: 'embed', request: { model: 'm1', input: ['a'] } });
        const c = await claimOne(at(2));
        expect(c.kind).toBe('embed');
        expect((await view(c.id)).kind).toBe('embed');
      });
    });
  });
}
