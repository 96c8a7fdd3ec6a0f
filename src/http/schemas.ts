import { Type, type Static } from '@sinclair/typebox';
import { JOB_STATES } from '../domain.js';

/** Request and response schemas. Fastify compiles each once: Ajv validators and fast-json-stringify serializers. */

/** Every `code` an error response can carry. */
export const API_ERROR_CODES = [
  'validation_failed',
  'invalid_json',
  'invalid_parameter',
  'invalid_content_length',
  'invalid_cursor',
  'invalid_url',
  'bad_request',
  'payload_too_large',
  'unsupported_media_type',
  'body_timeout',
  'request_timeout',
  'headers_too_large',
  'route_not_found',
  'not_found',
  'job_not_found',
  'artifact_not_found',
  'no_webhook',
  'no_such_event',
  'job_finished',
  'idempotency_key_reused',
  'queue_full',
  'storage_unavailable',
  'engine_unavailable',
  'internal_error',
  'host_not_allowed',
  'too_many_connections',
  'too_many_watchers',
  'redeliver_rate_limited',
  'filter_too_broad',
  'engine_busy',
  'conversation_not_ready',
  'conversation_expired',
  'conversation_not_found',
  'unauthorized',
  'forbidden',
  'key_not_found',
  'quota_exceeded',
  'invalid_signature',
  'url_expired',
] as const;

/** Every `error.code` a failed job can carry (ADR-0003, ADR-0007). */
export const JOB_ERROR_CODES = [
  'engine_unavailable',
  'engine_busy',
  'engine_error',
  'engine_timeout',
  'engine_stream_incomplete',
  'engine_stream_error',
  'engine_protocol_error',
  'engine_response_too_large',
  'model_not_found',
  'engine_bad_request',
  'engine_rejected',
  'deadline_exceeded',
  'previous_failed',
  'batch_expired',
  'batch_failed',
  'internal_error',
] as const;

export const ErrorBody = Type.Object(
  {
    code: Type.String({ enum: [...API_ERROR_CODES], description: 'stable, machine-readable' }),
    message: Type.String(),
    field: Type.Optional(Type.String({ description: 'the offending field, for validation errors' })),
  },
  { $id: 'Error' },
);

const JobStateSchema = Type.Union(JOB_STATES.map((s) => Type.Literal(s)));

const ToolCall = Type.Object({
  function: Type.Object({
    name: Type.String({ maxLength: 256 }),
    arguments: Type.Record(Type.String(), Type.Unknown()),
  }),
});

export const Message = Type.Object({
  role: Type.Union([Type.Literal('system'), Type.Literal('user'), Type.Literal('assistant'), Type.Literal('tool')]),
  content: Type.String(),
  images: Type.Optional(Type.Array(Type.String(), { maxItems: 64 })),
  tool_calls: Type.Optional(Type.Array(ToolCall, { maxItems: 256 })),
  thinking: Type.Optional(Type.String()),
  tool_name: Type.Optional(Type.String({ maxLength: 256 })),
});

const Tool = Type.Object({
  type: Type.Literal('function'),
  function: Type.Object({
    name: Type.String({ minLength: 1, maxLength: 256 }),
    description: Type.Optional(Type.String()),
    parameters: Type.Optional(Type.Record(Type.String(), Type.Unknown())),
  }),
});

/** Ollama's chat fields that Foreman passes to the engine unchanged (both /jobs and /api/chat). */
export const EngineFields = {
  model: Type.String({ minLength: 1, maxLength: 256 }),
  format: Type.Optional(Type.Union([Type.Literal('json'), Type.Record(Type.String(), Type.Unknown())])),
  options: Type.Optional(Type.Record(Type.String(), Type.Unknown())),
  tools: Type.Optional(Type.Array(Tool, { maxItems: 256 })),
  keep_alive: Type.Optional(Type.Union([Type.String({ maxLength: 32 }), Type.Number()])),
  think: Type.Optional(Type.Union([Type.Boolean(), Type.Literal('low'), Type.Literal('medium'), Type.Literal('high')])),
};

