/**
 * Crash chaos: runs the built service as a child process against a fake Ollama (50–500 ms per
 * job) and recording webhook receivers, submits N jobs, and SIGKILLs the service at random
 * moments (while submitting, mid-generation, mid-delivery, during a TTL sweep), restarting it
 * each time. Then it checks that nothing was lost. `npm run chaos` runs the full version; the
 * test suite runs a small one (test/chaos.test.ts). `npm run chaos -- --postgres --instances 3`
 * runs several instances on one PostgreSQL database instead (tools/chaos-postgres.ts).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import Database from 'better-sqlite3';
import { startFakeOllama } from '../test/support/fake-ollama.js';
import { startReceiver, type Receiver } from '../test/support/receiver.js';
import { spawnChild, type Spawned } from '../test/support/child.js';

export type KillKind = 'submit' | 'generation' | 'delivery' | 'sweep';

export interface ChaosOptions {
  jobs: number;
  kills: number;
  seed?: number;
  concurrency?: number;
  /** Expired finished jobs planted before each `sweep` restart, so the kill lands in a sweep. */
  sweepSeedRows?: number;
  log?: (line: string) => void;
}

export interface ChaosReport {
  seed: number;
  submitted: number;
  lost: number;
  stuck: number;
  failed: number;
  eventsExpected: number;
  eventsDelivered: number;
  duplicates: number;
  lostEvents: number;
  /** Jobs whose events arrived out of order (see orderViolations). */
  orderViolations: number;
  /** Generations of one job that ran at the same time (the fake engine counts them). */
  overlapping: number;
  missingArtifacts: number;
  integrity: string;
  restarts: number;
  kills: { kind: KillKind; atMs: number; detail: string }[];
  recoveryMs: number[];
  worstRecoveryMs: number;
  totalSecs: number;
}

export function mulberry32(seed: number) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Submits chaos job `n` until an instance answers 202, and returns its id. `urlFor(tries)` names
 * the instance for each try (null: none is up yet, wait). Each try has its own prompt: a try that
 * was committed but never answered (killed before its 202) is another job, and the fake engine's
 * overlap count goes by prompt.
 */
export async function submitUntilAccepted(n: number, urlFor: (tries: number) => string | null, hookUrl: string): Promise<string> {
  for (let tries = 0; ; tries++) {
    const base = urlFor(tries);
    if (!base) {
      await sleep(10);
      continue;
    }
    try {
      const res = await fetch(`${base}/jobs`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({
          model: 'llama3.2',
          messages: [{ role: 'user', content: `chaos ${n}.${tries}` }],
          state_webhook_url: hookUrl,
          metadata: { n: String(n) },
        }),
      });
      const body = (await res.json()) as { job_id?: string };
      if (res.status === 202 && body.job_id) return body.job_id;
    } catch {
      /* killed under us: no 202, so try again (on the next instance, if there are several) */
    }
    await sleep(10);
  }
}

