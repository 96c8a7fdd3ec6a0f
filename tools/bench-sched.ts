/**
 * npm run bench:sched: the model-aware scheduler (ADR-0012) against FIFO (affinity off,
 * FOREMAN_AFFINITY_MAX_WAIT=0) on fake Ollama hosts that hold one resident model each and take
 * SWAP_MS to load another. Per-token time is fixed, so a job's length is its prompt's length.
 * A measurement, not a test: nothing asserts. Prints one table row per workload and policy.
 */
import { startFakeOllama, type FakeOllama } from '../test/support/fake-ollama.js';
import { startHarness } from '../test/support/harness.js';

const HOSTS = Number(process.env.BENCH_SCHED_HOSTS ?? 2);
const SWAP_MS = Number(process.env.BENCH_SCHED_SWAP_MS ?? 2000);
const TOKEN_MS = Number(process.env.BENCH_SCHED_TOKEN_MS ?? 50);
const JOBS = Number(process.env.BENCH_SCHED_JOBS ?? 36);
const MAX_WAIT_MS = Number(process.env.BENCH_SCHED_MAX_WAIT_MS ?? 30_000);

interface Job {
  model: string;
  words: number;
  priority: number;
}

/** A deterministic pseudo-random sequence, so both policies get the same jobs. */
function rng(seed: number) {
  let s = seed >>> 0;
  return () => ((s = (s * 1664525 + 1013904223) >>> 0) / 2 ** 32);
}

/** 0.2 to 1 s at TOKEN_MS per streamed line: the fake streams 3 thinking lines, then the words. */
const wordsFor = (r: () => number) => Math.max(0, Math.round((200 + r() * 800) / TOKEN_MS) - 5);

const workloads: Record<string, () => Job[]> = {
  '(a) 3 models interleaved A B C A B C …': () => {
    const r = rng(1);
    return Array.from({ length: JOBS }, (_, i) => ({ model: ['ma', 'mb', 'mc'][i % 3]!, words: wordsFor(r), priority: 0 }));
  },
  '(b) one hot model, a trickle of two cold ones': () => {
    const r = rng(2);
    return Array.from({ length: JOBS }, (_, i) => ({ model: i % 9 === 4 ? 'mb' : i % 9 === 8 ? 'mc' : 'ma', words: wordsFor(r), priority: 0 }));
  },
  '(c) 3 models with priorities mixed in': () => {
    const r = rng(3);
    return Array.from({ length: JOBS }, (_, i) => ({ model: ['ma', 'mb', 'mc'][i % 3]!, words: wordsFor(r), priority: r() < 0.25 ? 5 : 0 }));
  },
};

const pct = (xs: number[], p: number) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? NaN;
};

async function run(jobs: Job[], affinityMaxWaitMs: number) {
  const fakes: FakeOllama[] = [];
  for (let i = 0; i < HOSTS; i++) {
    fakes.push(await startFakeOllama({ models: ['ma', 'mb', 'mc'], maxResident: 1, swapMs: SWAP_MS, defaultChunkDelayMs: TOKEN_MS }));
  }
  const h = await startHarness(
    {
      engines: fakes.map((f, i) => `${f.url}?name=gpu${i + 1}&slots=1`),
      affinityMaxWaitMs,
      engineIdleTimeoutMs: SWAP_MS + 10_000,
      maxQueued: 100_000,
    },
    {},
    fakes[0],
  );
  // Every job queued before any runs: a burst, as a backlog is.
  const ids: string[] = [];
  const t0 = Date.now();
  for (const j of jobs) {
    const text = Array.from({ length: j.words }, (_, k) => `w${k}`).join(' ');
    ids.push(await h.submit({ model: j.model, messages: [{ role: 'user', content: text }], priority: j.priority }));
  }
  const done = await Promise.all(ids.map((id) => h.waitForState(id, ['done', 'failed'], 600_000)));
  const end = Math.max(...done.map((j) => Date.parse(j.finished_at)));
  const waits = done.map((j) => Date.parse(j.started_at) - Date.parse(j.created_at));
  // Generation time (each job's run less its load): the work itself.
  const work = done.reduce((a, j) => a + (Date.parse(j.finished_at) - Date.parse(j.started_at) - (j.load_ms ?? 0)), 0);
  const models = new Set(jobs.map((j) => j.model)).size;
  const loads = fakes.reduce((a, f) => a + f.stats.swaps, 0);
  const failed = done.filter((j) => j.state !== 'done').length;
  await h.stop();
  for (const f of fakes) await f.close();
  return {
    makespan: (end - t0) / 1000,
    // Lower bound: the work spread over the hosts, plus each model's first load (hosts start empty).
    lowerBound: (work + Math.max(models, HOSTS) * SWAP_MS) / HOSTS / 1000,
    p50: pct(waits, 50) / 1000,
    p95: pct(waits, 95) / 1000,
    max: Math.max(...waits) / 1000,
    longestJob: Math.max(...done.map((j) => Date.parse(j.finished_at) - Date.parse(j.started_at))) / 1000,
    loads,
    failed,
  };
}

async function main() {
  console.log(
    `bench:sched — ${HOSTS} hosts × 1 slot, 1 resident model each, ${SWAP_MS} ms swap, ${TOKEN_MS} ms per streamed line, ${JOBS} jobs of 0.2–1 s, FOREMAN_AFFINITY_MAX_WAIT ${MAX_WAIT_MS} ms`,
  );
  console.log('');
  console.log('| workload | policy | makespan | lower bound | makespan ÷ bound | wait p50 / p95 / max | max wait bound (max wait + longest job) | loads | failed |');
  console.log('| --- | --- | --- | --- | --- | --- | --- | --- | --- |');
  for (const [name, make] of Object.entries(workloads)) {
    const jobs = make();
    const fifo = await run(jobs, 0);
    const smart = await run(jobs, MAX_WAIT_MS);
    for (const [policy, r] of [
      ['FIFO (affinity off)', fifo],
      ['Foreman scheduler', smart],
    ] as const) {
      console.log(
        `| ${name} | ${policy} | ${r.makespan.toFixed(1)} s | ${r.lowerBound.toFixed(1)} s | ${(r.makespan / r.lowerBound).toFixed(2)} | ${r.p50.toFixed(1)} / ${r.p95.toFixed(1)} / ${r.max.toFixed(1)} s | ${policy === 'FIFO (affinity off)' ? '—' : `${((MAX_WAIT_MS / 1000) + r.longestJob).toFixed(1)} s`} | ${r.loads} | ${r.failed} |`,
      );
    }
    console.log(`| ${name} | FIFO ÷ scheduler makespan | ${(fifo.makespan / smart.makespan).toFixed(2)}× | | | | | | |`);
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
