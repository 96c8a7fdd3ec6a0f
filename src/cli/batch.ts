import { createHash } from 'node:crypto';
import fs from 'node:fs';
import readline from 'node:readline';
import cliProgress from 'cli-progress';
import { CliError, EXIT, TERMINAL, type Client, type Job } from './client.js';

export interface BatchOptions {
  model: string;
  input: string;
  output: string;
  /** Submissions and status polls in flight at once. */
  concurrency: number;
  json: boolean;
  progress: boolean;
}

interface Line {
  customId: string;
  body: Record<string, unknown>;
  key: string;
}

/**
 * `foreman batch`: one job per input line, submitted with an Idempotency-Key derived from the
 * line, so running it again never duplicates a job; it resumes, skipping lines whose result is
 * already in the output file and waiting for jobs already submitted. One result line per input
 * line, keyed by `custom_id`, written as jobs finish. Ctrl-C stops submitting and waiting.
 */
export async function runBatch(client: Client, o: BatchOptions, signal: AbortSignal): Promise<number> {
  const lines = await readLines(o);
  const done = new Set<string>();
  if (fs.existsSync(o.output)) {
    for (const l of fs.readFileSync(o.output, 'utf8').split('\n')) {
      if (!l.trim()) continue;
      try {
        done.add((JSON.parse(l) as { custom_id: string }).custom_id);
      } catch {
        // a line cut by a kill: that job is simply waited for again
      }
    }
  }
  const todo = lines.filter((l) => !done.has(l.customId));
  const out = fs.createWriteStream(o.output, { flags: 'a' });
  const counts = { queued: 0, running: 0, done: 0, failed: 0 };
  const bar = o.progress
    ? new cliProgress.SingleBar(
        {
          format: 'batch |{bar}| {value}/{total} finished · queued {queued} · running {running} · done {done} · failed {failed} · {rate}/s · ETA {eta_formatted}',
          stream: process.stderr,
          hideCursor: false,
        },
        cliProgress.Presets.shades_classic,
      )
    : null;
  const t0 = Date.now();
  bar?.start(lines.length, done.size, { ...counts, rate: '0.0' });
  const update = () => bar?.update(done.size, { ...counts, rate: ((done.size - (lines.length - todo.length)) / Math.max(0.001, (Date.now() - t0) / 1000)).toFixed(1) });

  // Submit (an already submitted line replays its job), then poll until each job ends.
  const pending = new Map<string, { line: Line; id: string }>();
  let next = 0;
  const submitOne = async (line: Line) => {
    const r = await client.request<{ job_id: string }>('POST', '/jobs', line.body, { 'idempotency-key': line.key });
    pending.set(line.customId, { line, id: r.body.job_id });
  };
  await Promise.all(
    Array.from({ length: Math.min(o.concurrency, todo.length) }, async () => {
      while (next < todo.length && !signal.aborted) await submitOne(todo[next++]!);
    }),
  );
  let failed = 0;
  while (pending.size > 0 && !signal.aborted) {
    counts.queued = 0;
    counts.running = 0;
    const batch = [...pending.values()];
    let i = 0;
    await Promise.all(
      Array.from({ length: Math.min(o.concurrency, batch.length) }, async () => {
        while (i < batch.length && !signal.aborted) {
          const p = batch[i++]!;
          const j = await client.job(p.id);
          if (TERMINAL.has(j.state)) {
            pending.delete(p.line.customId);
            done.add(p.line.customId);
            if (j.state === 'done') counts.done++;
            else {
              counts.failed++;
              failed++;
            }
            out.write(`${JSON.stringify(resultLine(p.line.customId, j))}\n`);
          } else if (j.state === 'queued' || j.state === 'scheduled') counts.queued++;
          else counts.running++;
        }
      }),
    );
    update();
    if (pending.size > 0) await new Promise((r) => setTimeout(r, 250));
  }
  update();
  bar?.stop();
  await new Promise<void>((r) => out.end(r));
  if (signal.aborted) throw new CliError(`stopped: ${done.size} of ${lines.length} lines have results; run the same command again to resume`, EXIT.jobFailed);
  if (o.json) process.stdout.write(`${JSON.stringify({ lines: lines.length, done: counts.done, failed, output: o.output })}\n`);
  else process.stdout.write(`${lines.length} lines: results in ${o.output}${failed ? ` (${failed} failed)` : ''}\n`);
  return failed > 0 ? EXIT.jobFailed : EXIT.ok;
}

/** One result line: OpenAI-batch-like, keyed by custom_id. */
function resultLine(customId: string, j: Job) {
  return {
    custom_id: customId,
    job_id: j.job_id,
    state: j.state,
    content: j.result?.message?.content ?? null,
    response: j.state === 'done' ? j.result : null,
    error: j.error ?? null,
  };
}

/** Each line: a JSON string (a prompt) or an object with `prompt` or `messages`, and an optional `custom_id`. */
async function readLines(o: BatchOptions): Promise<Line[]> {
  if (!fs.existsSync(o.input)) throw new CliError(`no such file: ${o.input}`, EXIT.usage);
  const rl = readline.createInterface({ input: fs.createReadStream(o.input), crlfDelay: Infinity });
  const out: Line[] = [];
  const seen = new Set<string>();
  let n = 0;
  for await (const raw of rl) {
    n++;
    if (!raw.trim()) continue;
    let v: unknown;
    try {
      v = JSON.parse(raw);
    } catch {
      throw new CliError(`${o.input}:${n}: not JSON (each line is a JSON string or object)`, EXIT.usage);
    }
    let body: Record<string, unknown>;
    let customId = `line-${n}`;
    if (typeof v === 'string') body = { model: o.model, messages: [{ role: 'user', content: v }] };
    else if (v !== null && typeof v === 'object' && !Array.isArray(v)) {
      const { custom_id, prompt, ...rest } = v as Record<string, unknown>;
      if (custom_id !== undefined) customId = String(custom_id);
      body = { model: o.model, ...rest };
      if (typeof prompt === 'string') body.messages = [{ role: 'user', content: prompt }];
      if (!Array.isArray(body.messages)) throw new CliError(`${o.input}:${n}: needs "prompt" or "messages"`, EXIT.usage);
    } else throw new CliError(`${o.input}:${n}: each line is a JSON string or object`, EXIT.usage);
    if (seen.has(customId)) throw new CliError(`${o.input}:${n}: custom_id ${JSON.stringify(customId)} appears twice`, EXIT.usage);
    seen.add(customId);
    const key = createHash('sha256').update(`${customId}\n${JSON.stringify(body)}`).digest('hex').slice(0, 64);
    out.push({ customId, body, key: `batch-${key}` });
  }
  return out;
}