export const SubmitBody = Type.Object(
  {
    ...EngineFields,
    model: Type.Optional(Type.String({ minLength: 1, maxLength: 256, description: "required, except with continue_from (default: that job's model)" })),
    continue_from: Type.Optional(Type.String({ minLength: 1, maxLength: 64, description: 'continue the conversation of this job: its messages and reply come first (ADR-0016)' })),
    wait_for_previous: Type.Optional(Type.Boolean({ description: 'with continue_from: queue now and run once that job is done' })),
    kind: Type.Optional(Type.Union([Type.Literal('chat'), Type.Literal('embed')], { description: 'chat (default: Ollama /api/chat) or embed (/api/embed, ADR-0015)' })),
    messages: Type.Optional(Type.Array(Message, { minItems: 1, maxItems: 10_000, description: 'required for a chat job' })),
    input: Type.Optional(
      Type.Union([Type.String(), Type.Array(Type.String(), { minItems: 1, maxItems: 10_000 })], { description: 'an embed job: the text(s) to embed' }),
    ),
    truncate: Type.Optional(Type.Boolean({ description: 'an embed job: truncate inputs longer than the context (Ollama default true)' })),
    dimensions: Type.Optional(Type.Integer({ minimum: 1, maximum: 1_000_000, description: 'an embed job: dimensions of the vectors' })),
    stream: Type.Optional(Type.Boolean()),
    state_webhook_url: Type.Optional(Type.String({ minLength: 1, maxLength: 2048 })),
    webhook_events: Type.Optional(Type.Array(JobStateSchema, { minItems: 1, maxItems: JOB_STATES.length, uniqueItems: true })),
    metadata: Type.Optional(
      Type.Record(Type.String(), Type.String({ maxLength: 1024 }), {
        maxProperties: 64,
        propertyNames: { minLength: 1, maxLength: 64 },
      }),
    ),
    priority: Type.Optional(
      Type.Integer({ minimum: -1000, maximum: 1000, description: 'higher runs first; default 0; FIFO within a priority, with aging' }),
    ),
    deadline: Type.Optional(
      Type.String({
        minLength: 1,
        maxLength: 64,
        description: 'an ISO-8601 time or a duration (e.g. "10m"); a job still queued then fails deadline_exceeded',
      }),
    ),
  },
  { additionalProperties: false, $id: 'SubmitBody' },
);
export type SubmitBody = Static<typeof SubmitBody>;

const NullableInt = (min: number, max: number, description: string) => Type.Union([Type.Integer({ minimum: min, maximum: max }), Type.Null()], { description });

/** The caller's usage, on every submit, job read and GET /usage (ADR-0013). Limits are null where none applies. */
export const UsageSchema = Type.Object(
  {
    jobs_today: Type.Integer({ description: 'jobs submitted this UTC day' }),
    daily_limit: Type.Union([Type.Integer(), Type.Null()]),
    running: Type.Integer(),
    concurrency: Type.Union([Type.Integer(), Type.Null()]),
    queued: Type.Integer({ description: 'queued or scheduled' }),
    max_queued: Type.Union([Type.Integer(), Type.Null()]),
    tokens_today: Type.Integer({ description: 'prompt + generated tokens of jobs finished this UTC day' }),
  },
  { description: "the caller's usage and limits" },
);

export const SubmitReply = Type.Object({
  job_id: Type.String(),
  state: JobStateSchema,
  status_url: Type.String(),
  scheduled_for: Type.Optional(Type.String({ description: "with state scheduled: when it becomes queued (the next UTC midnight: the key's daily_limit was reached)" })),
  priority: Type.Optional(Type.Integer({ description: "the priority given, when the one asked for was above the key's priority_max" })),
  message: Type.Optional(Type.String()),
  usage: Type.Optional(UsageSchema),
});

