/**
 * The engine pool and model-aware scheduling (ADR-0012), against several protocol-faithful fake
 * Ollama hosts on loopback: routing by installed model, model_not_found, slots, failover when a
 * host dies mid-generation, a host coming back, affinity against FIFO, the starvation bound,
 * priority over affinity, the merged /api/tags and /api/ps, and FOREMAN_ENGINES validation.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../src/config.js';
import { startFakeOllama, type FakeOllama, type FakeOllamaOptions } from './support/fake-ollama.js';
import { hello, startHarness, type Harness } from './support/harness.js';
import { sleep, terminal, until } from './support/util.js';

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function fake(opts: FakeOllamaOptions = {}): Promise<FakeOllama> {
  const f = await startFakeOllama(opts);
  cleanups.push(() => f.close());
  return f;
}

/** A service over the given hosts: `name=` and `slots=` per host. */
async function pool(hosts: { f: FakeOllama; name: string; slots?: number }[], over: Parameters<typeof startHarness>[0] = {}): Promise<Harness> {
  const h = await startHarness(
    { engines: hosts.map((x) => `${x.f.url}?name=${x.name}&slots=${x.slots ?? 1}`), engineHealthIntervalMs: 100, ...over },
    {},
    hosts[0]!.f,
  );
  cleanups.push(() => h.stop());
  return h;
}

/** Two hosts: gpu1 has llama3.2, gpu2 has mistral; one slot each. */
async function llamaAndMistral() {
  const a = await fake({ models: ['llama3.2'] });
  const b = await fake({ models: ['mistral'] });
  const h = await pool([
    { f: a, name: 'gpu1' },
    { f: b, name: 'gpu2' },
  ]);
  return { a, b, h };
}

const job = (text: string, model: string, extra: Record<string, unknown> = {}) => ({ ...hello(text), model, ...extra });
const startedAt = (j: any) => Date.parse(j.started_at);

describe('routing', () => {
  it('sends each job to a host that has its model installed, and records the host', async () => {
    const { a, b, h } = await llamaAndMistral();
    const ids = [await h.submit(job('one', 'llama3.2')), await h.submit(job('two', 'mistral')), await h.submit(job('three', 'mistral'))];
    const jobs = await Promise.all(ids.map((id) => h.waitForState(id, ['done'])));
    expect(jobs.map((j) => j.engine)).toEqual(['gpu1', 'gpu2', 'gpu2']);
    expect(a.requests.filter((r) => r.kind === 'chat').map((r) => r.body.model)).toEqual(['llama3.2']);
    expect(b.requests.filter((r) => r.kind === 'chat').map((r) => r.body.model)).toEqual(['mistral', 'mistral']);
    // GET /jobs filters by host.
    const listed = (await h.api('/jobs?engine=gpu2')).body.jobs.map((j: any) => j.job_id);
    expect(listed.sort()).toEqual([ids[1], ids[2]].sort());
  });

  it('fails at once with model_not_found when every host is up and none has the model', async () => {
    const { a, b, h } = await llamaAndMistral();
    const before = a.requests.length + b.requests.length;
    const id = await h.submit(job('x', 'qwen3'));
    const j = await h.waitForState(id, terminal);
    expect(j).toMatchObject({ state: 'failed', attempt: 0, engine: null, error: { code: 'model_not_found', message: "model 'qwen3' not found" } });
    expect([...a.requests, ...b.requests].slice(before).filter((r) => r.kind !== 'other')).toEqual([]);
  });

  it('a host whose /api/tags lists nothing is offered every model; its own 404 decides', async () => {
    const quiet = await fake({ models: ['llama3.2'], listModels: false });
    const h = await pool([{ f: quiet, name: 'compat' }]);
    expect((await h.api('/engines')).body.engines[0].installed_models).toEqual([]);
    const ok = await h.waitForState(await h.submit(job('served', 'llama3.2')), terminal);
    expect(ok).toMatchObject({ state: 'done', engine: 'compat' });
    const missing = await h.waitForState(await h.submit(job('not here', 'qwen3')), terminal);
    expect(missing).toMatchObject({ state: 'failed', attempt: 1, engine: 'compat', error: { code: 'model_not_found', message: "model 'qwen3' not found" } });
  });

  it('while a host is down, a job for a model no live host has waits instead of failing', async () => {
    const { b, h } = await llamaAndMistral();
    await b.stop();
    await until('gpu2 to be seen down', async () => (await h.api('/engines')).body.engines[1].health === 'down', 5_000);
    const id = await h.submit(job('later', 'mistral'));
    await sleep(400);
    expect((await h.api(`/jobs/${id}`)).body).toMatchObject({ state: 'queued', attempt: 0 });
    await b.start();
    const j = await h.waitForState(id, terminal, 10_000);
    expect(j).toMatchObject({ state: 'done', engine: 'gpu2', attempt: 1 });
  });
});

