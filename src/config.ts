import { Type, type Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import path from 'node:path';
import { blockListOf } from './webhooks/ssrf.js';

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

/** How a setting's text is read. */
type Kind = 'string' | 'url' | 'dburl' | 'int' | 'duration' | 'bool' | 'enum' | 'list';

/** A setting's schema carries its variable, default and kind: the one table of settings. */
interface SettingMeta {
  env: string;
  def: string | undefined;
  kind: Kind;
}

const meta = (env: string, def: string | undefined, kind: Kind): SettingMeta => ({ env, def, kind });
const str = (env: string, def: string | undefined, minLength = 0) => Type.String({ minLength, ...meta(env, def, 'string') });
const url = (env: string, def: string | undefined) => Type.String({ ...meta(env, def, 'url') });
const int = (env: string, def: string | undefined, minimum: number, maximum: number) => Type.Integer({ minimum, maximum, ...meta(env, def, 'int') });
const ms = (env: string, def: string | undefined, minimum: number) => Type.Integer({ minimum, ...meta(env, def, 'duration') });
const bool = (env: string, def: string | undefined) => Type.Boolean(meta(env, def, 'bool'));
const oneOf = <T extends string>(env: string, def: T, values: readonly T[]) =>
  Type.Union(
    values.map((v) => Type.Literal(v)),
    meta(env, def, 'enum'),
  );

/** What FOREMAN_INSTANCE_ID may be. */
const INSTANCE_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/**
 * Every setting: its variable, default, type and range. Parsing, validation and the error
 * messages all come from this one table; README.md documents the same variables.
 */
export const ConfigSchema = Type.Object({
  host: str('FOREMAN_HOST', '127.0.0.1', 1),
  port: int('FOREMAN_PORT', '8080', 0, 65535),
  dataDir: str('FOREMAN_DATA_DIR', './data', 1),
  // Set: the PostgreSQL driver, shared by every instance on that database (ADR-0011). Unset: SQLite in FOREMAN_DATA_DIR.
  databaseUrl: Type.Optional(Type.String(meta('FOREMAN_DATABASE_URL', undefined, 'dburl'))),
  databasePool: int('FOREMAN_DATABASE_POOL', '10', 1, 1000),
  // Unset: hostname-pid. Set: INSTANCE_ID.
  instanceId: Type.Optional(str('FOREMAN_INSTANCE_ID', undefined, 1)),
  publicUrl: url('FOREMAN_PUBLIC_URL', undefined),
  ollamaUrl: url('FOREMAN_OLLAMA_URL', 'http://127.0.0.1:11434'),
  // The pool of Ollama hosts (ADR-0012); empty: the one host FOREMAN_OLLAMA_URL.
  engines: Type.Array(Type.String({ minLength: 1 }), meta('FOREMAN_ENGINES', '', 'list')),
  affinityMaxWaitMs: ms('FOREMAN_AFFINITY_MAX_WAIT', '30s', 0),
  engineHealthIntervalMs: ms('FOREMAN_ENGINE_HEALTH_INTERVAL', '5s', 10),
  concurrency: int('FOREMAN_CONCURRENCY', '1', 1, 1024),
  jobMaxAttempts: int('FOREMAN_JOB_MAX_ATTEMPTS', '3', 1, 1000),
  jobRetryBaseMs: ms('FOREMAN_JOB_RETRY_BASE', '1s', 0),
  jobRetryMaxMs: ms('FOREMAN_JOB_RETRY_MAX', '10m', 0),
  engineIdleTimeoutMs: ms('FOREMAN_ENGINE_IDLE_TIMEOUT', '5m', 1),
  jobTtlMs: ms('FOREMAN_JOB_TTL', '7d', 1),
  maxBodyBytes: int('FOREMAN_MAX_BODY_BYTES', '10485760', 1024, 1073741824),
  logLevel: oneOf('FOREMAN_LOG_LEVEL', 'info', LOG_LEVELS),
  jobLeaseMs: ms('FOREMAN_JOB_LEASE', '60s', 100),
  pollIntervalMs: ms('FOREMAN_POLL_INTERVAL', '5s', 1),
  sweepIntervalMs: ms('FOREMAN_SWEEP_INTERVAL', '1m', 1),
  shutdownGraceMs: ms('FOREMAN_SHUTDOWN_GRACE', '10s', 0),
  maxQueued: int('FOREMAN_MAX_QUEUED', '10000', 1, 1_000_000_000),
  maxQueuedBytes: int('FOREMAN_MAX_QUEUED_BYTES', '1073741824', 1024, Number.MAX_SAFE_INTEGER),
  // Unset: FOREMAN_JOB_TTL.
  failedJobTtlMs: Type.Optional(ms('FOREMAN_FAILED_JOB_TTL', undefined, 1)),
  webhookSecrets: Type.Array(Type.String({ minLength: 1 }), meta('FOREMAN_WEBHOOK_SECRET', '', 'list')),
  webhookConcurrency: int('FOREMAN_WEBHOOK_CONCURRENCY', '16', 1, 4096),
  webhookTimeoutMs: ms('FOREMAN_WEBHOOK_TIMEOUT', '10s', 1),
  webhookBackoffBaseMs: ms('FOREMAN_WEBHOOK_BACKOFF_BASE', '1s', 0),
  webhookBackoffMaxMs: ms('FOREMAN_WEBHOOK_BACKOFF_MAX', '1h', 0),
  webhookRetryAfterMaxMs: ms('FOREMAN_WEBHOOK_RETRY_AFTER_MAX', '1h', 0),
  webhookMaxAttempts: int('FOREMAN_WEBHOOK_MAX_ATTEMPTS', '45', 1, 10000),
  // Unset: blocked unless Foreman listens on loopback only (open single-user mode keeps loopback receivers working).
  webhookBlockPrivate: Type.Optional(bool('FOREMAN_WEBHOOK_BLOCK_PRIVATE', undefined)),
  webhookAllowNets: Type.Array(Type.String({ minLength: 1 }), meta('FOREMAN_WEBHOOK_ALLOW_NETS', '', 'list')),
  allowedHosts: Type.Array(Type.String({ minLength: 1 }), meta('FOREMAN_ALLOWED_HOSTS', '', 'list')),
  auth: oneOf('FOREMAN_AUTH', 'auto', ['auto', 'off'] as const),
  // Set: authentication is on (ADR-0013). Unset: Foreman runs open.
  adminToken: Type.Optional(str('FOREMAN_ADMIN_TOKEN', undefined, 16)),
  // Unset: one is generated on first start and stored in the database (shared by every instance).
  urlSigningSecret: Type.Optional(str('FOREMAN_URL_SIGNING_SECRET', undefined, 32)),
  artifactUrlTtlMs: ms('FOREMAN_ARTIFACT_URL_TTL', '7d', 1000),
  metricsOpen: bool('FOREMAN_METRICS_OPEN', 'false'),
  maxConnections: int('FOREMAN_MAX_CONNECTIONS', '1024', 1, 1_000_000),
  maxWatchersPerJob: int('FOREMAN_MAX_WATCHERS_PER_JOB', '64', 1, 100_000),
  redeliverPerMinute: int('FOREMAN_REDELIVER_PER_MINUTE', '5', 1, 10_000),
  inlineArtifactMaxBytes: int('FOREMAN_INLINE_ARTIFACT_MAX_BYTES', '262144', 0, 1073741824),
  engineMaxResponseBytes: int('FOREMAN_ENGINE_MAX_RESPONSE_BYTES', '33554432', 1024, 1073741824),
  engineOutageTimeoutMs: ms('FOREMAN_ENGINE_OUTAGE_TIMEOUT', '1h', 1),
  webhookPerUrlConcurrency: int('FOREMAN_WEBHOOK_PER_URL_CONCURRENCY', '8', 1, 4096),
  bodyTimeoutMs: ms('FOREMAN_BODY_TIMEOUT', '30s', 1),
  sqliteBusyTimeoutMs: ms('FOREMAN_SQLITE_BUSY_TIMEOUT', '1s', 0),
  sqliteSynchronous: oneOf('FOREMAN_SQLITE_SYNCHRONOUS', 'FULL', ['FULL', 'NORMAL'] as const),
  idempotencyTtlMs: ms('FOREMAN_IDEMPOTENCY_TTL', '24h', 1),
  priorityAgingMs: ms('FOREMAN_PRIORITY_AGING', '1m', 1),
  sseKeepaliveMs: ms('FOREMAN_SSE_KEEPALIVE', '15s', 1),
  // The Batch API (ADR-0015).
  batchMaxLines: int('FOREMAN_BATCH_MAX_LINES', '50000', 1, 10_000_000),
  batchMaxBytes: int('FOREMAN_BATCH_MAX_BYTES', '209715200', 1024, Number.MAX_SAFE_INTEGER),
  uploadTimeoutMs: ms('FOREMAN_UPLOAD_TIMEOUT', '10m', 1),
  fileTtlMs: ms('FOREMAN_FILE_TTL', '30d', 1),
  batchTtlMs: ms('FOREMAN_BATCH_TTL', '30d', 1),
});
export type Config = Static<typeof ConfigSchema>;

interface Spec extends SettingMeta {
  key: keyof Config;
  schema: Record<string, unknown>;
}

/** The table, as a list (derived from ConfigSchema). */
export const SETTINGS: readonly Spec[] = Object.entries(ConfigSchema.properties).map(([key, schema]) => {
  const m = schema as unknown as SettingMeta & Record<string, unknown>;
  return { key: key as keyof Config, env: m.env, def: m.def, kind: m.kind, schema: m };
});

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
  const t = spec.schema as { minimum?: number; maximum?: number; anyOf?: { const: string }[] };
  switch (spec.kind) {
    case 'string':
      return raw;
    case 'list':
      return raw
        .split(',')
        .map((s) => s.trim())
        .filter((s) => s.length > 0);
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
    case 'dburl': {
      // Never echo the value: it may carry a password.
      let u: URL;
      try {
        u = new URL(raw);
      } catch {
        throw new ConfigError(spec.env, 'is not a URL (expected postgres://user:password@host:port/database)');
      }
      if (u.protocol !== 'postgres:' && u.protocol !== 'postgresql:') {
        throw new ConfigError(spec.env, `must be a postgres:// URL, not ${u.protocol}//…`);
      }
      // postgres:///db?host=/run/postgresql (a Unix socket) names its host in the query.
      if (u.hostname === '' && !u.searchParams.get('host')) {
        throw new ConfigError(spec.env, 'names no host (expected postgres://user:password@host:port/database, or ?host=/socket/dir)');
      }
      return raw;
    }
    case 'int': {
      if (!/^\s*-?\d+\s*$/.test(raw)) throw new ConfigError(spec.env, `"${raw}" is not a whole number`);
      const n = Number(raw);
      if (n < (t.minimum ?? -Infinity) || n > (t.maximum ?? Infinity)) {
        throw new ConfigError(spec.env, `${n} is out of range (${t.minimum}..${t.maximum})`);
      }
      return n;
    }
    case 'duration': {
      const ms = parseDuration(raw);
      if (ms === undefined) {
        throw new ConfigError(spec.env, `"${raw}" is not a duration (use e.g. 250ms, 10s, 5m, 2h, 7d)`);
      }
      if (ms < (t.minimum ?? 0)) throw new ConfigError(spec.env, `must be at least ${t.minimum}ms`);
      return ms;
    }
    case 'bool': {
      const v = raw.trim().toLowerCase();
      if (['true', '1', 'yes', 'on'].includes(v)) return true;
      if (['false', '0', 'no', 'off', ''].includes(v)) return false;
      throw new ConfigError(spec.env, `"${raw}" is not a boolean (true or false)`);
    }
    case 'enum': {
      const values = (t.anyOf ?? []).map((v) => v.const);
      if (!values.includes(raw)) throw new ConfigError(spec.env, `"${raw}" must be one of ${values.join(', ')}`);
      return raw;
    }
  }
}

