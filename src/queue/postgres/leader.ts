import pg from 'pg';
import { connectionConfig } from './db.js';

/** The advisory lock the maintenance leader holds ('foreman-leader'). */
export const LEADER_LOCK = 7_466_371_054_321;

/**
 * Leader election for the maintenance services (ADR-0011): the leader is whoever holds a session
 * advisory lock, on a connection of its own. The lock lives exactly as long as that session: if
 * the leader's process dies, or its connection drops, the server releases it and the next
 * instance to try (every `intervalMs`) takes over. The holder checks its session every
 * `intervalMs` too, and steps down at once when it is lost.
 */
export class LeaderElection {
  private client: pg.Client | null = null;
  private timer: NodeJS.Timeout | null = null;
  private stopped = false;
  private busy = false;
  leader = false;

  constructor(
    private readonly o: { url: string; instanceId: string; intervalMs?: number; onChange: (leader: boolean) => void },
  ) {}

  start(): void {
    this.stopped = false;
    void this.round();
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => void this.round(), this.o.intervalMs ?? 1000);
    this.timer.unref();
  }

  private set(leader: boolean): void {
    if (leader === this.leader) return;
    this.leader = leader;
    this.o.onChange(leader);
  }

  private drop(): void {
    const c = this.client;
    this.client = null;
    if (c) void c.end().catch(() => {});
    this.set(false);
  }

  private async round(): Promise<void> {
    if (this.busy || this.stopped) return;
    this.busy = true;
    try {
      if (!this.client) {
        const c = new pg.Client({
          // The server ends a vanished leader's session (and with it the lock) by its own TCP
          // keepalive, ~25 s after the last packet (SESSION_DEFAULTS); this side probes too.
          ...connectionConfig(this.o.url),
          application_name: `foreman leader ${this.o.instanceId}`.slice(0, 63),
          connectionTimeoutMillis: 5000,
          // A round that gets no answer (a server that vanished) ends in 5 s, and the leader steps down.
          query_timeout: 5000,
        });
        c.on('error', () => {
          if (this.client === c) this.drop();
        });
        await c.connect();
        if (this.stopped) {
          await c.end().catch(() => {});
          return;
        }
        this.client = c;
      }
      if (this.leader) {
        await this.client.query('SELECT 1');
      } else {
        const r = await this.client.query<{ ok: boolean }>('SELECT pg_try_advisory_lock($1) AS ok', [LEADER_LOCK]);
        if (r.rows[0]?.ok) this.set(true);
      }
    } catch {
      this.drop();
    } finally {
      this.busy = false;
      this.schedule();
    }
  }

  /** Steps down (the lock goes with the session) and stops trying. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    const c = this.client;
    this.client = null;
    this.set(false);
    if (c) await c.end().catch(() => {});
  }
}
