import type { ApiKeyRecord } from '../queue/driver.js';

/**
 * Who is asking (ADR-0013). `open`: authentication is off, everything is allowed and jobs carry
 * no key. `admin`: the admin token, which sees and acts on every job. `key`: an API key, which
 * sees only its own jobs. `anonymous`: no credentials on a route that needs none (health, docs,
 * a signed artifact URL).
 */
export type Principal = { kind: 'open' } | { kind: 'admin' } | { kind: 'key'; key: ApiKeyRecord } | { kind: 'anonymous' };

export const OPEN: Principal = { kind: 'open' };
export const ADMIN: Principal = { kind: 'admin' };

/** What the audit log records as the actor. */
export function actorOf(p: Principal): string {
  return p.kind === 'key' ? p.key.id : p.kind;
}

/** The key a principal's jobs carry, and the only jobs it may see: '' for the keyless. */
export function keyIdOf(p: Principal): string {
  return p.kind === 'key' ? p.key.id : '';
}

/** The owner filter for reads and writes: a key sees only its own jobs; open and admin see all. */
export function scopeOf(p: Principal): string | undefined {
  return p.kind === 'key' ? p.key.id : undefined;
}