/** Reads every FOREMAN_* variable, applies defaults and validates. Throws ConfigError naming the variable. */
export function loadConfig(env: NodeJS.ProcessEnv = process.env): Config {
  const out: Record<string, unknown> = {};
  for (const spec of SETTINGS) {
    const raw = env[spec.env];
    const value = raw === undefined ? spec.def : raw;
    if (value === undefined) continue;
    out[spec.key] = parseOne(spec, value);
  }
  out.dataDir = path.resolve(String(out.dataDir));
  // Empty means "derive from the address actually listened on" (see service.ts), so port 0 works.
  out.publicUrl ??= '';
  checkSecrets(out.webhookSecrets as string[]);
  try {
    blockListOf(out.webhookAllowNets as string[]);
  } catch (err) {
    throw new ConfigError('FOREMAN_WEBHOOK_ALLOW_NETS', (err as Error).message);
  }
  if ((env.FOREMAN_ENGINES ?? '').trim() !== '' && (env.FOREMAN_OLLAMA_URL ?? '').trim() !== '') {
    throw new ConfigError('FOREMAN_ENGINES', 'and FOREMAN_OLLAMA_URL are both set: FOREMAN_OLLAMA_URL is the one-host shorthand; list every host in FOREMAN_ENGINES');
  }
  engineHostsOf(out as Config);
  if (out.auth === 'off' && out.adminToken !== undefined) {
    throw new ConfigError('FOREMAN_AUTH', 'is off, but FOREMAN_ADMIN_TOKEN is set (which turns authentication on): unset one of them');
  }
  if (!isLoopbackHost(String(out.host)) && out.auth !== 'off' && out.adminToken === undefined) {
    throw new ConfigError(
      'FOREMAN_HOST',
      `"${String(out.host)}" is not a loopback address, and Foreman has no authentication configured: anyone who can reach it ` +
        'could submit, read and cancel every job. Set FOREMAN_ADMIN_TOKEN to turn API keys on, listen on 127.0.0.1, or set ' +
        'FOREMAN_AUTH=off to run open on purpose',
    );
  }
  if ((out.webhookBackoffMaxMs as number) < (out.webhookBackoffBaseMs as number)) {
    throw new ConfigError('FOREMAN_WEBHOOK_BACKOFF_MAX', 'must not be smaller than FOREMAN_WEBHOOK_BACKOFF_BASE');
  }
  // An instance id is part of every lease it takes (`<id>/…`) and of every NOTIFY it sends.
  if (out.instanceId !== undefined && !INSTANCE_ID.test(out.instanceId as string)) {
    throw new ConfigError('FOREMAN_INSTANCE_ID', 'must be 1 to 64 letters, digits, ".", "_" or "-", starting with a letter or digit');
  }
  if (!Value.Check(ConfigSchema, out)) {
    const first = Value.Errors(ConfigSchema, out).First();
    const key = first?.path.slice(1) ?? '';
    const spec = SETTINGS.find((s) => s.key === key);
    throw new ConfigError(spec?.env ?? key, first?.message ?? 'invalid');
  }
  return out as Config;
}

