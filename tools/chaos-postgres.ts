/**
 * Crash chaos on PostgreSQL (`npm run chaos -- --postgres --instances 3`): N Foreman instances
 * as child processes on one database of a private PostgreSQL server, one fake Ollama (50–500 ms
 * per job) shared by all, recording webhook receivers. Jobs are submitted round-robin to the
 * instances; instances are SIGKILLed at chosen moments (while submitting, mid-generation,
 * mid-delivery, the maintenance leader) and restarted, every other time under the same
 * FOREMAN_INSTANCE_ID (it takes its own running jobs back at once) and otherwise under a new one
 * (its jobs wait for their lease to expire and the leader's rescuer). Then it checks what the
 * SQLite run checks, and what only a cluster can break:
 *
 * - 0 accepted jobs lost, 0 stuck non-terminal, 0 done jobs without their artifact;
 * - 0 webhook events lost, 0 pending deliveries, each job's events in order (replays of events
 *   already received are allowed: at least once);
 * - no job generating on two instances at once (the fake engine counts overlapping generations);
 * - `GET /jobs/<id>` names an instance that was started, the one whose log says it finished it;
 * - never two maintenance leaders at once; and it prints who led maintenance over time.
 *
 * test/chaos-postgres.test.ts runs a small one.
 */
import pg from 'pg';
import { startFakeOllama } from '../test/support/fake-ollama.js';
import { startReceiver, type Receiver } from '../test/support/receiver.js';
import { spawnChild, type Spawned } from '../test/support/child.js';
import { startPostgresCluster, type PostgresCluster } from '../test/support/postgres.js';
import { countKinds, median, mulberry32, orderViolations, sleep, submitUntilAccepted } from './chaos.js';

export type PgKillKind = 'submit' | 'generation' | 'delivery' | 'leader';

export interface PgChaosOptions {
  jobs: number;
  kills: number;
  instances: number;
  seed?: number;
  /** Jobs at once per instance (FOREMAN_CONCURRENCY). */
  concurrency?: number;
  /** An empty database to use; unset: a private PostgreSQL server is started (and removed) for the run. */
  databaseUrl?: string;
  /** FOREMAN_JOB_LEASE of the instances: how long a killed instance's jobs wait for the rescuer. */
  leaseMs?: number;
  /** Submissions are spread over this long (default: as long as the kills take, at least 6 s), so the kills find work. */
  submitSecs?: number;
  log?: (line: string) => void;
}

export interface LeaderSpan {
  instance: string;
  fromMs: number;
  /** When it stopped leading (its kill, its step-down), or null: still leading at the end. */
  toMs: number | null;
  end: 'killed' | 'stepped down' | 'leading at the end';
}

export interface PgChaosReport {
  seed: number;
  instances: number;
  submitted: number;
  /** Accepted jobs not done at the end. */
  lost: number;
  /** Jobs (accepted or not) not terminal at the end. */
  stuck: number;
  failed: number;
  missingArtifacts: number;
  eventsExpected: number;
  eventsDelivered: number;
  duplicates: number;
  lostEvents: number;
  pendingDeliveries: number;
  orderViolations: number;
  /** Generations of one job running at the same time (on two instances, or twice on one). */
  overlapping: number;
  /** Jobs that ran again after a kill (a `queued` transition after the first). */
  rescued: number;
  /** Jobs whose `instance` in GET /jobs/<id> is not one of the instances started. */
  unknownInstance: number;
  /** Jobs whose `instance` differs from the instance whose log says `job done` for it. */
  instanceMismatches: number;
  /** Jobs whose `job done` log line was found (a SIGKILL right after the commit can lose one). */
  instanceConfirmed: number;
  /** Done jobs per instance, as GET /jobs/<id> names it. */
  perInstance: Record<string, number>;
  restarts: number;
  kills: { kind: PgKillKind; atMs: number; instance: string; detail: string }[];
  recoveryMs: number[];
  worstRecoveryMs: number;
  leadership: LeaderSpan[];
  /** Times two instances led maintenance at once (from their logs and the kill times). */
  leaderOverlaps: number;
  /** The longest time without a leader after a leader was killed. */
  worstLeaderlessMs: number;
  totalSecs: number;
}

