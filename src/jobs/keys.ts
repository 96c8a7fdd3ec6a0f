import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { Clock } from '../domain.js';
import { Forbidden, NotFound, Unauthorized, Validation } from '../errors.js';
import { uuidv7 } from '../ids.js';
import type { ApiKeyLimits, ApiKeyRecord, AuditEntry, KeyUsage, QueueDriver } from '../queue/driver.js';
import { ADMIN, actorOf, keyIdOf, OPEN, type Principal } from './principal.js';
import { decodeCursor, encodeCursor } from './rules.js';

export const DAY_MS = 86_400_000;

/** The usage every answer carries (ADR-0013). Limits are null where none applies. */
export interface Usage {
  jobsToday: number;
  dailyLimit: number | null;
  running: number;
  concurrency: number | null;
  queued: number;
  maxQueued: number | null;
  tokensToday: number;
}

export interface NewKeyInput {
  name: string;
  concurrency?: number | null;
  maxQueued?: number | null;
  dailyLimit?: number | null;
  priorityMax?: number | null;
}

const sha256 = (s: string): Buffer => createHash('sha256').update(s, 'utf8').digest();

/**
 * API keys (ADR-0013): creating, changing and revoking them, and turning an `Authorization`
 * header into a `Principal`. A key is `fm_` + 32 random bytes (base64url); only its SHA-256 is
 * stored, so the raw key exists only in the one reply that creates it.
 */
/** How long a verified key is trusted without reading it again (revocation here drops it at once). */
const VERIFIED_TTL_MS = 1000;
const VERIFIED_MAX = 1024;

export class Keys {
  private readonly adminHash: Buffer | null;
  /**
   * Bearer tokens verified in the last second → their key: a client's burst of requests costs one
   * hash and one read, not one each. Held in memory only; revoking or changing a key here drops
   * its entries at once (ADR-0013).
   */
  private readonly verified = new Map<string, { key: ApiKeyRecord; until: number }>();

  constructor(
    private readonly driver: QueueDriver,
    private readonly clock: Clock,
    adminToken: string | undefined,
  ) {
    this.adminHash = adminToken === undefined ? null : sha256(adminToken);
  }

  /** Whether authentication is on (FOREMAN_ADMIN_TOKEN is set). */
  get enabled(): boolean {
    return this.adminHash !== null;
  }

  /**
   * The principal of a request. With authentication off, everyone is `open`. Otherwise the
   * bearer token must be the admin token (compared in constant time, as hashes) or a live key;
   * no header at all is `anonymous` (the route decides whether that will do).
   */
  async authenticate(authorization: string | undefined): Promise<Principal> {
    if (this.adminHash === null) return OPEN;
    if (authorization === undefined) return { kind: 'anonymous' };
    const m = /^Bearer[ \t]+(\S+)[ \t]*$/i.exec(authorization);
    if (!m) throw new Unauthorized('the Authorization header must be "Bearer <API key or admin token>"');
    const token = m[1]!;
    const now = this.clock.now();
    const hit = this.verified.get(token);
    if (hit && hit.until > now) return { kind: 'key', key: hit.key };
    const given = sha256(token);
    if (timingSafeEqual(given, this.adminHash)) return ADMIN;
    const key = await this.driver.keyByHash({ hash: given.toString('hex') });
    if (!key || key.revokedAt !== null) throw new Unauthorized('unknown or revoked API key');
    if (this.verified.size >= VERIFIED_MAX) this.verified.clear();
    this.verified.set(token, { key, until: now + VERIFIED_TTL_MS });
    return { kind: 'key', key };
  }

  /** Drops a key's verified tokens (it was changed or revoked). */
  private forget(id: string): void {
    for (const [t, v] of this.verified) if (v.key.id === id) this.verified.delete(t);
  }

  requireAdmin(who: Principal): void {
    if (who.kind === 'admin' || who.kind === 'open') return;
    if (who.kind === 'anonymous') throw new Unauthorized();
    throw new Forbidden('forbidden', 'this route needs the admin token (FOREMAN_ADMIN_TOKEN), not an API key');
  }

