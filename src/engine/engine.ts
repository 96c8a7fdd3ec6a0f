/** The small interface the worker needs from a chat engine. OllamaEngine is the real one. */

export type EngineFaultKind = 'transient' | 'permanent';

/**
 * A classified engine failure. `code` is stable and ends up in the job's `error.code`;
 * `message` carries the engine's own text where it gave one.
 */
export class EngineError extends Error {
  constructor(
    readonly kind: EngineFaultKind,
    readonly code: string,
    message: string,
    readonly status?: number,
    /** True when no connection could be made at all: the engine is down, not this job's fault. */
    readonly unreachable = false,
  ) {
    super(message);
    this.name = 'EngineError';
  }
}

export interface ToolCall {
  id?: string;
  function: { index?: number; name: string; arguments: Record<string, unknown> };
  [k: string]: unknown;
}

export interface ChatChunk {
  model?: string;
  created_at?: string;
  message?: { role?: string; content?: string; thinking?: string; tool_calls?: ToolCall[] };
  done?: boolean;
  done_reason?: string;
  total_duration?: number;
  load_duration?: number;
  prompt_eval_count?: number;
  prompt_eval_duration?: number;
  eval_count?: number;
  eval_duration?: number;
  error?: unknown;
}

/** Ollama's non-stream response shape: the merged stream. */
export interface ChatResponse {
  model: string;
  created_at: string;
  message: { role: string; content: string; thinking?: string; tool_calls?: ToolCall[] };
  done: true;
  done_reason: string;
  total_duration?: number;
  load_duration?: number;
  prompt_eval_count?: number;
  prompt_eval_duration?: number;
  eval_count?: number;
  eval_duration?: number;
}

/** Ollama's `/api/embed` response (ADR-0015). */
export interface EmbedResponse {
  model: string;
  embeddings: number[][];
  total_duration?: number;
  load_duration?: number;
  prompt_eval_count?: number;
}

export interface EngineStatus {
  up: boolean;
  version?: string;
  error?: string;
}

export interface ChatEngine {
  /**
   * Makes sure the model is loaded: an empty-messages chat answered with done_reason "load", or
   * for an embedding model (`kind: 'embed'`) an `/api/embed` with no input.
   */
  load(model: string, opts: { keepAlive?: unknown; signal: AbortSignal; kind?: 'chat' | 'embed' }): Promise<void>;
  /** An embedding (`/api/embed`): the vectors of every input, in order. */
  embed(request: Record<string, unknown>, opts: { signal: AbortSignal }): Promise<EmbedResponse>;
  /** Streams a chat and returns the merged response. `onChunk` sees every chunk as it arrives. */
  chat(request: Record<string, unknown>, opts: { signal: AbortSignal; onChunk?: (c: ChatChunk) => void }): Promise<ChatResponse>;
  status(): Promise<EngineStatus>;
  /** A read-only GET passed through to the engine (`/api/tags`, `/api/ps`, `/api/version`). */
  passthrough(path: string): Promise<{ status: number; contentType: string; body: Buffer }>;
  close(): Promise<void>;
}

/** Merges a chat stream's chunks into Ollama's non-stream shape. */
export class ChunkMerger {
  private content: string[] = [];
  private thinking: string[] = [];
  private toolCalls: ToolCall[] = [];
  private role = 'assistant';
  final: ChatChunk | null = null;
  first: ChatChunk | null = null;

  add(c: ChatChunk): void {
    this.first ??= c;
    const m = c.message;
    if (m) {
      if (typeof m.role === 'string') this.role = m.role;
      if (typeof m.content === 'string' && m.content.length > 0) this.content.push(m.content);
      if (typeof m.thinking === 'string' && m.thinking.length > 0) this.thinking.push(m.thinking);
      if (Array.isArray(m.tool_calls)) this.toolCalls.push(...m.tool_calls);
    }
    if (c.done === true) this.final = c;
  }

  result(): ChatResponse {
    const f = this.final ?? {};
    const message: ChatResponse['message'] = { role: this.role, content: this.content.join('') };
    if (this.thinking.length > 0) message.thinking = this.thinking.join('');
    if (this.toolCalls.length > 0) message.tool_calls = this.toolCalls;
    const out: ChatResponse = {
      model: f.model ?? this.first?.model ?? '',
      created_at: f.created_at ?? this.first?.created_at ?? new Date().toISOString(),
      message,
      done: true,
      done_reason: f.done_reason ?? 'stop',
    };
    for (const k of [
      'total_duration',
      'load_duration',
      'prompt_eval_count',
      'prompt_eval_duration',
      'eval_count',
      'eval_duration',
    ] as const) {
      if (typeof f[k] === 'number') out[k] = f[k];
    }
    return out;
  }
}
