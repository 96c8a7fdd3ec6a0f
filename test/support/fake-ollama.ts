/**
 * A fake Ollama server for tests. It speaks the subset of the native API that
 * Foreman uses (see /work/shared/ollama-protocol.md): POST /api/chat (loads,
 * streaming and non-streaming chats, errors), POST /api/embed (deterministic
 * vectors; `input: []` loads the model), GET /api/version, /api/tags,
 * /api/ps and /. Failure modes (HTTP errors, errors mid-stream, cut streams,
 * connection resets, hangs, stalls, malformed lines, huge streams) are scripted
 * per request with enqueue() / setLoadBehaviour().
 *
 * Only node built-ins are used.
 */
import { createServer } from 'node:http';
import type { IncomingMessage, Server, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { EventEmitter } from 'node:events';

export type FakeBehaviour =
  | {
      kind: 'ok';
      chunks?: FakeChunk[];
      chunkDelayMs?: number;
      firstByteDelayMs?: number;
      /** /api/chat sends no byte until this settles (or the client goes away): a test's own signal, not a timer. */
      gate?: Promise<unknown>;
      /** With `gate`: the chunks before this index go out first, the rest wait for the gate (default 0: no byte at all). */
      gateAt?: number;
    }
  | { kind: 'http_error'; status: number; error: string }
  | { kind: 'error_mid_stream'; after: number; error: string }
  | { kind: 'cut'; after: number }
  | { kind: 'reset'; after: number }
  | { kind: 'hang' }
  | { kind: 'stall'; after: number }
  | { kind: 'malformed'; after: number }
  | { kind: 'huge'; bytes: number };

export interface FakeChunk {
  content?: string;
  thinking?: string;
  tool_calls?: Array<{ function: { name: string; arguments: Record<string, unknown> } }>;
}

export interface RecordedRequest {
  path: string;
  method: string;
  /** Parsed JSON body, or the raw string if it is not JSON (undefined for an empty body). */
  body: any;
  /** load = POST /api/chat whose messages is [] or absent, or POST /api/embed whose input is []. */
  kind: 'load' | 'chat' | 'embed' | 'other';
  /** True if the client closed the connection before the fake finished the response. */
  aborted: boolean;
  receivedAt: number;
}

export interface FakeOllamaOptions {
  /** Installed models; default ['llama3.2', 'qwen3']. 'llama3.2' also matches 'llama3.2:latest'. */
  models?: string[];
  /** How long a load (messages: []) blocks before answering; default 0. */
  loadDelayMs?: number;
  /** Default delay between streamed lines; default 0. */
  defaultChunkDelayMs?: number;
  /**
   * Residency, as a GPU host has it: at most this many models loaded at once (default: no limit).
   * A request for a model that is not loaded first takes `swapMs` and evicts the least recently
   * used one; a loaded model answers a load at once.
   */
  maxResident?: number;
  /** With `maxResident`: how long loading a model that is not resident takes. */
  swapMs?: number;
  /** false: `/api/tags` lists nothing (as some Ollama-compatible servers do), though `models` are served. */
  listModels?: boolean;
  /** false: `/api/ps` lists nothing (as some Ollama-compatible servers do), though models load. */
  listLoaded?: boolean;
}

/** What the fake saw of its own load: swaps, and requests in flight at once. */
export interface FakeStats {
  /** Loads of a model that was not resident (with `maxResident`). */
  swaps: number;
  /** Chat requests (loads and generations) in flight at once, at most. */
  maxConcurrent: number;
  /** Generations with the same last user text in flight at once (a job run twice at the same time). */
  overlapping: number;
}

export interface FakeOllama {
  url: string;
  port: number;
  requests: RecordedRequest[];
  /** Behaviour for the next chat (non-load) requests, consumed FIFO one per request; when the queue is empty, 'ok' with default chunks. */
  enqueue(...b: FakeBehaviour[]): void;
  /** Behaviour used for every load request (messages: []) while set; null = normal load answer. Sticky until changed. */
  setLoadBehaviour(b: FakeBehaviour | null): void;
  setLoadDelay(ms: number): void;
  /** Stop accepting connections: subsequent requests get ECONNREFUSED. Open sockets are destroyed. */
  stop(): Promise<void>;
  /** Listen again on the same port after stop(). */
  start(): Promise<void>;
  /** Close everything, destroy open sockets. */
  close(): Promise<void>;
  stats: FakeStats;
  /** Loaded models, least recently used first. */
  resident(): string[];
  /** Resolves when `n` requests matching pred (default: any) have been recorded. */
  waitForRequests(n: number, pred?: (r: RecordedRequest) => boolean, timeoutMs?: number): Promise<RecordedRequest[]>;
}

// ---------------------------------------------------------------------------
// constants and helpers

const VERSION = '0.33.0';
const JSON_CT = 'application/json; charset=utf-8';
const NDJSON_CT = 'application/x-ndjson';

/** Deterministic metrics for the final (done:true) line; eval_count is filled per response. */
const METRICS = {
  total_duration: 182242375,
  load_duration: 41295167,
  prompt_eval_count: 169,
  prompt_eval_duration: 24573166,
} as const;
const EVAL_DURATION = 115959084;

const MALFORMED_LINE = '{"message":{"con';

/** Vector length of the fake's embeddings unless `dimensions` asks for another. */
export const EMBED_DIMS = 8;

/**
 * The fake's embedding of `text`: `dims` values k/256 (k in −256…255, exactly representable as
 * float32), from a hash of the text and the position. Tests compute the expected vectors with it.
 */
export function fakeEmbedding(text: string, dims = EMBED_DIMS): number[] {
  const h = hashHex(text);
  return Array.from({ length: dims }, (_, i) => {
    const k = parseInt(h.slice((i * 3) % 60, ((i * 3) % 60) + 3), 16) % 512;
    return (k - 256) / 256;
  });
}
const HUGE_PIECE = 4096;

/**
 * The default chunks the fake streams for a chat whose last user message has
 * content `text`: thinking "Let me think." as ["Let ", "me ", "think."], then
 * "echo: " + text split on spaces keeping the spaces.
 */
export function defaultChunks(lastUserText: string): FakeChunk[] {
  const thinking = ['Let ', 'me ', 'think.'].map((t): FakeChunk => ({ thinking: t }));
  const content = ('echo: ' + lastUserText)
    .split(/(?<= )/)
    .filter((s) => s.length > 0)
    .map((c): FakeChunk => ({ content: c }));
  return [...thinking, ...content];
}

/** 'llama3.2' -> 'llama3.2:latest'; names with a tag are kept as they are. */
function normalizeModel(name: string): string {
  const slash = name.lastIndexOf('/');
  const tail = name.slice(slash + 1);
  return tail.includes(':') ? name : `${name}:latest`;
}

function hashHex(s: string): string {
  // Small deterministic 64-hex-digit digest (FNV-1a variants); not cryptographic.
  let out = '';
  for (let seed = 0; seed < 8; seed++) {
    let h = (0x811c9dc5 ^ (seed * 0x9e3779b1)) >>> 0;
    for (let i = 0; i < s.length; i++) {
      h ^= s.charCodeAt(i);
      h = Math.imul(h, 0x01000193) >>> 0;
    }
    out += h.toString(16).padStart(8, '0');
  }
  return out;
}

function modelSize(name: string): number {
  return 1_000_000_000 + (parseInt(hashHex(name).slice(0, 6), 16) % 1_000_000) * 1000;
}

function modelDetails(name: string): Record<string, unknown> {
  const family = name.split(/[:/]/)[0]?.replace(/[0-9.]+$/, '') || 'llama';
  return {
    parent_model: '',
    format: 'gguf',
    family,
    families: [family],
    parameter_size: '3.2B',
    quantization_level: 'Q4_K_M',
  };
}

function lastUserText(body: any): string {
  const messages: unknown = body?.messages;
  if (!Array.isArray(messages)) return '';
  for (let i = messages.length - 1; i >= 0; i--) {
    const m = messages[i] as { role?: unknown; content?: unknown } | null;
    if (m && m.role === 'user') return typeof m.content === 'string' ? m.content : '';
  }
  return '';
}

/** Take the first `after` chunks of `base`, padding with filler content chunks if base is too short. */
function firstChunks(base: FakeChunk[], after: number): FakeChunk[] {
  const n = Math.max(0, Math.floor(after));
  const out = base.slice(0, n);
  for (let i = out.length; i < n; i++) out.push({ content: `more${i} ` });
  return out;
}

function hugeChunks(bytes: number): FakeChunk[] {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789 ';
  const piece = alphabet.repeat(Math.ceil(HUGE_PIECE / alphabet.length)).slice(0, HUGE_PIECE);
  const out: FakeChunk[] = [];
  let left = Math.max(0, Math.floor(bytes));
  while (left > 0) {
    const n = Math.min(left, HUGE_PIECE);
    out.push({ content: n === HUGE_PIECE ? piece : piece.slice(0, n) });
    left -= n;
  }
  return out;
}

function chunkMessage(c: FakeChunk): Record<string, unknown> {
  const message: Record<string, unknown> = { role: 'assistant', content: c.content ?? '' };
  if (c.thinking !== undefined) message.thinking = c.thinking;
  if (c.tool_calls !== undefined) message.tool_calls = c.tool_calls;
  return message;
}

function mergedMessage(chunks: FakeChunk[]): Record<string, unknown> {
  const content = chunks.map((c) => c.content ?? '').join('');
  const thinking = chunks.map((c) => c.thinking ?? '').join('');
  const toolCalls = chunks.flatMap((c) => c.tool_calls ?? []);
  const message: Record<string, unknown> = { role: 'assistant', content };
  if (thinking.length > 0) message.thinking = thinking;
  if (toolCalls.length > 0) message.tool_calls = toolCalls;
  return message;
}

function finalLine(model: string, evalCount: number): Record<string, unknown> {
  return {
    model,
    created_at: new Date().toISOString(),
    message: { role: 'assistant', content: '' },
    done: true,
    done_reason: 'stop',
    ...METRICS,
    eval_count: evalCount,
    eval_duration: EVAL_DURATION,
  };
}

// ---------------------------------------------------------------------------
// per-request state

interface ReqState {
  req: IncomingMessage;
  res: ServerResponse;
  /** Set once the response (or its connection) has closed, for whatever reason. */
  closed: boolean;
  /** The fake itself destroyed the connection (reset / stop / close): not a client abort. */
  killedByServer: boolean;
  /** Resolves when `closed` becomes true. */
  closedPromise: Promise<void>;
  record?: RecordedRequest;
}

function sleep(ms: number, st: ReqState): Promise<void> {
  if (ms <= 0 || st.closed) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const t = setTimeout(resolve, ms);
    void st.closedPromise.then(() => {
      clearTimeout(t);
      resolve();
    });
  });
}