const KeyLimits = {
  concurrency: Type.Optional(NullableInt(1, 100_000, 'jobs of this key running at once; null: no limit')),
  max_queued: Type.Optional(NullableInt(1, 1_000_000_000, 'queued or scheduled jobs of this key; beyond it a submit gets 429')),
  daily_limit: Type.Optional(NullableInt(1, 1_000_000_000, 'jobs per UTC day; beyond it a submit is scheduled for the next day')),
  priority_max: Type.Optional(NullableInt(-1000, 1000, 'higher priorities are clamped to this')),
};
export const KeyCreateBody = Type.Object({ name: Type.String({ minLength: 1, maxLength: 100 }), ...KeyLimits }, { additionalProperties: false });
export const KeyPatchBody = Type.Object({ name: Type.Optional(Type.String({ minLength: 1, maxLength: 100 })), ...KeyLimits }, { additionalProperties: false, minProperties: 1 });
const KeyFields = {
  id: Type.String(),
  name: Type.String(),
  concurrency: Type.Union([Type.Integer(), Type.Null()]),
  max_queued: Type.Union([Type.Integer(), Type.Null()]),
  daily_limit: Type.Union([Type.Integer(), Type.Null()]),
  priority_max: Type.Union([Type.Integer(), Type.Null()]),
  created_at: Type.String(),
  revoked_at: Type.Union([Type.String(), Type.Null()]),
};
export const KeyCreatedReply = Type.Object({ ...KeyFields, key: Type.String({ description: 'the secret: shown once, never again' }) });
export const KeyReply = Type.Object({ ...KeyFields, usage: Type.Optional(UsageSchema) });
export const KeysReply = Type.Object({ keys: Type.Array(KeyReply) });
export const KeyParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 64 }) });
export const AuditQuery = Type.Object(
  {
    limit: Type.Optional(Type.String({ pattern: '^[0-9]{1,3}$' })),
    cursor: Type.Optional(Type.String({ minLength: 1, maxLength: 64 })),
  },
  { additionalProperties: false },
);
export const AuditReply = Type.Object({
  entries: Type.Array(
    Type.Object({
      id: Type.Integer(),
      at: Type.String(),
      actor: Type.String({ description: 'admin, open, or the key id' }),
      action: Type.String(),
      target: Type.String(),
      detail: Type.Union([Type.Record(Type.String(), Type.Unknown()), Type.Null()]),
    }),
  ),
  next_cursor: Type.Union([Type.String(), Type.Null()]),
});

export const JobParams = Type.Object({ id: Type.String() });
export const SubmitHeaders = Type.Object({
  'idempotency-key': Type.Optional(
    Type.String({ minLength: 1, maxLength: 255, pattern: '^[\\x21-\\x7e]+$', description: 'same key + same body replays the original job' }),
  ),
});
export const CancelReply = Type.Object({ job_id: Type.String(), state: JobStateSchema });
export const ListQuery = Type.Object(
  {
    state: Type.Optional(JobStateSchema),
    model: Type.Optional(Type.String({ minLength: 1, maxLength: 256 })),
    created_after: Type.Optional(Type.String({ minLength: 1, maxLength: 64, description: 'ISO-8601, inclusive' })),
    created_before: Type.Optional(Type.String({ minLength: 1, maxLength: 64, description: 'ISO-8601, exclusive' })),
    limit: Type.Optional(Type.String({ pattern: '^[0-9]{1,3}$', description: '1 to 100, default 20' })),
    cursor: Type.Optional(Type.String({ minLength: 1, maxLength: 128, description: 'next_cursor of the previous page' })),
    conversation_id: Type.Optional(Type.String({ minLength: 1, maxLength: 64 })),
    key_id: Type.Optional(Type.String({ minLength: 1, maxLength: 64, description: 'admin only: one API key\'s jobs' })),
    engine: Type.Optional(Type.String({ minLength: 1, maxLength: 64, description: 'jobs run on this engine host (GET /engines)' })),
  },
  {
    // metadata.<key>=<value> filters
    patternProperties: { '^metadata\\.[^\\x00]{1,64}$': Type.String({ maxLength: 1024 }) },
    additionalProperties: false,
  },
);
export const ListItem = Type.Object({
  job_id: Type.String(),
  key_id: Type.Union([Type.String(), Type.Null()]),
  engine: Type.Union([Type.String(), Type.Null()], { description: 'the engine host that ran it' }),
  instance: Type.Union([Type.String(), Type.Null()], { description: 'the Foreman instance that ran it (FOREMAN_INSTANCE_ID)' }),
  state: JobStateSchema,
  model: Type.String(),
  priority: Type.Integer(),
  attempt: Type.Integer(),
  metadata: Type.Record(Type.String(), Type.String()),
  created_at: Type.String(),
  finished_at: Type.Union([Type.String(), Type.Null()]),
  status_url: Type.String(),
});
export const ListReply = Type.Object({ jobs: Type.Array(ListItem), next_cursor: Type.Union([Type.String(), Type.Null()]) });
export const ArtifactParams = Type.Object({ id: Type.String(), name: Type.String() });
export const RedeliverQuery = Type.Object(
  { state: Type.Optional(JobStateSchema) },
  { additionalProperties: false },
);

