import { Type, type Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import path from 'node:path';

/** Parses `250ms`, `10s`, `5m`, `2h`, `7d` (or a bare number of milliseconds) into milliseconds. */
export function parseDuration(text: string): number | undefined {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/.exec(text);
  if (!m) return undefined;
  const n = Number(m[1]);
  const unit = m[2] ?? 'ms';
  const factor = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 }[unit as 'ms'];
  const ms = Math.round(n * factor);
  return Number.isFinite(ms) ? ms : undefined;
}

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const;

/**
 * Every setting, with its default and meaning. This table is the single source for parsing
 * and for the error messages; README.md documents the same variables.
 */
type Kind =
  | { kind: 'string' }
  | { kind: 'url' }
  | { kind: 'int'; min: number; max: number }
  | { kind: 'duration'; min: number }
  | { kind: 'bool' }
  | { kind: 'enum'; values: readonly string[] };

interface Spec {
  env: string;
  key: keyof Config;
  def: string | undefined;
  type: Kind;
}

export const ConfigSchema = Type.Object({
  host: Type.String({ minLength: 1 }),
  port: Type.Integer({ minimum: 0, maximum: 65535 }),
  dataDir: Type.String({ minLength: 1 }),
  publicUrl: Type.String(),
  ollamaUrl: Type.String({ minLength: 1 }),
  concurrency: Type.Integer({ minimum: 1 }),
  jobMaxAttempts: Type.Integer({ minimum: 1 }),
  jobRetryBaseMs: Type.Integer({ minimum: 0 }),
  engineIdleTimeoutMs: Type.Integer({ minimum: 1 }),
  jobTtlMs: Type.Integer({ minimum: 1 }),
  maxBodyBytes: Type.Integer({ minimum: 1024 }),
  logLevel: Type.Union(LOG_LEVELS.map((l) => Type.Literal(l))),
  jobLeaseMs: Type.Integer({ minimum: 100 }),
  pollIntervalMs: Type.Integer({ minimum: 1 }),
  sweepIntervalMs: Type.Integer({ minimum: 1 }),
  shutdownGraceMs: Type.Integer({ minimum: 0 }),
  maxQueued: Type.Integer({ minimum: 1 }),
  webhookSecrets: Type.Array(Type.String({ minLength: 1 })),
  webhookConcurrency: Type.Integer({ minimum: 1 }),
  webhookTimeoutMs: Type.Integer({ minimum: 1 }),
  webhookBackoffBaseMs: Type.Integer({ minimum: 0 }),
  webhookBackoffMaxMs: Type.Integer({ minimum: 0 }),
  webhookMaxAttempts: Type.Integer({ minimum: 1 }),
  webhookBlockPrivate: Type.Boolean(),
  inlineArtifactMaxBytes: Type.Integer({ minimum: 0 }),
  engineMaxResponseBytes: Type.Integer({ minimum: 1024 }),
  engineOutageTimeoutMs: Type.Integer({ minimum: 1 }),
  webhookPerUrlConcurrency: Type.Integer({ minimum: 1 }),
  bodyTimeoutMs: Type.Integer({ minimum: 1 }),
  sqliteBusyTimeoutMs: Type.Integer({ minimum: 0 }),
  sqliteSynchronous: Type.Union([Type.Literal('FULL'), Type.Literal('NORMAL')]),
  idempotencyTtlMs: Type.Integer({ minimum: 1 }),
  priorityAgingMs: Type.Integer({ minimum: 1 }),
  sseKeepaliveMs: Type.Integer({ minimum: 1 }),
});
export type Config = Static<typeof ConfigSchema>;