export async function runChaos(opts: ChaosOptions): Promise<ChaosReport> {
  const seed = opts.seed ?? Date.now() % 1_000_000;
  const rand = mulberry32(seed);
  const log = opts.log ?? (() => {});
  const t0 = Date.now();
  const fake = await startFakeOllama({ defaultChunkDelayMs: 40 });
  // 7 delays per job (6 chunks + done): 7 × 7..71 ms ≈ 50–500 ms per generation.
  for (let i = 0; i < opts.jobs * 2; i++) fake.enqueue({ kind: 'ok', chunkDelayMs: 7 + Math.floor(rand() * 65) });
  const receivers: Receiver[] = [];
  for (let i = 0; i < 4; i++) {
    receivers.push(await startReceiver(async () => {
      await sleep(Math.floor(rand() * 20));
      return 200;
    }));
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'foreman-chaos-'));
  const dbFile = path.join(dir, 'foreman.db');
  const env = {
    FOREMAN_DATA_DIR: dir,
    FOREMAN_OLLAMA_URL: fake.url,
    FOREMAN_CONCURRENCY: String(opts.concurrency ?? 8),
    FOREMAN_LOG_LEVEL: 'warn',
    FOREMAN_JOB_RETRY_BASE: '20ms',
    FOREMAN_WEBHOOK_BACKOFF_BASE: '20ms',
    FOREMAN_WEBHOOK_BACKOFF_MAX: '200ms',
    FOREMAN_JOB_TTL: '1h',
    FOREMAN_SWEEP_INTERVAL: '250ms',
    FOREMAN_MAX_QUEUED: '1000000',
  };

  let child: Spawned | null = null;
  let currentUrl = '';
  const accepted: string[] = [];
  const recoveryMs: number[] = [];
  const kills: ChaosReport['kills'] = [];
  let restarts = 0;

  async function start(): Promise<void> {
    const t = Date.now();
    child = await spawnChild(env);
    await child.ready(30_000);
    recoveryMs.push(Date.now() - t);
    currentUrl = child.url;
  }
  async function kill(kind: KillKind, detail: string): Promise<void> {
    child!.proc.kill('SIGKILL');
    await child!.exited;
    kills.push({ kind, atMs: Date.now() - t0, detail });
    log(`kill #${kills.length} (${kind}): ${detail}`);
    currentUrl = '';
  }

  // The submitter runs through the first kills: it retries until each job gets its 202.
  const submitRate = opts.jobs / 6; // jobs per second
  let submitting = true;
  const submitter = (async () => {
    const started = Date.now();
    let i = 0;
    const worker = async () => {
      while (i < opts.jobs) {
        const n = i++;
        const due = started + (n / submitRate) * 1000;
        if (due > Date.now()) await sleep(due - Date.now());
        accepted.push(await submitUntilAccepted(n, () => currentUrl, `${receivers[n % receivers.length]!.url}/hook`));
      }
    };
    await Promise.all(Array.from({ length: 8 }, worker));
    submitting = false;
  })();

  const plan: KillKind[] = ['submit', 'generation', 'delivery', 'sweep'];
  await start();
  for (let k = 0; k < opts.kills; k++) {
    let kind = plan[k % plan.length]!;
    if (kind === 'submit' && !submitting) kind = 'generation';
    if (kind === 'submit') {
      const ms = 50 + Math.floor(rand() * 400);
      await sleep(ms);
      await kill('submit', `${accepted.length} jobs accepted so far, ${ms} ms after start`);
    } else if (kind === 'generation') {
      const before = fake.requests.filter((r) => r.kind === 'chat').length;
      const seen = await fake.waitForRequests(before + 1, (r) => r.kind === 'chat', 20_000).then(() => true, () => false);
      await sleep(10 + Math.floor(rand() * 60));
      await kill('generation', seen ? 'with a generation streaming' : 'no generation seen (queue empty)');
    } else if (kind === 'delivery') {
      const counts = receivers.map((r) => r.received.length);
      const total = () => receivers.reduce((a, r) => a + r.received.length, 0);
      const before = counts.reduce((a, b) => a + b, 0);
      const end = Date.now() + 20_000;
      while (total() === before && Date.now() < end) await sleep(1);
      await kill('delivery', total() > before ? 'with a delivery in flight' : 'no delivery seen');
    } else {
      // Plant expired finished jobs under the running service; its sweep (every 250 ms) starts
      // deleting them in batches; kill it while it does.
      const planted = plantExpired(dbFile, opts.sweepSeedRows ?? 5000);
      const t = Date.now();
      const end = t + 5_000;
      while (countPlanted(dbFile) === planted && Date.now() < end) await sleep(2);
      await sleep(Math.floor(rand() * 15));
      await kill('sweep', 'planted expired jobs');
      const left = countPlanted(dbFile);
      kills[kills.length - 1]!.detail = `${planted - left} of ${planted} expired jobs swept when killed (${left === 0 ? 'sweep had finished' : 'mid-sweep'})`;
      log(`  ${kills[kills.length - 1]!.detail}`);
    }
    restarts++;
    await start();
  }
  await submitter;

  // Wait for every accepted job to finish and every event to arrive.
  const deadline = Date.now() + 120_000;
  const expected = new Set(accepted.flatMap((id) => ['queued', 'loading', 'working', 'done'].map((s) => `${id}:${s}`)));
  const receivedIds = () => new Set(receivers.flatMap((r) => r.received.map((x) => x.event?.event_id as string)));
  for (;;) {
    const got = receivedIds();
    const missing = [...expected].filter((e) => !got.has(e)).length;
    if (missing === 0 || Date.now() > deadline) break;
    await sleep(100);
  }
  const jobs = await fetchStates(currentUrl, accepted);
  child!.proc.kill('SIGTERM');
  await child!.exited;

  const db = new Database(dbFile, { readonly: true });
  const integrity = db.pragma('integrity_check', { simple: true }) as string;
  const stuck = db.prepare(`SELECT count(*) FROM jobs WHERE state NOT IN ('done', 'failed')`).pluck().get() as number;
  const missingArtifacts = db
    .prepare(`SELECT count(*) FROM jobs j WHERE state = 'done' AND NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.job_seq = j.seq AND a.name = 'completion')`)
    .pluck()
    .get() as number;
  db.close();

  const all = receivers.flatMap((r) => r.received.map((x) => x.event?.event_id as string)).filter((e) => expected.has(e));
  const got = new Set(all);
  const report: ChaosReport = {
    seed,
    submitted: accepted.length,
    lost: accepted.filter((id) => jobs.get(id) !== 'done').length,
    stuck,
    failed: [...jobs.values()].filter((s) => s === 'failed').length,
    eventsExpected: expected.size,
    eventsDelivered: got.size,
    duplicates: all.length - got.size,
    lostEvents: expected.size - got.size,
    // Each job's events go to one receiver: the receivers' lists one after another keep each job's arrival order.
    orderViolations: orderViolations(receivers.flatMap((r) => r.received.map((x) => x.event ?? {})), accepted).length,
    overlapping: fake.stats.overlapping,
    missingArtifacts,
    integrity,
    restarts,
    kills,
    recoveryMs,
    worstRecoveryMs: Math.max(...recoveryMs),
    totalSecs: (Date.now() - t0) / 1000,
  };
  for (const r of receivers) await r.close();
  await fake.close();
  fs.rmSync(dir, { recursive: true, force: true });
  return report;
}

