import { useEffect, useRef, useState } from 'preact/hooks';

export interface Polled<T> {
  data: T | undefined;
  error: Error | undefined;
  /** Runs the loader now (after an action), without waiting for the next tick. */
  refresh: () => void;
}

/**
 * Runs `load` now and then every `ms` (one at a time: the next run is scheduled when the last
 * ends). Restarts when `deps` change; stops on unmount.
 */
export function usePoll<T>(load: (signal: AbortSignal) => Promise<T>, ms: number, deps: unknown[]): Polled<T> {
  const [state, setState] = useState<{ data: T | undefined; error: Error | undefined }>({ data: undefined, error: undefined });
  const kick = useRef<() => void>(() => {});
  useEffect(() => {
    const ctl = new AbortController();
    let timer: ReturnType<typeof setTimeout> | undefined;
    let running = false;
    let again = false;
    const run = async () => {
      if (running) {
        again = true;
        return;
      }
      running = true;
      clearTimeout(timer);
      try {
        const data = await load(ctl.signal);
        if (!ctl.signal.aborted) setState({ data, error: undefined });
      } catch (err) {
        if (!ctl.signal.aborted) setState((s) => ({ data: s.data, error: err instanceof Error ? err : new Error(String(err)) }));
      } finally {
        running = false;
        if (!ctl.signal.aborted) {
          if (again) {
            again = false;
            void run();
          } else timer = setTimeout(() => void run(), ms);
        }
      }
    };
    setState({ data: undefined, error: undefined });
    kick.current = () => void run();
    void run();
    return () => {
      ctl.abort();
      clearTimeout(timer);
    };
  }, deps);
  return { ...state, refresh: () => kick.current() };
}

export type Route =
  | { view: 'overview' }
  | { view: 'jobs'; query: URLSearchParams }
  | { view: 'job'; id: string }
  | { view: 'engines' }
  | { view: 'receivers' };

export function parseRoute(hash: string): Route {
  const [path = '', qs = ''] = hash.replace(/^#/, '').split('?', 2);
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  if (parts[0] === 'jobs' && parts[1]) return { view: 'job', id: parts[1] };
  if (parts[0] === 'jobs') return { view: 'jobs', query: new URLSearchParams(qs) };
  if (parts[0] === 'engines') return { view: 'engines' };
  if (parts[0] === 'receivers') return { view: 'receivers' };
  return { view: 'overview' };
}

export function useRoute(): Route {
  const [hash, setHash] = useState(location.hash);
  useEffect(() => {
    const on = () => setHash(location.hash);
    addEventListener('hashchange', on);
    return () => removeEventListener('hashchange', on);
  }, []);
  return parseRoute(hash);
}

export const jobHref = (id: string): string => `#/jobs/${encodeURIComponent(id)}`;

export function jobsHref(filters: Record<string, string | undefined>): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
  const s = q.toString();
  return s ? `#/jobs?${s}` : '#/jobs';
}

/** Re-renders every `ms` (for "x s ago" texts). */
export function useNow(ms = 1000): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(t);
  }, [ms]);
  return now;
}
