import { isStorageUnavailable } from './errors.js';

/**
 * Runs a driver write, retrying `StorageUnavailable` with exponential backoff (50 ms doubling,
 * at most `maxWaitMs` apart), so a passing storage fault does not throw work away. No
 * transaction is held across the waits. Gives up after `maxTries`, or when `signal` aborts.
 */
export async function retryStorage<T>(
  fn: () => Promise<T>,
  opts: { signal?: AbortSignal; maxTries?: number; maxWaitMs?: number; onRetry?: (err: unknown, waitMs: number) => void },
): Promise<T> {
  const maxTries = opts.maxTries ?? Infinity;
  for (let i = 0; ; i++) {
    try {
      return await fn();
    } catch (err) {
      if (!isStorageUnavailable(err) || i + 1 >= maxTries || opts.signal?.aborted) throw err;
      const wait = Math.min(opts.maxWaitMs ?? 4000, 50 * 2 ** i);
      opts.onRetry?.(err, wait);
      await new Promise((r) => setTimeout(r, wait));
    }
  }
}