const SPECS: Spec[] = [
  { env: 'FOREMAN_HOST', key: 'host', def: '127.0.0.1', type: { kind: 'string' } },
  { env: 'FOREMAN_PORT', key: 'port', def: '8080', type: { kind: 'int', min: 0, max: 65535 } },
  { env: 'FOREMAN_DATA_DIR', key: 'dataDir', def: './data', type: { kind: 'string' } },
  { env: 'FOREMAN_PUBLIC_URL', key: 'publicUrl', def: undefined, type: { kind: 'url' } },
  { env: 'FOREMAN_OLLAMA_URL', key: 'ollamaUrl', def: 'http://127.0.0.1:11434', type: { kind: 'url' } },
  { env: 'FOREMAN_CONCURRENCY', key: 'concurrency', def: '1', type: { kind: 'int', min: 1, max: 1024 } },
  { env: 'FOREMAN_JOB_MAX_ATTEMPTS', key: 'jobMaxAttempts', def: '3', type: { kind: 'int', min: 1, max: 1000 } },
  { env: 'FOREMAN_JOB_RETRY_BASE', key: 'jobRetryBaseMs', def: '1s', type: { kind: 'duration', min: 0 } },
  { env: 'FOREMAN_ENGINE_IDLE_TIMEOUT', key: 'engineIdleTimeoutMs', def: '5m', type: { kind: 'duration', min: 1 } },
  { env: 'FOREMAN_JOB_TTL', key: 'jobTtlMs', def: '7d', type: { kind: 'duration', min: 1 } },
  { env: 'FOREMAN_MAX_BODY_BYTES', key: 'maxBodyBytes', def: '10485760', type: { kind: 'int', min: 1024, max: 1073741824 } },
  { env: 'FOREMAN_LOG_LEVEL', key: 'logLevel', def: 'info', type: { kind: 'enum', values: LOG_LEVELS } },
  { env: 'FOREMAN_JOB_LEASE', key: 'jobLeaseMs', def: '60s', type: { kind: 'duration', min: 100 } },
  { env: 'FOREMAN_POLL_INTERVAL', key: 'pollIntervalMs', def: '5s', type: { kind: 'duration', min: 1 } },
  { env: 'FOREMAN_SWEEP_INTERVAL', key: 'sweepIntervalMs', def: '1m', type: { kind: 'duration', min: 1 } },
  { env: 'FOREMAN_SHUTDOWN_GRACE', key: 'shutdownGraceMs', def: '10s', type: { kind: 'duration', min: 0 } },
  { env: 'FOREMAN_MAX_QUEUED', key: 'maxQueued', def: '10000', type: { kind: 'int', min: 1, max: 1_000_000_000 } },
  { env: 'FOREMAN_WEBHOOK_SECRET', key: 'webhookSecrets', def: '', type: { kind: 'string' } },
  { env: 'FOREMAN_WEBHOOK_CONCURRENCY', key: 'webhookConcurrency', def: '16', type: { kind: 'int', min: 1, max: 4096 } },
  { env: 'FOREMAN_WEBHOOK_TIMEOUT', key: 'webhookTimeoutMs', def: '10s', type: { kind: 'duration', min: 1 } },
  { env: 'FOREMAN_WEBHOOK_BACKOFF_BASE', key: 'webhookBackoffBaseMs', def: '1s', type: { kind: 'duration', min: 0 } },
  { env: 'FOREMAN_WEBHOOK_BACKOFF_MAX', key: 'webhookBackoffMaxMs', def: '1h', type: { kind: 'duration', min: 0 } },
  { env: 'FOREMAN_WEBHOOK_MAX_ATTEMPTS', key: 'webhookMaxAttempts', def: '45', type: { kind: 'int', min: 1, max: 10000 } },
  { env: 'FOREMAN_WEBHOOK_BLOCK_PRIVATE', key: 'webhookBlockPrivate', def: 'false', type: { kind: 'bool' } },
  { env: 'FOREMAN_INLINE_ARTIFACT_MAX_BYTES', key: 'inlineArtifactMaxBytes', def: '262144', type: { kind: 'int', min: 0, max: 1073741824 } },
  { env: 'FOREMAN_ENGINE_MAX_RESPONSE_BYTES', key: 'engineMaxResponseBytes', def: '33554432', type: { kind: 'int', min: 1024, max: 1073741824 } },
  { env: 'FOREMAN_ENGINE_OUTAGE_TIMEOUT', key: 'engineOutageTimeoutMs', def: '1h', type: { kind: 'duration', min: 1 } },
  { env: 'FOREMAN_WEBHOOK_PER_URL_CONCURRENCY', key: 'webhookPerUrlConcurrency', def: '4', type: { kind: 'int', min: 1, max: 4096 } },
  { env: 'FOREMAN_BODY_TIMEOUT', key: 'bodyTimeoutMs', def: '30s', type: { kind: 'duration', min: 1 } },
  { env: 'FOREMAN_SQLITE_BUSY_TIMEOUT', key: 'sqliteBusyTimeoutMs', def: '1s', type: { kind: 'duration', min: 0 } },
  { env: 'FOREMAN_SQLITE_SYNCHRONOUS', key: 'sqliteSynchronous', def: 'FULL', type: { kind: 'enum', values: ['FULL', 'NORMAL'] } },
  { env: 'FOREMAN_IDEMPOTENCY_TTL', key: 'idempotencyTtlMs', def: '24h', type: { kind: 'duration', min: 1 } },
  { env: 'FOREMAN_PRIORITY_AGING', key: 'priorityAgingMs', def: '1m', type: { kind: 'duration', min: 1 } },
  { env: 'FOREMAN_SSE_KEEPALIVE', key: 'sseKeepaliveMs', def: '15s', type: { kind: 'duration', min: 1 } },
];

