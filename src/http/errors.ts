import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { DomainError } from '../errors.js';

/** An error answered as JSON `{code, message, field?}` with a stable `code`. */
export class ApiError extends Error {
  constructor(
    readonly statusCode: number,
    readonly code: string,
    message: string,
    readonly field?: string,
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = 'ApiError';
  }
}


/** Turns an Ajv error into a field path like `messages[0].role`. */
function fieldOf(v: { instancePath?: string; params?: Record<string, unknown> }): string {
  const parts = (v.instancePath ?? '')
    .split('/')
    .slice(1)
    .map((p) => p.replace(/~1/g, '/').replace(/~0/g, '~'));
  const extra = v.params?.missingProperty ?? v.params?.additionalProperty;
  if (typeof extra === 'string') parts.push(extra);
  let out = '';
  for (const p of parts) out += /^\d+$/.test(p) ? `[${p}]` : out === '' ? p : `.${p}`;
  return out;
}

const STATUS_OF: Record<DomainError['kind'], number> = {
  validation: 400,
  not_found: 404,
  conflict: 409,
  gone: 410,
  quota: 429,
  unavailable: 503,
  unauthorized: 401,
  forbidden: 403,
};

/** The one mapping from domain errors to HTTP. */
function fromDomain(e: DomainError): ApiError {
  const headers: Record<string, string> = e.retryAfterS !== undefined ? { 'retry-after': String(e.retryAfterS) } : {};
  if (e.kind === 'unauthorized') headers['www-authenticate'] = 'Bearer realm="foreman"';
  if (e.code === 'storage_unavailable') {
    // Never the database's own words.
    return new ApiError(503, e.code, 'the database cannot take writes right now; try again shortly', undefined, headers);
  }
  return new ApiError(STATUS_OF[e.kind], e.code, e.message, e.field, headers);
}

export function toApiError(err: FastifyError | ApiError | Error): ApiError {
  if (err instanceof ApiError) return err;
  const e = err as FastifyError & { validation?: { instancePath?: string; params?: Record<string, unknown>; message?: string }[]; validationContext?: string };
  if (e.validation && e.validation.length > 0) {
    const v = e.validation[0]!;
    const field = fieldOf(v);
    const where = e.validationContext === 'body' || !e.validationContext ? '' : `${e.validationContext} `;
    const what = v.params?.additionalProperty !== undefined ? 'is not a known field' : (v.message ?? 'is invalid');
    const code = e.validationContext === 'params' ? 'invalid_parameter' : 'validation_failed';
    return new ApiError(400, code, `${where}${field || 'body'} ${what}`.trim(), field || e.validationContext || 'body');
  }
  switch (e.code) {
    case 'FST_ERR_CTP_INVALID_MEDIA_TYPE':
      return new ApiError(415, 'unsupported_media_type', 'the request body must be application/json');
    case 'FST_ERR_CTP_BODY_TOO_LARGE':
      return new ApiError(413, 'payload_too_large', 'the request body is larger than FOREMAN_MAX_BODY_BYTES');
    case 'FST_ERR_CTP_EMPTY_JSON_BODY':
      return new ApiError(400, 'invalid_json', 'the request body is empty');
    case 'FST_ERR_CTP_INVALID_JSON_BODY':
      return new ApiError(400, 'invalid_json', 'the request body is not valid JSON');
    case 'FST_ERR_CTP_INVALID_CONTENT_LENGTH':
      return new ApiError(400, 'invalid_content_length', 'Content-Length does not match the body');
    case 'FST_ERR_CTP_INVALID_PARSE_TYPE':
      return new ApiError(415, 'unsupported_media_type', 'the request body must be application/json');
  }
  if (e instanceof SyntaxError || e.name === 'SyntaxError') {
    return new ApiError(400, 'invalid_json', 'the request body is not valid JSON');
  }
  if (e instanceof DomainError) return fromDomain(e);
  const status = typeof e.statusCode === 'number' ? e.statusCode : 500;
  if (status >= 400 && status < 500) {
    return new ApiError(status, 'bad_request', e.message || 'bad request');
  }
  return new ApiError(500, 'internal_error', 'internal error; see the server log for this request id');
}

export function errorHandler(err: FastifyError, req: FastifyRequest, reply: FastifyReply): void {
  const api = toApiError(err);
  if (api.statusCode >= 500) req.log.error({ err }, 'request failed');
  else req.log.info({ code: api.code, field: api.field }, api.message);
  const body: { code: string; message: string; field?: string; error?: string } = { code: api.code, message: api.message };
  if (api.field !== undefined) body.field = api.field;
  // Ollama's clients read `error`: the compatible surface carries it too.
  if (req.url.startsWith('/api/')) body.error = api.message;
  void reply.code(api.statusCode).headers(api.headers).send(body);
}