async function fetchStates(url: string, ids: string[]): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (let i = 0; i < ids.length; i += 50) {
    const batch = ids.slice(i, i + 50);
    const states = await Promise.all(
      batch.map(async (id) => {
        const r = await fetch(`${url}/jobs/${id}`);
        return ((await r.json()) as { state?: string }).state ?? `http ${r.status}`;
      }),
    );
    batch.forEach((id, k) => out.set(id, states[k]!));
  }
  return out;
}

const PLANT_PREFIX = 'planted-';

function plantExpired(dbFile: string, n: number): number {
  const db = new Database(dbFile);
  const old = Date.now() - 30 * 86_400_000;
  const insJob = db.prepare(`INSERT INTO jobs (id, state, model, request, max_attempts, run_at, created_at, started_at, finished_at, updated_at, result, attempt)
    VALUES (?, 'done', 'llama3.2', '{}', 3, ?, ?, ?, ?, ?, '{"message":{"content":"old"}}', 1) RETURNING seq`);
  const insArt = db.prepare(`INSERT INTO artifacts (job_seq, name, content_type, size, sha256, body, created_at)
    VALUES (?, 'completion', 'application/json', ?, ?, ?, ?)`);
  const body = Buffer.from(JSON.stringify({ message: { content: 'x'.repeat(2000) } }));
  db.transaction(() => {
    for (let i = 0; i < n; i++) {
      const seq = (insJob.get(`${PLANT_PREFIX}${Date.now()}-${i}`, old, old, old, old, old) as { seq: number }).seq;
      insArt.run(seq, body.length, '0'.repeat(64), body, old);
    }
  })();
  db.close();
  return n;
}

function countPlanted(dbFile: string): number {
  const db = new Database(dbFile, { readonly: true });
  const n = db.prepare(`SELECT count(*) FROM jobs WHERE id LIKE '${PLANT_PREFIX}%'`).pluck().get() as number;
  db.close();
  return n;
}

/** Every invariant held. */
export function chaosPassed(r: ChaosReport): boolean {
  return r.lost === 0 && r.stuck === 0 && r.lostEvents === 0 && r.orderViolations === 0 && r.overlapping === 0 && r.missingArtifacts === 0 && r.integrity === 'ok';
}

export function formatReport(r: ChaosReport): string {
  const lines = [
    `chaos run (seed ${r.seed}, ${r.totalSecs.toFixed(1)} s)`,
    '',
    '| measure | value |',
    '| --- | --- |',
    `| jobs submitted (202) | ${r.submitted} |`,
    `| jobs lost (not done) | ${r.lost} |`,
    `| jobs stuck non-terminal | ${r.stuck} |`,
    `| done jobs missing their completion artifact | ${r.missingArtifacts} |`,
    `| events expected | ${r.eventsExpected} |`,
    `| events delivered (distinct) | ${r.eventsDelivered} |`,
    `| events lost | ${r.lostEvents} |`,
    `| duplicate deliveries (allowed) | ${r.duplicates} |`,
    `| jobs whose events arrived out of order | ${r.orderViolations} |`,
    `| generations of one job running twice at once | ${r.overlapping} |`,
    `| SIGKILL restarts | ${r.restarts} (${countKinds(r)}) |`,
    `| recovery time after restart (spawn → /healthz) worst / median | ${r.worstRecoveryMs} ms / ${median(r.recoveryMs)} ms |`,
    `| PRAGMA integrity_check | ${r.integrity} |`,
  ];
  return lines.join('\n');
}

