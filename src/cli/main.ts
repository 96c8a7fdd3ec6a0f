#!/usr/bin/env node
/**
 * The `foreman` command line (README "CLI"): talks to FOREMAN_URL (default
 * http://127.0.0.1:8080) with FOREMAN_API_KEY. Exit codes: 0 ok, 1 job failed, 2 usage error,
 * 3 server unreachable.
 */
import fs from 'node:fs';
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import { JOB_STATES } from '../domain.js';
import { VERSION } from '../version.js';
import { runBatch } from './batch.js';
import { CliError, Client, EXIT, exitFor, type Job } from './client.js';

const client = new Client((process.env.FOREMAN_URL ?? 'http://127.0.0.1:8080').replace(/\/+$/, ''), process.env.FOREMAN_API_KEY || undefined);
/** An action whose result is the process's exit code. */
const act =
  <A extends unknown[]>(fn: (...a: A) => Promise<number>) =>
  async (...a: A): Promise<void> => {
    process.exitCode = await fn(...a);
  };
const print = (s: string) => process.stdout.write(`${s}\n`);
const json = (v: unknown) => print(JSON.stringify(v, null, 2));

function summary(j: Job): string {
  const lines = [`${j.job_id}  ${j.state}  ${j.model}`];
  if (j.error) lines.push(`error: ${j.error.code}: ${j.error.message}`);
  if (j.state === 'done' && typeof j.result?.message?.content === 'string') lines.push(j.result.message.content);
  return lines.join('\n');
}

/**
 * After a job's live tokens: a line end, and the whole answer again when what was shown is not it.
 * Tokens are live only (never replayed), so a stream joined after the first ones, or resumed after a
 * cut, shows a part; a retried run shows its tokens twice.
 */
function endLive(j: Job, streamed: string): void {
  const content = j.state === 'done' && typeof j.result?.message?.content === 'string' ? j.result.message.content : null;
  if (content !== null && content !== streamed) {
    if (streamed !== '') {
      print('');
      process.stderr.write('[the stream did not show the whole answer; here it is]\n');
    }
    print(content);
  } else print('');
}

/** Waits for a job, showing its states on stderr and its tokens on stdout unless --json. */
async function waitFor(id: string, asJson: boolean, live: boolean): Promise<number> {
  let streamed = '';
  const j = await client.follow(id, {
    onState: (state) => {
      if (!asJson && live) process.stderr.write(`[${state}]\n`);
    },
    onDelta: (text) => {
      if (asJson || !live) return;
      streamed += text;
      process.stdout.write(text);
    },
  });
  if (asJson) json(j);
  else if (streamed === '') print(summary(j));
  else if (j.state === 'done') endLive(j, streamed);
  else print(`\n[${j.state}] ${j.error ? `${j.error.code}: ${j.error.message}` : ''}`);
  return exitFor(j);
}

const program = new Command()
  .name('foreman')
  .description('Foreman: an async job service for LLM work (client for FOREMAN_URL, default http://127.0.0.1:8080)')
  .version(VERSION)
  .exitOverride()
  .showHelpAfterError();

program
  .command('serve')
  .description('run the service in the foreground (the same as npm start)')
  .action(act(async () => {
    await import('../main.js');
    await new Promise(() => {}); // the service runs until a signal
    return EXIT.ok;
  }));

program
  .command('submit')
  .description('submit a chat job; prints the job id')
  .argument('[prompt...]', 'the user message')
  .option('-m, --model <model>', 'the model (may be left out with --continue-from)')
  .option('-f, --file <messages.json>', 'a JSON array of messages instead of a prompt')
  .option('--priority <n>', 'higher runs first', (v) => Number.parseInt(v, 10))
  .option('--webhook <url>', 'state_webhook_url')
  .option('--continue-from <job id>', 'continue that job\'s conversation')
  .option('--wait', 'follow the job: states and streamed tokens, then the result')
  .option('--json', 'JSON output')
  .action(act(async (prompt: string[], o: { model?: string; file?: string; priority?: number; webhook?: string; continueFrom?: string; wait?: boolean; json?: boolean }) => {
    let messages: unknown;
    if (o.file) {
      try {
        messages = JSON.parse(fs.readFileSync(o.file, 'utf8'));
      } catch (err) {
        throw new CliError(`cannot read messages from ${o.file}: ${(err as Error).message}`, EXIT.usage);
      }
    } else if (prompt.length > 0) messages = [{ role: 'user', content: prompt.join(' ') }];
    else throw new CliError('give a prompt or --file messages.json', EXIT.usage);
    const body: Record<string, unknown> = { messages };
    if (o.model) body.model = o.model;
    if (o.priority !== undefined) body.priority = o.priority;
    if (o.webhook) body.state_webhook_url = o.webhook;
    if (o.continueFrom) body.continue_from = o.continueFrom;
    const r = await client.request<{ job_id: string; state: string }>('POST', '/jobs', body);
    if (!o.wait) {
      if (o.json) json(r.body);
      else print(r.body.job_id);
      return EXIT.ok;
    }
    if (!o.json) process.stderr.write(`${r.body.job_id}\n`);
    return waitFor(r.body.job_id, o.json === true, true);
  }));

