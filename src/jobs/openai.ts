import type { ChatResponse, ToolCall } from '../engine/engine.js';
import { Validation } from '../errors.js';
import type { BatchRecord, BatchResultRow } from '../queue/driver.js';

/**
 * The OpenAI-compatible surface's translation (ADR-0015): OpenAI requests to Ollama requests, and
 * Ollama results back to OpenAI's response shapes. Pure functions, shared by the synchronous routes
 * (`/v1/chat/completions`, `/v1/embeddings`), the batch upload's validation and the batch output.
 * A parameter that cannot be mapped is refused (400) naming it, never silently dropped.
 */

type Obj = Record<string, unknown>;

const isObj = (v: unknown): v is Obj => v !== null && typeof v === 'object' && !Array.isArray(v);

const missing = (param: string) => new Validation(`you must provide ${param}`, param, 'missing_required_parameter');
const badType = (param: string, what: string) => new Validation(`${param} must be ${what}`, param, 'invalid_type');
const badValue = (param: string, why: string) => new Validation(`${param} ${why}`, param, 'invalid_value');
const unsupported = (param: string, why = 'is not supported by this server (Ollama through Foreman)') => new Validation(`${param} ${why}`, param, 'unsupported_parameter');
const unsupportedValue = (param: string, why: string) => new Validation(`${param} ${why}`, param, 'unsupported_value');

