/** Display helpers. */
export function fmtTime(iso: string | null | undefined): string {
  if (!iso) return '—';
  const d = new Date(iso);
  const today = new Date().toDateString() === d.toDateString();
  const time = d.toLocaleTimeString(undefined, { hour12: false });
  return today ? time : `${d.toLocaleDateString()} ${time}`;
}

export function fmtMs(ms: number | null | undefined): string {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return '—';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function ago(iso: string | null | undefined, now = Date.now()): string {
  if (!iso) return '—';
  const ms = now - new Date(iso).getTime();
  const whole = (v: number) => (v < 60_000 ? `${Math.round(v / 1000)} s` : fmtMs(v));
  if (ms < -500) return `in ${whole(-ms)}`;
  if (ms < 1000) return 'just now';
  return `${whole(ms)} ago`;
}

export function fmtBytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

/** Job ids are UUIDv7: the leading digits are the time, so the tail tells jobs apart. */
export const shortId = (id: string): string => (id.length > 13 ? `…${id.slice(-12)}` : id);

/** The text of an Ollama chat result (`result.message.content`), or null. */
export function resultText(result: unknown): { content: string; thinking: string } | null {
  if (result === null || typeof result !== 'object') return null;
  const m = (result as { message?: { content?: unknown; thinking?: unknown } }).message;
  if (!m) return null;
  return { content: typeof m.content === 'string' ? m.content : '', thinking: typeof m.thinking === 'string' ? m.thinking : '' };
}
