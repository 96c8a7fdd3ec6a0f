/**
 * Domain errors: what the application layer and the queue drivers throw. Each has a stable
 * `code` and a human `message`; `http/errors.ts` is the one place that maps them to status codes.
 */
export abstract class DomainError extends Error {
  abstract readonly kind: 'not_found' | 'conflict' | 'validation' | 'quota' | 'unavailable' | 'gone' | 'unauthorized' | 'forbidden';
  constructor(
    readonly code: string,
    message: string,
    /** The request field at fault, where there is one. */
    readonly field?: string,
    /** Seconds a client should wait before trying again, where that is known. */
    readonly retryAfterS?: number,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

export class NotFound extends DomainError {
  readonly kind = 'not_found';
}

export class Conflict extends DomainError {
  readonly kind = 'conflict';
}

export class Validation extends DomainError {
  readonly kind = 'validation';
  constructor(message: string, field: string, code = 'validation_failed') {
    super(code, message, field);
  }
}

/** It existed, and is gone for good (410). */
export class Gone extends DomainError {
  readonly kind = 'gone';
}

/** No credentials, or ones that are unknown or revoked (401). */
export class Unauthorized extends DomainError {
  readonly kind = 'unauthorized';
  constructor(message = 'send Authorization: Bearer <API key or admin token>') {
    super('unauthorized', message);
  }
}

/** Valid credentials that may not do this (403): a key on an admin route, a bad signed URL. */
export class Forbidden extends DomainError {
  readonly kind = 'forbidden';
}

export class QuotaExceeded extends DomainError {
  readonly kind = 'quota';
}

/** Storage cannot take writes or answer right now (locked, full, read-only, unreachable). Retry later. */
export class StorageUnavailable extends DomainError {
  readonly kind = 'unavailable';
  constructor(message: string, cause?: unknown) {
    super('storage_unavailable', message, undefined, 5);
    if (cause !== undefined) this.cause = cause;
  }
}

/** Busy, but not storage: the queue is full and the like. */
export class Unavailable extends DomainError {
  readonly kind = 'unavailable';
}

export function isStorageUnavailable(err: unknown): err is StorageUnavailable {
  return err instanceof StorageUnavailable;
}