/** One Ollama host of the pool (ADR-0012). */
export interface EngineSpec {
  /** `?name=`, default host:port. */
  name: string;
  /** The base URL, without the query. */
  url: string;
  /** Jobs at once on this host: `?slots=`, default FOREMAN_CONCURRENCY. */
  slots: number;
}

/**
 * The engine hosts: FOREMAN_ENGINES (`http://gpu1:11434?slots=2&name=gpu1,http://gpu2:11434`), or
 * the one host FOREMAN_OLLAMA_URL. A bad URL, a duplicate name or `slots` < 1 is a ConfigError
 * naming the entry.
 */
export function engineHostsOf(config: Pick<Config, 'engines' | 'ollamaUrl' | 'concurrency'>): EngineSpec[] {
  const entries = config.engines.length > 0 ? config.engines : [config.ollamaUrl];
  const out: EngineSpec[] = [];
  const names = new Set<string>();
  for (const entry of entries) {
    const bad = (why: string) => new ConfigError(config.engines.length > 0 ? 'FOREMAN_ENGINES' : 'FOREMAN_OLLAMA_URL', `entry "${entry.replace(/\/\/[^@/]*@/, '//…@')}": ${why}`);
    let u: URL;
    try {
      u = new URL(entry);
    } catch {
      throw bad('is not an absolute URL');
    }
    if (u.protocol !== 'http:' && u.protocol !== 'https:') throw bad('must be an http or https URL');
    let slots = config.concurrency;
    let name = u.host;
    for (const [k, v] of u.searchParams) {
      if (k === 'slots') {
        if (!/^\d+$/.test(v) || Number(v) < 1 || Number(v) > 1024) throw bad('slots must be a whole number from 1 to 1024');
        slots = Number(v);
      } else if (k === 'name') {
        if (!/^[A-Za-z0-9._-]{1,64}$/.test(v)) throw bad('name must be 1 to 64 letters, digits, dots, dashes or underscores');
        name = v;
      } else throw bad(`unknown option "${k}" (use slots and name)`);
    }
    if (names.has(name)) throw bad(`the name "${name}" is used twice`);
    names.add(name);
    out.push({ name, url: `${u.origin}${u.pathname}`.replace(/\/+$/, ''), slots });
  }
  return out;
}

