/** Fastify + pg-boss doing Foreman's work (see common.ts). Env: PORT, OLLAMA_URL, PG_URL, CONCURRENCY. */
import PgBoss from 'pg-boss';
import { engineFromEnv, runJob, serve, type ChatJob } from './common.js';

const engine = engineFromEnv();
const boss = new PgBoss({ connectionString: process.env.PG_URL!, max: 16 });
await boss.start();
await boss.deleteQueue('chat').catch(() => undefined);
await boss.createQueue('chat');
// pg-boss polls; 0.5 s is the smallest interval it allows. One worker per unit of concurrency.
for (let i = 0; i < Number(process.env.CONCURRENCY ?? 4); i++) {
  await boss.work<ChatJob>('chat', { batchSize: 1, pollingIntervalSeconds: 0.5 }, async ([job]) => runJob(engine, job!.id, job!.data));
}
await serve(Number(process.env.PORT), async (job) => (await boss.send('chat', job, { retryLimit: 2 }))!);
