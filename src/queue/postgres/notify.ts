import { randomBytes } from 'node:crypto';
import pg from 'pg';
import type { TransitionEvent } from '../driver.js';
import type { LocalNotifier } from '../notifier.js';
import { connectionConfig } from './db.js';

/** The channel every instance LISTENs on. */
export const CHANNEL = 'foreman_events';
/** Token deltas of running jobs, coalesced per job (SSE on another instance). */
export const DELTA_CHANNEL = 'foreman_deltas';
/** Sends NOTIFY payloads on DELTA_CHANNEL, in order. */
const SEND_DELTAS = 'SELECT pg_notify($1, x) FROM unnest($2::text[]) WITH ORDINALITY AS t(x, o) ORDER BY o';
/** How long deltas are gathered before they cross to the other instances. */
export const DELTA_COALESCE_MS = 75;
/** NOTIFY refuses payloads of 8000 bytes or more; stay well below. */
export const MAX_PAYLOAD = 7500;
/** How often an instance says it is there (on CHANNEL), and how long a silent one still counts. */
export const HEARTBEAT_MS = 5_000;
const peerTtl = (heartbeatMs: number) => 3 * heartbeatMs + 1_000;
/** The instance id of a sender on the channel (`id#nonce`). */
const instanceOf = (sender: string) => sender.slice(0, sender.lastIndexOf('#'));

interface Fx {
  jobReady: boolean;
  deliveryReady: boolean;
  batchReady: boolean;
  transitions: TransitionEvent[];
  canceled: string[];
}

/** One NOTIFY payload: who sent it, and what happened. */
interface Message {
  /** The sender: its instance id, `#`, and a nonce of its process (two processes never share one). */
  i: string;
  /** A heartbeat: 1 from a running instance, 2 from one that has just started (answer it at once). */
  h?: 1 | 2;
  r?: 1;
  d?: 1;
  /** A batch was created or cancelled. */
  b?: 1;
  c?: string[];
  t?: TransitionEvent[];
}

/** Splits effects into payloads below MAX_PAYLOAD bytes (an event too big alone loses its error message's tail). */
export function payloadsOf(sender: string, fx: Fx): string[] {
  const out: string[] = [];
  const base: Message = { i: sender };
  if (fx.jobReady) base.r = 1;
  if (fx.deliveryReady) base.d = 1;
  if (fx.batchReady) base.b = 1;
  if (fx.canceled.length) base.c = [...fx.canceled];
  let cur: Message = base;
  const size = (m: Message) => Buffer.byteLength(JSON.stringify(m));
  const tooBig = (e: TransitionEvent) => Buffer.byteLength(JSON.stringify(e)) > MAX_PAYLOAD - 200;
  for (let e of fx.transitions) {
    if (e.error && tooBig(e)) {
      // Cut by the bytes it takes as JSON (a control character takes six): 2,000 characters, then halved until it fits.
      let message = e.error.message.slice(0, 2000);
      const cut = () => ({ ...e, error: { code: e.error!.code, message } });
      while (message !== '' && tooBig(cut())) message = message.slice(0, message.length >> 1);
      e = cut();
    }
    const next = { ...cur, t: [...(cur.t ?? []), e] };
    if (size(next) > MAX_PAYLOAD && (cur.t?.length ?? 0) > 0) {
      out.push(JSON.stringify(cur));
      cur = { i: sender, t: [e] };
    } else cur = next;
  }
  if (cur.r || cur.d || cur.b || cur.c || cur.t?.length) out.push(JSON.stringify(cur));
  return out;
}

/**
 * Carries a driver's effects to the other instances: NOTIFY inside the writing transaction (so
 * only a commit sends it), LISTEN on a dedicated connection that reconnects by itself. While that
 * connection is down, a slow poll stands in: `jobReady`, `deliveryReady` and `batchReady` every `fallbackMs`;
 * once it is back, `resync` tells watchers that state changes may have gone by unheard. A
 * connection that stays up but no longer hears its own heartbeats (deaf) is dropped and made again.
 */