describe('slots and failover', () => {
  it("never runs more than a host's slots at once", async () => {
    const a = await fake({ defaultChunkDelayMs: 15 });
    const b = await fake({ defaultChunkDelayMs: 15 });
    const h = await pool([
      { f: a, name: 'big', slots: 3 },
      { f: b, name: 'small', slots: 1 },
    ]);
    const ids: string[] = [];
    for (let i = 0; i < 16; i++) ids.push(await h.submit(job(`j${i}`, 'llama3.2')));
    const jobs = await Promise.all(ids.map((id) => h.waitForState(id, ['done'], 20_000)));
    expect(a.stats.maxConcurrent).toBeLessThanOrEqual(3);
    expect(b.stats.maxConcurrent).toBe(1);
    expect(a.stats.maxConcurrent).toBe(3); // the big host was used to its slots
    const on = (n: string) => jobs.filter((j) => j.engine === n).length;
    expect(on('big') + on('small')).toBe(16);
    expect(on('small')).toBeGreaterThan(0);
    expect(a.stats.overlapping + b.stats.overlapping).toBe(0);
  });

  it('a host that dies mid-generation gives the job back: it finishes on another host, its attempt not burned', async () => {
    const a = await fake({ defaultChunkDelayMs: 60 });
    const b = await fake({ defaultChunkDelayMs: 60 });
    const h = await pool([
      { f: a, name: 'gpu1' },
      { f: b, name: 'gpu2' },
    ]);
    const id = await h.submit(job('a long answer to survive a crash', 'llama3.2'));
    const running = await until('the job to be working', async () => {
      const j = (await h.api(`/jobs/${id}`)).body;
      return j.state === 'working' ? j : null;
    });
    const dying = running.engine === 'gpu1' ? a : b;
    const other = running.engine === 'gpu1' ? 'gpu2' : 'gpu1';
    await sleep(100); // mid-stream
    await dying.stop(); // its sockets are destroyed, as when the process is killed
    const j = await h.waitForState(id, terminal, 10_000);
    expect(j).toMatchObject({ state: 'done', engine: other, attempt: 1 });
    expect(j.result.message.content).toBe('echo: a long answer to survive a crash');
    expect(j.transitions.map((t: any) => t.state)).toEqual(['queued', 'loading', 'working', 'queued', 'loading', 'working', 'done']);
    const engines = (await h.api('/engines')).body.engines;
    expect(engines.find((e: any) => e.name === running.engine)).toMatchObject({ health: 'down', circuit: 'open' });
  });

  it('a host that comes back is used again with no manual step', async () => {
    const { b, h } = await llamaAndMistral();
    await b.stop();
    await until('gpu2 down', async () => (await h.api('/engines')).body.engines[1].health === 'down', 5_000);
    expect((await h.api('/readyz')).status).toBe(200); // one healthy host is enough
    await b.start();
    await until('gpu2 up', async () => (await h.api('/engines')).body.engines[1].health === 'up', 10_000);
    const j = await h.waitForState(await h.submit(job('back', 'mistral')), terminal);
    expect(j).toMatchObject({ state: 'done', engine: 'gpu2' });
  });
});