program
  .command('get')
  .description("print a job's record")
  .argument('<id>')
  .option('--json', 'JSON output')
  .action(act(async (id: string, o: { json?: boolean }) => {
    const j = await client.job(id);
    if (o.json) json(j);
    else print(summary(j));
    return EXIT.ok;
  }));

program
  .command('wait')
  .description('wait for a job to finish; exit 1 if it failed or was canceled')
  .argument('<id>')
  .option('--json', 'JSON output')
  .action(act(async (id: string, o: { json?: boolean }) => waitFor(id, o.json === true, false)));

program
  .command('tail')
  .description("follow a job's events (SSE): states and tokens as they come")
  .argument('<id>')
  .option('--json', 'one JSON object per event')
  .action(act(async (id: string, o: { json?: boolean }) => {
    let streamed = '';
    const j = await client.follow(id, {
      onState: (state, data) => (o.json ? print(JSON.stringify({ event: 'state', ...data })) : process.stderr.write(`[${state}]\n`)),
      onDelta: (text) => {
        if (o.json) return print(JSON.stringify({ event: 'delta', content: text }));
        streamed += text;
        process.stdout.write(text);
      },
    });
    if (!o.json) endLive(j, streamed);
    return exitFor(j);
  }));

program
  .command('cancel')
  .description('cancel a queued or running job')
  .argument('<id>')
  .option('--json', 'JSON output')
  .action(act(async (id: string, o: { json?: boolean }) => {
    const r = await client.request<{ job_id: string; state: string }>('POST', `/jobs/${encodeURIComponent(id)}/cancel`);
    if (o.json) json(r.body);
    else print(`${r.body.job_id}  ${r.body.state}`);
    return EXIT.ok;
  }));

program
  .command('jobs')
  .description('list jobs, newest first')
  .addOption(new Option('--state <state>').choices([...JOB_STATES]))
  .option('--model <model>')
  .option('--limit <n>', '1 to 100', '20')
  .option('--json', 'JSON output')
  .action(act(async (o: { state?: string; model?: string; limit: string; json?: boolean }) => {
    const q = new URLSearchParams({ limit: o.limit, ...(o.state ? { state: o.state } : {}), ...(o.model ? { model: o.model } : {}) });
    const r = await client.request<{ jobs: { job_id: string; state: string; model: string; created_at: string }[] }>('GET', `/jobs?${q}`);
    if (o.json) json(r.body);
    else for (const j of r.body.jobs) print(`${j.job_id}  ${j.state.padEnd(8)}  ${j.model}  ${j.created_at}`);
    return EXIT.ok;
  }));

program
  .command('batch')
  .description('one job per line of a JSONL file; results to a JSONL file as they finish; resumable')
  .argument('<input.jsonl>', 'each line a JSON string (a prompt) or {custom_id?, prompt | messages, ...}')
  .requiredOption('-m, --model <model>', 'the model for every line (a line may override it)')
  .requiredOption('-o, --output <results.jsonl>', 'results, one line per input line, keyed by custom_id')
  .option('--concurrency <n>', 'requests in flight at once', '32')
  .option('--json', 'JSON summary')
  .action(act(async (input: string, o: { model: string; output: string; concurrency: string; json?: boolean }) => {
    const stop = new AbortController();
    process.once('SIGINT', () => stop.abort());
    return runBatch(client, { model: o.model, input, output: o.output, concurrency: Math.max(1, Number(o.concurrency) || 32), json: o.json === true, progress: process.stderr.isTTY === true }, stop.signal);
  }));

