import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const MAIN = path.join(root, 'dist/src/main.js');

export interface Child {
  proc: ChildProcess;
  url: string;
  /** Every log line the child printed (parsed pino JSON). */
  logs: any[];
  exited: Promise<number | null>;
}

/** Starts the built service (`dist/src/main.js`, built by `npm test`'s pretest) as a child process and waits for its URL. */
export function startChild(env: Record<string, string>, timeoutMs = 15_000): Promise<Child> {
  const proc = spawn(process.execPath, [MAIN], {
    env: { PATH: process.env.PATH ?? '', FOREMAN_PORT: '0', FOREMAN_LOG_LEVEL: 'info', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const logs: any[] = [];
  let stderr = '';
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)));
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`child did not start in ${timeoutMs}ms: ${stderr}`)), timeoutMs);
    let buf = '';
    proc.stdout!.on('data', (d: Buffer) => {
      buf += d.toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        try {
          const j = JSON.parse(line);
          logs.push(j);
          if (typeof j.url === 'string' && /listening/.test(j.msg)) {
            clearTimeout(t);
            resolve({ proc, url: j.url, logs, exited });
          }
        } catch {
          /* not a log line */
        }
      }
    });
    proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString('utf8')));
    void exited.then((code) => {
      clearTimeout(t);
      reject(new Error(`child exited with ${code} before listening: ${stderr}`));
    });
  });
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
