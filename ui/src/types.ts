/** The API's shapes, as the page reads them (src/http/schemas.ts is the source of truth). */
export const JOB_STATES = ['queued', 'loading', 'working', 'done', 'failed', 'canceled'] as const;
export type JobState = (typeof JOB_STATES)[number];
export const ACTIVE_STATES: readonly JobState[] = ['queued', 'loading', 'working'];
export const isTerminal = (s: JobState): boolean => s === 'done' || s === 'failed' || s === 'canceled';

export interface ListItem {
  job_id: string;
  state: JobState;
  model: string;
  priority: number;
  attempt: number;
  metadata: Record<string, string>;
  created_at: string;
  finished_at: string | null;
  status_url: string;
  /** The engine host and the Foreman instance that ran (or run) it; null until claimed. */
  engine: string | null;
  instance: string | null;
}

export interface ListReply {
  jobs: ListItem[];
  next_cursor: string | null;
}

export interface Delivery {
  event_id: string;
  state: JobState;
  status: 'pending' | 'delivered' | 'failed';
  attempts: number;
  last_status_code: number | null;
  last_error: string | null;
  next_attempt_at: string | null;
  delivered_at: string | null;
}

export interface Job {
  job_id: string;
  state: JobState;
  model: string;
  attempt: number;
  max_attempts: number;
  priority: number;
  deadline: string | null;
  queue_position: number | null;
  estimated_start_at: string | null;
  metadata: Record<string, string>;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  updated_at: string;
  transitions: { state: JobState; at: string; attempt: number }[];
  result: unknown;
  error: { code: string; message: string } | null;
  artifacts: { name: string; content_type: string; size: number; sha256: string; url: string }[];
  webhook: { url: string; events: JobState[]; deliveries: Delivery[] } | null;
  conversation_id: string;
  continue_from: string | null;
  waiting_for_previous: boolean;
  load_ms: number | null;
  usage: { prompt_tokens: number | null; completion_tokens: number | null };
  engine: string | null;
  instance: string | null;
}

export interface Readyz {
  status: 'ready' | 'unavailable';
  database: 'ok' | 'error';
  engine: { status: 'up'; version: string | null } | { status: 'down'; error: string | null };
}

/** GET /api/ps (Ollama's running models). */
export interface PsReply {
  models: { name: string; model?: string; size?: number; size_vram?: number; expires_at?: string; context_length?: number }[];
}

/** GET /api/tags (Ollama's installed models). */
export interface TagsReply {
  models: { name: string; size?: number; modified_at?: string; details?: { parameter_size?: string; quantization_level?: string; family?: string } }[];
}

/** GET /ui/api/info: what the dashboard needs that no API route tells (src/http/ui.ts). */
export interface UiInfo {
  version: string;
  concurrency: number;
  engine: { host: string };
}