/** Write one NDJSON line; waits for drain under backpressure. Returns false if the response is gone. */
async function writeLine(st: ReqState, obj: unknown): Promise<boolean> {
  return writeRaw(st, JSON.stringify(obj) + '\n');
}

async function writeRaw(st: ReqState, text: string): Promise<boolean> {
  if (st.closed || st.res.destroyed) return false;
  const ok = st.res.write(text);
  if (!ok) {
    await new Promise<void>((resolve) => {
      const done = (): void => {
        st.res.off('drain', done);
        resolve();
      };
      st.res.on('drain', done);
      void st.closedPromise.then(done);
    });
  }
  return !st.closed && !st.res.destroyed;
}

/** Resolves once everything written so far has been handed to the kernel. */
function flushed(st: ReqState): Promise<void> {
  // Nothing to flush before the headers; writing here would send an implicit 200.
  if (st.closed || st.res.destroyed || !st.res.headersSent) return Promise.resolve();
  return new Promise<void>((resolve) => {
    st.res.write('', () => resolve());
    void st.closedPromise.then(() => resolve());
  });
}

function sendJson(st: ReqState, status: number, obj: unknown): void {
  if (st.closed || st.res.headersSent) return;
  const body = JSON.stringify(obj);
  st.res.writeHead(status, { 'Content-Type': JSON_CT, 'Content-Length': Buffer.byteLength(body) });
  st.res.end(body);
}

