import { Pool } from 'undici';
import { discardBody } from '../body.js';
import { ChunkMerger, EngineError, type ChatChunk, type ChatEngine, type ChatResponse, type EmbedResponse, type EngineStatus } from './engine.js';

export interface OllamaEngineOptions {
  url: string;
  /** No byte from the engine for this long (headers or body) is a transient failure. */
  idleTimeoutMs: number;
  connections?: number;
  /** A single NDJSON line larger than this is a protocol error. */
  maxLineBytes?: number;
  /** A generation whose stream exceeds this many bytes is stopped and fails permanently. */
  maxResponseBytes?: number;
}

const TRANSIENT_NET_CODES = new Set([
  'ECONNREFUSED',
  'ECONNRESET',
  'EPIPE',
  'ETIMEDOUT',
  'EHOSTUNREACH',
  'ENETUNREACH',
  'EAI_AGAIN',
  'ENOTFOUND',
  'UND_ERR_SOCKET',
  'UND_ERR_CONNECT_TIMEOUT',
  'UND_ERR_CLOSED',
]);

const STALE_SOCKET_CODES = new Set(['ECONNRESET', 'EPIPE', 'UND_ERR_SOCKET']);

/** Errors raised before a connection exists: the engine is unreachable. */
const UNREACHABLE_CODES = new Set(['ECONNREFUSED', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'ENOTFOUND', 'UND_ERR_CONNECT_TIMEOUT']);

function isAbort(err: unknown, signal: AbortSignal): boolean {
  return signal.aborted || (err as { name?: string }).name === 'AbortError' || (err as { code?: string }).code === 'UND_ERR_ABORTED';
}

/** Maps a thrown network-level error to an EngineError (or rethrows aborts untouched). */
function classifyNetworkError(err: unknown, signal: AbortSignal, phase: string): never {
  if (isAbort(err, signal)) throw err;
  const code = (err as { code?: string }).code ?? '';
  const msg = (err as Error).message ?? String(err);
  if (code === 'UND_ERR_HEADERS_TIMEOUT' || code === 'UND_ERR_BODY_TIMEOUT') {
    throw new EngineError('transient', 'engine_timeout', `the engine sent nothing for too long during ${phase} (${msg})`);
  }
  if (TRANSIENT_NET_CODES.has(code) || code.startsWith('UND_ERR')) {
    throw new EngineError(
      'transient',
      'engine_unavailable',
      `cannot reach the engine during ${phase}: ${code} ${msg}`.trim(),
      undefined,
      UNREACHABLE_CODES.has(code),
    );
  }
  if (err instanceof EngineError) throw err;
  throw new EngineError('transient', 'engine_unavailable', `engine request failed during ${phase}: ${msg}`);
}

/** Maps a non-200 answer and its `{"error": ...}` text to a classified EngineError. */
export function errorForStatus(status: number, text: string): EngineError {
  if (status === 404) return new EngineError('permanent', 'model_not_found', text || 'model not found', status);
  if (status === 400) return new EngineError('permanent', 'engine_bad_request', text || 'bad request', status);
  if (status === 503) return new EngineError('transient', 'engine_busy', text || 'engine busy', status);
  if (status === 429) return new EngineError('transient', 'engine_busy', text || 'engine rate limited', status);
  if (status >= 500) return new EngineError('transient', 'engine_error', text || `engine answered ${status}`, status);
  return new EngineError('permanent', 'engine_rejected', text || `engine answered ${status}`, status);
}

function errorText(raw: string): string {
  try {
    const j = JSON.parse(raw) as { error?: unknown };
    if (typeof j.error === 'string') return j.error;
  } catch {
    /* not JSON */
  }
  return raw.slice(0, 1000).trim();
}

export class OllamaEngine implements ChatEngine {
  private readonly pool: Pool;
  private readonly maxLineBytes: number;
  private readonly maxResponseBytes: number;

  constructor(opts: OllamaEngineOptions) {
    this.pool = new Pool(opts.url, {
      connections: opts.connections ?? 16,
      headersTimeout: opts.idleTimeoutMs,
      bodyTimeout: opts.idleTimeoutMs,
      keepAliveTimeout: 10_000,
    });
    this.maxLineBytes = opts.maxLineBytes ?? 16 * 1024 * 1024;
    this.maxResponseBytes = opts.maxResponseBytes ?? 32 * 1024 * 1024;
  }

