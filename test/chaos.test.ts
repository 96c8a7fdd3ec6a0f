import { expect, it } from 'vitest';
import { runChaos } from '../tools/chaos.js';

// The small version of `npm run chaos`: a real child process, SIGKILLed at each kind of moment.
it('SIGKILL chaos: every accepted job finishes, every event arrives, the database is intact', async () => {
  const r = await runChaos({ jobs: 60, kills: 4, seed: 4242, sweepSeedRows: 2000 });
  expect(r.kills.map((k) => k.kind)).toEqual(['submit', 'generation', 'delivery', 'sweep']);
  expect(r.submitted).toBe(60);
  expect(r.lost).toBe(0);
  expect(r.stuck).toBe(0);
  expect(r.failed).toBe(0);
  expect(r.missingArtifacts).toBe(0);
  expect(r.eventsExpected).toBe(240);
  expect(r.eventsDelivered).toBe(240);
  expect(r.lostEvents).toBe(0);
  expect(r.orderViolations).toBe(0);
  expect(r.overlapping).toBe(0);
  expect(r.integrity).toBe('ok');
  expect(r.restarts).toBe(4);
}, 120_000);
