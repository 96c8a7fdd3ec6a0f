import type { ChatEngine } from '../engine/engine.js';
import { EngineError } from '../engine/engine.js';
import { Unavailable } from '../errors.js';

export interface InstalledModel {
  id: string;
  /** Unix seconds: when the model was last modified on the engine. */
  created: number;
  /** The namespace of the model's name (`library` for Ollama's own). */
  ownedBy: string;
}

/**
 * The models installed on the engine(s), for `GET /v1/models` (ADR-0015). Today there is one
 * engine and this reads its `/api/tags`; with an engine pool it becomes the union over the healthy
 * hosts, here and nowhere else.
 */
export async function installedModels(engine: Pick<ChatEngine, 'passthrough'>): Promise<InstalledModel[]> {
  let r: Awaited<ReturnType<ChatEngine['passthrough']>>;
  try {
    r = await engine.passthrough('/api/tags');
  } catch (err) {
    if (err instanceof EngineError) throw new Unavailable('engine_unavailable', `the engine did not answer: ${err.message}`, undefined, 5);
    throw err;
  }
  if (r.status !== 200) throw new Unavailable('engine_unavailable', `the engine answered ${r.status} to /api/tags`, undefined, 5);
  const tags = JSON.parse(r.body.toString('utf8')) as { models?: { name?: string; model?: string; modified_at?: string }[] };
  return (tags.models ?? []).flatMap((m) => {
    const id = m.model ?? m.name;
    if (typeof id !== 'string') return [];
    const t = Date.parse(m.modified_at ?? '');
    const slash = id.lastIndexOf('/');
    return [{ id, created: Number.isNaN(t) ? 0 : Math.floor(t / 1000), ownedBy: slash > 0 ? id.slice(0, slash) : 'library' }];
  });
}