function sendText(st: ReqState, status: number, text: string, headOnly = false): void {
  if (st.closed || st.res.headersSent) return;
  st.res.writeHead(status, { 'Content-Type': 'text/plain; charset=utf-8', 'Content-Length': Buffer.byteLength(text) });
  st.res.end(headOnly ? undefined : text);
}

// ---------------------------------------------------------------------------
// the server

export async function startFakeOllama(opts: FakeOllamaOptions = {}): Promise<FakeOllama> {
  const installed = new Map<string, string>(); // normalized name -> normalized name
  for (const m of opts.models ?? ['llama3.2', 'qwen3']) installed.set(normalizeModel(m), normalizeModel(m));
  const modifiedAt = new Date('2026-07-01T12:00:00.000Z').toISOString();

  let loadDelayMs = opts.loadDelayMs ?? 0;
  const defaultChunkDelayMs = opts.defaultChunkDelayMs ?? 0;
  let loadBehaviour: FakeBehaviour | null = null;
  const queue: FakeBehaviour[] = [];
  const loaded = new Map<string, number>(); // normalized name -> loaded at (ms)
  const requests: RecordedRequest[] = [];
  const changes = new EventEmitter();
  changes.setMaxListeners(0);
  const sockets = new Set<Socket>();
  const active = new Set<ReqState>();
  let closedForGood = false;

  const notify = (): void => {
    changes.emit('change');
  };

  const markLoaded = (model: string): void => {
    const m = normalizeModel(model);
    loaded.delete(m); // re-inserted: the Map's order is least recently used first
    loaded.set(m, Date.now());
  };
  const stats: FakeStats = { swaps: 0, maxConcurrent: 0, overlapping: 0 };
  let inFlight = 0;
  /** Same last-user-text generations in flight (a job run twice at once would show here). */
  const generating = new Map<string, number>();

  /** With maxResident: a model that is not loaded is loaded first (swapMs), evicting the LRU one. */
  async function ensureResident(model: string, st: ReqState): Promise<void> {
    if (opts.maxResident === undefined) return;
    const m = normalizeModel(model);
    if (loaded.has(m)) {
      markLoaded(m);
      return;
    }
    stats.swaps++;
    await sleep(opts.swapMs ?? 0, st);
    while (loaded.size >= opts.maxResident) loaded.delete(loaded.keys().next().value as string);
    markLoaded(m);
  }

  // ---- /api/chat

  /** Run a scripted behaviour. `base` are the chunks a normal stream would carry. */
  async function runBehaviour(
    st: ReqState,
    b: FakeBehaviour,
    model: string,
    base: FakeChunk[],
    stream: boolean,
    onOk: () => void,
  ): Promise<void> {
    const { res } = st;
    switch (b.kind) {
      case 'http_error':
        sendJson(st, b.status, { error: b.error });
        return;

      case 'hang':
        // Not a single byte, not even headers, until the client goes away.
        await st.closedPromise;
        return;

      case 'ok':
      case 'huge': {
        const chunks = b.kind === 'ok' ? (b.chunks ?? base) : hugeChunks(b.bytes);
        const delay = b.kind === 'ok' ? (b.chunkDelayMs ?? defaultChunkDelayMs) : defaultChunkDelayMs;
        if (b.kind === 'ok') await sleep(b.firstByteDelayMs ?? 0, st);
        const gate = b.kind === 'ok' ? b.gate : undefined;
        const gateAt = gate && b.kind === 'ok' ? (b.gateAt ?? 0) : -1;
        if (gate && gateAt === 0) await Promise.race([gate, st.closedPromise]);
        if (st.closed) return;
        onOk();
        if (!stream) {
          const final = finalLine(model, chunks.length);
          final.message = mergedMessage(chunks);
          sendJson(st, 200, final);
          return;
        }
        res.writeHead(200, { 'Content-Type': NDJSON_CT });
        res.flushHeaders();
        for (let i = 0; i < chunks.length; i++) {
          if (i > 0) await sleep(delay, st);
          if (gate && i > 0 && i === gateAt) await Promise.race([gate, st.closedPromise]);
          if (st.closed) return;
          const chunk = chunks[i] as FakeChunk;
          const line = { model, created_at: new Date().toISOString(), message: chunkMessage(chunk), done: false };
          if (!(await writeLine(st, line))) return;
        }
        if (chunks.length > 0) await sleep(delay, st);
        if (!(await writeLine(st, finalLine(model, chunks.length)))) return;
        res.end();
        return;
      }

      case 'error_mid_stream':
      case 'cut':
      case 'reset':
      case 'stall':
      case 'malformed': {
        const chunks = firstChunks(base, b.after);
        if (!stream && b.kind !== 'reset' && b.kind !== 'stall') {
          // Ollama never streams with stream:false; approximate each failure.
          if (b.kind === 'error_mid_stream') {
            sendJson(st, 500, { error: b.error });
          } else if (b.kind === 'cut') {
            res.writeHead(200, { 'Content-Type': JSON_CT });
            res.end();
          } else {
            res.writeHead(200, { 'Content-Type': JSON_CT });
            res.end(MALFORMED_LINE);
          }
          return;
        }
        if (b.kind !== 'reset') onOk();
        if (!stream && b.kind === 'stall') {
          res.writeHead(200, { 'Content-Type': JSON_CT });
          res.flushHeaders();
          await st.closedPromise;
          return;
        }
        if (stream) {
          res.writeHead(200, { 'Content-Type': NDJSON_CT });
          res.flushHeaders();
          for (let i = 0; i < chunks.length; i++) {
            if (i > 0) await sleep(defaultChunkDelayMs, st);
            const chunk = chunks[i] as FakeChunk;
            const line = { model, created_at: new Date().toISOString(), message: chunkMessage(chunk), done: false };
            if (!(await writeLine(st, line))) return;
          }
        }
        switch (b.kind) {
          case 'error_mid_stream':
            if (await writeLine(st, { error: b.error })) res.end();
            return;
          case 'cut':
            res.end();
            return;
          case 'malformed':
            if (await writeRaw(st, MALFORMED_LINE + '\n')) res.end();
            return;
          case 'stall':
            await st.closedPromise;
            return;
          case 'reset': {
            // Let the client actually read the bytes written so far, then RST the connection.
            await flushed(st);
            await sleep(30, st);
            if (st.closed) return;
            st.killedByServer = true;
            const sock = st.req.socket;
            if (typeof sock.resetAndDestroy === 'function') sock.resetAndDestroy();
            else sock.destroy();
            return;
          }
        }
        return;
      }
    }
  }

  async function handleChat(st: ReqState, body: any): Promise<void> {
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
      sendJson(st, 400, { error: 'missing request body' });
      return;
    }
    if (typeof body.model !== 'string' || body.model === '') {
      sendJson(st, 400, { error: 'model is required' });
      return;
    }
    const model: string = body.model;
    if (!installed.has(normalizeModel(model))) {
      sendJson(st, 404, { error: `model '${model}' not found` });
      return;
    }
    const isLoad = body.messages === undefined || (Array.isArray(body.messages) && body.messages.length === 0);
    const stream = body.stream !== false;
    inFlight++;
    stats.maxConcurrent = Math.max(stats.maxConcurrent, inFlight);
    void st.closedPromise.then(() => inFlight--);
    const unloading = body.keep_alive === 0 || body.keep_alive === '0' || body.keep_alive === '0s';
    if (!unloading) await ensureResident(model, st);
    if (st.closed) return;
    if (!isLoad) {
      const key = lastUserText(body);
      const n = (generating.get(key) ?? 0) + 1;
      generating.set(key, n);
      if (n > 1) stats.overlapping++;
      void st.closedPromise.then(() => {
        const left = (generating.get(key) ?? 1) - 1;
        if (left <= 0) generating.delete(key);
        else generating.set(key, left);
      });
    }

    if (isLoad) {
      const unload = unloading;
      await sleep(loadDelayMs, st);
      if (st.closed) return;
      const answer = (): void => {
        if (unload) loaded.delete(normalizeModel(model));
        else markLoaded(model);
        sendJson(st, 200, {
          model,
          created_at: new Date().toISOString(),
          message: { role: 'assistant', content: '' },
          done: true,
          done_reason: unload ? 'unload' : 'load',
        });
      };
      const b = loadBehaviour;
      if (b === null) {
        answer();
        return;
      }
      if (b.kind === 'ok') {
        await sleep(b.firstByteDelayMs ?? 0, st);
        if (!st.closed) answer();
        return;
      }
      // A load never streams, so failure behaviours take their stream:false form here:
      // reset = connection reset before any byte, stall = headers then silence,
      // error_mid_stream = 500 JSON error, cut = 200 with an empty body, malformed = 200 with truncated JSON.
      await runBehaviour(st, b, model, [], false, () => markLoaded(model));
      return;
    }

    const b: FakeBehaviour = queue.shift() ?? { kind: 'ok' };
    await runBehaviour(st, b, model, defaultChunks(lastUserText(body)), stream, () => markLoaded(model));
  }

  // ---- /api/embed (Ollama's embedding endpoint: {model, input, truncate?, dimensions?, keep_alive?, options?})

  async function handleEmbed(st: ReqState, body: any): Promise<void> {
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
      sendJson(st, 400, { error: 'missing request body' });
      return;
    }
    if (typeof body.model !== 'string' || body.model === '') {
      sendJson(st, 400, { error: 'model is required' });
      return;
    }
    const model: string = body.model;
    if (!installed.has(normalizeModel(model))) {
      sendJson(st, 404, { error: `model '${model}' not found` });
      return;
    }
    const raw = body.input;
    let inputs: string[];
    if (raw === undefined || raw === null) inputs = [];
    else if (typeof raw === 'string') inputs = raw === '' ? [] : [raw];
    else if (Array.isArray(raw) && raw.every((x: unknown) => typeof x === 'string')) inputs = raw as string[];
    else {
      sendJson(st, 400, { error: 'invalid input type' });
      return;
    }
    if (inputs.length === 0) {
      // Loads the model and answers with no vectors.
      await sleep(loadDelayMs, st);
      if (st.closed) return;
      markLoaded(model);
      sendJson(st, 200, { model, embeddings: [] });
      return;
    }
    const b = queue.shift() ?? { kind: 'ok' };
    if (b.kind === 'http_error') {
      sendJson(st, b.status, { error: b.error });
      return;
    }
    if (b.kind === 'hang') {
      await st.closedPromise;
      return;
    }
    if (b.kind === 'ok') await sleep(b.firstByteDelayMs ?? 0, st);
    if (st.closed) return;
    markLoaded(model);
    const dims = typeof body.dimensions === 'number' ? body.dimensions : EMBED_DIMS;
    sendJson(st, 200, {
      model,
      embeddings: inputs.map((t) => fakeEmbedding(t, dims)),
      total_duration: METRICS.total_duration,
      load_duration: METRICS.load_duration,
      prompt_eval_count: inputs.reduce((n, t) => n + t.split(/\s+/).filter(Boolean).length, 0),
    });
  }

  // ---- other endpoints

  function handleOther(st: ReqState, method: string, path: string): void {
    const get = method === 'GET' || method === 'HEAD';
    if (path === '/' && get) {
      sendText(st, 200, 'Ollama is running', method === 'HEAD');
      return;
    }
    if (path === '/api/version' && get) {
      sendJson(st, 200, { version: VERSION });
      return;
    }
    if (path === '/api/tags' && get) {
      sendJson(st, 200, {
        models: [...(opts.listModels === false ? [] : installed.keys())].map((name) => ({
          name,
          model: name,
          modified_at: modifiedAt,
          size: modelSize(name),
          digest: hashHex(name),
          details: modelDetails(name),
        })),
      });
      return;
    }
    if (path === '/api/ps' && get) {
      sendJson(st, 200, {
        models: [...(opts.listLoaded === false ? [] : loaded.entries())].map(([name, at]) => ({
          name,
          model: name,
          size: modelSize(name),
          digest: hashHex(name),
          details: modelDetails(name),
          expires_at: new Date(at + 5 * 60_000).toISOString(),
          size_vram: modelSize(name),
          context_length: 4096,
        })),
      });
      return;
    }
    if (path === '/api/chat' || path === '/api/embed') {
      sendJson(st, 405, { error: 'method not allowed' });
      return;
    }
    sendText(st, 404, '404 page not found');
  }

  // ---- request plumbing

  const server: Server = createServer((req, res) => {
    let resolveClosed!: () => void;
    const st: ReqState = {
      req,
      res,
      closed: false,
      killedByServer: false,
      closedPromise: new Promise<void>((r) => {
        resolveClosed = r;
      }),
    };
    active.add(st);
    const method = req.method ?? 'GET';
    const path = (req.url ?? '/').split('?')[0] ?? '/';
    const receivedAt = Date.now();
    const parts: Buffer[] = [];

    const record = (rawBody: string, aborted: boolean): RecordedRequest => {
      let body: any = undefined;
      if (rawBody.length > 0) {
        try {
          body = JSON.parse(rawBody);
        } catch {
          body = rawBody;
        }
      }
      const isChat = method === 'POST' && path === '/api/chat';
      const isEmbed = method === 'POST' && path === '/api/embed';
      const isObject = body !== null && typeof body === 'object' && !Array.isArray(body);
      const isLoad =
        (isChat && isObject && (body.messages === undefined || (Array.isArray(body.messages) && body.messages.length === 0))) ||
        (isEmbed && isObject && (body.input === undefined || (Array.isArray(body.input) && body.input.length === 0)));
      const r: RecordedRequest = {
        path,
        method,
        body,
        kind: isLoad ? 'load' : isChat ? 'chat' : isEmbed ? 'embed' : 'other',
        aborted,
        receivedAt,
      };
      st.record = r;
      requests.push(r);
      notify();
      return r;
    };

    res.on('close', () => {
      st.closed = true;
      active.delete(st);
      resolveClosed();
      const clientGone = !res.writableFinished && !st.killedByServer;
      if (st.record === undefined) {
        // The client left before its body was fully read; record what we have.
        record(Buffer.concat(parts).toString('utf8'), clientGone);
      } else if (clientGone && !st.record.aborted) {
        st.record.aborted = true;
        notify();
      }
    });

    req.on('data', (d: Buffer) => parts.push(d));
    req.on('error', () => {
      /* handled through res 'close' */
    });
    req.on('end', () => {
      const raw = Buffer.concat(parts).toString('utf8');
      const r = record(raw, false);
      const work =
        method === 'POST' && path === '/api/chat'
          ? handleChat(st, typeof r.body === 'string' ? undefined : r.body)
          : method === 'POST' && path === '/api/embed'
            ? handleEmbed(st, typeof r.body === 'string' ? undefined : r.body)
            : Promise.resolve(handleOther(st, method, path));
      work.catch((err: unknown) => {
        if (!st.closed && !res.headersSent) sendJson(st, 500, { error: String(err) });
        else if (!st.closed) res.destroy();
      });
    });
  });

  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });

  const listen = async (port: number): Promise<void> => {
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => {
        server.off('listening', onListening);
        reject(err);
      };
      const onListening = (): void => {
        server.off('error', onError);
        resolve();
      };
      server.once('error', onError);
      server.once('listening', onListening);
      server.listen(port, '127.0.0.1');
    });
  };

  await listen(0);
  const address = server.address();
  if (address === null || typeof address === 'string') throw new Error('fake-ollama: unexpected server address');
  const port = address.port;

  const shutDown = async (): Promise<void> => {
    const closed = server.listening
      ? new Promise<void>((resolve) => server.close(() => resolve()))
      : Promise.resolve();
    for (const st of active) st.killedByServer = true;
    for (const s of sockets) s.destroy();
    await closed;
  };

  const fake: FakeOllama = {
    url: `http://127.0.0.1:${port}`,
    port,
    requests,
    stats,
    resident: () => [...loaded.keys()],
    enqueue(...b: FakeBehaviour[]): void {
      queue.push(...b);
    },
    setLoadBehaviour(b: FakeBehaviour | null): void {
      loadBehaviour = b;
    },
    setLoadDelay(ms: number): void {
      loadDelayMs = ms;
    },
    async stop(): Promise<void> {
      await shutDown();
    },
    async start(): Promise<void> {
      if (closedForGood) throw new Error('fake-ollama: start() after close()');
      if (server.listening) return;
      await listen(port);
    },
    async close(): Promise<void> {
      closedForGood = true;
      await shutDown();
    },
    waitForRequests(
      n: number,
      pred: (r: RecordedRequest) => boolean = () => true,
      timeoutMs = 5000,
    ): Promise<RecordedRequest[]> {
      return new Promise<RecordedRequest[]>((resolve, reject) => {
        let timer: ReturnType<typeof setTimeout> | undefined;
        const check = (): boolean => {
          const matching = requests.filter(pred);
          if (matching.length < n) return false;
          if (timer !== undefined) clearTimeout(timer);
          changes.off('change', check);
          resolve(matching);
          return true;
        };
        if (check()) return;
        timer = setTimeout(() => {
          changes.off('change', check);
          const have = requests.filter(pred).length;
          reject(
            new Error(
              `fake-ollama: waited ${timeoutMs}ms for ${n} matching requests, have ${have} (of ${requests.length} total)`,
            ),
          );
        }, timeoutMs);
        changes.on('change', check);
      });
    },
  };
  return fake;
}