const Nullable = <T extends Parameters<typeof Type.Union>[0][number]>(t: T) => Type.Union([t, Type.Null()]);

export const ArtifactView = Type.Object({
  name: Type.String(),
  content_type: Type.String(),
  size: Type.Integer(),
  sha256: Type.String(),
  url: Type.String(),
});

export const DeliveryViewSchema = Type.Object({
  event_id: Type.String(),
  state: JobStateSchema,
  status: Type.Union([Type.Literal('pending'), Type.Literal('delivered'), Type.Literal('failed')]),
  attempts: Type.Integer(),
  last_status_code: Nullable(Type.Integer()),
  last_error: Nullable(Type.String()),
  next_attempt_at: Nullable(Type.String()),
  delivered_at: Nullable(Type.String()),
});

export const JobReply = Type.Object({
  job_id: Type.String(),
  kind: Type.Union([Type.Literal('chat'), Type.Literal('embed')]),
  state: JobStateSchema,
  model: Type.String(),
  attempt: Type.Integer(),
  max_attempts: Type.Integer(),
  priority: Type.Integer(),
  deadline: Nullable(Type.String()),
  queue_position: Nullable(Type.Integer({ description: 'queued jobs that run before this one (0 = next); null unless queued' })),
  estimated_start_at: Nullable(Type.String({ description: 'see README: moving average of run time per model' })),
  metadata: Type.Record(Type.String(), Type.String()),
  created_at: Type.String(),
  started_at: Nullable(Type.String()),
  finished_at: Nullable(Type.String()),
  updated_at: Type.String(),
  transitions: Type.Array(Type.Object({ state: JobStateSchema, at: Type.String(), attempt: Type.Integer() })),
  result: Type.Unknown(),
  error: Nullable(Type.Object({ code: Type.String({ enum: [...JOB_ERROR_CODES] }), message: Type.String() })),
  artifacts: Type.Array(ArtifactView),
  webhook: Nullable(
    Type.Object({
      url: Type.String(),
      events: Type.Array(JobStateSchema),
      deliveries: Type.Array(DeliveryViewSchema),
    }),
  ),
  conversation_id: Type.String(),
  continue_from: Nullable(Type.String()),
  waiting_for_previous: Type.Boolean(),
  load_ms: Nullable(Type.Number()),
  usage: Type.Object({ prompt_tokens: Nullable(Type.Integer()), completion_tokens: Nullable(Type.Integer()) }),
  key_id: Nullable(Type.String({ description: 'the API key that submitted it (null: none)' })),
  engine: Nullable(Type.String({ description: 'the engine host that ran (or is running) it' })),
  instance: Nullable(
    Type.String({ description: 'the Foreman instance (FOREMAN_INSTANCE_ID, default <hostname>-<pid>) that ran (or is running) it; null until first claimed' }),
  ),
  scheduled_for: Nullable(Type.String({ description: 'a scheduled job becomes queued at this time' })),
  caller_usage: Type.Optional(UsageSchema),
});

