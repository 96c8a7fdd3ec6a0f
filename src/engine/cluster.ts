import type { Logger } from 'pino';
import type { Clock } from '../domain.js';
import type { InstanceEngineView, ModelEntry, QueueDriver } from '../queue/driver.js';
import { byModel, mergeModels, modelNames, type EnginePool } from './pool.js';

/** How often an instance refreshes its engine view in the database. */
export const ENGINE_VIEW_REFRESH_MS = 5_000;
/** Views are deleted once older than this (and than the grace), whoever writes next. */
const DELETE_AFTER_MS = 24 * 3600_000;

/** Another instance's view as the policies count it: `stale` when it is no longer refreshed. */
type Counted = InstanceEngineView & { stale: boolean };

/**
 * Every instance's engine hosts, for the leader's routing and outage policies (ADR-0011, "Engine
 * hosts per instance"). Instances may list different hosts, so the leader may not judge by its
 * own pool alone: a model none of its hosts has may be on another instance's, and another
 * instance's hosts may answer while its own are out. Each instance keeps its pool's view in the
 * database: once its hosts have been probed at start, whenever the view changes, and every
 * `refreshMs`.
 *
 * A view refreshed within three refreshes and a second is the instance's word. One older than
 * that is an instance that stopped or died, taken as hosts that are down and may come back with
 * what they had: jobs for its models wait (as for a host of our own that is down), and its
 * outage counts from when it was last seen. After `graceMs` more (the outage timeout) it no
 * longer counts. A restart, or a rolling deploy, therefore fails nothing.
 *
 * With a driver that is not shared (SQLite) there are no other instances: nothing is written, and
 * the questions below answer for this instance alone.
 */
export class ClusterEngines {
  private timer: NodeJS.Timeout | null = null;
  private offChange: (() => void) | null = null;
  /** The write in flight, and whether another is due after it (writes never overlap). */
  private writing: Promise<void> | null = null;
  private again = false;
  private stopped = false;
  private readonly refreshMs: number;
  private readonly freshMs: number;
  /** This instance's hosts (they do not change). */
  private readonly ownHosts: { name: string; slots: number }[];
  /**
   * Jobs the cluster's hosts run at once, for the queue's ETA: the slots of every host of this
   * instance and of the other live ones (a host several list counts once, by name), so every
   * instance gives the same estimate. Counted again at each refresh.
   */
  slots: number;
  /** The other instances' views as last read (at each refresh), for the model listings. */
  private otherViews: InstanceEngineView[] = [];

  constructor(
    private readonly deps: { driver: QueueDriver; instanceId: string; pool: EnginePool; clock: Clock; logger: Logger; graceMs: number; refreshMs?: number },
  ) {
    this.refreshMs = deps.refreshMs ?? ENGINE_VIEW_REFRESH_MS;
    this.freshMs = 3 * this.refreshMs + 1_000;
    this.ownHosts = deps.pool.view().hosts;
    this.slots = this.countSlots([]);
  }

  private countSlots(otherHosts: { name: string; slots: number }[]): number {
    const seen = new Map<string, number>();
    for (const h of [...this.ownHosts, ...otherHosts]) if (!seen.has(h.name)) seen.set(h.name, h.slots);
    let n = 0;
    for (const slots of seen.values()) n += slots;
    return n;
  }

  private get shared(): boolean {
    return this.deps.driver.instanceEnginesPut !== undefined;
  }

  /** Puts this instance's view now (its hosts probed once), then keeps it fresh. */
  async start(): Promise<void> {
    if (!this.shared) return;
    this.offChange = this.deps.pool.onViewChange(() => void this.put());
    this.timer = setInterval(() => void this.put(), this.refreshMs);
    this.timer.unref();
    try {
      await this.put(true);
    } catch (err) {
      await this.stop();
      throw err;
    }
  }