export class ClusterNotifier {
  private client: pg.Client | null = null;
  private stopped = false;
  private retry: NodeJS.Timeout | null = null;
  private poll: NodeJS.Timeout | null = null;
  connected = false;
  private readonly deltaListeners = new Set<(jobId: string, chunk: unknown) => void>();
  private deltas = new Map<string, unknown[]>();
  private deltaTimer: NodeJS.Timeout | null = null;
  private heartbeat: NodeJS.Timeout | null = null;
  /** The other instances heard from (id → when), and since when this one listens. */
  private readonly peerSeen = new Map<string, number>();
  private listeningSince = 0;
  /** When this instance last heard its own heartbeat come back (the LISTEN connection works). */
  private selfHeard = 0;
  /** Whether a LISTEN connection was up before (a new one then may have missed something). */
  private listenedBefore = false;
  /** This process's name on the channel: the instance id and a nonce. */
  readonly sender: string;
  private readonly heartbeatMs: number;
  private readonly peerTtlMs: number;
  /** Instance ids already reported as used by another process too. */
  private readonly duplicatesSeen = new Set<string>();

  constructor(
    private readonly o: {
      url: string;
      instanceId: string;
      local: LocalNotifier;
      types: pg.CustomTypesConfig;
      fallbackMs?: number;
      /** HEARTBEAT_MS unless given (tests). */
      heartbeatMs?: number;
      /** DELTA_COALESCE_MS unless given (tests). */
      deltaCoalesceMs?: number;
      /** Another live process uses this instance id (a misconfiguration: its leases would be taken for ours). */
      onDuplicateId?: (instanceId: string) => void;
    },
  ) {
    this.sender = `${o.instanceId}#${randomBytes(4).toString('hex')}`;
    this.heartbeatMs = o.heartbeatMs ?? HEARTBEAT_MS;
    this.peerTtlMs = peerTtl(this.heartbeatMs);
  }

  async start(): Promise<void> {
    await this.connect();
  }

  private async connect(): Promise<void> {
    if (this.stopped) return;
    const client = new pg.Client({
      // A connection that died without a FIN (a half-open socket) is noticed by TCP keepalive,
      // and one that stays up but deaf by the heartbeats (see `tick`).
      ...connectionConfig(this.o.url),
      types: this.o.types,
      application_name: `foreman listen ${this.o.instanceId}`.slice(0, 63),
    });
    client.on('error', () => this.lost(client));
    client.on('end', () => this.lost(client));
    client.on('notification', (m) => (m.channel === DELTA_CHANNEL ? this.receiveDeltas(m.payload) : this.receive(m.payload)));
    try {
      await client.connect();
      await client.query(`LISTEN ${CHANNEL}`);
      await client.query(`LISTEN ${DELTA_CHANNEL}`);
    } catch {
      await client.end().catch(() => {});
      this.lost(null); // retried shortly; the slow poll stands in meanwhile
      return;
    }
    if (this.stopped) {
      await client.end().catch(() => {});
      return;
    }
    this.client = client;
    this.connected = true;
    this.listeningSince = Date.now();
    this.beat(2);
    if (!this.heartbeat) {
      this.heartbeat = setInterval(() => this.tick(), this.heartbeatMs);
      this.heartbeat.unref();
    }
    if (this.poll) clearInterval(this.poll);
    this.poll = null;
    // Whatever was announced while we were away: look again.
    this.lookAgain();
    if (this.listenedBefore) this.o.local.emit('resync');
    this.listenedBefore = true;
  }

  /** Wakes whoever waits for work announced by other instances: jobs, deliveries, batches. */
  private lookAgain(): void {
    this.o.local.emit('jobReady');
    this.o.local.emit('deliveryReady');
    this.o.local.emit('batchReady');
  }

  /** Every heartbeat period: a connection whose own heartbeats stopped coming back is deaf; else say we are here. */
  private tick(): void {
    const c = this.client;
    if (!c) return;
    if (Date.now() - Math.max(this.selfHeard, this.listeningSince) > this.peerTtlMs) {
      this.lost(c);
      void c.end().catch(() => {});
      return;
    }
    this.beat(1);
  }