interface Slot {
  index: number;
  /** Its FOREMAN_INSTANCE_ID now. */
  id: string;
  child: Spawned | null;
  url: string;
}

export async function runPgChaos(opts: PgChaosOptions): Promise<PgChaosReport> {
  if (!(opts.instances >= 1)) throw new Error('instances must be at least 1');
  const seed = opts.seed ?? Date.now() % 1_000_000;
  const rand = mulberry32(seed);
  const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)]!;
  const log = opts.log ?? (() => {});
  const t0 = Date.now();
  const cleanups: (() => Promise<unknown> | unknown)[] = [];
  try {
    let url = opts.databaseUrl;
    if (url === undefined) {
      log('starting a private PostgreSQL server…');
      const server: PostgresCluster = await startPostgresCluster();
      cleanups.push(() => server.stop());
      url = (await server.database('foreman_chaos')).url;
    }
    const sql = new pg.Client({ connectionString: url });
    await sql.connect();
    cleanups.push(() => sql.end());

    const fake = await startFakeOllama({ defaultChunkDelayMs: 40 });
    cleanups.push(() => fake.close());
    // 7 delays per job (6 chunks + done): 7 × 7..71 ms ≈ 50–500 ms per generation.
    for (let i = 0; i < opts.jobs * 2; i++) fake.enqueue({ kind: 'ok', chunkDelayMs: 7 + Math.floor(rand() * 65) });

    // A `delivery` kill holds one delivery at its receiver and kills the instance sending it.
    let grab: ((event: { job_id: string; state: string }) => Promise<void>) | null = null;
    const receivers: Receiver[] = [];
    for (let i = 0; i < 4; i++) {
      const r = await startReceiver(async (got) => {
        const g = grab;
        if (g && got.event?.job_id) {
          grab = null;
          await g(got.event as { job_id: string; state: string });
        }
        await sleep(Math.floor(rand() * 20));
        return 200;
      });
      receivers.push(r);
      cleanups.push(() => r.close());
    }

    const env: Record<string, string> = {
      FOREMAN_DATABASE_URL: url,
      FOREMAN_OLLAMA_URL: fake.url,
      FOREMAN_CONCURRENCY: String(opts.concurrency ?? 4),
      FOREMAN_LOG_LEVEL: 'info', // the leader changes and `job done` lines are read back
      FOREMAN_JOB_LEASE: `${opts.leaseMs ?? 3000}ms`,
      FOREMAN_JOB_RETRY_BASE: '20ms',
      FOREMAN_WEBHOOK_BACKOFF_BASE: '20ms',
      FOREMAN_WEBHOOK_BACKOFF_MAX: '200ms',
      FOREMAN_WEBHOOK_TIMEOUT: '1s',
      FOREMAN_DATABASE_POOL: '5',
      FOREMAN_SHUTDOWN_GRACE: '500ms',
      FOREMAN_MAX_QUEUED: '1000000',
    };

    const slots: Slot[] = Array.from({ length: opts.instances }, (_, i) => ({ index: i, id: `i${i}`, child: null, url: '' }));
    /** Every process started, with the id it ran under and when it was killed (logs are kept). */
    const started: { id: string; child: Spawned; killedAt: number | null }[] = [];
    cleanups.push(async () => {
      for (const s of started) if (s.child.proc.exitCode === null && s.child.proc.signalCode === null) s.child.proc.kill('SIGKILL');
      await Promise.all(started.map((s) => s.child.exited));
    });
    const recoveryMs: number[] = [];
    const kills: PgChaosReport['kills'] = [];
    let restarts = 0;

    const start = async (slot: Slot): Promise<void> => {
      const t = Date.now();
      const child = await spawnChild({ ...env, FOREMAN_INSTANCE_ID: slot.id });
      started.push({ id: slot.id, child, killedAt: null });
      await child.ready(30_000);
      recoveryMs.push(Date.now() - t);
      slot.child = child;
      slot.url = child.url;
    };
    const kill = async (slot: Slot, kind: PgKillKind, detail: string): Promise<void> => {
      const entry = started.find((s) => s.child === slot.child)!;
      slot.url = '';
      entry.killedAt = Date.now();
      slot.child!.proc.kill('SIGKILL');
      await slot.child!.exited;
      slot.child = null;
      kills.push({ kind, atMs: entry.killedAt - t0, instance: slot.id, detail });
      log(`kill #${kills.length} (${kind}) ${slot.id}: ${detail}`);
    };
    const restart = async (slot: Slot, k: number): Promise<void> => {
      // Every other restart under the same id (takes its own jobs back at once), else a new one.
      if (k % 2 === 1) slot.id = `i${slot.index}r${k}`;
      restarts++;
      await start(slot);
    };
    const live = () => slots.filter((s) => s.url !== '');
    /** Nothing left to run or deliver: a kill that waits for work stops waiting. */
    const idle = async (): Promise<boolean> =>
      !submitting &&
      (
        await sql.query<{ n: number }>(
          "SELECT ((SELECT count(*) FROM jobs WHERE state NOT IN ('done', 'failed', 'canceled')) + (SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'))::int AS n",
        )
      ).rows[0]!.n === 0;
    /** The current leader: the last `leader` log line of each live process says whether it leads. */
    const leaderSlot = (): Slot | undefined =>
      live().find((s) => {
        const l = [...s.child!.logs].reverse().find((x) => typeof x.leader === 'boolean');
        return l?.leader === true;
      });

    log(`starting ${opts.instances} instances on one database (seed ${seed})`);
    await Promise.all(slots.map((s) => start(s)));

    // The submitter: round-robin over the instances (the next live one while one is down),
    // retrying until each job gets its 202; it runs through the first kills.
    const accepted: string[] = [];
    // A restart takes seconds: the submissions are spread over the time the kills take (measured
    // as they go; 4 s each to begin with), so that the later kills still find work.
    let perKillMs = 4000;
    const windowMs = () => (opts.submitSecs !== undefined ? opts.submitSecs * 1000 : Math.max(6000, perKillMs * opts.kills));
    let submitting = true;
    const submitter = (async () => {
      const t = Date.now();
      let i = 0;
      const worker = async () => {
        while (i < opts.jobs) {
          const n = i++;
          for (let due = t + (n / opts.jobs) * windowMs(); due > Date.now(); due = t + (n / opts.jobs) * windowMs()) {
            await sleep(Math.min(250, due - Date.now()));
          }
          accepted.push(
            await submitUntilAccepted(n, (tries) => slots[(n + tries) % slots.length]!.url, `${receivers[n % receivers.length]!.url}/hook`),
          );
        }
      };
      await Promise.all(Array.from({ length: 8 }, worker));
      submitting = false;
    })();

    const plan: PgKillKind[] = ['submit', 'generation', 'delivery', 'leader'];
    const killsFrom = Date.now();
    for (let k = 0; k < opts.kills; k++) {
      if (k > 0) perKillMs = (Date.now() - killsFrom) / k;
      let kind = plan[k % plan.length]!;
      if (kind === 'submit' && !submitting) kind = 'generation';
      let victim: Slot;
      let detail: string;
      if (kind === 'submit') {
        const ms = 50 + Math.floor(rand() * 400);
        await sleep(ms);
        victim = pick(live());
        detail = `${accepted.length} of ${opts.jobs} jobs accepted so far`;
      } else if (kind === 'generation') {
        // A job that is generating now, on a live instance: kill that instance 10–70 ms later.
        const end = Date.now() + 20_000;
        let found: { id: string; instance: string } | undefined;
        while (!found && Date.now() < end) {
          const rows = (await sql.query<{ id: string; instance: string }>("SELECT id, instance FROM jobs WHERE state = 'working'")).rows;
          const mine = rows.filter((r) => live().some((s) => s.id === r.instance));
          if (mine.length) found = pick(mine);
          else if (await idle()) break;
          else await sleep(10);
        }
        await sleep(10 + Math.floor(rand() * 60));
        victim = (found && live().find((s) => s.id === found!.instance)) ?? pick(live());
        detail = found ? `while generating job ${found.id}` : 'no generation seen (queue empty)';
      } else if (kind === 'delivery') {
        // Hold the next delivery at its receiver, find who sends it (the row's claim), kill it.
        let sender: string | null = null;
        let jobOf = '';
        let release!: () => void;
        const held = new Promise<void>((r) => (release = r));
        const seen = new Promise<void>((resolve) => {
          grab = async (ev) => {
            jobOf = `${ev.job_id}:${ev.state}`;
            sender =
              (
                await sql.query<{ claimed_by: string | null }>(
                  'SELECT d.claimed_by FROM webhook_deliveries d JOIN jobs j ON j.seq = d.job_seq WHERE j.id = $1 AND d.state = $2',
                  [ev.job_id, ev.state],
                )
              ).rows[0]?.claimed_by ?? null;
            resolve();
            await held;
          };
        });
        let waiting = true;
        const gaveUp = (async () => {
          for (const end = Date.now() + 20_000; waiting && Date.now() < end && !(await idle()); ) await sleep(50);
        })();
        const got = await Promise.race([seen.then(() => true), gaveUp.then(() => false)]);
        waiting = false;
        grab = null;
        const s = sender === null ? undefined : live().find((x) => x.id === sender);
        victim = s ?? pick(live());
        detail = got ? (s ? `while delivering ${jobOf} (the receiver holds it)` : `delivery ${jobOf} seen, sender unknown`) : 'no delivery seen';
        await kill(victim, kind, detail);
        release();
        await restart(victim, k);
        continue;
      } else {
        const end = Date.now() + 10_000;
        let l = leaderSlot();
        while (!l && Date.now() < end) {
          await sleep(20);
          l = leaderSlot();
        }
        await sleep(Math.floor(rand() * 200));
        victim = leaderSlot() ?? pick(live());
        detail = l ? 'the maintenance leader' : 'no leader seen';
      }
      await kill(victim, kind, detail);
      await restart(victim, k);
    }
    await submitter;

    // Every accepted job done, every event delivered, nothing left pending.
    const expected = new Set(accepted.flatMap((id) => ['queued', 'loading', 'working', 'done'].map((s) => `${id}:${s}`)));
    const deliveredIds = () => new Set(receivers.flatMap((r) => r.received.map((x) => x.event?.event_id as string)));
    const deadline = Date.now() + 120_000;
    let stuck = 0;
    let pendingDeliveries = 0;
    for (;;) {
      const got = deliveredIds();
      const missing = [...expected].filter((e) => !got.has(e)).length;
      stuck = (await sql.query<{ n: number }>("SELECT count(*)::int AS n FROM jobs WHERE state NOT IN ('done', 'failed', 'canceled')")).rows[0]!.n;
      pendingDeliveries = (await sql.query<{ n: number }>("SELECT count(*)::int AS n FROM webhook_deliveries WHERE status = 'pending'")).rows[0]!.n;
      if ((missing === 0 && stuck === 0 && pendingDeliveries === 0) || Date.now() > deadline) break;
      await sleep(100);
    }
    const endMs = Date.now() - t0;

    // What GET /jobs/<id> says (on every instance in turn), against the `job done` log lines.
    const doneBy = new Map<string, string>();
    for (const s of started) for (const l of s.child.logs) if (l.msg === 'job done' && typeof l.job_id === 'string') doneBy.set(l.job_id, l.instance as string);
    const names = new Set(started.map((s) => s.id));
    const views = await fetchViews(live().map((s) => s.url), accepted);
    let unknownInstance = 0;
    let instanceMismatches = 0;
    let instanceConfirmed = 0;
    const perInstance: Record<string, number> = {};
    for (const id of accepted) {
      const v = views.get(id);
      const inst = v?.instance ?? null;
      if (v?.state === 'done') perInstance[inst ?? 'null'] = (perInstance[inst ?? 'null'] ?? 0) + 1;
      if (inst === null || !names.has(inst)) unknownInstance++;
      const logged = doneBy.get(id);
      if (logged !== undefined) {
        instanceConfirmed++;
        if (logged !== inst) instanceMismatches++;
      }
    }

    const q = async (text: string) => (await sql.query<{ n: number }>(text)).rows[0]!.n;
    const missingArtifacts = await q(
      "SELECT count(*)::int AS n FROM jobs j WHERE state = 'done' AND NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.job_seq = j.seq AND a.name = 'completion')",
    );
    const rescued = await q("SELECT count(DISTINCT job_seq)::int AS n FROM job_transitions WHERE state = 'queued' AND n > 1");
    const states = new Map((await sql.query<{ id: string; state: string }>('SELECT id, state FROM jobs WHERE id = ANY($1)', [accepted])).rows.map((r) => [r.id, r.state]));

    // Who led maintenance, from each process's log lines and kill time.
    const leadership: LeaderSpan[] = [];
    for (const s of started) {
      let open: LeaderSpan | null = null;
      for (const l of s.child.logs) {
        if (l.leader === true && !open) open = { instance: s.id, fromMs: (l.time as number) - t0, toMs: null, end: 'leading at the end' };
        else if (l.leader === false && open && (l.time as number) - t0 <= endMs) {
          leadership.push({ ...open, toMs: (l.time as number) - t0, end: 'stepped down' });
          open = null;
        }
      }
      if (open) leadership.push(s.killedAt !== null ? { ...open, toMs: s.killedAt - t0, end: 'killed' } : open);
    }
    leadership.sort((a, b) => a.fromMs - b.fromMs);
    let leaderOverlaps = 0;
    let worstLeaderlessMs = 0;
    for (let i = 1; i < leadership.length; i++) {
      const prev = leadership[i - 1]!;
      const cur = leadership[i]!;
      // A new leader logs after it took the lock, which the old one held until it died (after the SIGKILL was sent).
      if (prev.toMs === null || cur.fromMs < prev.toMs) leaderOverlaps++;
      else worstLeaderlessMs = Math.max(worstLeaderlessMs, cur.fromMs - prev.toMs);
    }

    const all = receivers.flatMap((r) => r.received.map((x) => x.event?.event_id as string)).filter((e) => expected.has(e));
    const got = new Set(all);
    const report: PgChaosReport = {
      seed,
      instances: opts.instances,
      submitted: accepted.length,
      lost: accepted.filter((id) => states.get(id) !== 'done').length,
      stuck,
      failed: [...states.values()].filter((s) => s === 'failed').length,
      missingArtifacts,
      eventsExpected: expected.size,
      eventsDelivered: got.size,
      duplicates: all.length - got.size,
      lostEvents: expected.size - got.size,
      pendingDeliveries,
      // Each job's events go to one receiver: its list keeps the job's arrival order.
      orderViolations: orderViolations(receivers.flatMap((r) => r.received.map((x) => x.event ?? {})), accepted).length,
      overlapping: fake.stats.overlapping,
      rescued,
      unknownInstance,
      instanceMismatches,
      instanceConfirmed,
      perInstance,
      restarts,
      kills,
      recoveryMs,
      worstRecoveryMs: Math.max(...recoveryMs),
      leadership,
      leaderOverlaps,
      worstLeaderlessMs,
      totalSecs: (Date.now() - t0) / 1000,
    };
    // A clean stop for the survivors.
    for (const s of live()) s.child!.proc.kill('SIGTERM');
    await Promise.all(live().map((s) => s.child!.exited));
    return report;
  } finally {
    for (const c of cleanups.reverse()) await Promise.resolve(c()).catch(() => {});
  }
}