function num(body: Obj, key: string, p: string, min: number, max: number): number | undefined {
  const v = body[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw badType(p + key, 'a number');
  if (v < min || v > max) throw badValue(p + key, `must be between ${min} and ${max}`);
  return v;
}

function int(body: Obj, key: string, p: string, min: number, max: number): number | undefined {
  const v = num(body, key, p, min, max);
  if (v !== undefined && !Number.isInteger(v)) throw badType(p + key, 'an integer');
  return v;
}

function str(v: unknown, param: string, max = 1_000_000): string {
  if (typeof v !== 'string') throw badType(param, 'a string');
  if (v.length > max) throw badValue(param, `is longer than ${max} characters`);
  return v;
}

/** OpenAI `metadata`: up to 16 string pairs (keys ≤ 64, values ≤ 512 characters). */
export function checkMetadata(v: unknown, param: string): Record<string, string> | null {
  if (v === undefined || v === null) return null;
  if (!isObj(v)) throw badType(param, 'an object of strings');
  const entries = Object.entries(v);
  if (entries.length > 16) throw badValue(param, 'may hold at most 16 pairs');
  for (const [k, val] of entries) {
    if (k.length < 1 || k.length > 64) throw badValue(`${param}.${k.slice(0, 64)}`, 'keys must be 1 to 64 characters');
    if (typeof val !== 'string') throw badType(`${param}.${k}`, 'a string');
    if (val.length > 512) throw badValue(`${param}.${k}`, 'values must be at most 512 characters');
  }
  return v as Record<string, string>;
}

/** Parameters accepted with no effect on an Ollama engine (identifiers, storage hints, defaults). */
const IGNORED = new Set(['user', 'safety_identifier', 'prompt_cache_key', 'store', 'parallel_tool_calls']);

export interface ChatPlan {
  model: string;
  /** The Ollama `/api/chat` request (without `stream`: a job always streams from the engine). */
  request: Obj;
  stream: boolean;
  includeUsage: boolean;
  metadata: Record<string, string> | null;
  /** Foreman's own extra: the job's priority. */
  priority: number | undefined;
}

const CHAT_KEYS = new Set([
  'model', 'messages', 'stream', 'stream_options', 'temperature', 'top_p', 'max_tokens', 'max_completion_tokens', 'stop', 'seed',
  'frequency_penalty', 'presence_penalty', 'response_format', 'reasoning_effort', 'tools', 'tool_choice', 'n', 'logprobs',
  'top_logprobs', 'logit_bias', 'metadata', 'service_tier', 'modalities', 'priority', ...IGNORED,
]);

/** Text of a content that may be a string or a list of parts; image parts go to `images`. */
function contentOf(v: unknown, param: string, allowImages: boolean, images: string[]): string {
  if (v === null || v === undefined) return '';
  if (typeof v === 'string') return v;
  if (!Array.isArray(v)) throw badType(param, 'a string or an array of content parts');
  const texts: string[] = [];
  v.forEach((part, j) => {
    const pp = `${param}[${j}]`;
    if (!isObj(part)) throw badType(pp, 'a content part object');
    const type = part.type;
    if (type === 'text') texts.push(str(part.text, `${pp}.text`));
    else if (type === 'refusal') texts.push(str(part.refusal, `${pp}.refusal`));
    else if (type === 'image_url' && allowImages) {
      const iu = part.image_url;
      if (!isObj(iu)) throw badType(`${pp}.image_url`, 'an object with url');
      const url = str(iu.url, `${pp}.image_url.url`, 50_000_000);
      const m = /^data:image\/[a-zA-Z0-9.+-]+;base64,(.*)$/s.exec(url);
      if (!m) throw unsupportedValue(`${pp}.image_url.url`, 'must be a data: URL (data:image/…;base64,…): this server does not fetch images from the network');
      images.push(m[1]!);
    } else throw unsupportedValue(`${pp}.type`, `"${String(type).slice(0, 40)}" is not supported here (text${allowImages ? ' and image_url' : ''} only)`);
  });
  return texts.join('\n');
}

function mapMessages(v: unknown, param: string): Obj[] {
  if (v === undefined) throw missing(param);
  if (!Array.isArray(v)) throw badType(param, 'an array');
  if (v.length === 0) throw badValue(param, 'must hold at least one message');
  if (v.length > 10_000) throw badValue(param, 'may hold at most 10000 messages');
  const toolNames = new Map<string, string>();
  return v.map((m, i) => {
    const mp = `${param}[${i}]`;
    if (!isObj(m)) throw badType(mp, 'a message object');
    const role = m.role;
    for (const k of Object.keys(m)) {
      if (!['role', 'content', 'name', 'tool_calls', 'tool_call_id', 'refusal', 'audio', 'function_call'].includes(k)) throw unsupported(`${mp}.${k}`);
    }
    if (m.audio != null) throw unsupported(`${mp}.audio`);
    if (m.function_call != null) throw unsupported(`${mp}.function_call`, 'is deprecated: use tool_calls');
    const images: string[] = [];
    switch (role) {
      case 'system':
      case 'developer':
        return { role: 'system', content: contentOf(m.content, `${mp}.content`, false, images) };
      case 'user': {
        if (m.content === undefined) throw missing(`${mp}.content`);
        const out: Obj = { role: 'user', content: contentOf(m.content, `${mp}.content`, true, images) };
        if (images.length > 0) out.images = images;
        return out;
      }
      case 'assistant': {
        const out: Obj = { role: 'assistant', content: contentOf(m.content, `${mp}.content`, false, images) };
        if (m.tool_calls != null) {
          if (!Array.isArray(m.tool_calls)) throw badType(`${mp}.tool_calls`, 'an array');
          out.tool_calls = m.tool_calls.map((tc, k) => {
            const tp = `${mp}.tool_calls[${k}]`;
            if (!isObj(tc) || !isObj(tc.function)) throw badType(tp, 'a function tool call');
            if (tc.type !== undefined && tc.type !== 'function') throw unsupportedValue(`${tp}.type`, 'must be "function"');
            const name = str(tc.function.name, `${tp}.function.name`, 256);
            const raw = tc.function.arguments ?? '{}';
            let args: unknown;
            try {
              args = typeof raw === 'string' ? JSON.parse(raw === '' ? '{}' : raw) : raw;
            } catch {
              throw badValue(`${tp}.function.arguments`, 'is not valid JSON');
            }
            if (!isObj(args)) throw badType(`${tp}.function.arguments`, 'a JSON object');
            if (typeof tc.id === 'string') toolNames.set(tc.id, name);
            return { function: { name, arguments: args } };
          });
        }
        return out;
      }
      case 'tool': {
        const out: Obj = { role: 'tool', content: contentOf(m.content, `${mp}.content`, false, images) };
        const id = m.tool_call_id;
        if (typeof id !== 'string') throw missing(`${mp}.tool_call_id`);
        const name = toolNames.get(id);
        if (name !== undefined) out.tool_name = name;
        return out;
      }
      case undefined:
        throw missing(`${mp}.role`);
      default:
        throw unsupportedValue(`${mp}.role`, `"${String(role).slice(0, 40)}" is not supported (system, developer, user, assistant, tool)`);
    }
  });
}

function mapTools(v: unknown, param: string): Obj[] {
  if (!Array.isArray(v)) throw badType(param, 'an array');
  if (v.length > 256) throw badValue(param, 'may hold at most 256 tools');
  return v.map((t, i) => {
    const tp = `${param}[${i}]`;
    if (!isObj(t)) throw badType(tp, 'a tool object');
    if (t.type !== 'function') throw unsupportedValue(`${tp}.type`, 'must be "function" (custom tools are not supported)');
    if (!isObj(t.function)) throw missing(`${tp}.function`);
    const f = t.function;
    const fn: Obj = { name: str(f.name, `${tp}.function.name`, 256) };
    if (f.description !== undefined) fn.description = str(f.description, `${tp}.function.description`);
    if (f.parameters !== undefined) {
      if (!isObj(f.parameters)) throw badType(`${tp}.function.parameters`, 'a JSON schema object');
      fn.parameters = f.parameters;
    }
    return { type: 'function', function: fn };
  });
}

/**
 * An OpenAI chat completion request as an Ollama `/api/chat` request. `p` prefixes parameter
 * names in errors (a batch line's `body.`).
 */
export function mapChat(body: unknown, p = ''): ChatPlan {
  if (!isObj(body)) throw badType(p === '' ? 'body' : p.slice(0, -1), 'a JSON object');
  for (const k of Object.keys(body)) {
    if (!CHAT_KEYS.has(k)) throw unsupported(p + k, `is not a parameter this server supports (unrecognized or unmappable to Ollama)`);
  }
  if (body.model === undefined) throw missing(p + 'model');
  const model = str(body.model, p + 'model', 256);
  if (model.length === 0) throw badValue(p + 'model', 'must not be empty');
  const request: Obj = { model, messages: mapMessages(body.messages, p + 'messages') };
  const options: Obj = {};
  const temperature = num(body, 'temperature', p, 0, 2);
  if (temperature !== undefined) options.temperature = temperature;
  const topP = num(body, 'top_p', p, 0, 1);
  if (topP !== undefined) options.top_p = topP;
  for (const k of ['frequency_penalty', 'presence_penalty'] as const) {
    const v = num(body, k, p, -2, 2);
    if (v !== undefined) options[k] = v;
  }
  const maxTokens = int(body, 'max_completion_tokens', p, 1, 10_000_000) ?? int(body, 'max_tokens', p, 1, 10_000_000);
  if (maxTokens !== undefined) options.num_predict = maxTokens;
  const seed = int(body, 'seed', p, -(2 ** 53), 2 ** 53);
  if (seed !== undefined) options.seed = seed;
  if (body.stop !== undefined && body.stop !== null) {
    const stop = typeof body.stop === 'string' ? [body.stop] : body.stop;
    if (!Array.isArray(stop) || stop.some((x) => typeof x !== 'string')) throw badType(p + 'stop', 'a string or an array of strings');
    if (stop.length > 4) throw badValue(p + 'stop', 'may hold at most 4 sequences');
    if (stop.length > 0) options.stop = stop;
  }
  if (Object.keys(options).length > 0) request.options = options;
  const rf = body.response_format;
  if (rf !== undefined && rf !== null) {
    if (!isObj(rf)) throw badType(p + 'response_format', 'an object');
    if (rf.type === 'json_object') request.format = 'json';
    else if (rf.type === 'json_schema') {
      const js = rf.json_schema;
      if (!isObj(js)) throw missing(p + 'response_format.json_schema');
      str(js.name, p + 'response_format.json_schema.name', 64);
      if (js.schema !== undefined && !isObj(js.schema)) throw badType(p + 'response_format.json_schema.schema', 'a JSON schema object');
      request.format = isObj(js.schema) ? js.schema : 'json';
    } else if (rf.type !== 'text') throw unsupportedValue(p + 'response_format.type', 'must be text, json_object or json_schema');
  }
  const effort = body.reasoning_effort;
  if (effort !== undefined && effort !== null) {
    if (effort === 'none') request.think = false;
    else if (effort === 'low' || effort === 'medium' || effort === 'high') request.think = effort;
    else throw unsupportedValue(p + 'reasoning_effort', 'must be none, low, medium or high');
  }
  const toolChoice = body.tool_choice;
  if (toolChoice !== undefined && toolChoice !== null && toolChoice !== 'auto' && toolChoice !== 'none') {
    throw unsupportedValue(p + 'tool_choice', 'must be auto or none (Ollama cannot be made to call a tool)');
  }
  if (body.tools !== undefined && body.tools !== null && toolChoice !== 'none') {
    const tools = mapTools(body.tools, p + 'tools');
    if (tools.length > 0) request.tools = tools;
  }
  if (body.n !== undefined && body.n !== null && body.n !== 1) throw unsupportedValue(p + 'n', 'must be 1 (one choice per request)');
  if (body.logprobs !== undefined && body.logprobs !== null && body.logprobs !== false) throw unsupportedValue(p + 'logprobs', 'is not supported');
  if (body.top_logprobs !== undefined && body.top_logprobs !== null) throw unsupported(p + 'top_logprobs');
  if (body.logit_bias !== undefined && body.logit_bias !== null && !(isObj(body.logit_bias) && Object.keys(body.logit_bias).length === 0)) {
    throw unsupported(p + 'logit_bias');
  }
  if (body.service_tier !== undefined && body.service_tier !== null && body.service_tier !== 'auto' && body.service_tier !== 'default') {
    throw unsupportedValue(p + 'service_tier', 'must be auto or default');
  }
  if (body.modalities !== undefined && body.modalities !== null) {
    if (!Array.isArray(body.modalities) || body.modalities.some((m) => m !== 'text')) throw unsupportedValue(p + 'modalities', 'must be ["text"]');
  }
  const stream = body.stream === true;
  if (body.stream !== undefined && body.stream !== null && typeof body.stream !== 'boolean') throw badType(p + 'stream', 'a boolean');
  let includeUsage = false;
  if (body.stream_options !== undefined && body.stream_options !== null) {
    if (!stream) throw badValue(p + 'stream_options', 'is only allowed when stream is true');
    if (!isObj(body.stream_options)) throw badType(p + 'stream_options', 'an object');
    for (const k of Object.keys(body.stream_options)) {
      if (k !== 'include_usage' && k !== 'include_obfuscation') throw unsupported(`${p}stream_options.${k}`);
    }
    includeUsage = body.stream_options.include_usage === true;
  }
  const priority = int(body, 'priority', p, -1000, 1000);
  return { model, request, stream, includeUsage, metadata: checkMetadata(body.metadata, p + 'metadata'), priority };
}

export interface EmbedPlan {
  model: string;
  /** The Ollama `/api/embed` request. */
  request: Obj;
  encoding: 'float' | 'base64';
  priority: number | undefined;
}

const EMBED_KEYS = new Set(['model', 'input', 'encoding_format', 'dimensions', 'user', 'priority']);

/** An OpenAI embeddings request as an Ollama `/api/embed` request. */
export function mapEmbed(body: unknown, p = ''): EmbedPlan {
  if (!isObj(body)) throw badType(p === '' ? 'body' : p.slice(0, -1), 'a JSON object');
  for (const k of Object.keys(body)) if (!EMBED_KEYS.has(k)) throw unsupported(p + k, 'is not a parameter this server supports');
  if (body.model === undefined) throw missing(p + 'model');
  const model = str(body.model, p + 'model', 256);
  if (model.length === 0) throw badValue(p + 'model', 'must not be empty');
  const input = body.input;
  if (input === undefined) throw missing(p + 'input');
  if (typeof input === 'string') {
    if (input.length === 0) throw badValue(p + 'input', 'must not be empty');
  } else if (Array.isArray(input)) {
    if (input.length === 0) throw badValue(p + 'input', 'must not be empty');
    if (input.length > 2048) throw badValue(p + 'input', 'may hold at most 2048 inputs');
    input.forEach((x, i) => {
      if (typeof x === 'number' || Array.isArray(x)) throw unsupportedValue(p + 'input', 'token arrays are not supported: send text');
      if (typeof x !== 'string') throw badType(`${p}input[${i}]`, 'a string');
      if (x.length === 0) throw badValue(`${p}input[${i}]`, 'must not be empty');
    });
  } else throw badType(p + 'input', 'a string or an array of strings');
  const enc = body.encoding_format ?? 'float';
  if (enc !== 'float' && enc !== 'base64') throw unsupportedValue(p + 'encoding_format', 'must be float or base64');
  const request: Obj = { model, input };
  const dims = int(body, 'dimensions', p, 1, 1_000_000);
  if (dims !== undefined) request.dimensions = dims;
  return { model, request, encoding: enc, priority: int(body, 'priority', p, -1000, 1000) };
}

// --- responses ---

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export function chatUsage(r: { prompt_eval_count?: number | null; eval_count?: number | null }): Usage {
  const prompt = r.prompt_eval_count ?? 0;
  const completion = r.eval_count ?? 0;
  return { prompt_tokens: prompt, completion_tokens: completion, total_tokens: prompt + completion };
}

/** A tool call's id: Ollama's own if it gave one, else stable per job and position (stream and record agree). */
export function toolCallId(jobId: string, index: number, call?: ToolCall): string {
  if (typeof call?.id === 'string' && call.id !== '') return call.id;
  return `call_${jobId.replace(/-/g, '').slice(-16)}_${index}`;
}

export function openAiToolCall(jobId: string, index: number, c: ToolCall) {
  return { id: toolCallId(jobId, index, c), type: 'function' as const, function: { name: c.function.name, arguments: JSON.stringify(c.function.arguments ?? {}) } };
}

export function finishReason(r: Pick<ChatResponse, 'done_reason' | 'message'>): 'stop' | 'length' | 'tool_calls' {
  if ((r.message.tool_calls?.length ?? 0) > 0) return 'tool_calls';
  return r.done_reason === 'length' ? 'length' : 'stop';
}

const seconds = (ms: number) => Math.floor(ms / 1000);

/** The `chat.completion` object of a done chat job. */
export function chatCompletion(jobId: string, createdAtMs: number, model: string, r: ChatResponse) {
  const calls = r.message.tool_calls ?? [];
  const message: Obj = {
    role: 'assistant',
    content: calls.length > 0 && r.message.content === '' ? null : r.message.content,
    refusal: null,
    annotations: [],
  };
  if (calls.length > 0) message.tool_calls = calls.map((c, i) => openAiToolCall(jobId, i, c));
  return {
    id: `chatcmpl-${jobId}`,
    object: 'chat.completion' as const,
    created: seconds(createdAtMs),
    model,
    choices: [{ index: 0, message, logprobs: null, finish_reason: finishReason(r) }],
    usage: chatUsage(r),
  };
}

/** Streaming: the fields every `chat.completion.chunk` of one job shares. */
export function chunkBase(jobId: string, createdAtMs: number, model: string) {
  return { id: `chatcmpl-${jobId}`, object: 'chat.completion.chunk' as const, created: seconds(createdAtMs), model };
}

export interface EmbedResult {
  model?: string;
  embeddings: number[][];
  prompt_eval_count?: number;
}

/** A vector as OpenAI's base64 encoding: little-endian float32. */
export function base64Vector(v: number[]): string {
  const b = Buffer.alloc(v.length * 4);
  v.forEach((x, i) => b.writeFloatLE(x, i * 4));
  return b.toString('base64');
}

/** The `list` of `embedding` objects of a done embed job. */
export function embeddingsResponse(model: string, r: EmbedResult, encoding: 'float' | 'base64') {
  const prompt = r.prompt_eval_count ?? 0;
  return {
    object: 'list' as const,
    data: r.embeddings.map((e, index) => ({ object: 'embedding' as const, index, embedding: encoding === 'base64' ? base64Vector(e) : e })),
    model,
    usage: { prompt_tokens: prompt, total_tokens: prompt },
  };
}

/** The HTTP status a request would have answered, from a failed job's error code. */
export function statusOfJobError(code: string): number {
  if (code === 'model_not_found') return 404;
  if (code === 'engine_bad_request' || code === 'validation_failed') return 400;
  if (code === 'engine_busy' || code === 'engine_unavailable') return 503;
  if (code === 'quota_exceeded') return 429;
  return 500;
}

/** OpenAI's error `type` for an HTTP status. */
export function errorType(status: number): string {
  if (status === 401) return 'authentication_error';
  if (status === 403) return 'permission_error';
  if (status === 404) return 'not_found_error';
  if (status === 429) return 'rate_limit_error';
  if (status >= 500) return 'server_error';
  return 'invalid_request_error';
}

const tsOrNull = (ms: number | null) => (ms === null ? null : seconds(ms));

/** OpenAI's `batch` object. The output (error) file id shows once a request succeeded (failed). */
export function batchObject(b: BatchRecord) {
  return {
    id: b.id,
    object: 'batch' as const,
    endpoint: b.endpoint,
    errors: b.errors === null ? null : { object: 'list' as const, data: b.errors.map((e) => ({ code: e.code, message: e.message, param: e.param ?? null, line: e.line ?? null })) },
    input_file_id: b.inputFileId,
    completion_window: b.completionWindow,
    status: b.status,
    output_file_id: b.completed > 0 ? b.outputFileId : null,
    error_file_id: b.failed + b.canceled > 0 ? b.errorFileId : null,
    created_at: seconds(b.createdAt),
    in_progress_at: tsOrNull(b.inProgressAt),
    expires_at: seconds(b.expiresAt),
    finalizing_at: tsOrNull(b.finalizingAt),
    completed_at: tsOrNull(b.completedAt),
    failed_at: tsOrNull(b.failedAt),
    expired_at: tsOrNull(b.expiredAt),
    cancelling_at: tsOrNull(b.cancellingAt),
    cancelled_at: tsOrNull(b.cancelledAt),
    request_counts: { total: b.total, completed: b.completed, failed: b.failed },
    metadata: b.metadata,
  };
}

/** One line of a batch's output or error file (OpenAI's batch output format). */
export function batchOutputLine(b: BatchRecord, r: BatchResultRow): string {
  const id = `batch_req_${r.jobId.replace(/-/g, '')}`;
  const customId = r.metadata?.custom_id ?? '';
  const encoding = r.metadata?.encoding_format === 'base64' ? 'base64' : 'float';
  let line: Obj;
  if (r.state === 'done') {
    const body =
      b.endpoint === '/v1/embeddings'
        ? embeddingsResponse(r.model, r.result as EmbedResult, encoding)
        : chatCompletion(r.jobId, r.createdAt, r.model, r.result as ChatResponse);
    line = { id, custom_id: customId, response: { status_code: 200, request_id: r.jobId, body }, error: null };
  } else if (r.state === 'canceled') {
    line = { id, custom_id: customId, response: null, error: { code: 'batch_cancelled', message: 'this request was cancelled with its batch before it ran' } };
  } else if (r.error?.code === 'batch_expired' || r.error?.code === 'batch_failed') {
    line = { id, custom_id: customId, response: null, error: { code: r.error.code, message: r.error.message } };
  } else {
    const err = r.error ?? { code: 'internal_error', message: 'the request failed' };
    const status = statusOfJobError(err.code);
    line = {
      id,
      custom_id: customId,
      response: { status_code: status, request_id: r.jobId, body: { error: { message: err.message, type: errorType(status), param: null, code: err.code } } },
      error: null,
    };
  }
  return JSON.stringify(line);
}

/** An error file line for a line that never became a job (the batch was cancelled, expired or failed first). */
export function unsubmittedLine(b: BatchRecord, n: number, customId: string): string {
  const code = b.ending === 'cancel' ? 'batch_cancelled' : b.ending === 'expire' ? 'batch_expired' : 'batch_failed';
  const message =
    code === 'batch_cancelled'
      ? 'this request was cancelled with its batch before it ran'
      : code === 'batch_expired'
        ? 'this request could not be executed before the completion window expired'
        : 'the batch failed before this request ran';
  return JSON.stringify({ id: `batch_req_${b.id.replace(/^batch_/, '')}_line${n}`, custom_id: customId, response: null, error: { code, message } });
}

/** OpenAI's `file` object. */
export function fileObject(f: { id: string; purpose: string; filename: string; bytes: number | null; createdAt: number; expiresAt: number | null }) {
  return {
    id: f.id,
    object: 'file' as const,
    bytes: f.bytes ?? 0,
    created_at: seconds(f.createdAt),
    expires_at: tsOrNull(f.expiresAt),
    filename: f.filename,
    purpose: f.purpose,
    status: 'processed' as const,
    status_details: null,
  };
}
