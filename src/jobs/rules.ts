import { createHash } from 'node:crypto';
import { parseDuration } from '../config.js';
import { Validation } from '../errors.js';

/** Fields passed through to the engine unchanged. `stream` is accepted but a job always streams. */
export const ENGINE_FIELDS = ['model', 'messages', 'format', 'options', 'tools', 'keep_alive', 'think'] as const;

/** An embed job's fields, passed to Ollama's /api/embed unchanged (ADR-0015). */
export const EMBED_FIELDS = ['model', 'input', 'truncate', 'dimensions', 'options', 'keep_alive'] as const;

/** How deeply a request's JSON may nest (Ollama's own payloads need a handful of levels). */
export const MAX_JSON_DEPTH = 64;

/** A deadline further ahead than this is refused (it would also overflow a Date). */
export const MAX_DEADLINE_MS = 366 * 86_400_000;

/** Checks a webhook URL: absolute http(s), no credentials. Returns the normalised URL. */
export function checkWebhookUrl(raw: string): string {
  const bad = (why: string) => new Validation(`state_webhook_url ${why}`, 'state_webhook_url');
  let u: URL;
  try {
    u = new URL(raw);
  } catch {
    throw bad('is not an absolute URL');
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw bad('must be an http or https URL');
  if (u.username !== '' || u.password !== '') throw bad('must not carry credentials');
  if (u.hostname === '') throw bad('has no host');
  return u.href;
}

/** Returns the top-level field holding JSON nested deeper than `limit`, or null. Iterative: no recursion. */
export function tooDeep(value: Record<string, unknown>, limit: number): string | null {
  for (const [field, v] of Object.entries(value)) {
    const stack: [unknown, number][] = [[v, 1]];
    while (stack.length > 0) {
      const [x, d] = stack.pop()!;
      if (x === null || typeof x !== 'object') continue;
      if (d > limit) return field;
      for (const child of Object.values(x)) if (child !== null && typeof child === 'object') stack.push([child, d + 1]);
    }
  }
  return null;
}

/** `deadline`: an ISO-8601 time, or a duration from now; in the future and at most a year ahead. */
export function parseDeadline(raw: string, now: number): number {
  const d = parseDuration(raw);
  let at: number | undefined;
  if (d !== undefined) at = now + d;
  else if (/^\d{4}-\d{2}-\d{2}T/.test(raw)) {
    const t = Date.parse(raw);
    if (!Number.isNaN(t)) at = t;
  }
  if (at === undefined) throw new Validation('deadline must be an ISO-8601 time or a duration such as 10m', 'deadline');
  if (at <= now) throw new Validation('deadline is in the past', 'deadline');
  if (at - now > MAX_DEADLINE_MS) throw new Validation('deadline must be at most a year ahead', 'deadline');
  return at;
}

/** JSON with object keys sorted, so equal bodies hash equally whatever their key order. */
function canonical(v: unknown): string {
  if (v === null || typeof v !== 'object') return JSON.stringify(v);
  if (Array.isArray(v)) return `[${v.map(canonical).join(',')}]`;
  const o = v as Record<string, unknown>;
  return `{${Object.keys(o)
    .sort()
    .filter((k) => o[k] !== undefined)
    .map((k) => `${JSON.stringify(k)}:${canonical(o[k])}`)
    .join(',')}}`;
}

export function bodyHash(body: unknown): string {
  return createHash('sha256').update(canonical(body)).digest('hex');
}

/** Opaque list cursors: the last seq of the previous page. */
export function encodeCursor(seq: number): string {
  return Buffer.from(`v1:${seq}`).toString('base64url');
}

export function decodeCursor(cursor: string): number {
  const m = /^v1:(\d{1,15})$/.exec(Buffer.from(cursor, 'base64url').toString('utf8'));
  if (!m) throw new Validation('cursor is not one this service handed out', 'cursor', 'invalid_cursor');
  return Number(m[1]);
}
