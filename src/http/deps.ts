import type { Logger } from 'pino';
import type { Config } from '../config.js';
import type { Clock } from '../domain.js';
import type { ClusterEngines } from '../engine/cluster.js';
import type { EnginePool } from '../engine/pool.js';
import type { JobEvents } from '../events.js';
import type { Jobs } from '../jobs/jobs.js';
import type { Keys } from '../jobs/keys.js';
import type { Files } from '../jobs/files.js';
import type { Batches } from '../jobs/batches.js';
import type { ArtifactUrls } from '../artifact-urls.js';

/** What the HTTP layer is given. It reaches stored jobs only through `jobs` (the application layer). */
export interface AppDeps {
  jobs: Jobs;
  /** API keys: authentication, key management, usage and audit (ADR-0013). */
  keys: Keys;
  /** Uploaded files and batch outputs, and batches (ADR-0015). */
  files: Files;
  batches: Batches;
  artifactUrls: ArtifactUrls;
  /** The engine hosts: status, merged pass-through reads, direct loads (ADR-0012). */
  pool: EnginePool;
  /** Every instance's engine hosts: what the cluster has installed (ADR-0011). */
  cluster: Pick<ClusterEngines, 'installed'>;
  events: JobEvents;
  /** Prometheus metrics: the exposition, and one observation per request. */
  metrics?: {
    text(): Promise<{ contentType: string; body: string }>;
    request(method: string, route: string, status: number, seconds: number): void;
  };
  /** Whether storage answers (readiness). */
  storageReady: () => Promise<boolean>;
  config: Config;
  clock: Clock;
  logger: Logger;
  /** The base of every absolute URL handed out (FOREMAN_PUBLIC_URL, or the address listened on). */
  publicUrl: () => string;
}