export function countKinds(r: { kills: { kind: string }[] }): string {
  const c = new Map<string, number>();
  for (const k of r.kills) c.set(k.kind, (c.get(k.kind) ?? 0) + 1);
  return [...c].map(([k, n]) => `${n} ${k}`).join(', ');
}

const STATE_SEQ: Record<string, number> = { scheduled: 0, queued: 1, loading: 2, working: 3, done: 4, failed: 4, canceled: 4 };

/**
 * Jobs whose webhook events broke per-job order. `events` are one receiver's deliveries in
 * arrival order (each job's events go to one receiver). A job's first arrivals of each state
 * must come in state order; a crash between a receiver's answer and the record of it sends the
 * unrecorded events again, in order (at least once), so going back is allowed only to a state
 * already received, never to a new one out of turn.
 */
export function orderViolations(events: { job_id?: string; state?: string }[], ids: Iterable<string>): string[] {
  const per = new Map<string, number[]>();
  for (const id of ids) per.set(id, []);
  for (const e of events) {
    const seq = e.job_id === undefined ? undefined : per.get(e.job_id);
    if (seq && e.state !== undefined && STATE_SEQ[e.state] !== undefined) seq.push(STATE_SEQ[e.state]!);
  }
  const bad: string[] = [];
  for (const [id, seq] of per) {
    const first = seq.filter((x, i) => seq.indexOf(x) === i);
    let ok = first.every((x, i) => i === 0 || x > first[i - 1]!);
    for (let i = 1; ok && i < seq.length; i++) if (seq[i]! < seq[i - 1]! && !seq.slice(0, i).includes(seq[i]!)) ok = false;
    if (!ok) bad.push(id);
  }
  return bad;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? 0;
}

// `npm run chaos [-- --postgres [--instances N]] [--jobs N] [--kills N] [--seed N]`
if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const { values: args } = parseArgs({
    options: {
      postgres: { type: 'boolean', default: false },
      instances: { type: 'string' },
      jobs: { type: 'string' },
      kills: { type: 'string' },
      seed: { type: 'string' },
    },
  });
  const num = (flag: string | undefined, envName: string, def: number): number => {
    const raw = flag ?? process.env[envName];
    const n = raw === undefined ? def : Number(raw);
    if (!Number.isInteger(n) || n < 0) {
      console.error(`chaos: ${flag !== undefined ? 'the flag' : envName} must be a whole number, got ${JSON.stringify(raw)}`);
      process.exit(2);
    }
    return n;
  };
  const jobs = num(args.jobs, 'CHAOS_JOBS', 500);
  const kills = num(args.kills, 'CHAOS_KILLS', 12);
  const seed = args.seed ?? process.env.CHAOS_SEED;
  const seedOpt = seed === undefined ? {} : { seed: num(seed, 'CHAOS_SEED', 0) };
  if (args.instances !== undefined && !args.postgres) {
    console.error('chaos: --instances needs --postgres (SQLite is one process)');
    process.exit(2);
  }
  const run = args.postgres
    ? import('./chaos-postgres.js').then(async ({ runPgChaos, formatPgReport, pgChaosPassed }) => {
        const instances = num(args.instances, 'CHAOS_INSTANCES', 3);
        const r = await runPgChaos({ jobs, kills, instances, log: (l) => console.log(l), ...seedOpt });
        console.log('');
        console.log(formatPgReport(r));
        return pgChaosPassed(r);
      })
    : runChaos({ jobs, kills, log: (l) => console.log(l), ...seedOpt }).then((r) => {
        console.log('');
        console.log(formatReport(r));
        return chaosPassed(r);
      });
  run
    .then((ok) => {
      console.log(ok ? '\nPASS: nothing lost' : '\nFAIL: an invariant failed (see the table)');
      process.exit(ok ? 0 : 1);
    })
    .catch((err) => {
      console.error(err);
      process.exit(1);
    });
}
