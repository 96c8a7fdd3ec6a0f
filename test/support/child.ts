import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root: the nearest folder above this file with package.json (works from test/ and dist/test/). */
function repoRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  while (!fs.existsSync(path.join(dir, 'package.json'))) dir = path.dirname(dir);
  return dir;
}
export const MAIN = path.join(repoRoot(), 'dist/src/main.js');

export interface Child {
  proc: ChildProcess;
  url: string;
  /** Every log line the child printed (parsed pino JSON). */
  logs: any[];
  exited: Promise<number | null>;
}

export async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

export interface Spawned extends Child {
  /** Resolves once /healthz answers (rejects if the process exits first or the timeout passes). */
  ready(timeoutMs?: number): Promise<void>;
}

/** Spawns the built service (`dist/src/main.js`, built by `npm test`'s pretest) on a free port without waiting for it. */
export async function spawnChild(env: Record<string, string>): Promise<Spawned> {
  const port = env.FOREMAN_PORT ?? String(await freePort());
  const proc = spawn(process.execPath, [MAIN], {
    env: { PATH: process.env.PATH ?? '', FOREMAN_LOG_LEVEL: 'info', ...env, FOREMAN_PORT: port },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const url = `http://127.0.0.1:${port}`;
  const logs: any[] = [];
  let stderr = '';
  let exitCode: number | null | undefined;
  const exited = new Promise<number | null>((r) =>
    proc.on('exit', (code) => {
      exitCode = code;
      r(code);
    }),
  );
  let buf = '';
  proc.stdout!.on('data', (d: Buffer) => {
    buf += d.toString('utf8');
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      try {
        logs.push(JSON.parse(line));
      } catch {
        /* not a log line */
      }
    }
  });
  proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
  const ready = async (timeoutMs = 15_000) => {
    const end = Date.now() + timeoutMs;
    for (;;) {
      if (exitCode !== undefined) throw new Error(`child exited with ${exitCode} before listening: ${stderr}`);
      if (Date.now() > end) {
        proc.kill('SIGKILL');
        throw new Error(`child did not start in ${timeoutMs}ms: ${stderr}`);
      }
      try {
        const r = await fetch(`${url}/healthz`);
        if (r.status === 200) return;
      } catch {
        /* not listening yet */
      }
      await new Promise((r) => setTimeout(r, 10));
    }
  };
  return { proc, url, logs, exited, ready };
}

/** Starts the built service on a free port and resolves once /healthz answers. */
export async function startChild(env: Record<string, string>, timeoutMs = 15_000): Promise<Child> {
  const c = await spawnChild(env);
  await c.ready(timeoutMs);
  return c;
}

/** Runs the built service to completion (for start-up failures) and returns its exit code and stderr. */
export function runChild(env: Record<string, string>): Promise<{ code: number | null; stderr: string; stdout: string }> {
  const proc = spawn(process.execPath, [MAIN], { env: { PATH: process.env.PATH ?? '', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  let stdout = '';
  proc.stderr.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
  proc.stdout.on('data', (d: Buffer) => (stdout += d.toString('utf8')));
  return new Promise((r) => proc.on('exit', (code) => r({ code, stderr, stdout })));
}
