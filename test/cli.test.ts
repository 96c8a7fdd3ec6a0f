/**
 * The `foreman` CLI as a real child process against a real service: submit, wait, tail, get,
 * cancel, jobs, a 200-line batch resumed after a kill, and the exit codes.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hello, startHarness, tempDir, type Harness } from './support/harness.js';
import { freePort } from './support/child.js';
import { jobCount, sleep, until } from './support/util.js';

function repoRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  while (!fs.existsSync(path.join(dir, 'package.json'))) dir = path.dirname(dir);
  return dir;
}
const CLI = path.join(repoRoot(), 'dist/src/cli/main.js');

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function cli(args: string[], env: Record<string, string>, onSpawn?: (kill: () => void, out: () => string) => void): Promise<Run> {
  const p = spawn(process.execPath, [CLI, ...args], { env: { PATH: process.env.PATH ?? '', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  p.stdout.on('data', (d: Buffer) => (stdout += d.toString('utf8')));
  p.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
  onSpawn?.(() => p.kill('SIGKILL'), () => stdout);
  return new Promise((resolve) => p.on('exit', (code) => resolve({ code, stdout, stderr })));
}

let h: Harness;
let env: Record<string, string>;
const dir = tempDir('foreman-cli-');
beforeAll(async () => {
  h = await startHarness({ concurrency: 4 });
  env = { FOREMAN_URL: h.url };
});
afterAll(async () => {
  await h?.stop();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('foreman CLI', () => {
  it('submit prints the job id; wait --json prints the finished job and exits 0', async () => {
    const s = await cli(['submit', '-m', 'llama3.2', 'hello', 'there'], env);
    expect(s.code).toBe(0);
    const id = s.stdout.trim();
    expect(id).toMatch(/^[0-9a-f]{8}-[0-9a-f]{4}-7/);
    const w = await cli(['wait', id, '--json'], env);
    expect(w.code).toBe(0);
    const j = JSON.parse(w.stdout);
    expect(j).toMatchObject({ job_id: id, state: 'done' });
    expect(j.result.message.content).toBe('echo: hello there');
    const g = await cli(['get', id], env);
    expect(g.code).toBe(0);
    expect(g.stdout).toContain(`${id}  done  llama3.2`);
    expect(g.stdout).toContain('echo: hello there');
  });

  it('submit --wait shows the states and streams the tokens', async () => {
    h.fake.setLoadDelay(200); // long enough for the stream to be attached before the tokens
    try {
      const r = await cli(['submit', '-m', 'llama3.2', '--wait', 'stream', 'me'], env);
      expect(r.code).toBe(0);
      expect(r.stdout).toContain('echo: stream me');
      expect(r.stderr).toMatch(/\[loading\][\s\S]*\[working\][\s\S]*\[done\]/);
    } finally {
      h.fake.setLoadDelay(0);
    }
  });

  it('tail joined after the first tokens shows the rest, then the whole answer (tokens are live only)', async () => {
    let release!: () => void;
    const gate = new Promise<void>((resolve) => (release = resolve));
    // 'one ' goes out at once; 'two ' and 'three' wait until the CLI is watching.
    h.fake.enqueue({ kind: 'ok', chunks: [{ content: 'one ' }, { content: 'two ' }, { content: 'three' }], chunkDelayMs: 0, gate, gateAt: 1 });
    const id = await h.submit(hello('joined late'));
    const ctl = new AbortController();
    const watch = await fetch(`${h.url}/jobs/${id}/events`, { signal: ctl.signal });
    let seen = '';
    const decoder = new TextDecoder();
    for await (const chunk of watch.body as unknown as AsyncIterable<Uint8Array>) {
      seen += decoder.decode(chunk, { stream: true });
      if (seen.includes('event: delta')) break; // 'one ' has been streamed
    }
    ctl.abort();
    await until('the first watcher gone', async () => h.service.events.watchers(id) === 0);
    const tail = cli(['tail', id], env);
    await until('the CLI watches', async () => h.service.events.watchers(id) === 1, 10_000);
    release();
    const t = await tail;
    expect(t.code).toBe(0);
    expect(t.stdout).toBe('two three\none two three\n');
    expect(t.stderr).toBe('[queued]\n[loading]\n[working]\n[done]\n[the stream did not show the whole answer; here it is]\n');
    // Joined after the end: no token streamed, the answer alone.
    const again = await cli(['tail', id], env);
    expect(again.stdout).toBe('one two three\n');
    expect(again.stderr).toBe('[queued]\n[loading]\n[working]\n[done]\n');
  });

  it('exit codes: 1 for a failed job, 2 for usage errors and rejected input, 3 when the server is unreachable', async () => {
    const failed = await cli(['submit', '-m', 'llama9', '--wait', 'x'], env);
    expect(failed.code).toBe(1);
    expect(failed.stdout).toContain('model_not_found');
    expect((await cli(['frobnicate'], env)).code).toBe(2);
    expect((await cli(['submit'], env)).code).toBe(2);
    const bad = await cli(['submit', '-m', 'llama3.2', '--priority', '5000', 'x'], env);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain('validation_failed');
    const unknown = await cli(['get', '01a23016-b8e3-7000-8261-91d4c62b68ee'], env);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain('job_not_found');
    const port = await freePort();
    const down = await cli(['jobs'], { FOREMAN_URL: `http://127.0.0.1:${port}` });
    expect(down.code).toBe(3);
    expect(down.stderr).toContain('cannot reach');
  });

  it('cancel, tail and jobs', async () => {
    h.fake.enqueue({ kind: 'hang' });
    const id = (await cli(['submit', '-m', 'llama3.2', 'hang'], env)).stdout.trim();
    await h.waitForState(id, ['working']);
    const tail = cli(['tail', id, '--json'], env);
    await sleep(200);
    const c = await cli(['cancel', id, '--json'], env);
    expect(c.code).toBe(0);
    expect(JSON.parse(c.stdout)).toEqual({ job_id: id, state: 'canceled' });
    const t = await tail;
    expect(t.code).toBe(1); // the job did not finish done
    const events = t.stdout.trim().split('\n').map((l) => JSON.parse(l));
    expect(events.filter((e) => e.event === 'state').map((e) => e.state)).toEqual(['queued', 'loading', 'working', 'canceled']);
    const list = JSON.parse((await cli(['jobs', '--state', 'canceled', '--json'], env)).stdout);
    expect(list.jobs.map((j: { job_id: string }) => j.job_id)).toContain(id);
  });

  it('batch: 200 lines, killed part way, then run again: every custom_id once, no job submitted twice', { timeout: 60_000 }, async () => {
    const input = path.join(dir, 'prompts.jsonl');
    const output = path.join(dir, 'results.jsonl');
    const lines: string[] = [];
    for (let i = 0; i < 200; i++) lines.push(i % 2 === 0 ? JSON.stringify(`prompt ${i}`) : JSON.stringify({ custom_id: `c${i}`, prompt: `prompt ${i}` }));
    fs.writeFileSync(input, `${lines.join('\n')}\n`);
    const before = (await jobCount(h));
    // Slow enough that the kill lands while jobs are still running.
    for (let i = 0; i < 200; i++) h.fake.enqueue({ kind: 'ok', chunkDelayMs: 5 });
    const first = await cli(['batch', input, '-m', 'llama3.2', '-o', output, '--concurrency', '16'], env, (kill) => {
      void until('about 40 results written', async () => fs.existsSync(output) && fs.readFileSync(output, 'utf8').split('\n').filter(Boolean).length >= 40, 30_000).then(kill);
    });
    expect(first.code).toBeNull(); // killed
    const partial = fs.readFileSync(output, 'utf8').split('\n').filter(Boolean).length;
    expect(partial).toBeGreaterThanOrEqual(40);
    expect(partial).toBeLessThan(200);
    const second = await cli(['batch', input, '-m', 'llama3.2', '-o', output, '--json'], env);
    expect(second.code).toBe(0);
    expect(JSON.parse(second.stdout)).toMatchObject({ lines: 200, failed: 0 });
    const results = fs
      .readFileSync(output, 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l));
    const ids = results.map((r) => r.custom_id);
    expect(new Set(ids).size).toBe(200);
    expect(ids).toHaveLength(200);
    expect(ids).toContain('line-1');
    expect(ids).toContain('c199');
    for (const r of results) {
      expect(r.state).toBe('done');
      const n = r.custom_id.startsWith('c') ? r.custom_id.slice(1) : String(Number(r.custom_id.slice(5)) - 1);
      expect(r.content).toBe(`echo: prompt ${n}`);
    }
    // Exactly 200 jobs: the rerun replayed what the first run had submitted (Idempotency-Key).
    expect((await jobCount(h)) - before).toBe(200);
  });

  it('batch: a malformed line is refused with its line number, and nothing is submitted', async () => {
    const input = path.join(dir, 'bad.jsonl');
    fs.writeFileSync(input, `"ok"\n{"custom_id": "x"}\n`);
    const before = (await jobCount(h));
    const r = await cli(['batch', input, '-m', 'llama3.2', '-o', path.join(dir, 'bad-out.jsonl')], env);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(`${input}:2`);
    expect((await jobCount(h))).toBe(before);
  });
});

describe('foreman keys (authentication on)', () => {
  it('create prints the key once; the key submits; list shows it without the secret; revoke makes it 401 (exit 2)', async () => {
    const admin = 'cli-admin-token-0123456789';
    const ha = await startHarness({ adminToken: admin });
    try {
      const adminEnv = { FOREMAN_URL: ha.url, FOREMAN_API_KEY: admin };
      const c = await cli(['keys', 'create', 'tenant-a', '--concurrency', '2', '--daily-limit', '10'], adminEnv);
      expect(c.code).toBe(0);
      const key = c.stdout.trim();
      expect(key).toMatch(/^fm_[A-Za-z0-9_-]{43}$/);
      expect(c.stderr).toMatch(/concurrency 2 · max_queued - · daily_limit 10 · priority_max -/);

      const keyEnv = { FOREMAN_URL: ha.url, FOREMAN_API_KEY: key };
      const s = await cli(['submit', '-m', 'llama3.2', '--wait', '--json', 'hi'], keyEnv);
      expect(s.code).toBe(0);
      expect(JSON.parse(s.stdout)).toMatchObject({ state: 'done', key_id: expect.any(String) });

      const l = await cli(['keys', 'list', '--json'], adminEnv);
      expect(l.code).toBe(0);
      const listed = JSON.parse(l.stdout).keys;
      expect(listed).toHaveLength(1);
      expect(listed[0]).toMatchObject({ name: 'tenant-a', concurrency: 2, daily_limit: 10, revoked_at: null, usage: { jobs_today: 1 } });
      expect(l.stdout).not.toContain(key);
      // A key may not manage keys.
      const forbidden = await cli(['keys', 'list'], keyEnv);
      expect(forbidden.code).toBe(2);
      expect(forbidden.stderr).toMatch(/forbidden/);

      const r = await cli(['keys', 'revoke', listed[0].id], adminEnv);
      expect(r.code).toBe(0);
      const after = await cli(['submit', '-m', 'llama3.2', 'hi'], keyEnv);
      expect(after.code).toBe(2);
      expect(after.stderr).toMatch(/unauthorized/);
    } finally {
      await ha.stop();
    }
  });
});