  async create(who: Principal, input: NewKeyInput): Promise<{ record: ApiKeyRecord; key: string }> {
    this.requireAdmin(who);
    if (!this.enabled) throw new Validation('API keys need authentication: set FOREMAN_ADMIN_TOKEN', 'name', 'auth_off');
    const now = this.clock.now();
    const key = `fm_${randomBytes(32).toString('base64url')}`;
    const record: ApiKeyRecord = {
      id: uuidv7(now),
      name: input.name,
      concurrency: input.concurrency ?? null,
      maxQueued: input.maxQueued ?? null,
      dailyLimit: input.dailyLimit ?? null,
      priorityMax: input.priorityMax ?? null,
      createdAt: now,
      updatedAt: now,
      revokedAt: null,
    };
    await this.driver.keyInsert({ key: record, hash: sha256(key).toString('hex'), actor: actorOf(who) });
    return { record, key };
  }

  async list(who: Principal): Promise<(ApiKeyRecord & { usage: Usage })[]> {
    this.requireAdmin(who);
    const keys = await this.driver.keysList();
    return Promise.all(keys.map(async (k) => ({ ...k, usage: await this.usageOf(k.id, k) })));
  }

  async get(who: Principal, id: string): Promise<ApiKeyRecord & { usage: Usage }> {
    this.requireAdmin(who);
    const k = await this.driver.keyGet({ id });
    if (!k) throw keyNotFound(id);
    return { ...k, usage: await this.usageOf(k.id, k) };
  }

  async update(who: Principal, id: string, changes: Partial<ApiKeyLimits> & { name?: string }): Promise<ApiKeyRecord> {
    this.requireAdmin(who);
    const r = await this.driver.keyUpdate({ id, changes, now: this.clock.now(), actor: actorOf(who) });
    if (!r) throw keyNotFound(id);
    this.forget(id);
    return r;
  }

  async revoke(who: Principal, id: string): Promise<ApiKeyRecord> {
    this.requireAdmin(who);
    const r = await this.driver.keyRevoke({ id, now: this.clock.now(), actor: actorOf(who) });
    if (!r) throw keyNotFound(id);
    this.forget(id);
    return r;
  }

  /** The caller's usage: a key's own, or the keyless bucket's (admin, open) with no limits. */
  usage(who: Principal): Promise<Usage> {
    return this.usageOf(keyIdOf(who), who.kind === 'key' ? who.key : null);
  }

  private async usageOf(keyId: string, limits: ApiKeyLimits | null): Promise<Usage> {
    const u: KeyUsage = await this.driver.keyUsage({ keyId, day: Math.floor(this.clock.now() / DAY_MS) });
    return {
      jobsToday: u.jobsToday,
      dailyLimit: limits?.dailyLimit ?? null,
      running: u.running,
      concurrency: limits?.concurrency ?? null,
      // Scheduled jobs are waiting work too: they count against max_queued.
      queued: u.queued + u.scheduled,
      maxQueued: limits?.maxQueued ?? null,
      tokensToday: u.tokensToday,
    };
  }

  async audit(who: Principal, q: { limit: number; cursor?: string }): Promise<{ entries: AuditEntry[]; nextCursor: string | null }> {
    this.requireAdmin(who);
    if (!(q.limit >= 1 && q.limit <= 100)) throw new Validation('limit must be 1 to 100', 'limit');
    const rows = await this.driver.auditList({ limit: q.limit + 1, ...(q.cursor !== undefined ? { beforeId: decodeCursor(q.cursor) } : {}) });
    const more = rows.length > q.limit;
    if (more) rows.pop();
    return { entries: rows, nextCursor: more ? encodeCursor(rows[rows.length - 1]!.id) : null };
  }
}

const keyNotFound = (id: string) => new NotFound('key_not_found', `no API key with id ${JSON.stringify(id.slice(0, 80))}`);
