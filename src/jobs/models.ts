import type { EnginePool } from '../engine/pool.js';
import { Unavailable } from '../errors.js';

export interface InstalledModel {
  id: string;
  /** Unix seconds: when the model was last modified on the engine. */
  created: number;
  /** The namespace of the model's name (`library` for Ollama's own). */
  ownedBy: string;
}

/**
 * The models installed on the engine hosts, for `GET /v1/models` (ADR-0015): the union over the
 * healthy hosts of the pool (ADR-0012), deduplicated by name, from their last probes.
 */
export function installedModels(pool: Pick<EnginePool, 'tags' | 'hosts'>): InstalledModel[] {
  if (!pool.hosts.some((h) => h.usable)) throw new Unavailable('engine_unavailable', 'no engine host answers right now', undefined, 5);
  return pool.tags().models.flatMap((m) => {
    const id = (m.model ?? m.name) as unknown;
    if (typeof id !== 'string') return [];
    const t = Date.parse(String(m.modified_at ?? ''));
    const slash = id.lastIndexOf('/');
    return [{ id, created: Number.isNaN(t) ? 0 : Math.floor(t / 1000), ownedBy: slash > 0 ? id.slice(0, slash) : 'library' }];
  });
}
