/**
 * The engines panel renders a list of hosts: GET /engines (health, circuit, slots, installed and
 * resident models, load times and counts per host), with sizes from the merged /api/tags and
 * /api/ps (each resident model carries its host).
 */
import { getJson } from './api';
import type { Metrics } from './prom';
import type { PsReply, TagsReply } from './types';

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

interface EngineRow {
  name: string;
  url: string;
  health: 'up' | 'down' | 'unknown';
  circuit: string;
  version: string | null;
  last_error: string | null;
  slots: number;
  slots_in_use: number;
  installed_models: string[];
  resident_models: string[];
  load_ms: Record<string, number>;
  load_counts: Record<string, number>;
  jobs_run: number;
  loads: number;
}

/** Every engine host, from GET /engines (ADR-0012); sizes and details from the merged /api/tags and /api/ps. */
export async function loadHosts(_metrics: Metrics | null, signal: AbortSignal): Promise<EngineHost[]> {
  const [engines, ps, tags] = await Promise.all([
    getJson<{ engines: EngineRow[] }>('/engines', signal),
    settled(getJson<PsReply>('/api/ps', signal)),
    settled(getJson<TagsReply>('/api/tags', signal)),
  ]);
  const tagOf = new Map((tags instanceof Error ? [] : tags.models).map((m) => [m.name, m]));
  return engines.engines.map((e) => ({
    id: e.name,
    address: `${e.name} · ${e.url}`,
    status: e.health,
    version: e.version,
    error: e.health === 'up' ? null : (e.last_error ?? `circuit ${e.circuit}`),
    slots: { busy: e.slots_in_use, total: e.slots },
    resident: (ps instanceof Error ? [] : ps.models)
      .filter((m) => (m as { engine?: string }).engine === e.name)
      .map((m) => ({ name: m.name, size: m.size ?? null, vram: m.size_vram ?? null, context: m.context_length ?? null, expiresAt: m.expires_at ?? null })),
    installed: e.installed_models.map((name) => {
      const m = tagOf.get(name);
      return { name, size: m?.size ?? null, parameters: m?.details?.parameter_size ?? null, quantization: m?.details?.quantization_level ?? null };
    }),
    loads: Object.entries(e.load_ms)
      .map(([model, meanMs]) => ({ model, meanMs, count: e.load_counts[model] ?? 0 }))
      .sort((a, b) => a.model.localeCompare(b.model)),
  }));
}
