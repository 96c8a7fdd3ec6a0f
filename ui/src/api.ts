/**
 * Every request the page makes goes through `apiFetch`: it adds `Authorization: Bearer <key>` when
 * a key is stored in sessionStorage, and on a 401 asks for a key once (concurrent requests share
 * the one prompt), stores it and retries. Server-Sent Events use the same path (fetch streaming
 * and eventsource-parser), since the browser's EventSource cannot send headers.
 */
import { createParser, type EventSourceMessage } from 'eventsource-parser';

const KEY_STORAGE = 'foreman.apiKey';

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

export function storedKey(): string | null {
  try {
    return sessionStorage.getItem(KEY_STORAGE);
  } catch {
    return null;
  }
}

export function storeKey(key: string | null): void {
  try {
    if (key === null) sessionStorage.removeItem(KEY_STORAGE);
    else sessionStorage.setItem(KEY_STORAGE, key);
  } catch {
    /* storage disabled: the key lives for this request only */
  }
  notify();
}

/** Shows the key prompt; resolves with the key typed, or null when dismissed. */
export type KeyPrompt = (reason: 'missing' | 'rejected') => Promise<string | null>;

let prompt: KeyPrompt | null = null;
let pending: Promise<string | null> | null = null;
/** The prompt was dismissed: do not ask again on every poll, only when the user asks. */
let declined = false;
/** The last answer was a 401 that no key fixed. */
let unauthorized = false;
const listeners = new Set<() => void>();

function notify(): void {
  for (const l of listeners) l();
}

export function onKeyNeeded(fn: KeyPrompt): void {
  prompt = fn;
}

/** Auth state for the header: whether a key is stored, and whether the server refused us. */
export function authState(): { hasKey: boolean; unauthorized: boolean } {
  return { hasKey: storedKey() !== null, unauthorized };
}

export function subscribeAuth(fn: () => void): () => void {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

function askForKey(reason: 'missing' | 'rejected'): Promise<string | null> {
  if (!prompt || declined) return Promise.resolve(null);
  pending ??= prompt(reason)
    .then((key) => {
      if (key) {
        storeKey(key);
      } else {
        declined = true;
        if (reason === 'rejected') storeKey(null);
      }
      return key || null;
    })
    .finally(() => {
      pending = null;
    });
  return pending;
}

/** Opens the key prompt on request (the header's key button), even after a dismissal. */
export async function changeKey(): Promise<void> {
  declined = false;
  await askForKey(storedKey() === null ? 'missing' : 'rejected');
}

function withKey(init: RequestInit, key: string | null): RequestInit {
  const headers = new Headers(init.headers);
  if (key !== null) headers.set('authorization', `Bearer ${key}`);
  return { ...init, headers };
}

export async function apiFetch(path: string, init: RequestInit = {}): Promise<Response> {
  const sent = storedKey();
  const res = await fetch(path, withKey(init, sent));
  if (res.status !== 401) return settle(res);
  // Another request may have got a new key meanwhile: use it; otherwise ask (one prompt for all).
  let key = storedKey();
  if (key === sent) key = await askForKey(sent === null ? 'missing' : 'rejected');
  if (key === null || key === sent) return settle(res);
  return settle(await fetch(path, withKey(init, key)));
}

function settle(res: Response): Response {
  const was = unauthorized;
  unauthorized = res.status === 401;
  if (was !== unauthorized) notify();
  return res;
}

async function errorFrom(res: Response): Promise<ApiError> {
  let code = 'http_error';
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = (await res.json()) as { code?: unknown; message?: unknown; error?: unknown };
    if (typeof body.code === 'string') code = body.code;
    if (typeof body.message === 'string') message = body.message;
    else if (typeof body.error === 'string') message = body.error;
  } catch {
    /* not JSON */
  }
  return new ApiError(res.status, code, message);
}

export async function getJson<T>(path: string, signal?: AbortSignal): Promise<T> {
  const res = await apiFetch(path, signal ? { signal } : {});
  if (!res.ok) throw await errorFrom(res);
  return (await res.json()) as T;
}

export async function getText(path: string, signal?: AbortSignal): Promise<string> {
  const res = await apiFetch(path, signal ? { signal } : {});
  if (!res.ok) throw await errorFrom(res);
  return res.text();
}

export async function postJson<T>(path: string): Promise<T> {
  const res = await apiFetch(path, { method: 'POST' });
  if (!res.ok) throw await errorFrom(res);
  return (await res.json()) as T;
}

/** Downloads a protected file (an artifact) with the key, and hands it to the browser. */
export async function download(path: string, name: string): Promise<void> {
  const res = await apiFetch(path);
  if (!res.ok) throw await errorFrom(res);
  const url = URL.createObjectURL(await res.blob());
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  a.click();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/**
 * Reads one Server-Sent Events stream until the server ends it. Throws on an HTTP error or a
 * dropped connection; the caller reconnects with the last `id` it saw (Last-Event-ID).
 */
export async function readSse(
  path: string,
  opts: { lastEventId?: string; signal: AbortSignal; onEvent: (m: EventSourceMessage) => void },
): Promise<void> {
  const headers: Record<string, string> = { accept: 'text/event-stream' };
  if (opts.lastEventId) headers['last-event-id'] = opts.lastEventId;
  const res = await apiFetch(path, { headers, signal: opts.signal });
  if (!res.ok || !res.body) throw await errorFrom(res);
  const parser = createParser({ onEvent: opts.onEvent });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      parser.feed(value);
    }
  } finally {
    reader.releaseLock();
  }
}
