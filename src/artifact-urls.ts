import { createHmac, timingSafeEqual } from 'node:crypto';
import type { Clock } from './domain.js';

/**
 * Artifact URLs (ADR-0013). With authentication on, the URLs handed out (in webhook events and
 * in `GET /jobs/<id>`) carry an expiry and an HMAC-SHA256 signature of job, name and expiry, so
 * a webhook receiver, which holds no API key, can fetch them until they expire.
 */
export class ArtifactUrls {
  /** Null: authentication is off, URLs are plain. */
  private signing: { secret: string; ttlMs: number } | null = null;

  constructor(
    private readonly base: () => string,
    private readonly clock: Clock,
  ) {}

  /** Turns signing on (at start-up, once the secret is known: it may come from the database). */
  useSecret(secret: string, ttlMs: number): void {
    this.signing = { secret, ttlMs };
  }

  get signed(): boolean {
    return this.signing !== null;
  }

  /** The URL of an artifact; signed ones expire `ttlMs` after `issuedAt` (default now). */
  url(jobId: string, name: string, issuedAt: number = this.clock.now()): string {
    const plain = `${this.base()}/jobs/${encodeURIComponent(jobId)}/artifacts/${encodeURIComponent(name)}`;
    if (this.signing === null) return plain;
    const expires = Math.floor((issuedAt + this.signing.ttlMs) / 1000);
    return `${plain}?expires=${expires}&sig=${this.sign(jobId, name, expires)}`;
  }

  /** Checks a signed URL's query. */
  verify(jobId: string, name: string, expires: string | undefined, sig: string | undefined): 'ok' | 'expired' | 'invalid' {
    if (this.signing === null || expires === undefined || sig === undefined || !/^\d{1,12}$/.test(expires)) return 'invalid';
    const want = Buffer.from(this.sign(jobId, name, Number(expires)));
    const got = Buffer.from(sig);
    if (got.length !== want.length || !timingSafeEqual(got, want)) return 'invalid';
    return Number(expires) * 1000 <= this.clock.now() ? 'expired' : 'ok';
  }

  private sign(jobId: string, name: string, expires: number): string {
    return createHmac('sha256', this.signing!.secret).update(`${jobId}\n${name}\n${expires}`).digest('base64url');
  }
}
