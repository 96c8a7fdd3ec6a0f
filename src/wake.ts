/**
 * A wake-up latch for a loop: `notify()` wakes the current (or next) `wait()`; `wait(ms)`
 * also returns after a timeout. Several notifies before a wait collapse into one wake-up.
 */
export class Wake {
  private pending = false;
  private resolve: (() => void) | null = null;
  private timer: NodeJS.Timeout | null = null;

  notify = (): void => {
    if (this.resolve) {
      const r = this.resolve;
      this.clear();
      r();
    } else {
      this.pending = true;
    }
  };

  wait(ms: number): Promise<void> {
    if (this.pending) {
      this.pending = false;
      return Promise.resolve();
    }
    return new Promise<void>((resolve) => {
      this.resolve = resolve;
      this.timer = setTimeout(() => {
        this.clear();
        resolve();
      }, Math.max(0, ms));
    });
  }

  private clear() {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.resolve = null;
  }
}
