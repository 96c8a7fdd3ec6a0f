/**
 * The queue driver conformance suite against the SQLite driver, plus what only an exclusive,
 * file-backed driver promises: one process per data directory, and start-up recovery that
 * re-queues every running job.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { DataDirLocked } from '../../src/queue/sqlite/db.js';
import { SqliteDriver } from '../../src/queue/sqlite/driver.js';
import { driverConformance, newJob } from './conformance.js';

const freshDir = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'foreman-driver-'));

driverConformance(
  'sqlite driver',
  async () => {
    const dataDir = freshDir();
    const driver = new SqliteDriver({ dataDir });
    return {
      driver,
      cleanup: async () => {
        await driver.close();
        fs.rmSync(dataDir, { recursive: true, force: true });
      },
    };
  },
);

const T0 = 1_700_000_000_000;

const job = newJob;

describe('sqlite driver only', () => {
  const dirs: string[] = [];
  const open: SqliteDriver[] = [];
  const openDriver = (dataDir: string): SqliteDriver => {
    const d = new SqliteDriver({ dataDir });
    open.push(d);
    return d;
  };

  afterEach(async () => {
    for (const d of open.splice(0)) await d.close();
    for (const dir of dirs.splice(0)) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('a data directory belongs to one driver at a time; after close() it can be opened again', async () => {
    const dir = freshDir();
    dirs.push(dir);
    const first = openDriver(dir);
    const j = job();
    expect(await first.jobsInsert({ jobs: [j], now: T0, maxQueued: 10 })).toEqual([{ ok: true, jobId: j.id, replayed: false, state: 'queued', scheduledFor: null }]);
    expect(() => new SqliteDriver({ dataDir: dir })).toThrow(DataDirLocked);
    // The refused attempt left the first driver working.
    expect(await first.ping()).toBe(true);
    await first.close();
    const second = openDriver(dir);
    expect(await second.ping()).toBe(true);
    expect((await second.jobGet({ id: j.id }))?.state).toBe('queued');
    expect(() => new SqliteDriver({ dataDir: dir })).toThrow(DataDirLocked);
  });

  it('recover() re-queues every running job, live lease or not (exclusive ownership)', async () => {
    const dir = freshDir();
    dirs.push(dir);
    const first = openDriver(dir);
    const [a, b, q, done] = [job(), job(), job(), job({ priority: 9 })];
    await first.jobsInsert({ jobs: [a, b, q, done], now: T0, maxQueued: 10 });
    const [cd] = await first.jobsClaim({ owner: 'w', limit: 1, now: T0 + 1, leaseMs: 60_000 });
    expect(cd!.id).toBe(done.id);
    expect(await first.jobSetWorking({ seq: cd!.seq, lease: cd!.lease, now: T0 + 2, leaseMs: 60_000 })).toBe(true);
    expect(await first.jobComplete({ seq: cd!.seq, lease: cd!.lease, now: T0 + 3, result: 1, artifacts: [], runMs: 1 })).toBe(true);
    const claimed = await first.jobsClaim({ owner: 'w', limit: 2, now: T0 + 10, leaseMs: 60_000 });
    expect(claimed.map((c) => c.id).sort()).toEqual([a.id, b.id].sort());
    const cb = claimed.find((c) => c.id === b.id)!;
    expect(await first.jobSetWorking({ seq: cb.seq, lease: cb.lease, now: T0 + 20, leaseMs: 60_000 })).toBe(true);
    // The process "dies": the next one opens the same directory. Every lease is still live.
    await first.close();
    const second = openDriver(dir);
    const { requeued } = await second.recover({ now: T0 + 30 });
    expect(requeued.sort()).toEqual([a.id, b.id].sort());
    for (const id of [a.id, b.id]) {
      const v = await second.jobGet({ id });
      expect(v).toMatchObject({ state: 'queued', attempt: 0 });
      expect(v!.transitions.at(-1)).toEqual({ state: 'queued', at: T0 + 30, attempt: 0 });
    }
    expect((await second.jobGet({ id: q.id }))?.state).toBe('queued');
    expect((await second.jobGet({ id: done.id }))?.state).toBe('done');
    // The old attempts' leases are dead; the jobs are claimable at once.
    expect(await second.jobSetWorking({ seq: cb.seq, lease: cb.lease, now: T0 + 31, leaseMs: 1_000 })).toBe(false);
    expect((await second.recover({ now: T0 + 40 })).requeued).toEqual([]);
    const again = await second.jobsClaim({ owner: 'w2', limit: 10, now: T0 + 50, leaseMs: 1_000 });
    expect(again.map((c) => c.id).sort()).toEqual([a.id, b.id, q.id].sort());
  });
});
