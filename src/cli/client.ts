import { createParser, type EventSourceMessage } from 'eventsource-parser';

/** Exit codes (README "CLI"): 0 ok, 1 job failed, 2 usage error, 3 server unreachable. */
export const EXIT = { ok: 0, jobFailed: 1, usage: 2, unreachable: 3 } as const;

/** An error that ends the command with an exit code and a message for people. */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode: number,
    readonly code?: string,
  ) {
    super(message);
  }
}

export interface Job {
  job_id: string;
  state: string;
  model: string;
  result?: { message?: { content?: string } } | null;
  error?: { code: string; message: string } | null;
  [k: string]: unknown;
}

export const TERMINAL = new Set(['done', 'failed', 'canceled']);

/** A small client for the Foreman API: FOREMAN_URL, FOREMAN_API_KEY; errors carry exit codes. */
export class Client {
  constructor(
    readonly base: string,
    private readonly apiKey: string | undefined,
  ) {}

  private headers(extra: Record<string, string> = {}): Record<string, string> {
    return { ...(this.apiKey ? { authorization: `Bearer ${this.apiKey}` } : {}), ...extra };
  }

  async request<T>(method: string, path: string, body?: unknown, extra: Record<string, string> = {}): Promise<{ status: number; body: T }> {
    let res: Response;
    try {
      res = await fetch(`${this.base}${path}`, {
        method,
        headers: this.headers(body === undefined ? extra : { 'content-type': 'application/json', ...extra }),
        ...(body === undefined ? {} : { body: JSON.stringify(body) }),
      });
    } catch (err) {
      const cause = (err as { cause?: { code?: string; message?: string } }).cause;
      throw new CliError(`cannot reach ${this.base}: ${cause?.code ?? cause?.message ?? (err as Error).message}`, EXIT.unreachable);
    }
    const text = await res.text();
    let parsed: unknown = null;
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch {
      parsed = text;
    }
    if (res.status >= 400) {
      const e = parsed as { code?: string; message?: string } | null;
      const msg = `${e?.code ?? `HTTP ${res.status}`}: ${e?.message ?? text.slice(0, 200)}`;
      throw new CliError(msg, res.status >= 500 ? EXIT.jobFailed : EXIT.usage, e?.code);
    }
    return { status: res.status, body: parsed as T };
  }

  job(id: string): Promise<Job> {
    return this.request<Job>('GET', `/jobs/${encodeURIComponent(id)}`).then((r) => r.body);
  }

  /**
   * Follows a job's SSE stream until it ends: `onState` for each state event, `onDelta` for
   * tokens. Resumes with Last-Event-ID if the connection drops. Returns the final job.
   */
  async follow(id: string, on: { onState?: (state: string, data: Record<string, unknown>) => void; onDelta?: (text: string) => void } = {}): Promise<Job> {
    let lastId = '';
    for (let tries = 0; ; tries++) {
      let ended = false;
      try {
        const res = await fetch(`${this.base}/jobs/${encodeURIComponent(id)}/events`, {
          headers: this.headers(lastId ? { 'last-event-id': lastId } : {}),
        });
        if (res.status >= 400) {
          const e = (await res.json().catch(() => null)) as { code?: string; message?: string } | null;
          throw new CliError(`${e?.code ?? `HTTP ${res.status}`}: ${e?.message ?? ''}`, EXIT.usage, e?.code);
        }
        const parser = createParser({
          onEvent: (ev: EventSourceMessage) => {
            if (ev.id) lastId = ev.id;
            const data = JSON.parse(ev.data) as Record<string, unknown>;
            if (ev.event === 'state') {
              on.onState?.(String(data.state), data);
              if (TERMINAL.has(String(data.state))) ended = true;
            } else if (ev.event === 'delta' && typeof data.content === 'string') on.onDelta?.(data.content);
          },
        });
        const decoder = new TextDecoder();
        for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) parser.feed(decoder.decode(chunk, { stream: true }));
      } catch (err) {
        if (err instanceof CliError) throw err;
        if (tries >= 5) throw new CliError(`lost the event stream of ${id}: ${(err as Error).message}`, EXIT.unreachable);
      }
      if (ended) return this.job(id);
      // The stream ended without a terminal event we saw (resumed past it, or cut): ask.
      const j = await this.job(id);
      if (TERMINAL.has(j.state)) return j;
      await new Promise((r) => setTimeout(r, 200 * (tries + 1)));
    }
  }
}

/** A job's outcome as an exit code. */
export const exitFor = (j: Job): number => (j.state === 'done' ? EXIT.ok : EXIT.jobFailed);
