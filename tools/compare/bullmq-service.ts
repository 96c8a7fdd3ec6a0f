/** Fastify + BullMQ doing Foreman's work (see common.ts). Env: PORT, OLLAMA_URL, REDIS_PORT, CONCURRENCY. */
import { Queue, Worker } from 'bullmq';
import { engineFromEnv, runJob, serve, type ChatJob } from './common.js';

const connection = { host: '127.0.0.1', port: Number(process.env.REDIS_PORT ?? 6379) };
const engine = engineFromEnv();
const queue = new Queue<ChatJob>('chat', { connection });
await queue.obliterate({ force: true }).catch(() => undefined);
new Worker<ChatJob>('chat', async (job) => runJob(engine, String(job.id), job.data), {
  connection,
  concurrency: Number(process.env.CONCURRENCY ?? 4),
  removeOnComplete: { count: 1000 },
});
await serve(Number(process.env.PORT), async (job) => String((await queue.add('chat', job, { attempts: 3 })).id));