async function fetchViews(urls: string[], ids: string[]): Promise<Map<string, { state?: string; instance?: string | null }>> {
  const out = new Map<string, { state?: string; instance?: string | null }>();
  for (let i = 0; i < ids.length; i += 50) {
    const batch = ids.slice(i, i + 50);
    const views = await Promise.all(
      batch.map(async (id, k) => {
        const r = await fetch(`${urls[(i + k) % urls.length]}/jobs/${id}`);
        return (await r.json()) as { state?: string; instance?: string | null };
      }),
    );
    batch.forEach((id, k) => out.set(id, views[k]!));
  }
  return out;
}

/** Every invariant held. */
export function pgChaosPassed(r: PgChaosReport): boolean {
  return (
    r.lost === 0 &&
    r.stuck === 0 &&
    r.missingArtifacts === 0 &&
    r.lostEvents === 0 &&
    r.pendingDeliveries === 0 &&
    r.orderViolations === 0 &&
    r.overlapping === 0 &&
    r.unknownInstance === 0 &&
    r.instanceMismatches === 0 &&
    r.leaderOverlaps === 0
  );
}

const secs = (ms: number | null) => (ms === null ? 'end' : `${(ms / 1000).toFixed(1)} s`);

export function formatPgReport(r: PgChaosReport): string {
  const lines = [
    `chaos run on PostgreSQL, ${r.instances} instances (seed ${r.seed}, ${r.totalSecs.toFixed(1)} s)`,
    '',
    '| measure | value |',
    '| --- | --- |',
    `| jobs submitted (202), round-robin | ${r.submitted} |`,
    `| jobs lost (not done) | ${r.lost} |`,
    `| jobs stuck non-terminal | ${r.stuck} |`,
    `| done jobs missing their completion artifact | ${r.missingArtifacts} |`,
    `| events expected | ${r.eventsExpected} |`,
    `| events delivered (distinct) | ${r.eventsDelivered} |`,
    `| events lost | ${r.lostEvents} |`,
    `| deliveries still pending | ${r.pendingDeliveries} |`,
    `| duplicate deliveries (allowed) | ${r.duplicates} |`,
    `| jobs whose events arrived out of order | ${r.orderViolations} |`,
    `| generations of one job running twice at once | ${r.overlapping} |`,
    `| jobs run again after a kill | ${r.rescued} |`,
    `| jobs whose \`instance\` is no instance started | ${r.unknownInstance} |`,
    `| jobs whose \`instance\` differs from its \`job done\` log line | ${r.instanceMismatches} (of ${r.instanceConfirmed} with one) |`,
    `| done jobs per instance (\`instance\` in GET /jobs/<id>) | ${Object.entries(r.perInstance).sort().map(([k, n]) => `${k} ${n}`).join(', ')} |`,
    `| SIGKILL restarts | ${r.restarts} (${countKinds(r)}) |`,
    `| recovery time after restart (spawn → /healthz) worst / median | ${r.worstRecoveryMs} ms / ${median(r.recoveryMs)} ms |`,
    `| two maintenance leaders at once | ${r.leaderOverlaps} |`,
    `| longest time without a leader after a leader died | ${r.worstLeaderlessMs} ms |`,
    '',
    'kills:',
    ...r.kills.map((k, i) => `  #${i + 1} at ${secs(k.atMs)}: ${k.kind}, ${k.instance} (${k.detail})`),
    '',
    'maintenance leader over time:',
    ...r.leadership.map((l) => `  ${secs(l.fromMs).padStart(7)} – ${secs(l.toMs).padEnd(7)} ${l.instance} (${l.end})`),
  ];
  return lines.join('\n');
}