describe('model-aware scheduling', () => {
  /**
   * One host, one slot, one resident model, 120 ms swaps. A blocker (m1) holds the slot while
   * the queue forms: m2 m1 m2 m1 m2 m1. Returns the swaps and the order the models ran in.
   */
  async function interleaved(affinityMaxWaitMs: number) {
    const f = await fake({ models: ['m1', 'm2'], maxResident: 1, swapMs: 120, defaultChunkDelayMs: 5 });
    const h = await pool([{ f, name: 'gpu1' }], { affinityMaxWaitMs });
    f.enqueue({ kind: 'ok', chunkDelayMs: 150 });
    const blocker = await h.submit(job('blocker', 'm1'));
    await until('the blocker to run', async () => (await h.api(`/jobs/${blocker}`)).body.state === 'working');
    const ids: string[] = [];
    for (let i = 0; i < 6; i++) ids.push(await h.submit(job(`q${i}`, i % 2 === 0 ? 'm2' : 'm1')));
    const jobs = await Promise.all(ids.map((id) => h.waitForState(id, ['done'], 15_000)));
    const order = [...jobs].sort((x, y) => startedAt(x) - startedAt(y)).map((j) => j.model);
    const engine = (await h.api('/engines')).body.engines[0];
    return { swaps: f.stats.swaps, order, loads: engine.loads };
  }

  it('affinity runs the resident model first and swaps less than FIFO', async () => {
    const fifo = await interleaved(0);
    const smart = await interleaved(30_000);
    expect(fifo.order).toEqual(['m2', 'm1', 'm2', 'm1', 'm2', 'm1']);
    expect(fifo.swaps).toBe(7); // the blocker's load, then a swap for every job
    expect(smart.order).toEqual(['m1', 'm1', 'm1', 'm2', 'm2', 'm2']);
    expect(smart.swaps).toBe(2); // the blocker's load, then one swap to m2
    // The pool counts the same loads the host did.
    expect(fifo.loads).toBe(7);
    expect(smart.loads).toBe(2);
  });

  it('a job passed over for affinity still runs within FOREMAN_AFFINITY_MAX_WAIT plus one job', async () => {
    const f = await fake({ models: ['m1', 'm2'], maxResident: 1, swapMs: 50, defaultChunkDelayMs: 20 });
    const maxWait = 400;
    const h = await pool([{ f, name: 'gpu1' }], { affinityMaxWaitMs: maxWait });
    const blocker = await h.submit(job('blocker', 'm1'));
    await until('the blocker to run', async () => (await h.api(`/jobs/${blocker}`)).body.state === 'working');
    const cold = await h.submit(job('cold', 'm2'));
    // A steady stream of the resident model: each job ~100 ms.
    const warm: string[] = [];
    for (let i = 0; i < 12; i++) warm.push(await h.submit(job(`w${i}`, 'm1')));
    const all = await Promise.all([cold, ...warm].map((id) => h.waitForState(id, ['done'], 20_000)));
    const c = all[0]!;
    const waited = startedAt(c) - Date.parse(c.created_at);
    const longest = Math.max(...all.map((j) => Date.parse(j.finished_at) - startedAt(j)));
    expect(waited).toBeLessThanOrEqual(maxWait + longest + 150);
    // It was passed over at first (affinity), but did not wait for the whole stream.
    const before = all.slice(1).filter((j) => startedAt(j) < startedAt(c)).length;
    expect(before).toBeGreaterThan(0);
    expect(before).toBeLessThan(12);
  });

  it('another options.num_ctx is another load: affinity prefers the job that matches what is loaded', async () => {
    const f = await fake({ models: ['m1', 'm2'], maxResident: 1, swapMs: 50, defaultChunkDelayMs: 5 });
    const h = await pool([{ f, name: 'gpu1' }], { affinityMaxWaitMs: 30_000 });
    f.enqueue({ kind: 'ok', chunkDelayMs: 100 });
    const blocker = await h.submit(job('blocker', 'm1'));
    await until('the blocker to run', async () => (await h.api(`/jobs/${blocker}`)).body.state === 'working');
    const bigCtx = await h.submit(job('big context', 'm1', { options: { num_ctx: 8192 } }));
    const same = await h.submit(job('same load', 'm1'));
    const [b, s] = await Promise.all([h.waitForState(bigCtx, ['done']), h.waitForState(same, ['done'])]);
    expect(startedAt(s)).toBeLessThan(startedAt(b));
    // What the user sent is passed on unchanged.
    expect(f.requests.find((r) => r.kind === 'chat' && r.body.messages.at(-1).content === 'big context')!.body.options).toEqual({ num_ctx: 8192 });
  });

  it('priority beats affinity', async () => {
    const f = await fake({ models: ['m1', 'm2'], maxResident: 1, swapMs: 50, defaultChunkDelayMs: 5 });
    const h = await pool([{ f, name: 'gpu1' }], { affinityMaxWaitMs: 30_000 });
    f.enqueue({ kind: 'ok', chunkDelayMs: 100 });
    const blocker = await h.submit(job('blocker', 'm1'));
    await until('the blocker to run', async () => (await h.api(`/jobs/${blocker}`)).body.state === 'working');
    const warm = await h.submit(job('warm', 'm1'));
    const urgent = await h.submit(job('urgent', 'm2', { priority: 5 }));
    const [w, u] = await Promise.all([h.waitForState(warm, ['done']), h.waitForState(urgent, ['done'])]);
    expect(startedAt(u)).toBeLessThan(startedAt(w));
  });
});