  private lost(client: pg.Client | null): void {
    if (client !== null && client !== this.client) return;
    this.client = null;
    this.connected = false;
    if (this.stopped) return;
    if (!this.poll) {
      this.poll = setInterval(() => this.lookAgain(), this.o.fallbackMs ?? 1000);
      this.poll.unref();
    }
    if (!this.retry) {
      this.retry = setTimeout(() => {
        this.retry = null;
        this.connect().catch(() => {});
      }, 500);
      this.retry.unref();
    }
  }

  private receive(payload: string | undefined): void {
    if (!payload) return;
    let m: Message;
    try {
      m = JSON.parse(payload) as Message;
    } catch {
      return;
    }
    if (m.i === this.sender) {
      if (m.h) this.selfHeard = Date.now();
      return; // announced locally already, after our own commit
    }
    if (m.h && instanceOf(m.i) === this.o.instanceId && !this.duplicatesSeen.has(m.i)) {
      this.duplicatesSeen.add(m.i);
      this.o.onDuplicateId?.(this.o.instanceId);
    }
    this.peerSeen.set(m.i, Date.now());
    if (m.h === 2) this.beat(1); // a new instance learns at once that this one is here
    const n = this.o.local;
    if (m.d) n.emit('deliveryReady');
    if (m.b) n.emit('batchReady');
    if (m.r) n.emit('jobReady');
    for (const e of m.t ?? []) n.emit('stateChanged', { ...e, remote: true });
    for (const id of m.c ?? []) n.emit('cancelRequested', id);
  }

  /** Says on CHANNEL that this instance is here (outside any transaction: it changes nothing). */
  private beat(h: 1 | 2): void {
    const c = this.client;
    if (!c) return;
    c.query('SELECT pg_notify($1, $2)', [CHANNEL, JSON.stringify({ i: this.sender, h })]).catch(() => {});
  }

  /**
   * Whether another instance may be listening: then effects are sent by NOTIFY. Alone on the
   * database, an instance sends none (a round trip per write saved). It counts as not alone while
   * its own LISTEN connection is down or its own heartbeats stop coming back, for its first
   * heartbeat period (the others' answers to its hello are on their way), and for three heartbeat
   * periods (and a second) after it last heard another instance.
   */
  get peers(): boolean {
    if (!this.connected) return true;
    const now = Date.now();
    if (now - this.listeningSince < this.heartbeatMs) return true;
    // Its own heartbeats no longer come back: the connection may be half-open and deaf, so what
    // it hears proves nothing. Not alone, until they do again.
    if (now - this.selfHeard > this.peerTtlMs) return true;
    for (const [id, at] of this.peerSeen) {
      if (now - at < this.peerTtlMs) return true;
      this.peerSeen.delete(id);
    }
    return false;
  }

  /** Subscribes to other instances' token deltas. */
  onDelta(fn: (jobId: string, chunk: unknown) => void): () => void {
    this.deltaListeners.add(fn);
    return () => this.deltaListeners.delete(fn);
  }

  /**
   * A running job's token delta, for watchers on other instances: gathered per job for
   * DELTA_COALESCE_MS, then sent on the LISTEN connection (outside any transaction; a delta lost
   * with a connection is only a missed token of a live view, the stored result is whole), or
   * sooner by a transition's transaction (`sendDeltasIn`).
   */
  relayDelta(jobId: string, chunk: unknown): void {
    if (!this.connected || !this.peers) return;
    let list = this.deltas.get(jobId);
    if (!list) this.deltas.set(jobId, (list = []));
    list.push(chunk);
    this.armDeltaTimer();
  }

  /** Whether deltas wait to be sent (a state change of their job must not overtake them). */
  get deltasPending(): boolean {
    return this.deltas.size > 0;
  }

  /** Sends the gathered deltas now, on the LISTEN connection (the coalescing timer). */
  flushDeltas(): Promise<void> {
    const taken = this.takeDeltas();
    const c = this.client;
    if (!c) return Promise.resolve(); // lost with the connection: missed tokens of a live view only
    const payloads = this.deltaPayloads(taken);
    if (payloads.length === 0) return Promise.resolve();
    return c.query(SEND_DELTAS, [DELTA_CHANNEL, payloads]).then(
      () => {},
      () => {},
    );
  }

