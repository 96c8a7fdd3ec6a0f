/**
 * The offset clock that instances on a shared database keep the server's time with (ADR-0011,
 * "Time"), with a local clock and a server whose answers the test controls.
 */
import { describe, expect, it } from 'vitest';
import { measureOffset, OffsetClock } from '../src/clock.js';

describe('measureOffset', () => {
  it('takes the reading with the shortest round trip, at its middle', async () => {
    let t = 1_000;
    const local = { now: () => t };
    // Round trips of 40, 4 and 20 ms; the server is 5,000 ms ahead of the local clock.
    const trips = [40, 4, 20];
    let i = 0;
    const server = async () => {
      const rtt = trips[i++]!;
      t += rtt / 2;
      const s = t + 5_000 + (rtt === 4 ? 0 : 300); // the slow readings are off
      t += rtt / 2;
      return s;
    };
    expect(await measureOffset(local, server)).toEqual({ offsetMs: 5_000, rttMs: 4 });
    expect(i).toBe(3);
  });
});

describe('OffsetClock', () => {
  it('reads its base clock plus the offset set on it', () => {
    let t = 100;
    const c = new OffsetClock({ now: () => t });
    expect(c.now()).toBe(100);
    c.offsetMs = -40;
    t = 200;
    expect(c.now()).toBe(160);
  });
});
