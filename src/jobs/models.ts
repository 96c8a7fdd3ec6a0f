import type { ClusterEngines } from '../engine/cluster.js';
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
 * answering hosts of the pool (ADR-0012) and of the other instances (ADR-0011), deduplicated by
 * name, from their last probes. 503 while no host of the cluster answers.
 */
export function installedModels(cluster: Pick<ClusterEngines, 'installed'>): InstalledModel[] {
  const { answering, models } = cluster.installed();
  if (!answering) throw new Unavailable('engine_unavailable', 'no engine host answers right now', undefined, 5);
  return models.flatMap((m) => {
    const id = (m.model ?? m.name) as unknown;
    if (typeof id !== 'string') return [];
    const t = Date.parse(String(m.modified_at ?? ''));
    const slash = id.lastIndexOf('/');
    return [{ id, created: Number.isNaN(t) ? 0 : Math.floor(t / 1000), ownedBy: slash > 0 ? id.slice(0, slash) : 'library' }];
  });
}
