import { createServer, type IncomingHttpHeaders, type Server, type ServerResponse } from 'node:http';
import type { Socket } from 'node:net';

/** One webhook delivery as the receiver saw it: the raw bytes and headers, and the parsed event. */
export interface Received {
  path: string;
  headers: IncomingHttpHeaders;
  raw: Buffer;
  event: any;
  at: number;
  /** What the receiver answered (its status code), or null if it did not answer. */
  answered: number | null;
}

/** Decides how to answer one delivery; the default answers 200. Return 'hang' to never answer. */
export type Responder = (r: Received, res: ServerResponse) => number | 'hang' | 'handled' | Promise<number | 'hang' | 'handled'>;

export interface Receiver {
  url: string;
  received: Received[];
  respond(fn: Responder): void;
  /** Resolves once `pred` holds for the received list. */
  waitFor(pred: (r: Received[]) => boolean, timeoutMs?: number): Promise<Received[]>;
  close(): Promise<void>;
}

/** A real HTTP webhook receiver on loopback that records every delivery. */
export async function startReceiver(responder: Responder = () => 200): Promise<Receiver> {
  let fn = responder;
  const received: Received[] = [];
  const waiters = new Set<() => void>();
  const sockets = new Set<Socket>();
  const server: Server = createServer((req, res) => {
    const parts: Buffer[] = [];
    req.on('data', (c: Buffer) => parts.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(parts);
      let event: unknown = null;
      try {
        event = JSON.parse(raw.toString('utf8'));
      } catch {
        event = null;
      }
      const r: Received = { path: req.url ?? '/', headers: req.headers, raw, event, at: Date.now(), answered: null };
      received.push(r);
      void Promise.resolve(fn(r, res)).then((status) => {
        if (status === 'hang' || status === 'handled') return;
        r.answered = status;
        res.writeHead(status, { 'content-type': 'text/plain' }).end('ok');
        for (const w of waiters) w();
      });
      for (const w of waiters) w();
    });
  });
  server.on('connection', (s: Socket) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  return {
    url: `http://127.0.0.1:${port}`,
    received,
    respond(f) {
      fn = f;
    },
    waitFor(pred, timeoutMs = 10_000) {
      return new Promise((resolve, reject) => {
        const check = () => {
          if (pred(received)) {
            waiters.delete(check);
            clearTimeout(t);
            resolve(received);
          }
        };
        const t = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`receiver: condition not met in ${timeoutMs}ms; got ${received.map((r) => r.event?.event_id).join(', ')}`));
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}
