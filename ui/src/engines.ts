/**
 * The engines panel renders a list of hosts. Today Foreman has one engine, so the list has one
 * entry, assembled from what exists: GET /readyz (up or down, version), GET /api/ps (resident
 * models), GET /api/tags (installed models), GET /ui/api/info (slots = FOREMAN_CONCURRENCY) and
 * /metrics (busy slots, mean load time per model). A multi-host GET /engines can replace
 * `loadHosts` without touching the panel.
 */
import { getJson } from './api';
import type { Metrics } from './prom';
import type { PsReply, Readyz, TagsReply, UiInfo } from './types';

export interface EngineHost {
  id: string;
  /** Where it is (host:port), as far as the page may know. */
  address: string;
  status: 'up' | 'down' | 'unknown';
  version: string | null;
  error: string | null;
  slots: { busy: number; total: number | null };
  resident: { name: string; size: number | null; vram: number | null; context: number | null; expiresAt: string | null }[];
  installed: { name: string; size: number | null; parameters: string | null; quantization: string | null }[];
  /** Mean load time (ms) and loads counted, by model, from foreman_job_load_seconds. */
  loads: { model: string; meanMs: number; count: number }[];
}

async function settled<T>(p: Promise<T>): Promise<T | Error> {
  try {
    return await p;
  } catch (err) {
    return err instanceof Error ? err : new Error(String(err));
  }
}

export async function loadHosts(metrics: Metrics | null, signal: AbortSignal): Promise<EngineHost[]> {
  const [ready, ps, tags, info] = await Promise.all([
    settled(getJson<Readyz>('/readyz', signal)),
    settled(getJson<PsReply>('/api/ps', signal)),
    settled(getJson<TagsReply>('/api/tags', signal)),
    settled(getJson<UiInfo>('/ui/api/info', signal)),
  ]);
  const busy = metrics ? metrics.sum('foreman_jobs', { state: 'loading' }) + metrics.sum('foreman_jobs', { state: 'working' }) : 0;
  const loads: EngineHost['loads'] = [];
  if (metrics) {
    const sums = metrics.sumBy('foreman_job_load_seconds_sum', 'model');
    for (const [model, n] of metrics.sumBy('foreman_job_load_seconds_count', 'model')) {
      if (n > 0) loads.push({ model, count: n, meanMs: ((sums.get(model) ?? 0) / n) * 1000 });
    }
    loads.sort((a, b) => a.model.localeCompare(b.model));
  }
  const engine = ready instanceof Error ? null : ready.engine;
  return [
    {
      id: 'default',
      address: info instanceof Error ? 'engine' : info.engine.host,
      status: engine === null ? 'unknown' : engine.status,
      version: engine?.status === 'up' ? engine.version : null,
      error: engine?.status === 'down' ? engine.error : ready instanceof Error ? ready.message : null,
      slots: { busy, total: info instanceof Error ? null : info.concurrency },
      resident:
        ps instanceof Error
          ? []
          : ps.models.map((m) => ({ name: m.name, size: m.size ?? null, vram: m.size_vram ?? null, context: m.context_length ?? null, expiresAt: m.expires_at ?? null })),
      installed:
        tags instanceof Error
          ? []
          : tags.models.map((m) => ({ name: m.name, size: m.size ?? null, parameters: m.details?.parameter_size ?? null, quantization: m.details?.quantization_level ?? null })),
      loads,
    },
  ];
}