/** localhost, 127.0.0.0/8 or ::1 (with or without brackets). */
export function isLoopbackHost(host: string): boolean {
  const h = host.toLowerCase().replace(/^\[|\]$/g, '');
  return h === 'localhost' || h.endsWith('.localhost') || h === '::1' || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(h);
}

/**
 * Webhook secrets must give a real HMAC key: a `whsec_` secret is base64 of at least 24 bytes,
 * any other at least 16 bytes. The message never shows the secret.
 */
function checkSecrets(secrets: string[]): void {
  secrets.forEach((sec, i) => {
    const which = secrets.length > 1 ? `secret #${i + 1}` : 'the secret';
    if (sec.startsWith('whsec_')) {
      const b64 = sec.slice(6);
      if (!/^[A-Za-z0-9+/]+={0,2}$/.test(b64) || b64.length % 4 !== 0) {
        throw new ConfigError('FOREMAN_WEBHOOK_SECRET', `${which} starts with whsec_ but the rest is not base64`);
      }
      if (Buffer.from(b64, 'base64').length < 24) {
        throw new ConfigError('FOREMAN_WEBHOOK_SECRET', `${which} decodes to fewer than 24 bytes; use at least 24 random bytes`);
      }
    } else if (Buffer.byteLength(sec, 'utf8') < 16) {
      throw new ConfigError('FOREMAN_WEBHOOK_SECRET', `${which} is shorter than 16 bytes`);
    }
  });
}

/** A config for tests and tools: the defaults, overridden by `over`. */
export function configWith(over: Partial<Config>): Config {
  return { ...loadConfig({}), ...over };
}
