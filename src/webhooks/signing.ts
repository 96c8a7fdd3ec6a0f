import { createHmac } from 'node:crypto';

/**
 * Signing as in ../shared/webhook-protocols.md (see ADR-0005):
 * - `X-Foreman-Signature: sha256=<hex HMAC-SHA256(secret as UTF-8, raw body)>`, with the first secret;
 * - Standard Webhooks `webhook-signature: v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>`, one entry per secret.
 *   A `whsec_<base64>` secret's key is the decoded base64; any other secret's key is its UTF-8 bytes.
 */
export function standardWebhooksKey(secret: string): Buffer {
  return secret.startsWith('whsec_') ? Buffer.from(secret.slice(6), 'base64') : Buffer.from(secret, 'utf8');
}

export function foremanSignature(secret: string, body: Buffer): string {
  return `sha256=${createHmac('sha256', Buffer.from(secret, 'utf8')).update(body).digest('hex')}`;
}

export function standardSignature(keys: Buffer[], id: string, timestamp: number, body: Buffer): string {
  const prefix = Buffer.from(`${id}.${timestamp}.`, 'utf8');
  return keys.map((k) => `v1,${createHmac('sha256', k).update(prefix).update(body).digest('base64')}`).join(' ');
}

/** Precomputes the keys once; `headers()` gives the signature headers for one attempt. */
export class Signer {
  private readonly keys: Buffer[];

  constructor(private readonly secrets: string[]) {
    this.keys = secrets.map(standardWebhooksKey);
  }

  headers(id: string, timestamp: number, body: Buffer): Record<string, string> {
    const first = this.secrets[0];
    if (first === undefined) return {};
    return {
      'x-foreman-signature': foremanSignature(first, body),
      'webhook-signature': standardSignature(this.keys, id, timestamp, body),
    };
  }
}
