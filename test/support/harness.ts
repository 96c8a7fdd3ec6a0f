import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { configWith, type Config } from '../../src/config.js';
import { Service } from '../../src/service.js';
import { createDatabase } from './postgres.js';
import type { Clock } from '../../src/domain.js';
import { startFakeOllama, type FakeOllama, type FakeOllamaOptions } from './fake-ollama.js';

export function tempDir(prefix = 'foreman-test-'): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Settings for fast tests: port 0, millisecond backoffs and timeouts. */
export function testConfig(over: Partial<Config> = {}): Config {
  return configWith({
    host: '127.0.0.1',
    port: 0,
    dataDir: tempDir(),
    logLevel: (process.env.FOREMAN_TEST_LOG_LEVEL as Config['logLevel']) ?? 'silent',
    jobRetryBaseMs: 5,
    engineIdleTimeoutMs: 2_000,
    webhookBackoffBaseMs: 5,
    webhookBackoffMaxMs: 50,
    webhookTimeoutMs: 2_000,
    pollIntervalMs: 1_000,
    shutdownGraceMs: 500,
    ...over,
  });
}

export interface Harness {
  service: Service;
  fake: FakeOllama;
  url: string;
  config: Config;
  api(path: string, init?: RequestInit & { json?: unknown }): Promise<{ status: number; headers: Headers; body: any; raw: Buffer }>;
  submit(body: Record<string, unknown>): Promise<string>;
  waitForState(id: string, states: string[], timeoutMs?: number): Promise<any>;
  stop(): Promise<void>;
}

export async function startHarness(
  over: Partial<Config> = {},
  fakeOpts: FakeOllamaOptions = {},
  fakeIn?: FakeOllama,
  /** A clock of the test's own (time moved by hand). */
  extra: { clock?: Clock } = {},
): Promise<Harness> {
  const fake = fakeIn ?? (await startFakeOllama(fakeOpts));
  // FOREMAN_TEST_DRIVER=postgres: the same suite against the PostgreSQL driver, a fresh database per service.
  const db = process.env.FOREMAN_TEST_DRIVER === 'postgres' && over.databaseUrl === undefined ? await createDatabase() : null;
  const config = testConfig({ ollamaUrl: fake.url, ...(db ? { databaseUrl: db.url } : {}), ...over });
  const service = new Service({ config, logger: pino({ level: config.logLevel }), ...(extra.clock ? { clock: extra.clock } : {}) });
  const url = await service.start();
  // On a database of its own the instance leads maintenance at once; wait for it, so that no
  // test's timing includes the election (a loaded machine can take a while).
  for (const end = Date.now() + 10_000; !service.leader && Date.now() < end; ) await new Promise((r) => setTimeout(r, 5));
  const api: Harness['api'] = async (p, init = {}) => {
    const { json, ...rest } = init;
    const headers = new Headers(rest.headers);
    if (json !== undefined) headers.set('content-type', 'application/json');
    const res = await fetch(`${url}${p}`, { ...rest, headers, ...(json !== undefined ? { body: JSON.stringify(json) } : {}) });
    const raw = Buffer.from(await res.arrayBuffer());
    let body: unknown = null;
    try {
      body = raw.length ? JSON.parse(raw.toString('utf8')) : null;
    } catch {
      body = raw.toString('utf8');
    }
    return { status: res.status, headers: res.headers, body, raw };
  };
  return {
    service,
    fake,
    url,
    config,
    api,
    async submit(body) {
      const r = await api('/jobs', { method: 'POST', json: body });
      if (r.status !== 202) throw new Error(`submit failed: ${r.status} ${JSON.stringify(r.body)}`);
      return r.body.job_id as string;
    },
    async waitForState(id, states, timeoutMs = 10_000) {
      const end = Date.now() + timeoutMs;
      let last: any;
      while (Date.now() < end) {
        const r = await api(`/jobs/${id}`);
        last = r.body;
        if (states.includes(last?.state)) return last;
        await new Promise((res) => setTimeout(res, 10));
      }
      throw new Error(`job ${id} did not reach ${states.join('|')} in ${timeoutMs}ms; last: ${JSON.stringify(last)}`);
    },
    async stop() {
      await service.stop();
      if (!fakeIn) await fake.close();
      await db?.drop();
      fs.rmSync(config.dataDir, { recursive: true, force: true });
    },
  };
}

export const hello = (text = 'hello world', extra: Record<string, unknown> = {}) => ({
  model: 'llama3.2',
  messages: [{ role: 'user', content: text }],
  ...extra,
});
