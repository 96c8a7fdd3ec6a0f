import type { Clock } from './domain.js';

/**
 * A clock that reads another's time: its base clock plus an offset that the owner measures and
 * sets. Instances that share a PostgreSQL database keep time on the database server's clock
 * through one (ADR-0011, "Time"). With offset 0 it is its base clock.
 */
export class OffsetClock implements Clock {
  offsetMs = 0;

  constructor(readonly base: Clock) {}

  now(): number {
    return this.base.now() + this.offsetMs;
  }
}

/**
 * How far `server` is from `local`. Of `tries` readings, the one with the shortest round trip
 * counts, and it is compared with the local time at the middle of that round trip.
 */
export async function measureOffset(local: Clock, server: () => Promise<number>, tries = 3): Promise<{ offsetMs: number; rttMs: number }> {
  let best: { offsetMs: number; rttMs: number } | null = null;
  for (let i = 0; i < tries; i++) {
    const t0 = local.now();
    const s = await server();
    const t1 = local.now();
    if (best === null || t1 - t0 < best.rttMs) best = { offsetMs: Math.round(s - (t0 + t1) / 2), rttMs: t1 - t0 };
  }
  return best!;
}