describe('the pool as Ollama sees it', () => {
  it('keeps a model its job loaded resident when the host lists nothing in /api/ps: the next jobs of it are no loads', async () => {
    const a = await fake({ models: ['llama3.2'], listLoaded: false });
    const h = await pool([{ f: a, name: 'gpu1' }], { engineHealthIntervalMs: 60_000 });
    for (const text of ['one', 'two', 'three']) await h.waitForState(await h.submit(job(text, 'llama3.2')), ['done']);
    const engines = await until('gpu1 to have its slot back', async () => {
      const e = (await h.api('/engines')).body.engines;
      return e[0].slots_in_use === 0 ? e : null;
    });
    // Each job still sends its load (Ollama answers a resident model's at once); one counts as a load.
    expect(a.requests.filter((r) => r.kind === 'load').length).toBe(3);
    expect(engines.map((e: any) => [e.name, e.jobs_run, e.loads, e.resident_models])).toEqual([['gpu1', 3, 1, []]]);
  });

  it('merges /api/tags by name and lists /api/ps with each host; GET /engines describes every host', async () => {
    const a = await fake({ models: ['llama3.2', 'qwen3'] });
    const b = await fake({ models: ['mistral', 'llama3.2'] });
    const h = await pool([
      { f: a, name: 'gpu1', slots: 2 },
      { f: b, name: 'gpu2' },
    ]);
    const tags = (await h.api('/api/tags')).body.models.map((m: any) => m.name).sort();
    expect(tags).toEqual(['llama3.2:latest', 'mistral:latest', 'qwen3:latest']);
    await h.waitForState(await h.submit(job('on b', 'mistral')), ['done']);
    await h.service.pool.probeAll();
    const ps = (await h.api('/api/ps')).body.models.map((m: any) => [m.name, m.engine]);
    expect(ps).toEqual([['mistral:latest', 'gpu2']]);
    // The job's record is done a moment before the worker has given its slot back.
    const engines = await until('gpu2 to have its slot back', async () => {
      const e = (await h.api('/engines')).body.engines;
      return e[1].slots_in_use === 0 ? e : null;
    });
    expect(engines.map((e: any) => [e.name, e.health, e.circuit, e.slots, e.slots_in_use, e.jobs_run, e.loads])).toEqual([
      ['gpu1', 'up', 'closed', 2, 0, 0, 0],
      ['gpu2', 'up', 'closed', 1, 0, 1, 1],
    ]);
    expect(engines[1].installed_models.sort()).toEqual(['llama3.2:latest', 'mistral:latest']);
    expect(engines[1].resident_models).toEqual(['mistral:latest']);
    expect(Object.keys(engines[1].load_ms)).toEqual(['mistral']);
    const version = (await h.api('/api/version')).body;
    expect(version.engines).toEqual([
      { name: 'gpu1', version: '0.33.0', health: 'up' },
      { name: 'gpu2', version: '0.33.0', health: 'up' },
    ]);
    const ready = (await h.api('/readyz')).body;
    expect(ready.engines.map((e: any) => [e.name, e.health])).toEqual([
      ['gpu1', 'up'],
      ['gpu2', 'up'],
    ]);
  });
});

describe('FOREMAN_ENGINES', () => {
  const err = (env: Record<string, string>) => {
    try {
      loadConfig(env);
    } catch (e) {
      expect(e).toBeInstanceOf(ConfigError);
      return (e as Error).message;
    }
    throw new Error('no error');
  };

  it('parses hosts with slots and names; defaults to host:port and FOREMAN_CONCURRENCY', async () => {
    const { engineHostsOf } = await import('../src/config.js');
    const c = loadConfig({ FOREMAN_ENGINES: 'http://127.0.0.1:11434?slots=2&name=gpu1, http://127.0.0.2:11434', FOREMAN_CONCURRENCY: '3' });
    expect(engineHostsOf(c)).toEqual([
      { name: 'gpu1', url: 'http://127.0.0.1:11434', slots: 2 },
      { name: '127.0.0.2:11434', url: 'http://127.0.0.2:11434', slots: 3 },
    ]);
    expect(engineHostsOf(loadConfig({ FOREMAN_OLLAMA_URL: 'http://127.0.0.1:9999' }))).toEqual([{ name: '127.0.0.1:9999', url: 'http://127.0.0.1:9999', slots: 1 }]);
  });

  it('refuses bad entries, naming the entry', () => {
    expect(err({ FOREMAN_ENGINES: 'http://127.0.0.1:1,not a url' })).toMatch(/^FOREMAN_ENGINES: entry "not a url": is not an absolute URL/);
    expect(err({ FOREMAN_ENGINES: 'ftp://127.0.0.1:1' })).toMatch(/entry "ftp:\/\/127.0.0.1:1": must be an http or https URL/);
    expect(err({ FOREMAN_ENGINES: 'http://127.0.0.1:1?name=a,http://127.0.0.2:1?name=a' })).toMatch(/entry "http:\/\/127.0.0.2:1\?name=a": the name "a" is used twice/);
    expect(err({ FOREMAN_ENGINES: 'http://127.0.0.1:1?slots=0' })).toMatch(/entry "http:\/\/127.0.0.1:1\?slots=0": slots must be a whole number from 1 to 1024/);
    expect(err({ FOREMAN_ENGINES: 'http://127.0.0.1:1?gpu=2' })).toMatch(/unknown option "gpu"/);
    expect(err({ FOREMAN_ENGINES: 'http://127.0.0.1:1', FOREMAN_OLLAMA_URL: 'http://127.0.0.1:2' })).toMatch(/^FOREMAN_ENGINES: and FOREMAN_OLLAMA_URL are both set/);
  });
});