  private async post(body: unknown, signal: AbortSignal, phase: 'load' | 'generation', path = '/api/chat') {
    const payload = JSON.stringify(body);
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.pool.request({
          path,
          method: 'POST',
          headers: { 'content-type': 'application/json', accept: 'application/x-ndjson, application/json' },
          body: payload,
          signal,
        });
      } catch (err) {
        // A pooled keep-alive connection the engine already closed fails before any answer.
        // Loading is idempotent, so try once more on a fresh connection before judging.
        const code = (err as { code?: string }).code ?? '';
        if (phase === 'load' && attempt === 1 && !signal.aborted && STALE_SOCKET_CODES.has(code)) continue;
        return classifyNetworkError(err, signal, phase);
      }
    }
  }

  async load(model: string, opts: { keepAlive?: unknown; signal: AbortSignal; kind?: 'chat' | 'embed' }): Promise<void> {
    const embed = opts.kind === 'embed';
    // An embedding model cannot chat: it is loaded by an /api/embed with no input (ADR-0015).
    const body: Record<string, unknown> = embed ? { model, input: [] } : { model, messages: [] };
    if (opts.keepAlive !== undefined) body.keep_alive = opts.keepAlive;
    const res = await this.post(body, opts.signal, 'load', embed ? '/api/embed' : '/api/chat');
    let raw: string;
    try {
      raw = await res.body.text();
    } catch (err) {
      return classifyNetworkError(err, opts.signal, 'load');
    }
    if (res.statusCode !== 200) throw errorForStatus(res.statusCode, errorText(raw));
    // One object (even with stream on); tolerate an NDJSON answer by reading its last line.
    const lines = raw.split('\n').filter((l) => l.trim().length > 0);
    const last = lines[lines.length - 1];
    let parsed: ChatChunk;
    try {
      parsed = JSON.parse(last ?? '') as ChatChunk;
    } catch {
      throw new EngineError('transient', 'engine_protocol_error', `the engine's load answer is not JSON: ${raw.slice(0, 200)}`);
    }
    if (parsed.error !== undefined) throw new EngineError('transient', 'engine_stream_error', String(parsed.error));
    if (embed) {
      if (!Array.isArray((parsed as { embeddings?: unknown }).embeddings)) {
        throw new EngineError('transient', 'engine_protocol_error', `the engine's embed load answer has no embeddings: ${raw.slice(0, 200)}`);
      }
      return;
    }
    if (parsed.done !== true) {
      throw new EngineError('transient', 'engine_stream_incomplete', 'the engine ended the load without done:true');
    }
  }

  async chat(
    request: Record<string, unknown>,
    opts: { signal: AbortSignal; onChunk?: (c: ChatChunk) => void },
  ): Promise<ChatResponse> {
    const res = await this.post({ ...request, stream: true }, opts.signal, 'generation');
    if (res.statusCode !== 200) {
      let raw = '';
      try {
        raw = await res.body.text();
      } catch (err) {
        return classifyNetworkError(err, opts.signal, 'generation');
      }
      throw errorForStatus(res.statusCode, errorText(raw));
    }
    const merger = new ChunkMerger();
    const decoder = new TextDecoder('utf-8');
    let buf = '';
    let received = 0;
    const handleLine = (line: string) => {
      if (line.trim().length === 0) return;
      let chunk: ChatChunk;
      try {
        chunk = JSON.parse(line) as ChatChunk;
      } catch {
        throw new EngineError('transient', 'engine_protocol_error', `the engine sent a line that is not JSON: ${line.slice(0, 200)}`);
      }
      if (chunk === null || typeof chunk !== 'object') {
        throw new EngineError('transient', 'engine_protocol_error', `the engine sent a line that is not an object: ${line.slice(0, 200)}`);
      }
      if (chunk.error !== undefined) {
        throw new EngineError('transient', 'engine_stream_error', typeof chunk.error === 'string' ? chunk.error : JSON.stringify(chunk.error));
      }
      merger.add(chunk);
      opts.onChunk?.(chunk);
    };
    // Read in flowing mode rather than `for await`: leaving a `for await` early destroys the body
    // (and the keep-alive connection with it). After the done line the rest is drained, not parsed.
    const body = res.body;
    try {
      await new Promise<void>((resolve, reject) => {
        let settled = false;
        const fail = (err: unknown) => {
          if (settled) return;
          settled = true;
          reject(err);
        };
        body.on('data', (part: Buffer) => {
          if (settled) return; // after the done line: drained, ignored
          try {
            received += part.length;
            if (received > this.maxResponseBytes) {
              throw new EngineError(
                'permanent',
                'engine_response_too_large',
                `the engine's response exceeded FOREMAN_ENGINE_MAX_RESPONSE_BYTES (${this.maxResponseBytes} bytes); generation stopped`,
              );
            }
            buf += decoder.decode(part, { stream: true });
            let start = 0;
            let nl: number;
            while ((nl = buf.indexOf('\n', start)) >= 0) {
              handleLine(buf.slice(start, nl));
              start = nl + 1;
              if (merger.final) break;
            }
            buf = buf.slice(start);
            if (merger.final) {
              settled = true;
              resolve();
              return;
            }
            if (buf.length > this.maxLineBytes) {
              throw new EngineError('transient', 'engine_protocol_error', `an NDJSON line exceeded ${this.maxLineBytes} bytes`);
            }
          } catch (err) {
            fail(err);
          }
        });
        body.on('end', () => {
          if (settled) return;
          try {
            buf += decoder.decode();
            handleLine(buf);
            settled = true;
            resolve();
          } catch (err) {
            fail(err);
          }
        });
        body.on('error', fail);
      });
    } catch (err) {
      discardBody(body);
      if (err instanceof EngineError) throw err;
      return classifyNetworkError(err, opts.signal, 'generation');
    }
    if (!merger.final) {
      throw new EngineError('transient', 'engine_stream_incomplete', 'the engine stream ended without done:true');
    }
    return merger.result();
  }

  async embed(request: Record<string, unknown>, opts: { signal: AbortSignal }): Promise<EmbedResponse> {
    const res = await this.post(request, opts.signal, 'generation', '/api/embed');
    const parts: Buffer[] = [];
    let received = 0;
    try {
      for await (const part of res.body) {
        received += (part as Buffer).length;
        if (received > this.maxResponseBytes) {
          throw new EngineError(
            'permanent',
            'engine_response_too_large',
            `the engine's response exceeded FOREMAN_ENGINE_MAX_RESPONSE_BYTES (${this.maxResponseBytes} bytes)`,
          );
        }
        parts.push(part as Buffer);
      }
    } catch (err) {
      discardBody(res.body);
      if (err instanceof EngineError) throw err;
      return classifyNetworkError(err, opts.signal, 'generation');
    }
    const raw = Buffer.concat(parts).toString('utf8');
    if (res.statusCode !== 200) throw errorForStatus(res.statusCode, errorText(raw));
    let parsed: EmbedResponse & { error?: unknown };
    try {
      parsed = JSON.parse(raw) as EmbedResponse & { error?: unknown };
    } catch {
      throw new EngineError('transient', 'engine_protocol_error', `the engine's embed answer is not JSON: ${raw.slice(0, 200)}`);
    }
    if (parsed.error !== undefined) throw new EngineError('transient', 'engine_stream_error', String(parsed.error));
    if (!Array.isArray(parsed.embeddings)) throw new EngineError('transient', 'engine_protocol_error', 'the engine\'s embed answer has no embeddings');
    return parsed;
  }

  async status(): Promise<EngineStatus> {
    try {
      const res = await this.pool.request({ path: '/api/version', method: 'GET', signal: AbortSignal.timeout(2000) });
      const raw = await res.body.text();
      if (res.statusCode !== 200) return { up: false, error: `engine answered ${res.statusCode}` };
      const j = JSON.parse(raw) as { version?: string };
      return { up: true, version: j.version };
    } catch (err) {
      return { up: false, error: (err as Error).message };
    }
  }

  async passthrough(path: string): Promise<{ status: number; contentType: string; body: Buffer }> {
    try {
      const res = await this.pool.request({ path, method: 'GET', signal: AbortSignal.timeout(10_000) });
      const body = Buffer.from(await res.body.arrayBuffer());
      return { status: res.statusCode, contentType: String(res.headers['content-type'] ?? 'application/json'), body };
    } catch (err) {
      return classifyNetworkError(err, new AbortController().signal, `GET ${path}`);
    }
  }

  async close(): Promise<void> {
    await this.pool.destroy();
  }
}