  /**
   * Stops refreshing. The view stays: it ages into "down, may come back" (a restart fails
   * nothing), and out of the leader's sight after the grace.
   */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    if (this.timer) clearInterval(this.timer);
    this.offChange?.();
    await this.writing?.catch(() => {});
  }

  /** One write at a time; a change during a write is written after it. `strict`: a failure throws. */
  private put(strict = false): Promise<void> {
    if (this.stopped) return Promise.resolve();
    if (this.writing) {
      this.again = true;
      return this.writing;
    }
    const { driver, pool, clock, logger, graceMs } = this.deps;
    this.writing = (async () => {
      try {
        do {
          this.again = false;
          const now = clock.now();
          const { others } = await driver.instanceEnginesPut!({
            now,
            view: pool.view(),
            deleteBefore: now - Math.max(DELETE_AFTER_MS, this.freshMs + graceMs),
            freshSince: now - this.freshMs,
          });
          try {
            const views = others === 0 ? [] : await this.others();
            this.otherViews = views;
            this.slots = this.countSlots(views.filter((v) => !v.stale).flatMap((v) => v.hosts));
          } catch (err) {
            logger.warn({ err }, "could not read the other instances' engine views; the next refresh tries again");
          }
        } while (this.again && !this.stopped);
      } catch (err) {
        if (strict) throw err;
        logger.warn({ err }, 'could not store the engine view; the next refresh tries again');
      } finally {
        this.writing = null;
      }
    })();
    return this.writing;
  }

  /** The other instances' views that still count, those not refreshed lately as down since last seen. */
  private async others(): Promise<Counted[]> {
    const { driver, clock, graceMs } = this.deps;
    if (!driver.instanceEnginesList) return [];
    const now = clock.now();
    const views = await driver.instanceEnginesList({ now, maxAgeMs: this.freshMs + graceMs });
    return views.map((v) =>
      now - v.seenAt <= this.freshMs ? { ...v, stale: false } : { ...v, downSince: v.downSince ?? v.seenAt, stale: true },
    );
  }

  /**
   * What the cluster's answering hosts have installed (`GET /api/tags`, `/v1/models`), the same
   * from every instance: this instance's answering hosts' models, then those of the other live
   * instances as read at the last refresh, merged by name. `answering`: some host of the cluster
   * answers. No database read per call.
   */
  installed(): { answering: boolean; models: ModelEntry[] } {
    const { pool, clock, instanceId } = this.deps;
    const now = clock.now();
    // A view no longer refreshed is a stopped or dead instance: its hosts answer nobody.
    const others = this.otherViews.filter((v) => now - v.seenAt <= this.freshMs);
    const own = pool.tags().models;
    const answering = pool.hosts.some((h) => h.usable) || others.some((v) => v.downSince === null);
    if (others.length === 0) return { answering, models: own }; // alone: as the hosts list them
    // The same from every instance: each list by name (as views are written), the lists by
    // instance id, so where two instances' hosts list a model differently all answer with one entry.
    const views = [{ instance: instanceId, tags: own.sort(byModel) }, ...others];
    views.sort((a, b) => (a.instance < b.instance ? -1 : a.instance > b.instance ? 1 : 0));
    return { answering, models: mergeModels(views.map((v) => v.tags)) };
  }

  /**
   * Whether another instance may run `model`: one of its hosts has it or lists no models, or (a
   * live instance) one of its hosts is not answering and may have it. The job then waits, as it
   * does for a host of our own that is down. An instance no longer seen counts for what it had.
   */
  async elsewhereMayRun(model: string): Promise<boolean> {
    const names = modelNames(model);
    return (await this.others()).some(
      (v) => v.anyModel || names.some((n) => v.models.includes(n)) || (!v.allUp && !v.stale),
    );
  }

  /**
   * Since when no instance has had an engine host answering, given that this instance's have all
   * been down since `localSince`; null while another instance's are not all down.
   */
  async outageSince(localSince: number): Promise<number | null> {
    let since = localSince;
    for (const v of await this.others()) {
      if (v.downSince === null) return null;
      since = Math.max(since, v.downSince);
    }
    return since;
  }
}