// API keys (ADR-0013): FOREMAN_API_KEY must be the admin token.
const keys = program.command('keys').description('manage API keys (needs the admin token as FOREMAN_API_KEY)');
const limitOpt = (flag: string, what: string) => new Option(`${flag} <n>`, what).argParser((v: string) => {
  if (!/^-?\d+$/.test(v)) throw new InvalidArgumentError('must be a whole number');
  return Number(v);
});
interface KeyRow {
  id: string;
  name: string;
  key?: string;
  concurrency: number | null;
  max_queued: number | null;
  daily_limit: number | null;
  priority_max: number | null;
  revoked_at: string | null;
  usage?: { jobs_today: number; running: number; queued: number; tokens_today: number };
}
const limitsText = (k: KeyRow) =>
  `concurrency ${k.concurrency ?? '-'} · max_queued ${k.max_queued ?? '-'} · daily_limit ${k.daily_limit ?? '-'} · priority_max ${k.priority_max ?? '-'}`;
keys
  .command('create')
  .description('create a key; prints the secret once')
  .argument('<name>')
  .addOption(limitOpt('--concurrency', 'jobs of the key running at once'))
  .addOption(limitOpt('--max-queued', 'queued jobs beyond which a submit gets 429'))
  .addOption(limitOpt('--daily-limit', 'jobs per UTC day; beyond it jobs are scheduled for the next day'))
  .addOption(limitOpt('--priority-max', 'higher priorities are clamped to this'))
  .option('--json', 'JSON output')
  .action(act(async (name: string, o: { concurrency?: number; maxQueued?: number; dailyLimit?: number; priorityMax?: number; json?: boolean }) => {
    const body = {
      name,
      ...(o.concurrency !== undefined ? { concurrency: o.concurrency } : {}),
      ...(o.maxQueued !== undefined ? { max_queued: o.maxQueued } : {}),
      ...(o.dailyLimit !== undefined ? { daily_limit: o.dailyLimit } : {}),
      ...(o.priorityMax !== undefined ? { priority_max: o.priorityMax } : {}),
    };
    const r = await client.request<KeyRow>('POST', '/keys', body);
    if (o.json) json(r.body);
    else {
      print(r.body.key!);
      process.stderr.write(`key ${r.body.id} (${r.body.name}): ${limitsText(r.body)}. The key above is shown only this once.\n`);
    }
    return EXIT.ok;
  }));
keys
  .command('list')
  .description('keys (without secrets) with their usage today')
  .option('--json', 'JSON output')
  .action(act(async (o: { json?: boolean }) => {
    const r = await client.request<{ keys: KeyRow[] }>('GET', '/keys');
    if (o.json) json(r.body);
    else
      for (const k of r.body.keys) {
        const u = k.usage;
        print(`${k.id}  ${k.name.padEnd(16)}  ${k.revoked_at ? 'revoked ' : 'active  '}  ${limitsText(k)}${u ? `  · today ${u.jobs_today} jobs, ${u.tokens_today} tokens · running ${u.running} · queued ${u.queued}` : ''}`);
      }
    return EXIT.ok;
  }));
keys
  .command('revoke')
  .description("revoke a key: its next request gets 401 (its queued jobs stay)")
  .argument('<id>')
  .option('--json', 'JSON output')
  .action(act(async (id: string, o: { json?: boolean }) => {
    const r = await client.request<KeyRow>('DELETE', `/keys/${encodeURIComponent(id)}`);
    if (o.json) json(r.body);
    else print(`${r.body.id}  revoked ${r.body.revoked_at}`);
    return EXIT.ok;
  }));

try {
  await program.parseAsync(process.argv);
} catch (err) {
  if (err instanceof CommanderError) {
    process.exit(err.exitCode === 0 ? 0 : EXIT.usage);
  }
  if (err instanceof CliError) {
    process.stderr.write(`foreman: ${err.message}\n`);
    process.exit(err.exitCode);
  }
  process.stderr.write(`foreman: ${(err as Error).stack ?? String(err)}\n`);
  process.exit(EXIT.jobFailed);
}
