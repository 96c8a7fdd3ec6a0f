import { useRef } from 'preact/hooks';
import { ErrorNote, Panel } from '../components';
import { type EngineHost, loadHosts } from '../engines';
import { ago, fmtBytes, fmtMs } from '../format';
import { useNow, usePoll } from '../hooks';
import { useMetrics } from '../store';

export function Engines() {
  const { metrics } = useMetrics();
  const latest = useRef(metrics);
  latest.current = metrics;
  const hosts = usePoll((signal) => loadHosts(latest.current, signal), 3000, [metrics === null]);
  return (
    <div class="view" data-testid="view-engines">
      <ErrorNote error={hosts.error} />
      {hosts.data?.map((h) => (
        <HostCard host={h} />
      ))}
      {!hosts.data && !hosts.error && <p class="muted">Loading…</p>}
    </div>
  );
}

function HostCard({ host: h }: { host: EngineHost }) {
  const now = useNow();
  const pct = h.slots.total ? Math.min(100, (h.slots.busy / h.slots.total) * 100) : 0;
  return (
    <Panel
      testid="engine-host"
      title={
        <>
          <span class={`dot ${h.status}`} /> {h.address}
        </>
      }
      actions={<span class={`badge engine-${h.status}`}>{h.status}</span>}
    >
      <div class="host-top">
        <div>
          <div class="muted">version</div>
          <div>{h.version ?? '—'}</div>
        </div>
        <div class="slots">
          <div class="muted">slots busy</div>
          <div data-testid="engine-slots">
            {h.slots.busy} / {h.slots.total ?? '?'}
          </div>
          <div class="bar">
            <div class="bar-fill" style={{ width: `${pct}%` }} />
          </div>
        </div>
        {h.error && <p class="error">{h.error}</p>}
      </div>
      <div class="three">
        <div>
          <h3>Resident models</h3>
          {h.resident.length === 0 ? (
            <p class="muted">None loaded.</p>
          ) : (
            <table class="grid">
              <thead>
                <tr>
                  <th>model</th>
                  <th class="num">VRAM</th>
                  <th class="num">context</th>
                  <th>unloads</th>
                </tr>
              </thead>
              <tbody>
                {h.resident.map((m) => (
                  <tr data-testid="resident-model">
                    <td>{m.name}</td>
                    <td class="num">{fmtBytes(m.vram ?? m.size)}</td>
                    <td class="num">{m.context ?? '—'}</td>
                    <td>{m.expiresAt ? ago(m.expiresAt, now) : '—'}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          )}
        </div>
        <div>
          <h3>Load times</h3>
          {h.loads.length === 0 ? (
            <p class="muted">No loads measured since the server started.</p>
          ) : (
            <table class="grid">
              <thead>
                <tr>
                  <th>model</th>
                  <th class="num">mean load</th>
                  <th class="num">loads</th>
                </tr>
              </thead>
              <tbody>
                {h.loads.map((l) => (
                  <tr>
                    <td>{l.model}</td>
                    <td class="num">{fmtMs(l.meanMs)}</td>
                    <td class="num">{l.count}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          )}
        </div>
        <div>
          <h3>Installed models</h3>
          {h.installed.length === 0 ? (
            <p class="muted">None listed.</p>
          ) : (
            <table class="grid">
              <thead>
                <tr>
                  <th>model</th>
                  <th class="num">size</th>
                  <th>params</th>
                  <th>quant</th>
                </tr>
              </thead>
              <tbody>
                {h.installed.map((m) => (
                  <tr>
                    <td>{m.name}</td>
                    <td class="num">{fmtBytes(m.size)}</td>
                    <td>{m.parameters ?? '—'}</td>
                    <td>{m.quantization ?? '—'}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          )}
        </div>
      </div>
    </Panel>
  );
}