export class ConfigError extends Error {
  constructor(
    readonly variable: string,
    reason: string,
  ) {
    super(`${variable}: ${reason}`);
    this.name = 'ConfigError';
  }
}

function parseOne(spec: Spec, raw: string): unknown {
  const t = spec.type;
  switch (t.kind) {
    case 'string':
      return raw;
    case 'url': {
      let u: URL;
      try {
        u = new URL(raw);
      } catch {
        throw new ConfigError(spec.env, `"${raw}" is not an absolute URL`);
      }
      if (u.protocol !== 'http:' && u.protocol !== 'https:') {
        throw new ConfigError(spec.env, `"${raw}" must be an http or https URL`);
      }
      return raw.replace(/\/+$/, '');
    }
    case 'int': {
      if (!/^\s*-?\d+\s*$/.test(raw)) throw new ConfigError(spec.env, `"${raw}" is not a whole number`);
      const n = Number(raw);
      if (n < t.min || n > t.max) throw new ConfigError(spec.env, `${n} is out of range (${t.min}..${t.max})`);
      return n;
    }
    case 'duration': {
      const ms = parseDuration(raw);
      if (ms === undefined) {
        throw new ConfigError(spec.env, `"${raw}" is not a duration (use e.g. 250ms, 10s, 5m, 2h, 7d)`);
      }
      if (ms < t.min) throw new ConfigError(spec.env, `must be at least ${t.min}ms`);
      return ms;
    }
    case 'bool': {
      const v = raw.trim().toLowerCase();
      if (['true', '1', 'yes', 'on'].includes(v)) return true;
      if (['false', '0', 'no', 'off', ''].includes(v)) return false;
      throw new ConfigError(spec.env, `"${raw}" is not a boolean (true or false)`);
    }
    case 'enum': {
      if (!t.values.includes(raw)) throw new ConfigError(spec.env, `"${raw}" must be one of ${t.values.join(', ')}`);
      return raw;
    }
  }
}

/** Reads every FOREMAN_* variable, applies defaults and validates. Throws ConfigError naming the variable. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const out: Record<string, unknown> = {};
  for (const spec of SPECS) {
    const raw = env[spec.env];
    const value = raw === undefined ? spec.def : raw;
    if (value === undefined) continue;
    out[spec.key] = parseOne(spec, value);
  }
  out.webhookSecrets = String(out.webhookSecrets ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s.length > 0);
  out.dataDir = path.resolve(String(out.dataDir));
  // Empty means "derive from the address actually listened on" (see service.ts), so port 0 works.
  out.publicUrl ??= '';
  if ((out.webhookBackoffMaxMs as number) < (out.webhookBackoffBaseMs as number)) {
    throw new ConfigError('FOREMAN_WEBHOOK_BACKOFF_MAX', 'must not be smaller than FOREMAN_WEBHOOK_BACKOFF_BASE');
  }
  if (!Value.Check(ConfigSchema, out)) {
    const first = Value.Errors(ConfigSchema, out).First();
    const key = first?.path.slice(1) ?? '';
    const spec = SPECS.find((s) => s.key === key);
    throw new ConfigError(spec?.env ?? key, first?.message ?? 'invalid');
  }
  return out as Config;
}

/** A config for tests and tools: the defaults, overridden by `over`. */
export function configWith(over: Partial<Config>): Config {
  return { ...loadConfig({}), ...over };
}
