/**
 * npm run demo: starts Foreman (as a child process) and a tiny local webhook listener, submits
 * a job with state_webhook_url, and prints each event as it arrives with its signature check.
 * Then it drops one webhook on purpose and shows GET /jobs/<id> reconciling, and a redeliver.
 *
 * The engine is a local fake Ollama unless DEMO_OLLAMA_URL (and DEMO_MODEL) point at a real one.
 */
import { createHmac, timingSafeEqual } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startFakeOllama } from '../test/support/fake-ollama.js';
import { startReceiver, type Received } from '../test/support/receiver.js';
import { startChild } from '../test/support/child.js';

const SECRET = 'demo-secret-not-for-production';

function checkSignatures(r: Received): string {
  const raw = r.raw;
  const fs1 = String(r.headers['x-foreman-signature'] ?? '');
  const expect1 = `sha256=${createHmac('sha256', SECRET).update(raw).digest('hex')}`;
  const ok1 = fs1.length === expect1.length && timingSafeEqual(Buffer.from(fs1), Buffer.from(expect1));
  const id = String(r.headers['webhook-id']);
  const ts = String(r.headers['webhook-timestamp']);
  const expect2 = createHmac('sha256', SECRET).update(`${id}.${ts}.`).update(raw).digest('base64');
  const ok2 = String(r.headers['webhook-signature'] ?? '')
    .split(' ')
    .some((e) => e === `v1,${expect2}`);
  return `X-Foreman-Signature ${ok1 ? 'valid' : 'INVALID'}, webhook-signature ${ok2 ? 'valid' : 'INVALID'}`;
}

async function main() {
  const realUrl = process.env.DEMO_OLLAMA_URL;
  const fake = realUrl ? null : await startFakeOllama({ defaultChunkDelayMs: 40, loadDelayMs: 150 });
  const model = process.env.DEMO_MODEL ?? 'llama3.2';
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'foreman-demo-'));
  let dropping: string | null = null;
  const receiver = await startReceiver((r) => {
    if (dropping && r.event?.state === dropping) {
      console.log(`  ✗ listener dropped ${r.event.event_id} on purpose (answered 500)`);
      return 500;
    }
    console.log(`  → ${r.event.event_id}  state=${r.event.state}  sequence=${r.event.sequence}  (${checkSignatures(r)})`);
    return 200;
  });
  const child = await startChild({
    FOREMAN_DATA_DIR: dir,
    FOREMAN_OLLAMA_URL: realUrl ?? fake!.url,
    FOREMAN_WEBHOOK_SECRET: SECRET,
    FOREMAN_WEBHOOK_BACKOFF_BASE: '100ms',
    FOREMAN_WEBHOOK_BACKOFF_MAX: '200ms',
    FOREMAN_WEBHOOK_MAX_ATTEMPTS: '3',
    FOREMAN_LOG_LEVEL: 'warn',
  });
  const api = async (p: string, init?: RequestInit) => {
    const r = await fetch(`${child.url}${p}`, init);
    return { status: r.status, body: (await r.json()) as any };
  };
  const submit = (content: string) =>
    api('/jobs', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({
        model,
        messages: [{ role: 'user', content }],
        state_webhook_url: `${receiver.url}/hooks/foreman`,
        metadata: { demo: 'yes' },
      }),
    });

  console.log(`Foreman at ${child.url}; webhook listener at ${receiver.url}; engine ${realUrl ?? `fake Ollama at ${fake!.url}`}\n`);
  console.log('1. Submit a job with state_webhook_url; events as they arrive:');
  const a = await submit('Say hello to the demo.');
  console.log(`  202 ${JSON.stringify(a.body)}`);
  await receiver.waitFor((rs) => rs.some((r) => r.event?.event_id === `${a.body.job_id}:done` && r.answered === 200), 600_000);
  const ja = await api(`/jobs/${a.body.job_id}`);
  console.log(`  result: ${JSON.stringify(ja.body.result.message.content)}\n`);

  console.log('2. Submit another job while the listener drops its `working` event:');
  dropping = 'working';
  const b = await submit('And once more.');
  const id = b.body.job_id as string;
  let jb = await api(`/jobs/${id}`);
  while (!(jb.body.state === 'done' && jb.body.webhook.deliveries.every((d: any) => d.status !== 'pending'))) {
    await new Promise((r) => setTimeout(r, 100));
    jb = await api(`/jobs/${id}`);
  }
  console.log(`  GET /jobs/${id} still tells the truth: state=${jb.body.state}`);
  for (const d of jb.body.webhook.deliveries) {
    console.log(`    ${d.event_id.padEnd(50)} ${d.status.padEnd(9)} attempts=${d.attempts} last_status=${d.last_status_code}`);
  }
  console.log('\n3. The listener recovers; POST /jobs/<id>/webhooks/redeliver brings the dropped event back:');
  dropping = null;
  const re = await api(`/jobs/${id}/webhooks/redeliver`, { method: 'POST' });
  console.log(`  ${re.status} ${JSON.stringify(re.body)}`);
  await receiver.waitFor((rs) => rs.some((r) => r.event?.event_id === `${id}:working` && r.answered === 200), 30_000);

  child.proc.kill('SIGTERM');
  await child.exited;
  await receiver.close();
  await fake?.close();
  fs.rmSync(dir, { recursive: true, force: true });
  console.log('\ndone.');
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
