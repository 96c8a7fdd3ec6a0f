import { Type, type Static } from '@sinclair/typebox';
import { JOB_STATES } from '../domain.js';

/** Request and response schemas. Fastify compiles each once: Ajv validators and fast-json-stringify serializers. */

export const ErrorBody = Type.Object(
  {
    code: Type.String(),
    message: Type.String(),
    field: Type.Optional(Type.String()),
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

const Message = Type.Object({
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

export const SubmitBody = Type.Object(
  {
    model: Type.String({ minLength: 1, maxLength: 256 }),
    messages: Type.Array(Message, { minItems: 1, maxItems: 10_000 }),
    format: Type.Optional(Type.Union([Type.Literal('json'), Type.Record(Type.String(), Type.Unknown())])),
    options: Type.Optional(Type.Record(Type.String(), Type.Unknown())),
    tools: Type.Optional(Type.Array(Tool, { maxItems: 256 })),
    keep_alive: Type.Optional(Type.Union([Type.String({ maxLength: 32 }), Type.Number()])),
    think: Type.Optional(
      Type.Union([Type.Boolean(), Type.Literal('low'), Type.Literal('medium'), Type.Literal('high')]),
    ),
    stream: Type.Optional(Type.Boolean()),
    state_webhook_url: Type.Optional(Type.String({ minLength: 1, maxLength: 2048 })),
    webhook_events: Type.Optional(Type.Array(JobStateSchema, { minItems: 1, maxItems: 5, uniqueItems: true })),
    metadata: Type.Optional(
      Type.Record(Type.String(), Type.String({ maxLength: 1024 }), {
        maxProperties: 64,
        propertyNames: { minLength: 1, maxLength: 64 },
      }),
    ),
  },
  { additionalProperties: false },
);
export type SubmitBody = Static<typeof SubmitBody>;

export const SubmitReply = Type.Object({
  job_id: Type.String(),
  state: JobStateSchema,
  status_url: Type.String(),
});

export const JobParams = Type.Object({ id: Type.String() });
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
  state: JobStateSchema,
  model: Type.String(),
  attempt: Type.Integer(),
  max_attempts: Type.Integer(),
  metadata: Type.Record(Type.String(), Type.String()),
  created_at: Type.String(),
  started_at: Nullable(Type.String()),
  finished_at: Nullable(Type.String()),
  updated_at: Type.String(),
  transitions: Type.Array(Type.Object({ state: JobStateSchema, at: Type.String(), attempt: Type.Integer() })),
  result: Type.Unknown(),
  error: Nullable(Type.Object({ code: Type.String(), message: Type.String() })),
  artifacts: Type.Array(ArtifactView),
  webhook: Nullable(
    Type.Object({
      url: Type.String(),
      events: Type.Array(JobStateSchema),
      deliveries: Type.Array(DeliveryViewSchema),
    }),
  ),
});

export const RedeliverReply = Type.Object({
  job_id: Type.String(),
  requeued: Type.Array(Type.String()),
});
