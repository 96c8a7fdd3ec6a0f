/** A small reader of the Prometheus text exposition format (what GET /metrics serves). */
export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

function unescape(v: string): string {
  return v.replace(/\\(.)/g, (_m, c: string) => (c === 'n' ? '\n' : c));
}

function number(v: string): number {
  if (v === '+Inf') return Infinity;
  if (v === '-Inf') return -Infinity;
  return Number(v);
}

export class Metrics {
  private readonly byName = new Map<string, Sample[]>();

  constructor(text: string) {
    for (const line of text.split('\n')) {
      if (line === '' || line.startsWith('#')) continue;
      const m = LINE.exec(line);
      if (!m) continue;
      const labels: Record<string, string> = {};
      for (const l of (m[2] ?? '').matchAll(LABEL)) labels[l[1]!] = unescape(l[2]!);
      const s: Sample = { name: m[1]!, labels, value: number(m[3]!) };
      const list = this.byName.get(s.name);
      if (list) list.push(s);
      else this.byName.set(s.name, [s]);
    }
  }

  samples(name: string): Sample[] {
    return this.byName.get(name) ?? [];
  }

  /** The sum of the samples whose labels include `match`. */
  sum(name: string, match: Record<string, string> = {}): number {
    let total = 0;
    for (const s of this.samples(name)) {
      if (Object.entries(match).every(([k, v]) => s.labels[k] === v)) total += s.value;
    }
    return total;
  }

  /** Sums grouped by one label's value. */
  sumBy(name: string, label: string, match: Record<string, string> = {}): Map<string, number> {
    const out = new Map<string, number>();
    for (const s of this.samples(name)) {
      if (!Object.entries(match).every(([k, v]) => s.labels[k] === v)) continue;
      const key = s.labels[label] ?? '';
      out.set(key, (out.get(key) ?? 0) + s.value);
    }
    return out;
  }

  has(name: string): boolean {
    return this.byName.has(name);
  }
}
