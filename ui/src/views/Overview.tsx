import { useMemo } from 'preact/hooks';
import type uPlot from 'uplot';
import { Chart, ErrorNote, Panel, Stat } from '../components';
import { fmtMs } from '../format';
import { jobsHref } from '../hooks';
import { series, useMetrics } from '../store';
import { JOB_STATES, type JobState } from '../types';

/**
 * Counts by state and model: queued, loading and working are the `foreman_jobs` gauge (read from
 * the database at each scrape); done, failed and canceled are `foreman_jobs_finished_total`
 * (since the server started).
 */
export function Overview() {
  const { metrics, error, history } = useMetrics();

  const table = useMemo(() => {
    if (!metrics) return null;
    const counts = new Map<string, Record<JobState, number>>();
    const row = (model: string) => {
      let r = counts.get(model);
      if (!r) counts.set(model, (r = { queued: 0, loading: 0, working: 0, done: 0, failed: 0, canceled: 0 }));
      return r;
    };
    for (const s of metrics.samples('foreman_jobs_submitted_total')) row(s.labels.model ?? '');
    for (const s of metrics.samples('foreman_jobs')) {
      const st = s.labels.state as JobState;
      if (JOB_STATES.includes(st)) row(s.labels.model ?? '')[st] += s.value;
    }
    for (const s of metrics.samples('foreman_jobs_finished_total')) {
      const st = s.labels.state as JobState;
      if (JOB_STATES.includes(st)) row(s.labels.model ?? '')[st] += s.value;
    }
    const models = [...counts.keys()].sort();
    const total: Record<JobState, number> = { queued: 0, loading: 0, working: 0, done: 0, failed: 0, canceled: 0 };
    for (const r of counts.values()) for (const st of JOB_STATES) total[st] += r[st];
    return { models, counts, total };
  }, [metrics]);

  const s = useMemo(() => series(history), [history]);
  const throughput: uPlot.AlignedData = [s.t, s.done, s.failed];
  const queue: uPlot.AlignedData = [s.t, s.wait, s.queued];

  const waitAll = metrics ? metrics.sum('foreman_job_queue_wait_seconds_sum') / Math.max(1, metrics.sum('foreman_job_queue_wait_seconds_count')) : null;
  const total = table?.total;
  return (
    <div class="view" data-testid="view-overview">
      <ErrorNote error={error} />
      <div class="stats">
        <Stat label="queued" value={total ? total.queued : '…'} testid="stat-queued" />
        <Stat label="running" value={total ? total.loading + total.working : '…'} tone="info" testid="stat-running" />
        <Stat label="done since start" value={total ? total.done : '…'} tone="ok" testid="stat-done" />
        <Stat label="failed since start" value={total ? total.failed : '…'} tone={total?.failed ? 'bad' : ''} testid="stat-failed" />
        <Stat label="canceled since start" value={total ? total.canceled : '…'} testid="stat-canceled" />
        <Stat label="mean queue wait" value={metrics && metrics.sum('foreman_job_queue_wait_seconds_count') > 0 ? fmtMs((waitAll ?? 0) * 1000) : '—'} />
        <Stat label="webhooks pending" value={metrics ? metrics.sum('foreman_webhook_deliveries_pending') : '…'} tone={metrics?.sum('foreman_webhook_deliveries_pending') ? 'warn' : ''} />
      </div>

      <Panel title="Jobs by model and state" testid="counts">
        {table && table.models.length === 0 && <p class="muted">No jobs yet.</p>}
        {table && table.models.length > 0 && (
          <table class="grid counts">
            <thead>
              <tr>
                <th>model</th>
                {JOB_STATES.map((st) => (
                  <th class={`num state-col-${st}`}>{st}</th>
                ))}
              </tr>
            </thead>
            <tbody>
              {table.models.map((m) => (
                <tr>
                  <td>
                    <a href={jobsHref({ model: m })}>{m || '(none)'}</a>
                  </td>
                  {JOB_STATES.map((st) => {
                    const n = table.counts.get(m)![st];
                    return (
                      <td class={`num ${n === 0 ? 'zero' : ''}`}>
                        <a href={jobsHref({ model: m, state: st })} data-testid="count" data-model={m} data-state={st}>
                          {n}
                        </a>
                      </td>
                    );
                  })}
                </tr>
              ))}
            </tbody>
            <tfoot>
              <tr>
                <th>all models</th>
                {JOB_STATES.map((st) => (
                  <th class="num">
                    <a href={jobsHref({ state: st })} data-testid="count-total" data-state={st}>
                      {table.total[st]}
                    </a>
                  </th>
                ))}
              </tr>
            </tfoot>
          </table>
        )}
        <p class="note">Queued, loading and working are read from the database at each refresh; done, failed and canceled are counted since the server started.</p>
      </Panel>

      <div class="two">
        <Panel title="Throughput (jobs finished per minute)">
          <Chart
            data={throughput}
            series={[
              { label: 'done', color: '#2f9e6e' },
              { label: 'failed', color: '#d64545' },
            ]}
            axes={[{ scale: 'y', label: 'jobs/min' }]}
          />
        </Panel>
        <Panel title="Queue (mean wait and depth)">
          <Chart
            data={queue}
            series={[
              { label: 'mean wait (s)', color: '#3b6fd4', scale: 's' },
              { label: 'queued', color: '#c98a12', scale: 'n', stepped: true },
            ]}
            axes={[
              { scale: 's', label: 'seconds' },
              { scale: 'n', label: 'queued', side: 1 },
            ]}
          />
        </Panel>
      </div>
      <p class="note">Charts: one point per 10 s over the last hour, from GET /metrics while this page is open.</p>
    </div>
  );
}
