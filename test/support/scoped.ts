import { afterEach } from 'vitest';
import { startHarness, type Harness } from './harness.js';
import { startReceiver, type Receiver } from './receiver.js';

/**
 * Harnesses, receivers and other resources made inside a test, cleaned up after each test in
 * reverse order. Call once at the top of a test file.
 */
export function scoped() {
  const cleanups: (() => Promise<void> | void)[] = [];
  afterEach(async () => {
    for (const c of cleanups.splice(0).reverse()) await c();
  });
  return {
    cleanups,
    async harness(over: Parameters<typeof startHarness>[0] = {}): Promise<Harness> {
      const h = await startHarness(over);
      cleanups.push(() => h.stop());
      return h;
    },
    async receiver(): Promise<Receiver> {
      const r = await startReceiver();
      cleanups.push(() => r.close());
      return r;
    },
  };
}