export const ConversationParams = Type.Object({ id: Type.String({ minLength: 1, maxLength: 64 }) });
export const ConversationReply = Type.Object({
  conversation_id: Type.String(),
  status: Type.Union([Type.Literal('active'), Type.Literal('idle'), Type.Literal('failed')]),
  created_at: Type.String(),
  turns: Type.Array(
    Type.Object({
      job_id: Type.String(),
      state: JobStateSchema,
      messages: Type.Array(Type.Unknown()),
      reply: Type.Unknown(),
      error: Nullable(Type.Object({ code: Type.String(), message: Type.String() })),
      created_at: Type.String(),
      finished_at: Nullable(Type.String()),
    }),
  ),
});
export const ConversationsQuery = Type.Object(
  {
    limit: Type.Optional(Type.String({ pattern: '^[0-9]{1,3}$', description: '1 to 100, default 20' })),
    cursor: Type.Optional(Type.String({ minLength: 1, maxLength: 128 })),
  },
  { additionalProperties: false },
);
export const ConversationsReply = Type.Object({
  conversations: Type.Array(
    Type.Object({
      conversation_id: Type.String(),
      created_at: Type.String(),
      turns: Type.Integer(),
      last_job_id: Type.String(),
      last_state: JobStateSchema,
      url: Type.String(),
    }),
  ),
  next_cursor: Nullable(Type.String()),
});

export const RedeliverReply = Type.Object({
  job_id: Type.String(),
  requeued: Type.Array(Type.String()),
});

/** The webhook event body (ADR-0005), for the OpenAPI document's `webhooks`. */
export const WebhookEventSchema = Type.Object({
  event_id: Type.String({ description: '<job_id>:<state>; stable across retries: deduplicate on it' }),
  type: Type.Literal('job.state_changed'),
  job_id: Type.String(),
  state: JobStateSchema,
  sequence: Type.Integer({ description: 'queued 1, loading 2, working 3, done/failed/canceled 4' }),
  occurred_at: Type.String({ format: 'date-time' }),
  metadata: Type.Record(Type.String(), Type.String()),
  error: Type.Optional(Type.Object({ code: Type.String({ enum: [...JOB_ERROR_CODES] }), message: Type.String() })),
  // Terminal events (done, failed, canceled) only: how the run went (ADR-0005, ADR-0016).
  started_at: Type.Optional(Nullable(Type.String({ format: 'date-time' }))),
  finished_at: Type.Optional(Nullable(Type.String({ format: 'date-time' }))),
  duration_ms: Type.Optional(Nullable(Type.Number({ description: 'finished_at - started_at' }))),
  queue_ms: Type.Optional(Nullable(Type.Number({ description: 'started_at (or finished_at, if it never started) - created_at' }))),
  load_ms: Type.Optional(Nullable(Type.Number())),
  attempt: Type.Optional(Type.Integer()),
  model: Type.Optional(Type.String()),
  usage: Type.Optional(Type.Object({ prompt_tokens: Nullable(Type.Integer()), completion_tokens: Nullable(Type.Integer()) })),
  conversation_id: Type.Optional(Type.String()),
  artifacts: Type.Optional(
    Type.Array(
      Type.Object({
        name: Type.String(),
        content_type: Type.String(),
        size: Type.Integer(),
        sha256: Type.String(),
        url: Type.String(),
        inline: Type.Boolean(),
        content: Type.Optional(Type.String({ description: 'the bytes as UTF-8 text (text and JSON types), when inline' })),
        content_base64: Type.Optional(Type.String({ description: 'the bytes in base64 (other types), when inline' })),
      }),
    ),
  ),
});
