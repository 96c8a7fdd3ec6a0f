/**
 * What every contender does for one job, so the comparison measures the queue, not the work:
 * the same Ollama client as Foreman (load, then stream and merge), then one POST of the `done`
 * event to the job's webhook. Used by the BullMQ and pg-boss contenders in `npm run compare`.
 */
import Fastify from 'fastify';
import { request } from 'undici';
import { OllamaEngine } from '../../src/engine/ollama.js';

export interface ChatJob {
  model: string;
  messages: { role: string; content: string }[];
  state_webhook_url?: string;
}

export function engineFromEnv(): OllamaEngine {
  return new OllamaEngine({ url: process.env.OLLAMA_URL ?? 'http://127.0.0.1:11434', idleTimeoutMs: 300_000 });
}

export async function runJob(engine: OllamaEngine, id: string, job: ChatJob): Promise<void> {
  const signal = new AbortController().signal;
  await engine.load(job.model, { signal });
  const result = await engine.chat({ model: job.model, messages: job.messages }, { signal });
  if (job.state_webhook_url) {
    const res = await request(job.state_webhook_url, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ event_id: `${id}:done`, job_id: id, state: 'done', result }),
    });
    await res.body.dump();
    if (res.statusCode >= 300) throw new Error(`webhook answered ${res.statusCode}`);
  }
}

/** POST /jobs → enqueue (the contender's durable write) → 202 {job_id}. */
export async function serve(port: number, enqueue: (job: ChatJob) => Promise<string>): Promise<void> {
  const app = Fastify({ logger: false });
  app.post('/jobs', async (req, reply) => {
    const body = req.body as ChatJob;
    if (typeof body?.model !== 'string' || !Array.isArray(body.messages)) return reply.code(400).send({ code: 'validation_failed' });
    const id = await enqueue(body);
    return reply.code(202).send({ job_id: id, state: 'queued' });
  });
  app.get('/healthz', async () => ({ status: 'ok' }));
  await app.listen({ host: '127.0.0.1', port });
}