  /**
   * Sends the gathered deltas of `jobIds` inside the caller's transaction, which changes their
   * state, before its state NOTIFY: the other instances get both at its commit, tokens first, and
   * the transaction (holding its rows' locks) waits on nothing but its own connection. Returns what
   * it took, to be given back with `restoreDeltas` if the transaction does not commit (it gives
   * them back itself if the send fails).
   */
  async sendDeltasIn(client: pg.ClientBase, jobIds: Iterable<string>): Promise<Map<string, unknown[]>> {
    const taken = new Map<string, unknown[]>();
    for (const j of jobIds) {
      const chunks = this.deltas.get(j);
      if (!chunks) continue;
      taken.set(j, chunks);
      this.deltas.delete(j);
    }
    const payloads = this.deltaPayloads(taken);
    try {
      if (payloads.length > 0) await client.query(SEND_DELTAS, [DELTA_CHANNEL, payloads]);
    } catch (err) {
      this.restoreDeltas(taken);
      throw err;
    }
    return taken;
  }

  /** Deltas taken by a transaction that did not commit go back, ahead of any gathered since. */
  restoreDeltas(taken: Map<string, unknown[]>): void {
    if (taken.size === 0) return;
    for (const [j, chunks] of this.deltas) taken.set(j, [...(taken.get(j) ?? []), ...chunks]);
    this.deltas = taken;
    this.armDeltaTimer();
  }

  /** Deltas wait at most the coalescing delay before the timer sends them. */
  private armDeltaTimer(): void {
    if (this.deltaTimer) return;
    this.deltaTimer = setTimeout(() => void this.flushDeltas(), this.o.deltaCoalesceMs ?? DELTA_COALESCE_MS);
    this.deltaTimer.unref();
  }

  private takeDeltas(): Map<string, unknown[]> {
    if (this.deltaTimer) clearTimeout(this.deltaTimer);
    this.deltaTimer = null;
    const all = this.deltas;
    this.deltas = new Map();
    return all;
  }

  /** NOTIFY payloads of the deltas, per job, each below the payload limit. */
  private deltaPayloads(all: Map<string, unknown[]>): string[] {
    const payloads: string[] = [];
    for (const [j, chunks] of all) {
      let cur: unknown[] = [];
      let size = 0;
      for (const ch of chunks) {
        const n = Buffer.byteLength(JSON.stringify(ch));
        if (n > MAX_PAYLOAD - 300) continue; // a single oversized chunk: watchers elsewhere miss it, the result is whole
        if (size + n > MAX_PAYLOAD - 300 && cur.length) {
          payloads.push(JSON.stringify({ i: this.sender, j, c: cur }));
          cur = [];
          size = 0;
        }
        cur.push(ch);
        size += n + 1;
      }
      if (cur.length) payloads.push(JSON.stringify({ i: this.sender, j, c: cur }));
    }
    return payloads;
  }

  private receiveDeltas(payload: string | undefined): void {
    if (!payload || this.deltaListeners.size === 0) return;
    let m: { i: string; j: string; c: unknown[] };
    try {
      m = JSON.parse(payload) as { i: string; j: string; c: unknown[] };
    } catch {
      return;
    }
    if (m.i === this.sender) return;
    for (const ch of m.c) for (const fn of this.deltaListeners) fn(m.j, ch);
  }

  /** Queues the NOTIFYs in the caller's transaction. */
  async publish(client: pg.ClientBase, fx: Fx): Promise<void> {
    for (const p of payloadsOf(this.sender, fx)) await client.query('SELECT pg_notify($1, $2)', [CHANNEL, p]);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.deltaTimer) clearTimeout(this.deltaTimer);
    this.deltaTimer = null;
    if (this.retry) clearTimeout(this.retry);
    if (this.poll) clearInterval(this.poll);
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = null;
    this.retry = this.poll = null;
    const c = this.client;
    this.client = null;
    this.connected = false;
    if (c) await c.end().catch(() => {});
  }
}
