import type { ComponentChildren } from 'preact';
import { useEffect, useRef, useState } from 'preact/hooks';
import uPlot from 'uplot';
import type { JobState } from './types';

export function StateBadge({ state }: { state: JobState | string }) {
  return <span class={`badge state-${state}`}>{state}</span>;
}

export function Panel({ title, children, actions, testid }: { title: ComponentChildren; children: ComponentChildren; actions?: ComponentChildren; testid?: string }) {
  return (
    <section class="panel" data-testid={testid}>
      <header class="panel-head">
        <h2>{title}</h2>
        {actions && <div class="actions">{actions}</div>}
      </header>
      {children}
    </section>
  );
}

export function ErrorNote({ error }: { error: Error | null | undefined }) {
  if (!error) return null;
  return (
    <p class="error" role="alert">
      {error.message}
    </p>
  );
}

export function Stat({ label, value, tone, testid }: { label: string; value: ComponentChildren; tone?: string; testid?: string }) {
  return (
    <div class={`stat ${tone ?? ''}`} data-testid={testid}>
      <div class="stat-value">{value}</div>
      <div class="stat-label">{label}</div>
    </div>
  );
}

export interface ChartSeries {
  label: string;
  color: string;
  scale?: string;
  /** Stepped bars-like line for gauges. */
  stepped?: boolean;
}

/** A uPlot time-series chart that follows its container's width. */
export function Chart({ data, series, axes, height = 200 }: { data: uPlot.AlignedData; series: ChartSeries[]; axes: { scale: string; label: string; side?: 1 | 3 }[]; height?: number }) {
  const box = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const [width, setWidth] = useState(0);

  useEffect(() => {
    const el = box.current;
    if (!el) return;
    const ro = new ResizeObserver(() => setWidth(el.clientWidth));
    ro.observe(el);
    setWidth(el.clientWidth);
    return () => ro.disconnect();
  }, []);

  useEffect(() => {
    const el = box.current;
    if (!el || width === 0) return;
    const opts: uPlot.Options = {
      width,
      height,
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true } },
      series: [
        {},
        ...series.map(
          (s): uPlot.Series => ({
            label: s.label,
            stroke: s.color,
            width: 2,
            fill: `${s.color}22`,
            scale: s.scale ?? 'y',
            spanGaps: false,
            points: { show: false },
            ...(s.stepped ? { paths: uPlot.paths.stepped!({ align: 1 }) } : {}),
          }),
        ),
      ],
      axes: [
        { stroke: '#5b6472', grid: { stroke: '#eceff3' }, ticks: { stroke: '#eceff3' } },
        ...axes.map(
          (a): uPlot.Axis => ({
            scale: a.scale,
            label: a.label,
            side: a.side ?? 3,
            stroke: '#5b6472',
            grid: { show: a.side !== 1, stroke: '#eceff3' },
            ticks: { stroke: '#eceff3' },
            size: 50,
          }),
        ),
      ],
    };
    plot.current = new uPlot(opts, data, el);
    return () => {
      plot.current?.destroy();
      plot.current = null;
    };
    // The chart is rebuilt when its shape changes; data updates go through setData below.
  }, [width, height, series.length]);

  useEffect(() => {
    plot.current?.setData(data);
  }, [data]);

  const points = data[0].length;
  return (
    <div class="chart-wrap">
      <div class="chart" ref={box} />
      {points < 2 && <div class="chart-empty">Collecting data: a point every 10 s while this page is open.</div>}
    </div>
  );
}

/** A button that asks for confirmation inline (no browser dialog) before running `onConfirm`. */
export function ConfirmButton({ label, confirm, onConfirm, disabled, testid, tone }: { label: string; confirm: string; onConfirm: () => Promise<void>; disabled?: boolean; testid: string; tone?: string }) {
  const [asking, setAsking] = useState(false);
  const [busy, setBusy] = useState(false);
  if (!asking) {
    return (
      <button class={`btn ${tone ?? ''}`} data-testid={testid} disabled={disabled || busy} onClick={() => setAsking(true)}>
        {label}
      </button>
    );
  }
  return (
    <span class="confirm">
      <span>{confirm}</span>
      <button
        class={`btn ${tone ?? ''}`}
        data-testid={`${testid}-yes`}
        disabled={busy}
        onClick={async () => {
          setBusy(true);
          try {
            await onConfirm();
          } finally {
            setBusy(false);
            setAsking(false);
          }
        }}
      >
        Yes
      </button>
      <button class="btn ghost" data-testid={`${testid}-no`} onClick={() => setAsking(false)}>
        No
      </button>
    </span>
  );
}

/** The API key dialog, shown when a request is answered 401 (see api.ts). */
export function KeyPrompt({ reason, onDone }: { reason: 'missing' | 'rejected'; onDone: (key: string | null) => void }) {
  const [key, setKey] = useState('');
  const input = useRef<HTMLInputElement>(null);
  useEffect(() => input.current?.focus(), []);
  return (
    <div class="modal-backdrop">
      <form
        class="modal"
        data-testid="key-prompt"
        onSubmit={(e) => {
          e.preventDefault();
          onDone(key.trim() || null);
        }}
      >
        <h2>API key</h2>
        <p>{reason === 'rejected' ? 'The server refused the stored key. Enter another one.' : 'This server needs an API key.'}</p>
        <p class="muted">It is kept in this tab only (sessionStorage) and sent as Authorization: Bearer.</p>
        <input ref={input} type="password" autocomplete="off" placeholder="API key" value={key} onInput={(e) => setKey(e.currentTarget.value)} data-testid="key-input" />
        <div class="modal-actions">
          <button type="button" class="btn ghost" onClick={() => onDone(null)}>
            Cancel
          </button>
          <button type="submit" class="btn primary" disabled={key.trim() === ''}>
            Use key
          </button>
        </div>
      </form>
    </div>
  );
}
