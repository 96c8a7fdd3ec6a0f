import { ErrorNote, Panel, Stat } from '../components';
import { fmtMs, shortId } from '../format';
import { jobHref, usePoll } from '../hooks';
import { SCAN_JOBS, scanReceivers } from '../receivers';
import { useMetrics } from '../store';

export function Receivers() {
  const { metrics } = useMetrics();
  const scan = usePoll((signal) => scanReceivers(signal), 5000, []);
  const byOutcome = metrics?.sumBy('foreman_webhook_deliveries_total', 'outcome');
  // A counter has no sample until its first increment: then it is 0.
  const outcomes = byOutcome && { get: (o: string) => byOutcome.get(o) ?? 0 };
  const failing = scan.data?.rows.filter((r) => r.failed + r.retrying > 0) ?? [];
  const healthy = scan.data?.rows.filter((r) => r.failed + r.retrying === 0) ?? [];
  return (
    <div class="view" data-testid="view-receivers">
      <div class="stats">
        <Stat label="delivered since start" value={outcomes?.get('delivered') ?? '…'} tone="ok" />
        <Stat label="retried attempts" value={outcomes?.get('retried') ?? '…'} tone={outcomes?.get('retried') ? 'warn' : ''} />
        <Stat label="given up" value={outcomes?.get('failed') ?? '…'} tone={outcomes?.get('failed') ? 'bad' : ''} />
        <Stat label="410 gone" value={outcomes?.get('gone') ?? '…'} />
        <Stat label="pending" value={metrics ? metrics.sum('foreman_webhook_deliveries_pending') : '…'} />
        <Stat label="oldest pending" value={metrics ? fmtMs(metrics.sum('foreman_webhook_oldest_pending_age_seconds') * 1000) : '…'} />
      </div>
      <ErrorNote error={scan.error} />
      <Panel title="Failing receivers" testid="failing-receivers">
        {scan.data && failing.length === 0 && <p class="muted">No failing receivers among the last {scan.data.scanned} jobs.</p>}
        {failing.length > 0 && (
          <table class="grid">
            <thead>
              <tr>
                <th>receiver</th>
                <th class="num">jobs</th>
                <th class="num">failed events</th>
                <th class="num">retrying</th>
                <th class="num">delivered</th>
                <th class="num">last status</th>
                <th>last error</th>
                <th>jobs affected</th>
              </tr>
            </thead>
            <tbody>
              {failing.map((r) => (
                <tr data-testid="failing-receiver">
                  <td class="mono wrap">{r.receiver}</td>
                  <td class="num">{r.jobs}</td>
                  <td class="num bad-text">{r.failed}</td>
                  <td class="num warn-text">{r.retrying}</td>
                  <td class="num">{r.delivered}</td>
                  <td class="num">{r.lastStatus ?? '—'}</td>
                  <td class="wrap">{r.lastError ?? '—'}</td>
                  <td class="wrap">
                    {r.failingJobs.slice(0, 5).map((id) => (
                      <a class="chip mono" href={jobHref(id)} title={id}>
                        {shortId(id)}
                      </a>
                    ))}
                    {r.failingJobs.length > 5 && <span class="muted"> +{r.failingJobs.length - 5}</span>}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        )}
        <p class="note">From the webhook deliveries of the {SCAN_JOBS} most recent jobs. Failed: given up after every attempt; retrying: failed at least once, another attempt is scheduled.</p>
      </Panel>
      {healthy.length > 0 && (
        <Panel title="Healthy receivers">
          <table class="grid">
            <thead>
              <tr>
                <th>receiver</th>
                <th class="num">jobs</th>
                <th class="num">delivered events</th>
              </tr>
            </thead>
            <tbody>
              {healthy.map((r) => (
                <tr>
                  <td class="mono">{r.receiver}</td>
                  <td class="num">{r.jobs}</td>
                  <td class="num">{r.delivered}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </Panel>
      )}
    </div>
  );
}
